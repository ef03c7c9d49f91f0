"""Fake of Ascend/pytorch `torch_npu/npu/__init__.py`: the `torch.npu` namespace.

Exports what the real module does for device handling (is_available, device_count, set_device,
current_device, synchronize, get_device_name), the overflow flag (get_npu_overflow_flag,
clear_npu_overflow_flag, re-exported from utils as the real module does), the generators of random.py,
and the `amp` and `utils` submodules. `get_device_name` raises AssertionError("Invalid device id") for an
index out of range, as the real one.
"""

from __future__ import annotations

from .._chip import CHIP
from . import utils
from .random import (
    get_rng_state,
    get_rng_state_all,
    manual_seed,
    manual_seed_all,
    set_rng_state,
    set_rng_state_all,
)
from .utils import (
    _lazy_init,
    clear_npu_overflow_flag,
    current_device,
    device_count,
    get_npu_overflow_flag,
    is_available,
    set_device,
    synchronize,
)


def is_initialized() -> bool:
    return CHIP.initialized


def get_device_name(device_name=None) -> str:
    index = CHIP.index(device_name)
    if index < 0 or index >= device_count():
        raise AssertionError("Invalid device id")
    return CHIP.name


def __getattr__(name: str):
    if name == "default_generators":
        return CHIP.generators
    raise AttributeError(f"module 'torch_npu.npu' has no attribute {name!r}")


from . import amp  # noqa: E402

__all__ = [
    "amp",
    "clear_npu_overflow_flag",
    "current_device",
    "device_count",
    "get_device_name",
    "get_npu_overflow_flag",
    "get_rng_state",
    "get_rng_state_all",
    "is_available",
    "is_initialized",
    "manual_seed",
    "manual_seed_all",
    "set_device",
    "set_rng_state",
    "set_rng_state_all",
    "synchronize",
    "utils",
    "_lazy_init",
]
