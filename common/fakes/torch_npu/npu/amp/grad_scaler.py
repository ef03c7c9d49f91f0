"""Fake of Ascend/pytorch `torch_npu/npu/amp/grad_scaler.py` (GradScaler) and of the NPU kernel of
`torch._amp_foreach_non_finite_check_and_unscale_` it relies on (Ascend/op-plugin,
`op_plugin/ops/aclops/AmpForeachNonFiniteCheckAndUnscaleKernelNpu.cpp`).

Contract kept from the real code:
* `scale()` clears the float-status flag once per iteration (dynamic scaling, chip without inf/nan mode),
  and refuses tensors that are not on the NPU (ValueError).
* the unscale kernel decides "finite" from the values on a chip with inf/nan mode, but from the
  float-status flag alone (clearing it on a hit) in saturation mode, where an overflow leaves finite,
  saturated gradients; non-finite grads are left scaled and found_inf is raised.
* `_sync_dist_overflow_count` all-reduces an overflow count over the default process group, so every rank
  skips the same steps; it is skipped on a chip with inf/nan mode (DDP's all-reduce spreads inf there).
* `update()` halves the scale after an overflow (`_npu_update_scale`) and doubles it after
  `growth_interval` clean steps; `state_dict()` adds "dynamic".
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import GradScaler as BaseGradScaler
from torch.amp.grad_scaler import OptState, _MultiDeviceReplicator, _refresh_per_optimizer_state

from ..._chip import CHIP, overflowed
from .. import utils


def _amp_foreach_non_finite_check(scaled_grads: list[torch.Tensor]) -> bool:
    """op-plugin's `_amp_foreach_non_finite_check`: read the float-status flag, clear it on a hit."""
    flagged = overflowed(scaled_grads)
    if flagged:
        CHIP.overflow = False
    return flagged


def _amp_foreach_non_finite_check_and_unscale_(
    scaled_grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> None:
    if not CHIP.is_npu(inv_scale):
        raise RuntimeError("inv_scale must be NPU-Tensor")
    if not scaled_grads:
        return
    if CHIP.support_inf_nan:
        is_finite = all(torch.isfinite(g.float().sum()).item() for g in scaled_grads)
    else:
        is_finite = not _amp_foreach_non_finite_check(scaled_grads)
    if is_finite:
        for grad in scaled_grads:
            if not CHIP.is_npu(grad):
                raise RuntimeError("one of scaled_grads was not a NPU tensor.")
            grad.mul_(inv_scale)
    else:
        found_inf.add_(1)


class _NpuMultiDeviceReplicator(_MultiDeviceReplicator):
    def __init__(self, master_tensor: torch.Tensor) -> None:
        if not CHIP.is_npu(master_tensor):
            raise ValueError("Device type of master_tensor should be npu.")
        self.master = master_tensor
        self._per_device_tensors = {}


class GradScaler(BaseGradScaler):
    """torch_npu's loss scaler (see the module docstring for what is modelled)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        dynamic: bool = True,
        enabled: bool = True,
    ):
        if enabled and not utils.is_available():
            warnings.warn(
                "torch_npu.amp.GradScaler is enabled, but NPU is not available. Disabling.", stacklevel=2
            )
            self._enabled = False
        else:
            self._enabled = enabled
        if self._enabled:
            if growth_factor <= 1.0:
                raise ValueError("The growth factor must be > 1.0.")
            if backoff_factor >= 1.0:
                raise ValueError("The backoff factor must be < 1.0.")
            self._init_scale = init_scale
            self._scale = None
            self._growth_factor = growth_factor
            self._backoff_factor = backoff_factor
            self._growth_interval = growth_interval
            self._dynamic = dynamic
            self._init_growth_tracker = 0
            self._growth_tracker = None
            self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
            self._has_overflow = False
            self._clear_overflow_flag = False
            self._dist_initialized = False
            self._dist_overflow_count = None

    def _lazy_init_scale_growth_tracker(self, dev) -> None:
        if self._growth_tracker is not None:
            raise RuntimeError("_growth_tracker initialized before _scale")
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=dev)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=dev)

    def _lazy_init_dist_flag_and_dist_overflow_count(self) -> None:
        if self._dist_overflow_count is not None:
            raise RuntimeError("_dist_overflow_count initialized before _scale")
        self._dist_initialized = dist.is_available() and dist.is_initialized()
        self._dist_overflow_count = torch.zeros(1, dtype=torch.float32, device=CHIP.tensor_device)

    def scale(self, outputs):
        if not self._enabled:
            return outputs
        if self._dist_overflow_count is None:
            self._lazy_init_dist_flag_and_dist_overflow_count()
        if self._dynamic and not self._clear_overflow_flag:
            if not utils.is_support_inf_nan():
                GradScaler.clear_npu_overflow_flag()
            self._clear_overflow_flag = True
        if isinstance(outputs, torch.Tensor):
            if not CHIP.is_npu(outputs):
                raise ValueError("Device type of outputs should be npu.")
            if self._scale is None:
                self._lazy_init_scale_growth_tracker(outputs.device)
            return outputs * self._scale.to(device=outputs.device)
        raise TypeError("this fake scales one tensor at a time, as MixedPrecision uses it")

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device_found_inf = _NpuMultiDeviceReplicator(found_inf)
        per_device_inv_scale = _NpuMultiDeviceReplicator(inv_scale)
        per_device_and_dtype_grads = defaultdict(lambda: defaultdict(list))
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if (not allow_fp16) and param.grad.dtype == torch.float16:
                        raise TypeError("Attempting to unscale FP16 gradients.")
                    per_device_and_dtype_grads[param.grad.device][param.grad.dtype].append(param.grad)
            for device, per_dtype_grads in per_device_and_dtype_grads.items():
                for grads in per_dtype_grads.values():
                    if self._dynamic:
                        _amp_foreach_non_finite_check_and_unscale_(
                            grads, per_device_found_inf.get(device), per_device_inv_scale.get(device)
                        )
                        if per_device_found_inf.get(device).item() > 0:
                            self._has_overflow = True
                    else:
                        for grad in grads:
                            grad.mul_(per_device_inv_scale.get(device))
            self._sync_dist_overflow_count()
            if self._has_overflow:
                per_device_found_inf.get(found_inf.device).add_(1)
        return per_device_found_inf._per_device_tensors

    def unscale_(self, optimizer) -> None:
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inv_scale = self._scale.float().reciprocal()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=self._scale.device)
        optimizer_state["found_inf_per_device"] = self._unscale_grads_(optimizer, inv_scale, found_inf, False)
        optimizer_state["stage"] = OptState.UNSCALED

    def _maybe_opt_step(self, optimizer, optimizer_state, *args, **kwargs):
        if (
            not sum(v.item() for v in optimizer_state["found_inf_per_device"].values())
            and not self._has_overflow
        ):
            return optimizer.step(*args, **kwargs)
        print("Gradient overflow. Skipping step")
        return None

    def step(self, optimizer, *args, **kwargs):
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) <= 0:
            raise RuntimeError("No inf checks were recorded for this optimizer.")
        if self._dynamic:
            retval = self._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        else:
            retval = optimizer.step(*args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def update(self, new_scale=None) -> None:
        if not self._enabled:
            return
        _scale, _ = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            self._scale = torch.full((), float(new_scale), dtype=torch.float32, device=_scale.device)
        elif self._dynamic:
            self._npu_update_scale()
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self._has_overflow = False
        self._clear_overflow_flag = False

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._enabled:
            state["dynamic"] = self._dynamic
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved "
                "from a disabled instance of GradScaler."
            )
        super().load_state_dict(state_dict)
        self._dynamic = state_dict["dynamic"]

    @staticmethod
    def get_npu_overflow_flag() -> bool:
        return utils.get_npu_overflow_flag()

    @staticmethod
    def clear_npu_overflow_flag() -> None:
        utils.clear_npu_overflow_flag()

    def _sync_dist_overflow_count(self) -> None:
        if utils.is_support_inf_nan():
            return
        if self._dynamic and self._dist_initialized:
            if self._has_overflow:
                self._dist_overflow_count.add_(1)
                dist.all_reduce(self._dist_overflow_count)
                self._dist_overflow_count.zero_()
            else:
                dist.all_reduce(self._dist_overflow_count)
                if self._dist_overflow_count.item() != 0:
                    self._has_overflow = True
                self._dist_overflow_count.zero_()

    def _npu_update_scale(self) -> None:
        if self._has_overflow:
            self._scale.mul_(self._backoff_factor)
            self._growth_tracker.zero_()
        else:
            self._growth_tracker.add_(1)
            if self._growth_tracker.item() == self._growth_interval:
                new_scale = self._scale * self._growth_factor
                if not torch.isinf(new_scale):
                    self._scale = new_scale
                self._growth_tracker.zero_()
