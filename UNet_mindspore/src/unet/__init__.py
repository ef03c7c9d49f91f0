"""The valid-convolution U-Net of MindSpore's unet_medical (Ronneberger et al. 2015) in PyTorch."""

from __future__ import annotations

from .unet_model import (
    UNetMedical,
    check_input_size,
    nearest_valid_input_size,
    output_size,
    skip_crops,
    valid_input_sizes,
)

__all__ = [
    "UNetMedical",
    "check_input_size",
    "nearest_valid_input_size",
    "output_size",
    "skip_crops",
    "valid_input_sizes",
]
