"""UNet and NestedUNet (UNet++) as built by 4uiiurz1/pytorch-nested-unet (DSB 2018 nuclei).

Papers:
    - U-Net: Ronneberger, Fischer, Brox, MICCAI 2015.
    - UNet++: Zhou, Rahman Siddiquee, Tajbakhsh, Liang, "UNet++: A Nested U-Net Architecture for Medical
      Image Segmentation", DLMIA 2018 (arXiv:1807.10165).

The networks reproduce the reference (archs.py @ 557ea02): node X^{i,j} is the module `conv{i}_{j}`
(a `VGGBlock`), widths 32-64-128-256-512, MaxPool2d(2) down, parameter-free bilinear x2 upsampling
(align_corners=True) up, skips first in every concatenation, 1x1 heads that return logits. Same attribute
names give the same `state_dict` keys (UNet 128, NestedUNet 212, with deep supervision 218), so the
reference's checkpoints load with `strict=True`; modules are created in the reference's order, so a
given seed gives the same initial weights. Parameters at 3 input channels and 1 class: UNet 7,852,545;
NestedUNet 9,163,329 (9,163,428 with deep supervision).

Differences from the reference:
    - `UNet` accepts `deep_supervision` (the reference's train.py passes it positionally and the
      reference UNet crashes with a TypeError); it has no deep-supervision heads, so True raises ValueError.
    - Inputs are checked (4-D, H and W divisible by 16) and constructor arguments are validated.
"""

from __future__ import annotations

import repo_path  # noqa: F401  (puts the monorepo root on sys.path for `common`)
import torch
from torch import nn

from common.networks.input_checks import check_divisible_input
from common.registry import register_model

__all__ = ["UNet", "NestedUNet"]

FAMILY = "nested_unet"
NB_FILTER = (32, 64, 128, 256, 512)
DEPTH = len(NB_FILTER) - 1
# DEPTH 2x max-poolings: each must halve H and W exactly for the skips to line up.
SIZE_DIVISOR = 2**DEPTH


def _check_args(num_classes: int, input_channels: int) -> None:
    for arg, value in (("num_classes", num_classes), ("input_channels", input_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")


class VGGBlock(nn.Module):
    """(3x3 conv -> BN -> ReLU) twice: in_channels -> middle_channels -> out_channels.

    Keys `conv1.*`, `bn1.*`, `conv2.*`, `bn2.*` (14 per block).
    """

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, middle_channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(middle_channels)
        self.conv2 = nn.Conv2d(middle_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class _NodeGrid(nn.Module):
    """Shared pieces: the encoder column X^{i,0}, pooling and upsampling, node naming and creation."""

    def __init__(self, input_channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        in_ch = input_channels
        for i, width in enumerate(NB_FILTER):
            self._add_node(i, 0, in_ch)
            in_ch = width

    def _add_node(self, i: int, j: int, in_channels: int) -> None:
        width = NB_FILTER[i]
        setattr(self, f"conv{i}_{j}", VGGBlock(in_channels, width, width))

    def _node(self, i: int, j: int, *inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        return getattr(self, f"conv{i}_{j}")(x)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """X^{0,0} .. X^{DEPTH,0}."""
        check_divisible_input(x, SIZE_DIVISOR)
        column = [self._node(0, 0, x)]
        for i in range(1, DEPTH + 1):
            column.append(self._node(i, 0, self.pool(column[-1])))
        return column


@register_model("UNet", family=FAMILY)
class UNet(_NodeGrid):
    """U-Net with VGG blocks (the nested-unet repository's baseline); returns logits (N, num_classes, H, W).

    Decoder nodes conv3_1, conv2_2, conv1_3, conv0_4 each take [skip, up(previous)]. H and W of the input
    must be divisible by 16.

    Args:
        num_classes: output channels (>= 1).
        input_channels: input channels (>= 1).
        deep_supervision: accepted for a uniform constructor; must be False (only NestedUNet has
            deep-supervision heads).
        **kwargs: ignored, as in the reference (train.py passes its whole config).

    Example:
        >>> model = UNet(num_classes=1, input_channels=3)
        >>> model(torch.zeros(2, 3, 96, 96)).shape
        torch.Size([2, 1, 96, 96])
    """

    def __init__(
        self, num_classes: int, input_channels: int = 3, deep_supervision: bool = False, **kwargs: object
    ):
        _check_args(num_classes, input_channels)
        if deep_supervision:
            raise ValueError(
                "deep_supervision=True is only supported by NestedUNet; UNet has a single output head"
            )
        super().__init__(input_channels)
        self.deep_supervision = False
        for i in reversed(range(DEPTH)):
            self._add_node(i, DEPTH - i, NB_FILTER[i] + NB_FILTER[i + 1])
        self.final = nn.Conv2d(NB_FILTER[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        column = self._encode(x)
        d = column[DEPTH]
        for i in reversed(range(DEPTH)):
            d = self._node(i, DEPTH - i, column[i], self.up(d))
        return self.final(d)


@register_model("NestedUNet", family=FAMILY)
class NestedUNet(_NodeGrid):
    """UNet++ (Zhou et al. 2018): nested, densely connected skip pathways; returns logits.

    Node X^{i,j} (j >= 1) sees [X^{i,0}, ..., X^{i,j-1}, up(X^{i+1,j-1})]. Without deep supervision the
    output is one map (N, num_classes, H, W) from X^{0,4}; with it, a list of 4 maps from X^{0,1..4}
    (heads final1..final4). H and W of the input must be divisible by 16.

    Args:
        num_classes: output channels (>= 1).
        input_channels: input channels (>= 1).
        deep_supervision: add the four heads and return a list of 4 logit maps.
        **kwargs: ignored, as in the reference.

    Example:
        >>> model = NestedUNet(num_classes=1, input_channels=3, deep_supervision=True)
        >>> [y.shape for y in model(torch.zeros(1, 3, 32, 32))][-1]
        torch.Size([1, 1, 32, 32])
    """

    def __init__(
        self, num_classes: int, input_channels: int = 3, deep_supervision: bool = False, **kwargs: object
    ):
        _check_args(num_classes, input_channels)
        super().__init__(input_channels)
        self.deep_supervision = bool(deep_supervision)
        # Column by column (j), top to bottom (i): the reference's creation order.
        for j in range(1, DEPTH + 1):
            for i in range(DEPTH + 1 - j):
                self._add_node(i, j, NB_FILTER[i] * j + NB_FILTER[i + 1])
        if self.deep_supervision:
            for k in range(1, DEPTH + 1):
                setattr(self, f"final{k}", nn.Conv2d(NB_FILTER[0], num_classes, kernel_size=1))
        else:
            self.final = nn.Conv2d(NB_FILTER[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        # rows[i] holds X^{i,0}, X^{i,1}, ... as they are computed.
        rows = [[node] for node in self._encode(x)]
        for j in range(1, DEPTH + 1):
            for i in range(DEPTH + 1 - j):
                rows[i].append(self._node(i, j, *rows[i][:j], self.up(rows[i + 1][j - 1])))
        if self.deep_supervision:
            return [getattr(self, f"final{k}")(rows[0][k]) for k in range(1, DEPTH + 1)]
        return self.final(rows[0][DEPTH])


ARCHS: dict[str, type[nn.Module]] = {"UNet": UNet, "NestedUNet": NestedUNet}
