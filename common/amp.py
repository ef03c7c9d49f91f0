"""Mixed precision behind one small interface, whatever the machine has.

The ModelZoo flags (`--amp`, `--opt-level O0..O3`, `--loss-scale dynamic|<number>`) map onto:

* Ascend or NVIDIA apex, when `apex.amp` imports (on NPU always preferred; on CUDA only with
  `--use_apex`): `amp.initialize` (with `combine_grad=True` on NPU) and `amp.scale_loss`.
* otherwise native `torch.amp`: fp16 autocast with a loss scaler on CUDA/NPU (dynamic, or a static scale
  that never changes), bf16 autocast on CPU (no scaler needed: bf16 has fp32's exponent range).
* O0, or no `--amp`: fp32.

Every path skips a step whose gradients are not finite instead of applying it, counts it, and raises
`TrainingDiverged` once `max_consecutive_skips` steps in a row were skipped: a NaN that persists is a bug
in the data or the setup, and training on would only overwrite good weights.
"""

from __future__ import annotations

import contextlib

import torch

from common.device import DeviceInfo
from common.errors import ConfigError, TrainingDiverged

OPT_LEVELS = ("O0", "O1", "O2", "O3")


def parse_loss_scale(value: str | float | int | None) -> float | str:
    """'dynamic' (default) or a positive number."""
    if value is None or str(value).lower() in ("dynamic", "none", ""):
        return "dynamic"
    try:
        scale = float(value)
    except ValueError:
        raise ConfigError(f"--loss-scale must be 'dynamic' or a positive number, got {value!r}") from None
    if not scale > 0:
        raise ConfigError(f"--loss-scale must be 'dynamic' or a positive number, got {value!r}")
    return scale


def _apex_amp():
    try:
        from apex import amp
    except BaseException:  # noqa: BLE001 - PyPI's unrelated "apex" or a broken build
        return None
    return amp if hasattr(amp, "initialize") and hasattr(amp, "scale_loss") else None


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def unscale_and_check(optimizer: torch.optim.Optimizer, inv_scale: float) -> bool:
    """Multiply every gradient by `inv_scale` in place; True when any gradient is inf or NaN."""
    grads = _grads(optimizer)
    if not grads:
        return False
    found = False
    by_device: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault((grad.device, grad.dtype), []).append(grad)
    for (device, _dtype), group in by_device.items():
        found_inf = torch.zeros(1, device=device)
        scale = torch.full((1,), inv_scale, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, scale)
        except (RuntimeError, NotImplementedError):  # a backend without the fused kernel
            for grad in group:
                if inv_scale != 1.0:
                    grad.mul_(inv_scale)
                found_inf += (~torch.isfinite(grad)).any().float()
        found = found or bool(found_inf.item())
    return found


class _StaticScaler:
    """A fixed loss scale (ModelZoo `--loss-scale 128`): overflowing steps are skipped, the scale stays."""

    def __init__(self, scale: float):
        self.scale_value = float(scale)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if unscale_and_check(optimizer, 1.0 / self.scale_value):
            return False
        optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale_value}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])


def _torch_grad_scaler(kind: str, init_scale: float) -> torch.amp.GradScaler:
    try:
        return torch.amp.GradScaler(kind, init_scale=init_scale)
    except (TypeError, RuntimeError, AttributeError):
        return torch.npu.amp.GradScaler(init_scale=init_scale)  # older torch_npu


class MixedPrecision:
    """One object per run: `autocast()`, `backward(loss, optimizer)`, `step(optimizer) -> applied`.

    Args:
        device: from `common.device.select_device`.
        enabled: the `--amp` flag. False, or opt_level "O0", means fp32.
        opt_level: apex opt level O0..O3; with torch.amp every level above O0 is autocast.
        loss_scale: "dynamic" or a number (fp16 only; bf16 and fp32 need none).
        dtype: "auto" (fp16 on CUDA/NPU, bf16 on CPU), "fp16" or "bf16".
        prefer_apex: use apex on CUDA when it imports (on NPU apex is used whenever it imports).
        max_consecutive_skips: raise TrainingDiverged after this many skipped steps in a row.
    """

    def __init__(
        self,
        device: DeviceInfo,
        enabled: bool = False,
        opt_level: str = "O2",
        loss_scale: str | float = "dynamic",
        dtype: str = "auto",
        prefer_apex: bool = False,
        max_consecutive_skips: int = 50,
    ):
        opt_level = str(opt_level).upper()
        if opt_level not in OPT_LEVELS:
            raise ConfigError(f"--opt-level must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}")
        if dtype not in ("auto", "fp16", "bf16"):
            raise ConfigError(f"--amp-dtype must be auto, fp16 or bf16, got {dtype!r}")
        self.device = device
        self.opt_level = opt_level if enabled else "O0"
        self.loss_scale = parse_loss_scale(loss_scale)
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._apex = None
        self._scaler = None
        self.dtype: torch.dtype | None = None
        if self.opt_level == "O0":
            self.backend = "none"
            return
        apex_amp = _apex_amp() if device.kind in ("npu", "cuda") else None
        if apex_amp is not None and (device.kind == "npu" or prefer_apex):
            self.backend, self._apex, self.dtype = "apex", apex_amp, torch.float16
            return
        self.backend = "torch"
        if dtype == "auto":
            dtype = "bf16" if device.kind == "cpu" else "fp16"
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
        if self.dtype == torch.float16:
            if device.kind == "cpu":
                raise ConfigError(
                    "fp16 autocast is not supported for training on the CPU; use bf16 (the default)"
                )
            if self.loss_scale == "dynamic":
                self._scaler = _torch_grad_scaler(device.kind, 2.0**16)
            else:
                self._scaler = _StaticScaler(self.loss_scale)

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    @property
    def amp_type(self) -> str:
        """The AMP_Type column of the ModelZoo results tables."""
        if not self.enabled:
            return "fp32"
        name = "fp16" if self.dtype == torch.float16 else "bf16"
        return f"{self.opt_level} {name}"

    def describe(self) -> str:
        if not self.enabled:
            return "fp32 (no mixed precision)"
        scale = ""
        if self.dtype == torch.float16:
            scale = f", {'dynamic' if self.loss_scale == 'dynamic' else 'static'} loss scale"
        return f"{self.amp_type} via {'apex.amp' if self.backend == 'apex' else 'torch.amp'}{scale}"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """apex needs to wrap model and optimizer before DDP; a no-op for torch.amp."""
        if self.backend != "apex":
            return model, optimizer
        kwargs = {"opt_level": self.opt_level, "loss_scale": self.loss_scale}
        if self.device.kind == "npu":
            kwargs["combine_grad"] = True
        return self._apex.initialize(model, optimizer, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.backend != "torch":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.kind, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.backend == "apex":
            with self._apex.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        elif self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the step unless a gradient is inf/NaN. Returns whether it was applied."""
        if self.backend == "apex":
            optimizer.step()  # apex skips overflowing steps itself
            applied = not self._apex_overflowed()
        elif isinstance(self._scaler, _StaticScaler):
            applied = self._scaler.step(optimizer)
        elif self._scaler is not None:
            before = self._scaler.get_scale()
            self._scaler.step(optimizer)
            self._scaler.update()
            applied = self._scaler.get_scale() >= before
        else:
            applied = not unscale_and_check(optimizer, 1.0)
            if applied:
                optimizer.step()
        self._count(applied)
        return applied

    def _apex_overflowed(self) -> bool:
        try:
            return bool(self._apex._amp_state.loss_scalers[0]._has_overflow)
        except (AttributeError, IndexError):
            return False

    def _count(self, applied: bool) -> None:
        if applied:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"{self.consecutive_skips} optimizer steps in a row had non-finite gradients "
                f"({self.describe()}); stopping. The last good checkpoint is kept. Check the data for "
                "NaN/inf values, lower the learning rate, or train with --opt-level O0 to rule out fp16."
            )

    @property
    def scale(self) -> float | None:
        if isinstance(self._scaler, _StaticScaler):
            return self._scaler.scale_value
        if self._scaler is not None:
            return float(self._scaler.get_scale())
        return None

    def state_dict(self) -> dict:
        state = {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}
        if self.backend == "apex":
            state["apex"] = self._apex.state_dict()
        elif self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if self.backend == "apex" and "apex" in state:
            self._apex.load_state_dict(state["apex"])
        elif self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])
