"""The state of the one fake Ascend chip every fake torch_npu module reads: not a torch_npu API.

Models the hardware facts torch_npu's Python code depends on: how many devices, which one is current,
whether the chip reports overflow as inf/NaN values (Atlas A2 and later, `is_support_inf_nan()` True) or
through a float-status register with saturated finite values (Atlas training series), the register itself,
and one random generator per device. Tensors of the fake NPU live on `tensor_device` (the CPU by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FP16_MAX = 65504.0  # what an fp16 overflow saturates to on a chip without inf/nan mode


@dataclass
class Chip:
    support_inf_nan: bool = False
    device_count: int = 1
    tensor_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    name: str = "Ascend910A"
    current: int = 0
    overflow: bool = False  # the float-status register
    synchronize_calls: int = 0
    initialized: bool = False
    generators: tuple[torch.Generator, ...] = ()

    def configure(
        self,
        *,
        support_inf_nan: bool = False,
        device_count: int = 1,
        tensor_device: str | torch.device = "cpu",
        name: str = "Ascend910A",
    ) -> Chip:
        """Start over as a freshly booted chip with these properties."""
        self.support_inf_nan = support_inf_nan
        self.device_count = device_count
        self.tensor_device = torch.device(tensor_device)
        self.name = name
        self.current = 0
        self.overflow = False
        self.synchronize_calls = 0
        self.initialized = False
        self.generators = tuple(torch.Generator() for _ in range(device_count))
        return self

    def is_npu(self, tensor: torch.Tensor) -> bool:
        """`tensor.is_npu` of the real package: here, on the device that stands in for the NPU."""
        return tensor.device.type == self.tensor_device.type

    def index(self, device: int | str | torch.device | None, optional: bool = True) -> int:
        """torch_npu's `_get_device_index`: an int, "npu", "npu:N" (or None, the current device)."""
        if device is None or device == "npu":
            return self.current
        if isinstance(device, int):
            return device
        text = str(device)
        if text.startswith("npu:"):
            return int(text.split(":", 1)[1])
        raise ValueError(f"Expected a npu device, but got: {device}")


CHIP = Chip().configure()


class _OverflowInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if CHIP.support_inf_nan:
            return torch.full_like(grad, math.inf)
        CHIP.overflow = True
        return torch.full_like(grad, FP16_MAX)


def overflow_in_backward(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward overflows as the chip would: inf gradients in inf/nan mode; otherwise
    saturated, finite gradients and the float-status register raised."""
    return _OverflowInBackward.apply(x)


def overflowed(tensors: list[torch.Tensor]) -> bool:
    """The float-status register as a kernel reading it would see it after these tensors were computed.

    CPU arithmetic overflows to inf without touching the fake register, where a chip in saturation mode
    would have saturated the value and raised the register; a non-finite value stands for that.
    """
    return CHIP.overflow or any(not bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def raise_overflow() -> None:
    """Raise the float-status register, as any overflowing kernel of a chip in saturation mode does."""
    CHIP.overflow = True
