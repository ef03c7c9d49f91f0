"""Fake `torch_npu` (Ascend/pytorch) for tests on a machine without an NPU: test tool, never imported by
production code. Install it with `common.fakes.installed_torch_npu()`, which also registers `torch.npu`.

Models, from Ascend/pytorch:
* `torch_npu/__init__.py`: the package registers its `npu` module as `torch.npu` (here done by the
  installer, without renaming torch's privateuse1 backend, which cannot be undone in a process).
* the float-status ops `torch_npu.npu_get_float_status` / `npu_clear_float_status` (op-plugin), which read
  and reset the overflow register of a chip in saturation mode; element 0 is non-zero after an overflow.
* `torch_npu/npu/utils.py`, `torch_npu/npu/random.py`, `torch_npu/npu/amp/grad_scaler.py`: see those modules.
"""

from __future__ import annotations

import torch

from ._chip import CHIP

__version__ = "2.1.0.post0+fake"


def _check_npu(tensor: torch.Tensor, op: str) -> None:
    if not CHIP.is_npu(tensor):
        raise RuntimeError(f"{op}: Expected all tensors to be on the NPU, got a tensor on {tensor.device}")


def npu_get_float_status(float_status: torch.Tensor) -> torch.Tensor:
    """The 8-float status; element 0 is non-zero when an overflow happened since the last clear."""
    _check_npu(float_status, "npu_get_float_status")
    status = torch.zeros(8, dtype=torch.float32, device=float_status.device)
    if CHIP.overflow:
        status[0] = 1.0
    return status


def npu_clear_float_status(float_status: torch.Tensor) -> torch.Tensor:
    _check_npu(float_status, "npu_clear_float_status")
    CHIP.overflow = False
    return torch.zeros(8, dtype=torch.float32, device=float_status.device)


from . import npu as npu  # noqa: E402  (imported last, as the real package does, after its ops)
