"""The U-Net of MindSpore's unet_medical (ISBI 2012), in PyTorch, and the input sizes it accepts.

Paper: O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015. Ported from mindspore-ai/models:official/cv/Unet/src/unet_medical@eab643f.

Every convolution is valid (unpadded), so the output is smaller than the input: 572x572 -> 388x388.
A side length n works when, at each of the four encoder levels, n - 4 after the double conv is even and
positive before pooling, and every decoder size stays positive; that is n = 188, 204, 220, ... (n % 16 == 12),
and the output is n - 184.
"""

from __future__ import annotations

import torch
from torch import nn

from .unet_parts import DoubleConv, Down, OutConv, Up, init_conv_, init_transposed_conv_

_LEVELS = 4
_DOUBLE_CONV_SHRINK = 4  # two valid 3x3 convolutions remove 2 pixels each


def _size_trace(n: int) -> tuple[list[int], list[int]] | None:
    """(encoder skip sizes, decoder sizes) for side length n, or None when n does not fit."""
    if n <= 0:
        return None
    skips = []
    size = n
    for _ in range(_LEVELS):
        size -= _DOUBLE_CONV_SHRINK
        if size <= 0 or size % 2:
            return None
        skips.append(size)
        size //= 2
    size -= _DOUBLE_CONV_SHRINK  # bottleneck
    if size <= 0:
        return None
    decoder = []
    for skip in reversed(skips):
        size *= 2
        if size > skip or (skip - size) % 2:
            return None
        decoder.append(size)
        size -= _DOUBLE_CONV_SHRINK
        if size <= 0:
            return None
    decoder.append(size)
    return skips, decoder


def output_size(input_size: int) -> int:
    """Side length of the logits for a valid side length of the input (572 -> 388).

    Raises ValueError naming the nearest valid sizes when `input_size` does not fit.
    """
    trace = _size_trace(input_size)
    if trace is None:
        raise ValueError(
            f"input size {input_size} does not fit the valid-convolution U-Net: {_advice(input_size)}"
        )
    return trace[1][-1]


def skip_crops(input_size: int) -> list[tuple[int, int]]:
    """(upsampled size, skip size) at up1..up4: the skip is centre-cropped to the upsampled size.

    For 572: [(56, 64), (104, 136), (200, 280), (392, 568)], MindSpore's hard-coded crop fractions.
    """
    output_size(input_size)  # raises for a size that does not fit
    skips, decoder = _size_trace(input_size)
    return list(zip(decoder[:-1], reversed(skips)))


def valid_input_sizes(min_size: int, max_size: int) -> list[int]:
    """All side lengths in [min_size, max_size] that the network accepts, ascending."""
    return [n for n in range(max(min_size, 1), max_size + 1) if _size_trace(n) is not None]


def _valid_neighbours(n: int) -> tuple[int | None, int]:
    """The largest valid size <= n (None below the smallest) and the smallest valid size >= n."""
    below = next((m for m in range(n, 0, -1) if _size_trace(m) is not None), None)
    above = next(m for m in range(max(n, 1), n + 10_000) if _size_trace(m) is not None)
    return below, above


def nearest_valid_input_size(n: int) -> int:
    """The valid side length closest to n; a tie goes to the larger size (padding loses no pixels)."""
    below, above = _valid_neighbours(n)
    if below is None or above - n <= n - below:
        return above
    return below


def _advice(n: int) -> str:
    below, above = _valid_neighbours(n)
    if below is None:
        return f"use {above} or larger (output {output_size(above)})"
    return f"use one of {below} or {above} (output {output_size(below)} / {output_size(above)})"


def check_input_size(height: int, width: int) -> None:
    """Raise ValueError naming the nearest valid sizes when height x width does not fit the network."""
    bad_h = _size_trace(height) is None
    bad_w = _size_trace(width) is None
    if not (bad_h or bad_w):
        return
    prefix = f"input {height}x{width} does not fit the valid-convolution U-Net: "
    if height == width:
        raise ValueError(prefix + _advice(height))
    parts = []
    if bad_h:
        parts.append(f"height {height}: {_advice(height)}")
    if bad_w:
        parts.append(f"width {width}: {_advice(width)}")
    raise ValueError(prefix + "; ".join(parts))


class UNetMedical(nn.Module):
    """U-Net with valid convolutions (Ronneberger et al. 2015) as MindSpore's `UNetMedical`.

    Args:
        n_channels: input channels (1 for the grey-scale ISBI 2012 images).
        n_classes: output channels; the network returns logits (N, n_classes, H - 184, W - 184).

    Input sizes: each side must be 188, 204, 220, ... (n % 16 == 12); see `valid_input_sizes`,
    `nearest_valid_input_size` and `output_size`. Other sizes raise ValueError naming the nearest ones.

    Deviations of MindSpore's code from the paper, kept here so its checkpoints and results carry over:
      * no dropout at the end of the contracting path (the paper has it);
      * an extra ReLU after each 2x2 transposed convolution;
      * concatenation as [upsampled, skip] (upsampled first);
      * its data pipeline pads the image with zeros instead of mirroring it (not part of this module).

    Deviation from MindSpore: the skip is centre-cropped to the upsampled tensor's actual size instead of
    by fractions hard-coded for 572x572 (identical windows at 572), so any valid input size works.

    Parameter names match the MindSpore Cell tree (`inc.double_conv.0.weight`,
    `down1.maxpool_conv.1.double_conv.0.weight`, `up1.up.weight`, `up1.conv.double_conv.2.bias`,
    `outc.conv.weight`, ...): 31,030,658 parameters for 1 channel and 2 classes.

    Example:
        >>> net = UNetMedical(n_channels=1, n_classes=2)
        >>> net(torch.zeros(1, 1, 188, 188)).shape
        torch.Size([1, 2, 4, 4])
    """

    def __init__(self, n_channels: int = 1, n_classes: int = 2):
        super().__init__()
        for name, value in (("n_channels", n_channels), ("n_classes", n_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.inc = DoubleConv(n_channels, 64)
        self.down1 = Down(64, 128)
        self.down2 = Down(128, 256)
        self.down3 = Down(256, 512)
        self.down4 = Down(512, 1024)
        self.up1 = Up(1024, 512)
        self.up2 = Up(512, 256)
        self.up3 = Up(256, 128)
        self.up4 = Up(128, 64)
        self.outc = OutConv(64, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MindSpore's initialisation: convs TruncatedNormal(0.06), transposed convs Normal(0.01), zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init_conv_(module)
            elif isinstance(module, nn.ConvTranspose2d):
                init_transposed_conv_(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            if x.dim() != 4 or x.shape[1] != self.n_channels:
                raise ValueError(
                    f"UNetMedical expects input (N, {self.n_channels}, H, W), got shape {tuple(x.shape)}"
                )
            check_input_size(x.shape[-2], x.shape[-1])
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)
