"""Blocks of the valid-convolution U-Net (Ronneberger et al. 2015) as MindSpore's unet_medical builds them.

Attribute names follow the MindSpore Cell tree (`double_conv`, `maxpool_conv`, `up`, `conv`), so parameter
names such as `down1.maxpool_conv.1.double_conv.0.weight` carry over from a MindSpore checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

# MindSpore's TruncatedNormal(sigma) redraws samples beyond two sigma; "normal" is N(0, 0.01).
CONV_INIT_SIGMA = 0.06
TRANSPOSED_CONV_INIT_SIGMA = 0.01


@torch.no_grad()
def truncated_normal_(tensor: torch.Tensor, sigma: float) -> torch.Tensor:
    """N(0, sigma) samples, each one beyond +-2 sigma redrawn: MindSpore's `TruncatedNormal(sigma)`.

    Redraws only the rejected entries; `nn.init.trunc_normal_` redraws the whole tensor each round,
    which takes seconds for the 9.4M-weight convolutions of this network.
    """
    if tensor.is_meta:
        return tensor
    flat = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device).normal_(0.0, sigma)
    bound = 2.0 * sigma
    rejected = (flat.abs() > bound).nonzero().squeeze(1)
    while rejected.numel():
        draw = torch.empty(rejected.numel(), dtype=tensor.dtype, device=tensor.device).normal_(0.0, sigma)
        flat[rejected] = draw
        rejected = rejected[draw.abs() > bound]
    return tensor.copy_(flat.view_as(tensor))


def init_conv_(conv: nn.Conv2d, sigma: float = CONV_INIT_SIGMA) -> None:
    """MindSpore `TruncatedNormal(sigma)` weights (cut at +-2 sigma) and zero bias."""
    truncated_normal_(conv.weight, sigma)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_transposed_conv_(conv: nn.ConvTranspose2d, sigma: float = TRANSPOSED_CONV_INIT_SIGMA) -> None:
    """MindSpore `"normal"` weights (N(0, sigma), not truncated) and zero bias."""
    nn.init.normal_(conv.weight, mean=0.0, std=sigma)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def center_crop(skip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre `height` x `width` window of `skip` (N, C, H, W).

    For 572x572 inputs this is the same window as MindSpore's `CentralCrop` with the fractions
    56/64, 104/136, 200/280 and 392/568; it is computed from the sizes so other inputs work too.
    """
    top = (skip.shape[-2] - height) // 2
    left = (skip.shape[-1] - width) // 2
    return skip[..., top : top + height, left : left + width]


class DoubleConv(nn.Module):
    """Two valid 3x3 convolutions, each followed by ReLU; no BatchNorm and no dropout (as MindSpore)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=0, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=0, bias=True),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max pooling, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(kernel_size=2, stride=2),
            DoubleConv(in_channels, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """2x2 transposed conv + ReLU, centre-crop the skip to that size, cat [upsampled, skip], DoubleConv.

    One class for MindSpore's Up1..Up4, which differ only in their hard-coded crop fraction.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # Creation order as MindSpore's Up classes: the DoubleConv before the transposed conv.
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.up(x))
        skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.conv(torch.cat((x, skip), dim=1))


class OutConv(nn.Module):
    """1x1 convolution to class logits."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
