"""U-Net, R2U-Net, Attention U-Net and R2AttU-Net as built by LeeJunHyun/Image_Segmentation (ISIC 2018).

Papers:
    - U-Net: Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
      Segmentation", MICCAI 2015.
    - R2U-Net: Alom, Hasan, Yakopcic, Taha, Asari, "Recurrent Residual Convolutional Neural Network based
      on U-Net (R2U-Net) for Medical Image Segmentation", arXiv:1802.06955, 2018.
    - Attention U-Net: Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas",
      MIDL 2018 (arXiv:1804.03999).

The networks reproduce the reference implementation (network.py @ db34de2) layer for layer: the same
attribute names and Sequential indices give the same `state_dict` keys, so the reference's `.pkl`
checkpoints load with `strict=True` and give the same outputs, and with the same seed the same initial
weights (modules are created in the reference's order). Parameter counts at img_ch=3, output_ch=1:
U_Net 34,527,041; R2U_Net 39,091,393; AttU_Net 34,878,573; R2AttU_Net 39,442,925.

Deviations of the reference from the papers, kept on purpose because its checkpoints must keep working:
    - Attention gate: the gating signal g is the decoder feature *after* `up_conv`, so it already has the
      skip's spatial size. The paper gates with the coarser feature, uses a strided W_x and resamples the
      attention map; here W_x is a plain 1x1 conv and no resampling happens.
    - Recurrent block: y = f(x), then t times y = f(x + y), so the shared conv runs t + 1 times (3 for
      t=2), not t times as in the paper's unfolding.
    - Upsampling is nearest-neighbour x2 followed by a 3x3 conv + BN + ReLU, not a transposed conv;
      convolutions are "same"-padded, so no cropping and the output has the input's size.
    - The networks return logits; apply the sigmoid (or use BCEWithLogits) outside.

Class, attribute and argument names keep the reference's spelling (`conv_block`, `F_g`, ...), since they
are what its users and checkpoints know.

Additions: inputs are checked (4-D, H and W divisible by 16) with an error naming the padded size, and
constructor arguments are validated. `R2U_Net`/`R2AttU_Net` keep the reference's unused, parameter-free
`Upsample` attribute so that module listings match.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from common.networks.input_checks import check_divisible_input
from common.registry import register_model

__all__ = [
    "conv_block",
    "up_conv",
    "Recurrent_block",
    "RRCNN_block",
    "Attention_block",
    "U_Net",
    "R2U_Net",
    "AttU_Net",
    "R2AttU_Net",
]

FAMILY = "isic"
WIDTHS = (64, 128, 256, 512, 1024)
# Four 2x max-poolings between the five levels.
SIZE_DIVISOR = 2 ** (len(WIDTHS) - 1)


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=True),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def _conv1x1_bn(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, padding=0, bias=True), nn.BatchNorm2d(out_ch)]


def _check_channels(**channels: int) -> None:
    for arg, value in channels.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


def _check_t(t: int) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t (recurrent steps) must be an integer >= 1, got {t!r}")


# --------------------------------------------------------------------------------------------- blocks


class conv_block(nn.Module):
    """Two rounds of 3x3 conv -> BN -> ReLU (in_ch -> out_ch -> out_ch); keys `conv.{0,1,3,4}.*`."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        _check_channels(ch_in=ch_in, ch_out=ch_out)
        self.conv = nn.Sequential(*_conv_bn_relu(ch_in, ch_out), *_conv_bn_relu(ch_out, ch_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class up_conv(nn.Module):
    """Nearest-neighbour x2 upsampling, then 3x3 conv -> BN -> ReLU; keys `up.{1,2}.*`."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        _check_channels(ch_in=ch_in, ch_out=ch_out)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), *_conv_bn_relu(ch_in, ch_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class Recurrent_block(nn.Module):
    """Recurrent convolution (Alom et al. 2018) with one shared 3x3 conv -> BN -> ReLU, `f`.

    Computes y = f(x), then t times y = f(x + y): `f` runs t + 1 times (see the module docstring).
    """

    def __init__(self, ch_out: int, t: int = 2):
        super().__init__()
        _check_channels(ch_out=ch_out)
        _check_t(t)
        self.t = t
        self.ch_out = ch_out
        self.conv = nn.Sequential(*_conv_bn_relu(ch_out, ch_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for _ in range(self.t):
            y = self.conv(x + y)
        return y


class RRCNN_block(nn.Module):
    """Recurrent residual unit: x0 = Conv1x1(x) (no BN/ReLU), output x0 + R2(R1(x0)).

    R1 and R2 are two `Recurrent_block`s with their own weights; keys `Conv_1x1.*` and `RCNN.{0,1}.conv.*`.
    """

    def __init__(self, ch_in: int, ch_out: int, t: int = 2):
        super().__init__()
        _check_channels(ch_in=ch_in, ch_out=ch_out)
        # Created before Conv_1x1, as in the reference, so that seeded initial weights coincide.
        self.RCNN = nn.Sequential(Recurrent_block(ch_out, t=t), Recurrent_block(ch_out, t=t))
        self.Conv_1x1 = nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.Conv_1x1(x)
        return x0 + self.RCNN(x0)


class Attention_block(nn.Module):
    """Additive attention gate (Oktay et al. 2018) as in the reference: returns x * psi.

    psi = sigmoid(BN(Conv1x1(ReLU(BN(Conv1x1(g)) + BN(Conv1x1(x)))))) is a one-channel map; g (the
    gating signal, taken after upsampling) and x (the skip) have the same spatial size.

    Args:
        F_g: channels of the gating signal g.
        F_l: channels of the skip connection x.
        F_int: channels of the intermediate (joint) space.
    """

    def __init__(self, F_g: int, F_l: int, F_int: int):
        super().__init__()
        _check_channels(F_g=F_g, F_l=F_l, F_int=F_int)
        self.W_g = nn.Sequential(*_conv1x1_bn(F_g, F_int))
        self.W_x = nn.Sequential(*_conv1x1_bn(F_l, F_int))
        self.psi = nn.Sequential(*_conv1x1_bn(F_int, 1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The in-place ReLU acts on the fresh sum, never on g or x.
        psi = self.psi(self.relu(self.W_g(g) + self.W_x(x)))
        return x * psi


# ------------------------------------------------------------------------------------------- networks


class _FiveLevelUNet(nn.Module):
    """The shared encoder-decoder of the four networks; subclasses choose the block and the gates.

    Attribute names are `<encoder_prefix>1..5`, `Up5..Up2`, `Att5..Att2` (with attention) and
    `<decoder_prefix>5..2`, created in the reference's order.
    """

    def __init__(
        self,
        img_ch: int,
        output_ch: int,
        block: Callable[[int, int], nn.Module],
        encoder_prefix: str,
        decoder_prefix: str,
        attention: bool,
        legacy_upsample: bool = False,
    ):
        super().__init__()
        _check_channels(img_ch=img_ch, output_ch=output_ch)
        self.img_ch = img_ch
        self.output_ch = output_ch
        self.Maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
        if legacy_upsample:
            self.Upsample = nn.Upsample(scale_factor=2)  # unused; present in the reference R2 models

        self._encoder_names = tuple(f"{encoder_prefix}{level}" for level in range(1, len(WIDTHS) + 1))
        in_ch = img_ch
        for name, width in zip(self._encoder_names, WIDTHS):
            setattr(self, name, block(in_ch, width))
            in_ch = width

        # Decoder level n (5..2) maps WIDTHS[n-1] -> WIDTHS[n-2]; the skip has WIDTHS[n-2] channels too.
        self._decoder_names: tuple[tuple[str, str | None, str], ...] = ()
        for level in range(len(WIDTHS), 1, -1):
            wide, narrow = WIDTHS[level - 1], WIDTHS[level - 2]
            names = (f"Up{level}", f"Att{level}" if attention else None, f"{decoder_prefix}{level}")
            setattr(self, names[0], up_conv(wide, narrow))
            if names[1] is not None:
                setattr(self, names[1], Attention_block(F_g=narrow, F_l=narrow, F_int=narrow // 2))
            setattr(self, names[2], block(wide, narrow))
            self._decoder_names += (names,)

        self.Conv_1x1 = nn.Conv2d(WIDTHS[0], output_ch, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible_input(x, SIZE_DIVISOR)
        skips: list[torch.Tensor] = []
        for level, name in enumerate(self._encoder_names):
            x = getattr(self, name)(self.Maxpool(x) if level else x)
            skips.append(x)

        d = skips.pop()
        for (up_name, att_name, block_name), skip in zip(self._decoder_names, reversed(skips)):
            d = getattr(self, up_name)(d)
            if att_name is not None:
                skip = getattr(self, att_name)(g=d, x=skip)
            d = getattr(self, block_name)(torch.cat((skip, d), dim=1))
        return self.Conv_1x1(d)


@register_model("U_Net", family=FAMILY)
class U_Net(_FiveLevelUNet):
    """U-Net (Ronneberger et al. 2015) as in LeeJunHyun/Image_Segmentation; returns logits.

    Widths 64-128-256-512-1024, `conv_block` at every level, nearest x2 upsampling + conv in the decoder,
    skip first in each concatenation. H and W of the input must be divisible by 16.

    Args:
        img_ch: input channels (>= 1).
        output_ch: output channels (>= 1); 1 for binary segmentation.

    Example:
        >>> model = U_Net(img_ch=3, output_ch=1)
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1, 64, 64])
    """

    def __init__(self, img_ch: int = 3, output_ch: int = 1):
        super().__init__(img_ch, output_ch, conv_block, "Conv", "Up_conv", attention=False)


@register_model("R2U_Net", family=FAMILY)
class R2U_Net(_FiveLevelUNet):
    """R2U-Net (Alom et al. 2018): U-Net with recurrent residual blocks (`RRCNN_block`); returns logits.

    H and W of the input must be divisible by 16.

    Args:
        img_ch: input channels (>= 1).
        output_ch: output channels (>= 1).
        t: recurrent steps (>= 1); each recurrent conv runs t + 1 times. The class default is 2, the
            reference's main.py passes 3. t does not change the parameter count.

    Example:
        >>> model = R2U_Net(img_ch=3, output_ch=1, t=2)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(self, img_ch: int = 3, output_ch: int = 1, t: int = 2):
        _check_t(t)
        block = partial(RRCNN_block, t=t)
        super().__init__(img_ch, output_ch, block, "RRCNN", "Up_RRCNN", attention=False, legacy_upsample=True)
        self.t = t


@register_model("AttU_Net", family=FAMILY)
class AttU_Net(_FiveLevelUNet):
    """Attention U-Net (Oktay et al. 2018) as in LeeJunHyun/Image_Segmentation; returns logits.

    U-Net whose skips pass through an `Attention_block` gated by the upsampled decoder feature
    (Att5..Att2 with F_int = 256, 128, 64, 32). H and W of the input must be divisible by 16.

    Args:
        img_ch: input channels (>= 1).
        output_ch: output channels (>= 1).

    Example:
        >>> model = AttU_Net(img_ch=3, output_ch=1)
        >>> model(torch.zeros(2, 3, 48, 64)).shape
        torch.Size([2, 1, 48, 64])
    """

    def __init__(self, img_ch: int = 3, output_ch: int = 1):
        super().__init__(img_ch, output_ch, conv_block, "Conv", "Up_conv", attention=True)


@register_model("R2AttU_Net", family=FAMILY)
class R2AttU_Net(_FiveLevelUNet):
    """R2U-Net with attention gates on the skips, as in LeeJunHyun/Image_Segmentation; returns logits.

    H and W of the input must be divisible by 16.

    Args:
        img_ch: input channels (>= 1).
        output_ch: output channels (>= 1).
        t: recurrent steps (>= 1); each recurrent conv runs t + 1 times.

    Example:
        >>> model = R2AttU_Net(img_ch=3, output_ch=1, t=2)
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(self, img_ch: int = 3, output_ch: int = 1, t: int = 2):
        _check_t(t)
        block = partial(RRCNN_block, t=t)
        super().__init__(img_ch, output_ch, block, "RRCNN", "Up_RRCNN", attention=True, legacy_upsample=True)
        self.t = t
