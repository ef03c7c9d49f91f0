"""Input-shape checks shared by the 2-D U-Net family: a clear error instead of a shape mismatch deep inside."""

from __future__ import annotations

import torch

__all__ = ["check_divisible_input", "is_tracing"]


def is_tracing() -> bool:
    """True while TorchScript, `torch.jit.trace`, `torch.compile` or `torch.export` is tracing the model.

    Python-side shape checks are skipped then: they would add guards (or fail on symbolic sizes) and
    eager mode has already validated the sizes users actually pass.
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def check_divisible_input(x: torch.Tensor, divisor: int = 16) -> None:
    """Raise ValueError unless `x` is (N, C, H, W) with H and W divisible by `divisor`.

    `divisor` is 2**(number of 2x poolings): the decoder concatenates each upsampled map with the encoder
    map of the same level, so every pooling must halve the size exactly. The message gives the nearest
    padded size so the caller can fix the call in one try.

    Raises:
        ValueError: e.g. "input 3x100x130 must have H and W divisible by 16; pad to 112x144".
    """
    if is_tracing():
        return
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    channels, height, width = x.shape[1:]
    if height % divisor or width % divisor:
        raise ValueError(
            f"input {channels}x{height}x{width} must have H and W divisible by {divisor}; "
            f"pad to {_round_up(height, divisor)}x{_round_up(width, divisor)}"
        )
