"""Fake of `apex/amp/scaler.py` (LossScaler), NVIDIA/apex and Ascend/apex (patch/npu.patch).

NVIDIA: an overflow is an inf/NaN in the model gradients (`scale_check_overflow_python`). Ascend: with a
dynamic scale the overflow is the chip's float-status flag (`get_npu_overflow_flag`, read through its
npu_float_status extension, here the fake chip's register), the gradients' values are not checked, and the
verdict is all-reduced over the default process group (`_dist_overflow_count`), so all ranks agree.
`update_scale()` halves a dynamic scale after an overflow and returns whether the step must be skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._amp_state import _amp_state


def _chip():
    from ...torch_npu._chip import CHIP

    return CHIP


class LossScaler:
    def __init__(
        self,
        loss_scale,
        init_scale: float = 2.0**16,
        scale_factor: float = 2.0,
        scale_window: int = 2000,
        min_loss_scale: float | None = None,
        max_loss_scale: float = 2.0**24,
    ):
        if _amp_state.flavour == "ascend":
            # Ascend's scaler allocates its buffers with torch.npu.IntTensor: no NPU, no scaler.
            if not hasattr(torch, "npu"):
                raise AttributeError("module 'torch' has no attribute 'npu'")
        if loss_scale == "dynamic":
            self.dynamic = True
            self._loss_scale = min(max_loss_scale, init_scale)
        else:
            self.dynamic = False
            self._loss_scale = loss_scale
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_seq_len = scale_window
        self._unskipped = 0
        self._has_overflow = False
        self._dist_initialized = dist.is_available() and dist.is_initialized()

    def loss_scale(self) -> float:
        return self._loss_scale

    @staticmethod
    def get_npu_overflow_flag() -> bool:
        return _chip().overflow

    @staticmethod
    def clear_npu_overflow_flag() -> None:
        _chip().overflow = False

    def _copy_and_scale(self, model_grads, master_grads, scale: float) -> None:
        for model, master in zip(model_grads, master_grads):
            if model is None:
                continue
            if _amp_state.flavour == "nvidia" and self.dynamic:
                cpu_sum = float(model.float().sum())
                if cpu_sum in (float("inf"), -float("inf")) or cpu_sum != cpu_sum:
                    self._has_overflow = True
                    return
            if master is not model:
                master.copy_(model)
            if scale != 1.0:
                master.mul_(1.0 / scale)

    def _ascend_overflow(self, model_grads) -> None:
        from ...torch_npu._chip import overflowed

        self._has_overflow = overflowed(list(model_grads)) if self.dynamic else False

    def _ascend_agree(self) -> None:
        if not (self.dynamic and self._dist_initialized):
            return
        count = torch.zeros(1, dtype=torch.float32, device=_chip().tensor_device)
        if self._has_overflow:
            count.add_(1)
        dist.all_reduce(count)
        if count.item() != 0:
            self._has_overflow = True

    def unscale(self, model_grads, master_grads, unused_scale, models_are_masters=False, scale_override=None):
        if self._has_overflow:
            return
        scale = self._loss_scale if scale_override is None else scale_override
        if scale == 1.0 and models_are_masters and not self.dynamic:
            return
        if _amp_state.flavour == "ascend":
            self._ascend_overflow(model_grads)
            if not self._has_overflow:
                self._copy_and_scale(model_grads, master_grads, scale)
            self._ascend_agree()
        else:
            self._copy_and_scale(model_grads, master_grads, scale)

    def clear_overflow_state(self) -> None:
        self._has_overflow = False

    def update_scale(self) -> bool:
        if self._has_overflow and self.dynamic:
            should_skip = True
            if self._min_loss_scale:
                self._loss_scale = max(self._min_loss_scale, self._loss_scale / 2.0)
            else:
                self._loss_scale = self._loss_scale / 2.0
            self._unskipped = 0
        else:
            should_skip = False
            self._unskipped += 1
        if self._unskipped == self._scale_seq_len and self.dynamic:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * 2.0)
            self._unskipped = 0
        return should_skip
