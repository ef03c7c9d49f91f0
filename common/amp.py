"""Mixed precision behind one small interface, whatever the machine has.

The ModelZoo flags (`--amp`, `--opt-level O0..O3`, `--loss-scale dynamic|<number>`) map onto:

* Ascend or NVIDIA apex, when `apex.amp` imports (on NPU always preferred; on CUDA only with
  `--use_apex`): `amp.initialize` (with `combine_grad=True` on NPU) and `amp.scale_loss`.
* otherwise native `torch.amp`. `--amp-dtype auto` picks bf16 autocast without a loss scaler (bf16 has
  fp32's exponent range) where the device computes bf16 in hardware: NVIDIA compute capability >= 8.0,
  Ascend 910B and later, and always on the CPU; elsewhere fp16 autocast with a loss scaler (dynamic, or a
  static scale that never changes).
* `--amp=auto`: on an accelerator the same as `--amp`; on the CPU bf16 only where the CPU has bf16
  instructions (AVX512-BF16, AMX, Arm BF16) and timing a few training steps of the real model says bf16
  is faster (`choose_by_timing`, before the first epoch), else fp32. `--deterministic` keeps fp32 there.
  The choice is saved with the checkpoint: evaluating or resuming it uses the same (`follow`).
* O0, or no `--amp`: fp32.

Every path skips a step whose gradients are not finite instead of applying it, counts it, and raises
`TrainingDiverged` once `max_consecutive_skips` steps in a row were skipped: a NaN that persists is a bug
in the data or the setup, and training on would only overwrite good weights.

On CUDA, with an optimizer whose step takes the verdict as a tensor (torch's fused Adam/AdamW/SGD: they
set `_step_supports_amp_scaling` and read `optimizer.found_inf`, as torch.amp.GradScaler uses them,
pytorch torch/amp/grad_scaler.py `_maybe_opt_step`), the skip is decided on the device: the finite check
writes a flag the fused kernel reads, the skipped-step counts stay on the device, and nothing waits for
it until they are read (`settle_skips`, at logging steps and at the end of an epoch), so the host queues
the next step while the device still runs this one. Divergence is then reported at that read. Elsewhere
(CPU, NPU, apex, other optimizers) each step reads the verdict back, once.

On NPU, fp16 with a dynamic loss scale uses torch_npu's own GradScaler, and every other path reads the
chip's float-status flag where the chip has no inf/nan mode (Atlas training series: an overflow saturates
to finite values and only raises that flag), and agrees on the verdict across ranks.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from common.device import DeviceInfo
from common.errors import ConfigError, TrainingDiverged


def autocast_enabled(device_type: str) -> bool:
    """Whether torch.autocast is on for `device_type` here, on every torch this project supports."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


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


def _torch_npu():
    try:
        import torch_npu
    except BaseException:  # noqa: BLE001 - a broken CANN install raises anything
        return None
    return torch_npu


def uses_float_status(device: DeviceInfo) -> bool:
    """True on an NPU that signals overflow through its float-status flag, with saturated (finite) values.

    torch_npu.npu.utils.is_support_inf_nan() is False on the Atlas training series (saturation mode); builds
    of torch_npu from before chips with inf/nan mode lack the function and only have the flag.
    """
    if device.kind != "npu":
        return False
    torch_npu = _torch_npu()
    npu = getattr(torch_npu, "npu", None)
    if npu is None or not hasattr(npu, "get_npu_overflow_flag"):
        return False
    check = getattr(getattr(npu, "utils", None), "is_support_inf_nan", None)
    if check is None:
        return True
    try:
        return not bool(check())
    except BaseException:  # noqa: BLE001
        return False


def clear_float_status() -> None:
    """Reset the NPU's overflow flag, so that it then reports only what the next backward overflows."""
    _torch_npu().npu.clear_npu_overflow_flag()


def _read_float_status() -> bool:
    npu = _torch_npu().npu
    flagged = bool(npu.get_npu_overflow_flag())
    if flagged:
        npu.clear_npu_overflow_flag()
    return flagged


def _any_rank(found: bool, device: torch.device) -> bool:
    """Whether any rank of the default process group found an overflow (every rank must call this)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return found
    flag = torch.full((1,), 1.0 if found else 0.0, dtype=torch.float32, device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def unscale_and_check(
    optimizer: torch.optim.Optimizer, inv_scale: float, device: DeviceInfo | None = None
) -> bool:
    """Multiply every gradient by `inv_scale` in place; True when any gradient is inf or NaN.

    With `device` an NPU in saturation mode (`uses_float_status`), the float-status flag counts too (and
    is cleared), and the verdict is all-reduced over the default process group: an overflow there leaves
    finite gradients that DDP's all-reduce does not turn into inf on the other ranks, so ranks would
    otherwise disagree and their weights drift apart. torch_npu's GradScaler agrees the same way
    (torch_npu/npu/amp/grad_scaler.py, `_sync_dist_overflow_count`).
    """
    float_status = device is not None and uses_float_status(device)
    flagged = _read_float_status() if float_status else False
    found = _unscale_and_find_nonfinite(_grads(optimizer), inv_scale) or flagged
    if float_status:
        found = _any_rank(found, device.device)
    return found


def _unscale_and_find_nonfinite(grads: list[torch.Tensor], inv_scale: float) -> bool:
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

    def __init__(self, scale: float, device: DeviceInfo | None = None):
        self.scale_value = float(scale)
        self.device = device

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if unscale_and_check(optimizer, 1.0 / self.scale_value, self.device):
            return False
        optimizer.step()
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale_value}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])


def _torch_grad_scaler(kind: str, init_scale: float) -> torch.amp.GradScaler:
    if kind != "npu":
        return torch.amp.GradScaler(kind, init_scale=init_scale)
    # Not torch.amp.GradScaler("npu"): upstream's scaler neither clears nor reads the float-status flag of
    # a chip in saturation mode, nor agrees on overflow across ranks; torch_npu's does both
    # (torch_npu/npu/amp/grad_scaler.py: scale() clears the flag, _sync_dist_overflow_count all-reduces).
    try:
        from torch_npu.npu.amp import GradScaler
    except BaseException as exc:  # noqa: BLE001
        raise ConfigError(
            f"fp16 with a dynamic loss scale on NPU needs torch_npu.npu.amp.GradScaler, which does not import "
            f"({type(exc).__name__}: {exc}); use --loss-scale <number> or --amp-dtype bf16"
        ) from exc
    return GradScaler(init_scale=init_scale)


# ------------------------------------------------------------------------------------- bf16 in hardware

# /proc/cpuinfo names of the CPU instructions that compute bf16: x86 "flags" (AVX512-BF16, AMX-BF16) and
# aarch64 "Features" (Armv8.6 BF16).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FEATURE = "bf16"

# SoC names of the Ascend chips torch_npu counts as having bf16: c10_npu::IsBF16Supported() is
# `GetSocVersion() >= SocVersion::Ascend910B1` (Ascend/pytorch torch_npu/csrc/core/npu/NpuVariables.cpp),
# i.e. Ascend910B1..B4, Ascend310B1..B4, Ascend910_93xx and later. "Ascend910B" and "Ascend910ProB" are
# older members of the 910 series (enum values below Ascend910B1), without bf16.
_NPU_BF16_SOC = re.compile(r"^Ascend(910B\d|310B\d|910_9\d{2,}|9[5-9]\d)")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The bf16 instructions /proc/cpuinfo (or the given text of it) lists for this CPU; [] when none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, words = key.strip().lower(), value.split()
        if key == "flags":
            found.update(flag for flag in CPU_BF16_FLAGS if flag in words)
        elif key == "features" and ARM_BF16_FEATURE in words:
            found.add(ARM_BF16_FEATURE)
    return sorted(found)


def _onednn_runs_bf16() -> bool:
    """Whether this torch's oneDNN takes bf16 convolutions at all (it needs AVX512BW/VL/DQ on x86).

    Not a test for bf16 in hardware: aten's `mkldnn_bf16_device_check` accepts AVX512 CPUs that emulate
    bf16 (aten/src/ATen/native/mkldnn/Utils.h), hence the /proc/cpuinfo flags as well.
    """
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    if check is None:
        return True
    try:
        return bool(check())
    except (RuntimeError, AttributeError):
        return True


def cpu_bf16_support(cpuinfo: str | None = None) -> tuple[bool, str]:
    """(bf16 in hardware, what says so) for this CPU."""
    flags = cpu_bf16_flags(cpuinfo)
    if not flags:
        return False, "no avx512_bf16, amx_bf16 or Arm bf16 in /proc/cpuinfo"
    if not _onednn_runs_bf16():
        return False, f"{'/'.join(flags)} present, but this torch's oneDNN has no bf16 kernels for it"
    return True, "/".join(flags)


def cuda_bf16_support(index: int) -> tuple[bool, str]:
    """(bf16 in hardware, what says so) for CUDA device `index`: Ampere (8.0) and later.

    Both checks, because `torch.cuda.is_bf16_supported()` also answers True for older GPUs that only
    emulate bf16 (its `including_emulation` default, torch/cuda/__init__.py).
    """
    major, minor = torch.cuda.get_device_capability(index)
    detail = f"compute capability {major}.{minor}"
    return (major, minor) >= (8, 0) and bool(torch.cuda.is_bf16_supported()), detail


def npu_bf16_support(device: DeviceInfo) -> tuple[bool, str]:
    """(bf16 in hardware, the SoC name) for an Ascend NPU: 910B and later.

    torch_npu answers through `torch_npu.npu.is_bf16_supported()` (torch_npu/npu/utils.py, which calls
    `torch_npu._C._npu_is_bf16_supported`); builds from before it have only the SoC name.
    """
    name = device.name
    npu = getattr(_torch_npu(), "npu", None)
    try:
        name = str(npu.get_device_name(device.index))
    except BaseException:  # noqa: BLE001 - a broken CANN install raises anything
        pass
    utils = getattr(npu, "utils", None)
    check = getattr(npu, "is_bf16_supported", None) or getattr(utils, "is_bf16_supported", None)
    if check is not None:
        try:
            return bool(check()), name
        except BaseException:  # noqa: BLE001
            pass
    return bool(_NPU_BF16_SOC.match(name)), name


def bf16_support(device: DeviceInfo, cpuinfo: str | None = None) -> tuple[bool, str]:
    """(bf16 in hardware, what says so) for the device a run uses."""
    if device.kind == "cuda":
        return cuda_bf16_support(device.index)
    if device.kind == "npu":
        return npu_bf16_support(device)
    return cpu_bf16_support(cpuinfo)


class MixedPrecision:
    """One object per run: `autocast()`, `backward(loss, optimizer)`, `step(optimizer) -> applied`.

    Args:
        device: from `common.device.select_device`.
        enabled: the `--amp` flag: True, False, or "auto" (on the CPU: bf16 or fp32 by `choose_by_timing`;
            elsewhere as True). False, or opt_level "O0", means fp32.
        opt_level: apex opt level O0..O3; with torch.amp every level above O0 is autocast.
        loss_scale: "dynamic" or a number (fp16 only; bf16 and fp32 need none).
        dtype: "auto" (bf16 where the device has it in hardware and on the CPU, else fp16), "fp16" or
            "bf16".
        prefer_apex: use apex on CUDA when it imports (on NPU apex is used whenever it imports).
        max_consecutive_skips: raise TrainingDiverged after this many skipped steps in a row.
        deterministic: with enabled="auto" on the CPU, keep fp32 (a timing must not choose the numerics).
        skip_on_device: decide skipped steps on the device where the optimizer allows (see the module
            docstring); default: on CUDA.
    """

    def __init__(
        self,
        device: DeviceInfo,
        enabled: bool | str = False,
        opt_level: str = "O2",
        loss_scale: str | float = "dynamic",
        dtype: str = "auto",
        prefer_apex: bool = False,
        max_consecutive_skips: int = 50,
        deterministic: bool = False,
        skip_on_device: bool | None = None,
    ):
        opt_level = str(opt_level).upper()
        if opt_level not in OPT_LEVELS:
            raise ConfigError(f"--opt-level must be one of {', '.join(OPT_LEVELS)}, got {opt_level!r}")
        if dtype not in ("auto", "fp16", "bf16"):
            raise ConfigError(f"--amp-dtype must be auto, fp16 or bf16, got {dtype!r}")
        if enabled not in (True, False, "auto"):
            raise ConfigError(f"--amp takes no value, or 'auto'; got {enabled!r}")
        self.device = device
        self.opt_level = opt_level if enabled else "O0"
        self.loss_scale = parse_loss_scale(loss_scale)
        self.max_consecutive_skips = max_consecutive_skips
        self.skip_on_device = device.kind == "cuda" if skip_on_device is None else bool(skip_on_device)
        self._skipped = self._consecutive = 0  # counted on the host
        # Counted on the device since the last settle_skips: [skipped, skipped in a row at the end]
        self._device_skips: torch.Tensor | None = None
        self._device_steps = 0
        self._one: torch.Tensor | None = None  # a device constant 1, made once
        self._apex = None
        self._scaler = None
        self.dtype: torch.dtype | None = None
        self.note = ""  # why this precision, for describe()
        self.pending = False  # --amp=auto on the CPU until choose_by_timing has run
        self._float_status = uses_float_status(device)
        self.backend = "none"
        if self.opt_level == "O0":
            return
        apex_amp = _apex_amp() if device.kind in ("npu", "cuda") else None
        if apex_amp is not None and (device.kind == "npu" or prefer_apex):
            self.backend, self._apex, self.dtype = "apex", apex_amp, torch.float16
            self.note = "apex.amp imports on this NPU" if device.kind == "npu" else "--use_apex"
            return
        if device.kind == "cpu":
            self._init_cpu(enabled == "auto", dtype, deterministic)
            return
        self.backend = "torch"
        if dtype == "auto":
            has_bf16, detail = bf16_support(device)
            dtype = "bf16" if has_bf16 else "fp16"
            self.note = f"auto: {'bf16' if has_bf16 else 'no bf16'} in hardware, {detail}"
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
        if self.dtype == torch.float16:
            if self.loss_scale == "dynamic":
                self._scaler = _torch_grad_scaler(device.kind, 2.0**16)
            else:
                self._scaler = _StaticScaler(self.loss_scale, device)

    def _init_cpu(self, auto: bool, dtype: str, deterministic: bool) -> None:
        """bf16 autocast when asked (`--amp`, `--amp-dtype bf16`); with `--amp=auto` fp32 until timed."""
        if dtype == "fp16":
            raise ConfigError(
                "fp16 autocast is not supported for training on the CPU; use bf16 (the default)"
            )
        has_bf16, detail = cpu_bf16_support()
        if not auto or dtype == "bf16":
            self.backend, self.dtype = "torch", torch.bfloat16
            self.note = f"bf16 in hardware: {detail}" if has_bf16 else f"bf16 emulated: {detail}"
        elif not has_bf16:
            self.note = f"--amp=auto: fp32, no bf16 in this CPU's hardware: {detail}"
        elif deterministic:
            self.note = "--amp=auto: fp32 with --deterministic, as bf16 would change the numerics"
        else:
            self.pending = True
            self.note = f"--amp=auto: bf16 on {detail} or fp32, whichever trains faster; not timed yet"

    def settle(
        self,
        runtime: Any,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Any,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        prepare_batch: Callable[..., tuple[torch.Tensor, torch.Tensor]],
        *,
        steps: int = 2,
    ) -> None:
        """`--amp=auto` on the CPU, before the first epoch: `choose_by_timing` on the real model and
        optimizer at one batch of `loader`, then weights, optimizer state, BatchNorm statistics and random
        generators back as they were, so the run trains exactly as if nothing had been timed."""
        if not self.pending:
            return
        from common.checkpoint import rng_state, set_rng_state
        from common.engine import train_step

        rng = rng_state()
        weights = copy.deepcopy(model.state_dict())
        optimizer_state = copy.deepcopy(optimizer.state_dict())
        was_training = model.training
        try:
            batch = next(iter(loader))
            inputs, targets = prepare_batch(batch, runtime.device.device, runtime.options.channels_last)
            model.train()
            self.choose_by_timing(
                lambda: train_step(model, inputs, targets, loss_fn, optimizer, self),
                steps=steps,
                agree=lambda values: runtime.dist.reduce_scalars(values, runtime.device.device, "max"),
                synchronize=runtime.device.synchronize,
            )
        finally:
            if self.pending:  # the timing failed: the run (if it goes on) trains in fp32
                self._use("fp32")
                self.pending = False
            model.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
            model.train(was_training)
            set_rng_state(rng)
        runtime.print(f"Precision: {self.note}")

    def follow(self, checkpoint: Any) -> None:
        """`--amp=auto` on the CPU in a run that scores or resumes a checkpoint: the precision its run chose
        (`state_dict()["precision"]` under the checkpoint's "amp"), so an evaluation repeats the scores of that
        run's own validation and a resumed run goes on as it trained. Untimed otherwise."""
        amp_state = checkpoint.get("amp") if isinstance(checkpoint, Mapping) else None
        precision = amp_state.get("precision") if isinstance(amp_state, Mapping) else None
        if self.pending and precision in ("fp32", "bf16"):
            self._use(precision)
            self.pending = False
            self.note = f"--amp=auto: {precision}, as the run that wrote the checkpoint chose"

    def _use(self, precision: str) -> None:
        """Switch between fp32 and bf16 autocast (the CPU's choice; neither has a scaler)."""
        self.backend, self.dtype = ("torch", torch.bfloat16) if precision == "bf16" else ("none", None)

    def choose_by_timing(
        self,
        step: Callable[[], Any],
        *,
        steps: int = 2,
        agree: Callable[[list[float]], list[float]] | None = None,
        synchronize: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> dict[str, float]:
        """Settle `--amp=auto` on the CPU: time `steps` calls of `step` (one training step of the real
        model at the real batch) after one warm-up, in fp32 and in bf16, and keep the faster.

        `agree` turns this rank's [fp32, bf16] seconds into the values every rank decides on (the
        slowest rank's), so that all ranks train alike. Returns the seconds per step of each.
        """
        if not self.pending:
            raise RuntimeError("choose_by_timing is for --amp=auto on the CPU, once")
        seconds: dict[str, float] = {}
        for precision in ("fp32", "bf16"):
            self._use(precision)
            step()  # warm-up: oneDNN builds its primitives for the new dtype here
            if synchronize is not None:
                synchronize()
            start = clock()
            for _ in range(steps):
                step()
            if synchronize is not None:
                synchronize()
            seconds[precision] = (clock() - start) / steps
        if agree is not None:
            seconds = dict(zip(("fp32", "bf16"), agree([seconds["fp32"], seconds["bf16"]])))
        choice = "bf16" if seconds["bf16"] < seconds["fp32"] else "fp32"
        self._use(choice)
        self.pending = False
        self.skipped_steps = self.consecutive_skips = 0  # the timed steps are not the run's
        self.note = (
            f"--amp=auto: {choice}, timed {steps} training step(s) of the model: "
            f"fp32 {seconds['fp32']:.3f} s, bf16 {seconds['bf16']:.3f} s per step"
        )
        return seconds

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: what the steps compute in."""
        if not self.enabled:
            return "fp32"
        return "fp16" if self.dtype == torch.float16 else "bf16"

    @property
    def amp_type(self) -> str:
        """The AMP_Type column of the ModelZoo results tables."""
        return self.precision if not self.enabled else f"{self.opt_level} {self.precision}"

    def describe(self) -> str:
        """What runs and why, e.g. "O2 bf16 via torch.amp, no loss scale (auto: bf16 in hardware, ...)"."""
        if not self.enabled:
            return f"fp32 (no mixed precision; {self.note})" if self.note else "fp32 (no mixed precision)"
        note = f" ({self.note})" if self.note else ""
        scale = ", no loss scale"
        if self.dtype == torch.float16:
            scale = f", {'dynamic' if self.loss_scale == 'dynamic' else 'static'} loss scale"
        return f"{self.amp_type} via {'apex.amp' if self.backend == 'apex' else 'torch.amp'}{scale}{note}"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """apex needs to wrap model and optimizer before DDP; a no-op for torch.amp."""
        if self.backend != "apex":
            return model, optimizer
        kwargs = {"opt_level": self.opt_level, "loss_scale": self.loss_scale}
        if self.device.kind == "npu" and self.opt_level in ("O1", "O2"):
            # Ascend's apex refuses combine_grad at other levels (its frontend.py Properties).
            kwargs["combine_grad"] = True
        return self._apex.initialize(model, optimizer, **kwargs)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the gradients before a backward.

        apex.amp.initialize replaces `optimizer.zero_grad` by a function of no arguments when it keeps fp32
        master weights (O2: NVIDIA/apex apex/amp/_process_optimizer.py, `new_zero_grad(self)`), and Ascend's
        apex also with combine_grad (Ascend/apex patch/npu.patch, `new_zero_grad_with_master_weights`,
        `new_zero_grad_accelerate_*`), so `set_to_none=True` raises TypeError there.
        """
        if self.backend == "apex":
            optimizer.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.backend != "torch":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.backend == "apex":
            with self._apex.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
            return
        # torch_npu's GradScaler clears the flag in scale(); the other paths read it in unscale_and_check.
        if self._float_status and not self._dynamic_scaler:
            clear_float_status()
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    @property
    def _dynamic_scaler(self) -> bool:
        return self._scaler is not None and not isinstance(self._scaler, _StaticScaler)

    def step(self, optimizer: torch.optim.Optimizer) -> bool | None:
        """Apply the step unless a gradient is inf/NaN. Returns whether it was applied, or None where the
        device decided it (the count is read later: `settle_skips`)."""
        if self._steps_on_device(optimizer):
            return self._step_on_device(optimizer)
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
            applied = not unscale_and_check(optimizer, 1.0, self.device)
            if applied:
                optimizer.step()
        self._count(applied)
        return applied

    def _steps_on_device(self, optimizer: torch.optim.Optimizer) -> bool:
        return (
            self.skip_on_device
            and self.backend != "apex"
            and not self._float_status
            and not isinstance(self._scaler, _StaticScaler)
            and getattr(optimizer, "_step_supports_amp_scaling", False)
        )

    def _step_on_device(self, optimizer: torch.optim.Optimizer) -> None:
        if self._scaler is not None:
            # GradScaler hands a fused optimizer its verdict as a tensor; its per-device flags are read
            # between step() and update(), which clears them (torch/amp/grad_scaler.py).
            self._scaler.step(optimizer)
            flags = list(self._scaler._found_inf_per_device(optimizer).values())
            self._scaler.update()
            if flags:
                self._count_on_device(flags[0] if len(flags) == 1 else torch.stack(flags).sum())
            return None
        grads = _grads(optimizer)
        if not grads:
            optimizer.step()
            return None
        device = grads[0].device
        if any(g.device != device for g in grads):
            raise ConfigError("skip_on_device needs every gradient on one device; pass skip_on_device=False")
        found = torch.zeros((), dtype=torch.float32, device=device)
        one = self._one_like(found)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for group in by_dtype.values():
            # Sets `found` to 1 where a gradient is inf/NaN; the factor 1 leaves the gradients as they are.
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, one)
        # The fused step reads the flag on the device and leaves parameters, moments and its step count
        # as they were where it is 1 (torch/optim/adam.py `_fused_adam`, sgd.py `_fused_sgd`).
        optimizer.found_inf = found
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        self._count_on_device(found)
        return None

    def _count_on_device(self, found: torch.Tensor) -> None:
        found = found.reshape(()).float()
        if self._device_skips is None or self._device_skips.device != found.device:
            self.settle_skips()
            self._device_skips = torch.zeros(2, dtype=torch.float32, device=found.device)
        # [skipped += found, run = (run + found) * found]: the run of skips ends at an applied step.
        self._device_skips.add_(found).mul_(torch.stack([self._one_like(found), found]))
        self._device_steps += 1

    def _one_like(self, found: torch.Tensor) -> torch.Tensor:
        if self._one is None or self._one.device != found.device:
            self._one = torch.ones((), dtype=torch.float32, device=found.device)
        return self._one

    def settle_skips(self) -> None:
        """Read the skipped steps counted on the device (one wait for it) into the host counts, and raise
        TrainingDiverged if the steps skipped in a row reach the limit. A no-op when none are pending."""
        if self._device_steps == 0:
            return
        skipped, run = (int(v) for v in self._device_skips.tolist())
        steps, self._device_steps = self._device_steps, 0
        self._device_skips.zero_()
        self._skipped += skipped
        self._consecutive = self._consecutive + run if run == steps else run
        self._check_consecutive()

    @property
    def skipped_steps(self) -> int:
        """Steps skipped so far (reads the device's count where it keeps one)."""
        self.settle_skips()
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._drop_device_counts()
        self._skipped = int(value)

    @property
    def consecutive_skips(self) -> int:
        self.settle_skips()
        return self._consecutive

    @consecutive_skips.setter
    def consecutive_skips(self, value: int) -> None:
        self._drop_device_counts()
        self._consecutive = int(value)

    def _drop_device_counts(self) -> None:
        self._device_steps = 0
        if self._device_skips is not None:
            self._device_skips.zero_()

    def _apex_overflowed(self) -> bool:
        try:
            return bool(self._apex._amp_state.loss_scalers[0]._has_overflow)
        except (AttributeError, IndexError):
            return False

    def _count(self, applied: bool) -> None:
        if applied:
            self._consecutive = 0
            return
        self._skipped += 1
        self._consecutive += 1
        self._check_consecutive()

    def _check_consecutive(self) -> None:
        if self._consecutive >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"{self._consecutive} optimizer steps in a row had non-finite gradients "
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
        if not self.pending:  # what this run trains in, for `follow`
            state["precision"] = self.precision
        if self.backend == "apex":
            state["apex"] = self._apex.state_dict()
        elif self._scaler is not None:
            state["scaler"] = self._scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.follow({"amp": state})  # a resumed --amp=auto run keeps the precision it was timed to
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        if self.backend == "apex" and "apex" in state:
            self._apex.load_state_dict(state["apex"])
        elif self._scaler is not None and "scaler" in state:
            self._scaler.load_state_dict(state["scaler"])
