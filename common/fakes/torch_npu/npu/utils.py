"""Fake of Ascend/pytorch `torch_npu/npu/utils.py`: device selection and the overflow-flag helpers.

As the real module: `get_npu_overflow_flag` raises RuntimeError on a chip with inf/nan mode (the register
is not used there), `clear_npu_overflow_flag` only warns there, and `npu_check_overflow` checks the
values in inf/nan mode but the register (cleared after a hit) in saturation mode.
"""

from __future__ import annotations

import warnings

import torch

from .._chip import CHIP


def _lazy_init() -> None:
    CHIP.initialized = True


def is_support_inf_nan() -> bool:
    _lazy_init()
    return CHIP.support_inf_nan


def device_count() -> int:
    return CHIP.device_count


def is_available() -> bool:
    return device_count() > 0


def set_device(device) -> None:
    index = CHIP.index(device)
    if index < 0:
        return
    if index >= CHIP.device_count:
        raise RuntimeError(f"set_device: invalid device id {index}, {CHIP.device_count} NPU(s) visible")
    CHIP.current = index


def current_device() -> int:
    _lazy_init()
    return CHIP.current


def synchronize(device=None) -> None:
    _lazy_init()
    CHIP.synchronize_calls += 1


def _status_tensor() -> torch.Tensor:
    return torch.zeros(8, device=CHIP.tensor_device)


def get_npu_overflow_flag() -> bool:
    if is_support_inf_nan():
        raise RuntimeError("Unsupported api when soc_version >= Ascend910B1, please use npu_check_overflow")
    from .. import npu_get_float_status

    return bool(npu_get_float_status(_status_tensor()).cpu()[0] != 0)


def clear_npu_overflow_flag() -> None:
    if is_support_inf_nan():
        warnings.warn(
            "When soc_version >= Ascend910B1, clear_npu_overflow_flag is useless. Please remove it.",
            stacklevel=2,
        )
        return
    from .. import npu_clear_float_status

    npu_clear_float_status(_status_tensor())


def npu_check_overflow(grad) -> bool:
    if is_support_inf_nan():
        if isinstance(grad, float):
            cpu_sum = grad
        elif isinstance(grad, torch.Tensor):
            cpu_sum = float(grad.float().sum())
        else:
            raise RuntimeError("Unsupported type.")
        return cpu_sum in (float("inf"), -float("inf")) or cpu_sum != cpu_sum
    flagged = get_npu_overflow_flag()
    if flagged:
        clear_npu_overflow_flag()
    return flagged
