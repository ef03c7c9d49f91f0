"""Whether a per-device batch fits in memory, measured before the first step, and how to split it if not.

The planner measures instead of guessing, and budgets the way nnU-Net's experiment planner does (a
memory cost per sample on top of a fixed cost, compared with what the device has): one real forward,
loss and backward at two small micro-batch sizes (1 and 2, or 2 and 4 where BatchNorm needs more than
one value per channel), no optimizer update, the model's buffers restored afterwards. The peak growth
over the state before the first step gives a line, fixed + per_sample * n, which projects the peak at
the per-device batch and at any micro-batch size. What the first update adds (the optimizer's state, a
temporary of the multi-tensor update) and the loaded batch are counted on top.

* CUDA / NPU: `max_memory_allocated` after `reset_peak_memory_stats`, minus what was allocated before.
  Budget: the device's free memory plus this process's cached but unused blocks, minus a margin.
* CPU: the resident set. The C allocator keeps freed memory resident and reuses it, so a growth
  measured after earlier steps would miss what they left behind: before each probe the heap's free
  pages go back to the system (glibc `malloc_trim`), then the high-water mark (VmHWM) is reset through
  /proc/self/clear_refs (Linux >= 4.0) and the growth is VmHWM after the step minus the resident size
  before it. Without malloc_trim the baseline is the resident size before the first probe; without
  clear_refs the resident size is sampled every 2 ms. Budget: MemAvailable (or the cgroup's limit, if
  lower) divided by the ranks on this node, minus a margin and the loader workers' share.

Both probes run inside `no_sync()` under DDP, so no collective is issued while ranks are measuring.
"""

from __future__ import annotations

import contextlib
import math
import resource
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

from common.device import DeviceInfo
from common.errors import ConfigError

MIB = 2**20
GIB = 2**30
MIN_MARGIN_BYTES = 512 * MIB
HOST_MARGIN_FRACTION = 0.10  # RSS is a coarse measure (allocator slack, page granularity)
DEVICE_MARGIN_FRACTION = 0.05  # allocator accounting is exact; the slack is fragmentation
# A loader worker is a fork of its rank: the pages it writes (Python reference counts, decoded samples,
# its allocator's arenas) become its own. An allowance per worker, not a measurement.
WORKER_OVERHEAD_BYTES = 256 * MIB
_BATCH_NORM_MESSAGE = "more than 1 value per channel"

# ------------------------------------------------------------------------------------------- host memory


def _kb_line_bytes(path: str, key: str) -> int | None:
    """A `Key:  N kB` line of a /proc file in bytes (None off Linux or when absent)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _status_bytes(key: str) -> int | None:
    return _kb_line_bytes("/proc/self/status", key)


def _meminfo_bytes(key: str) -> int | None:
    return _kb_line_bytes("/proc/meminfo", key)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit, when there is a limit (v2, then v1)."""
    for limit_file, usage_file, stat_file, inactive_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
         "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
         "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
    ):  # fmt: skip
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= 2**60:
            continue
        inactive = 0
        try:
            with open(stat_file) as handle:
                for line in handle:
                    name, _, value = line.partition(" ")
                    if name == inactive_key:
                        inactive = int(value)
        except (OSError, ValueError):
            pass
        # The page cache counted in the usage is given back under pressure.
        return max(0, limit - max(0, usage - inactive))
    return None


def host_available_bytes() -> int | None:
    """Memory a new allocation can still get on this host: MemAvailable, or the cgroup's room if lower."""
    available = _meminfo_bytes("MemAvailable")
    room = _cgroup_available()
    if available is None:
        return room
    return available if room is None else min(available, room)


_hwm_before_resets = 0  # the process's peak resident size before this module last reset VmHWM


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc `malloc_trim(0)`); False where unavailable.

    glibc keeps memory freed by earlier steps resident and hands it out again, so a probe after a
    training step (an earlier fold, a precision timing) would find its memory already resident and
    measure almost no growth. After the trim the resident size is what is in use, and a probe's growth
    is what its step needs.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None


def _reset_host_peak() -> bool:
    """Reset VmHWM to the current resident size (kept for `peak_host_rss_bytes` first); False if refused."""
    global _hwm_before_resets
    hwm = _status_bytes("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    _hwm_before_resets = max(_hwm_before_resets, hwm or 0)
    return True


def peak_host_rss_bytes() -> int:
    """The process's peak resident size since it started, including what a VmHWM reset here cleared.

    ru_maxrss follows the mm's high-water mark, which /proc/self/clear_refs resets, so the peak seen
    before such a reset is added back.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return max(own, _hwm_before_resets)


class _RssSampler:
    """The largest VmRSS seen every few milliseconds: the fallback where VmHWM cannot be reset."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = _status_bytes("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_bytes("VmRSS") or 0)
            time.sleep(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_bytes("VmRSS") or 0)


# ----------------------------------------------------------------------------------------- device memory


def _device_module(device: DeviceInfo) -> Any:
    return getattr(torch, device.kind) if device.kind in ("cuda", "npu") else None


def device_peak_allocated_bytes(device: DeviceInfo) -> int | None:
    """Peak bytes the accelerator's allocator handed out since the last peak reset (None on CPU)."""
    module = _device_module(device)
    if module is None or device.device.type != device.kind:
        return None
    return int(module.max_memory_allocated(device.index))


def device_free_bytes(device: DeviceInfo) -> tuple[int, int]:
    """(free, total) bytes of the accelerator.

    torch.cuda.mem_get_info and torch_npu.npu.mem_get_info (torch_npu/npu/__init__.py, which reads
    `_npu_getDeviceMemories`) return (free, total); torch_npu builds without it get total from
    `get_device_properties(...).total_memory` and count everything this process reserved as used.
    """
    module = _device_module(device)
    if hasattr(module, "mem_get_info"):
        free, total = module.mem_get_info(device.index)
        return int(free), int(total)
    total = int(module.get_device_properties(device.index).total_memory)
    return max(0, total - int(module.memory_reserved(device.index))), total


# ------------------------------------------------------------------------------------------- the line


@dataclass(frozen=True)
class MemoryLine:
    """Peak memory growth of one training step as fixed + per_sample * n (bytes)."""

    fixed: float
    per_sample: float

    @classmethod
    def through(cls, points: Sequence[tuple[int, int]]) -> MemoryLine:
        """The line through two measured (micro-batch, peak growth) points, or through the origin and one.

        A slope that the measurement noise made zero or negative would promise that any batch fits;
        the line through the origin and the larger point is taken instead (all growth per sample).
        """
        points = sorted(points)
        if not points or any(n < 1 for n, _ in points):
            raise ValueError("at least one point with a micro-batch of 1 or more is needed")
        (n2, p2) = points[-1]
        if len(points) == 1 or points[0][0] == n2:
            return cls(0.0, p2 / n2)
        (n1, p1) = points[0]
        slope = (p2 - p1) / (n2 - n1)
        if slope <= 0:
            return cls(0.0, p2 / n2)
        return cls(max(0.0, p1 - slope * n1), slope)

    def at(self, samples: int) -> float:
        return self.fixed + self.per_sample * samples

    def largest_fitting(self, budget: float, extra: float = 0.0) -> int:
        """The most samples whose projected growth plus `extra` stays within `budget` (0 if none)."""
        room = budget - extra - self.fixed
        if room <= 0 or self.per_sample <= 0:
            return 0 if room <= 0 else 2**31
        return int(math.floor(room / self.per_sample))


def chunk_sizes(batch: int, micro_batches: int) -> list[int]:
    """Sizes of `torch.tensor_split(batch, micro_batches)`: as equal as possible, the larger ones first."""
    base, rest = divmod(batch, micro_batches)
    return [base + 1] * rest + [base] * (micro_batches - rest)


@dataclass(frozen=True)
class Decision:
    micro_batches: int  # 0: nothing fits, not even the smallest micro-batch
    largest_fitting: int  # the largest per-device batch that fits in one step


def parse_micro_batch(value: str | int) -> str | int:
    """`--micro_batch`: "auto", "off" or a positive number of micro-batches per batch."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip().lower()
        if text in ("auto", "off"):
            return text
        try:
            number = int(text)
        except ValueError:
            number = 0
    if number < 1:
        raise ConfigError(
            f"--micro_batch must be auto, off or a positive number of micro-batches per batch, got {value!r}"
        )
    return number


def decide(
    setting: str | int,
    batch: int,
    line: MemoryLine | None,
    extra: float,
    budget: float | None,
    min_micro_batch: int = 1,
    fails_at: int | None = None,
) -> Decision:
    """How many micro-batches a per-device `batch` needs.

    `setting`: "auto" (the fewest micro-batches whose largest one fits), "off" (1, whether or not it
    fits: the caller refuses), or a number (that many, capped at the batch). `extra`: bytes the step
    needs whatever the batch (optimizer state, the loaded batch). `min_micro_batch`: the smallest
    micro-batch the network trains on (2 with BatchNorm layers that need two values per channel).
    `fails_at`: a micro-batch that ran out of device memory while probing (it and anything larger fail).
    """
    if isinstance(setting, int):
        return Decision(max(1, min(setting, batch)), batch)
    if line is None or budget is None:
        return Decision(1, batch)
    largest = min(batch, line.largest_fitting(budget, extra))
    if fails_at is not None:
        largest = min(largest, fails_at - 1)
    if setting == "off" or largest >= batch:
        return Decision(1, largest)
    for k in range(2, batch // max(1, min_micro_batch) + 1):
        if chunk_sizes(batch, k)[0] <= largest:
            return Decision(k, largest)
    return Decision(0, largest)


# ------------------------------------------------------------------------------------------- the plan


@dataclass
class BatchPlan:
    """What the planner measured and decided; printed at start and kept in summary.json (MiB)."""

    setting: str
    per_device_batch: int
    micro_batches: int
    micro_batch_sizes: list[int]
    device: str
    measured: dict[int, float] = field(default_factory=dict)  # micro-batch -> peak growth, MiB
    fixed_mb: float | None = None
    per_sample_mb: float | None = None
    extra_mb: float | None = None  # optimizer state still to be created, the loaded batch
    projected_full_batch_mb: float | None = None
    projected_peak_mb: float | None = None  # at the largest micro-batch, extra included
    budget_mb: float | None = None
    budget_detail: str = ""
    largest_fitting_batch: int | None = None
    batch_norm: bool = False
    meter: str = ""
    # The peak growth since planning (the steps, and --amp=auto's timing steps), filled in by `record_observed`
    observed_peak_mb: float | None = None
    peak_meter: PeakMeter | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "peak_meter"}
        data["measured"] = {str(k): v for k, v in self.measured.items()}
        data["micro_batch_sizes"] = list(self.micro_batch_sizes)
        return data

    def record_observed(self) -> None:
        """The peak growth of the steps since planning, beside the projection it checks."""
        if self.peak_meter is not None:
            observed = self.peak_meter.observed()
            self.observed_peak_mb = None if observed is None else observed / MIB

    def describe(self) -> list[str]:
        """The lines printed at start."""
        lines = []
        sizes = self.micro_batch_sizes
        split = (
            f"{self.micro_batches} micro-batches of {'/'.join(str(s) for s in sorted(set(sizes), reverse=True))}"
            if self.micro_batches > 1
            else "one step per batch"
        )
        if self.measured:
            probes = ", ".join(f"{v / 1024:.2f} GiB at {k}" for k, v in sorted(self.measured.items()))
            budget = (
                f"budget {self.budget_mb / 1024:.2f} GiB ({self.budget_detail})"
                if self.budget_mb is not None
                else "no budget known (no /proc/meminfo): not checked"
            )
            lines.append(
                f"Memory plan ({self.device}, {self.meter}): step peak growth {probes} -> "
                f"{self.fixed_mb / 1024:.2f} GiB + {self.per_sample_mb / 1024:.3f} GiB per sample, plus "
                f"{self.extra_mb / 1024:.2f} GiB (optimizer state to come, the loaded batch); per-device batch "
                f"{self.per_device_batch} projects to {self.projected_full_batch_mb / 1024:.2f} GiB; {budget}"
            )
        reason = {"auto": "", "off": " (--micro_batch off)"}.get(self.setting, " (--micro_batch given)")
        projected = (
            f"; projected peak {self.projected_peak_mb / 1024:.2f} GiB"
            if self.projected_peak_mb is not None
            else ""
        )
        lines.append(f"Memory plan: per-device batch {self.per_device_batch}, {split}{reason}{projected}")
        if self.micro_batches > 1:
            lines.append(
                f"Memory plan: gradients accumulate over the {self.micro_batches} micro-batches, one optimizer "
                f"step per batch of {self.per_device_batch}; the loss and metrics cover the whole batch"
            )
            if self.batch_norm:
                lines.append(
                    f"Memory plan: note that BatchNorm layers normalise each micro-batch of "
                    f"{max(sizes)} on its own, not the batch of {self.per_device_batch}: their batch statistics "
                    f"are noisier and their running statistics update {self.micro_batches} times per step"
                )
        return lines


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def parameter_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])


def optimizer_extra_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Memory the first optimizer step adds, which the probes (no update) do not see.

    Two state tensors per parameter (Adam's moments; SGD with momentum needs one) until the optimizer
    holds state, plus one parameter-sized temporary of the multi-tensor update.
    """
    size = parameter_bytes(optimizer)
    return size * (1 if optimizer.state else 3)


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def take(value: Any, n: int) -> Any:
    """The first `n` samples of a batch tensor (or of every tensor in a list/tuple); others unchanged."""
    if isinstance(value, torch.Tensor):
        return value[:n]
    if isinstance(value, (list, tuple)):
        return type(value)(take(v, n) for v in value)
    return value


# ------------------------------------------------------------------------------------------- the probes


class PeakMeter:
    """Peak memory growth of a block of work over what is in use before it (see the module docstring)."""

    def __init__(self, device: DeviceInfo):
        self.device = device
        self.module = _device_module(device) if device.device.type == device.kind else None
        self.kind = device.kind if self.module is not None else "cpu"
        self.baseline = 0
        self.resettable = True
        self.trims = False
        if self.kind == "cpu":
            self.trims = release_free_heap()
            self.baseline = _status_bytes("VmRSS") or 0
        else:
            self.module.synchronize(device.index)
            self.baseline = int(self.module.memory_allocated(device.index))

    @property
    def name(self) -> str:
        if self.kind != "cpu":
            return f"{self.kind} max_memory_allocated"
        return "host VmHWM (reset per probe)" if self.resettable else "host VmRSS sampled every 2 ms"

    def measure(self, work: Callable[[], None]) -> int:
        """Run `work` and return its peak growth over the baseline in bytes."""
        if self.kind != "cpu":
            self.module.synchronize(self.device.index)
            self.module.reset_peak_memory_stats(self.device.index)
            work()
            self.module.synchronize(self.device.index)
            return max(0, int(self.module.max_memory_allocated(self.device.index)) - self.baseline)
        if self.trims:
            release_free_heap()
            self.baseline = _status_bytes("VmRSS") or self.baseline
        if self.resettable and _reset_host_peak():
            work()
            return max(0, (_status_bytes("VmHWM") or 0) - self.baseline)
        self.resettable = False
        with _RssSampler() as sampler:
            work()
        return max(0, sampler.peak - self.baseline)

    def restart(self) -> None:
        """Start the peak over, so that `observed` covers the training steps only."""
        if self.kind != "cpu":
            self.module.reset_peak_memory_stats(self.device.index)
            return
        if self.trims:
            release_free_heap()
            self.baseline = _status_bytes("VmRSS") or self.baseline
        if self.resettable:
            _reset_host_peak()

    def observed(self) -> int | None:
        """Peak growth over the baseline since `restart` (None where the host peak cannot be reset)."""
        if self.kind != "cpu":
            return max(0, int(self.module.max_memory_allocated(self.device.index)) - self.baseline)
        if not self.resettable:
            return None
        return max(0, (_status_bytes("VmHWM") or 0) - self.baseline)


def probe_step(model: torch.nn.Module, inputs: Any, targets: Any, loss_fn: Callable, amp: Any) -> None:
    """Forward and backward as a training step runs them, without an optimizer update.

    The gradient flows from a stand-in for the loss (the mean square of every output): the training loss
    is not called, so a loss with state of its own (a counter, a schedule) sees only real steps, and its
    memory is small next to the network's activations. The backward is not loss-scaled, so the scaler's
    state is untouched; the gradients are dropped and the buffers (BatchNorm statistics) restored by the
    caller. `no_sync()` keeps DDP from all-reducing. `loss_fn` and `targets` are kept for the signature.
    """
    del loss_fn, targets
    sync = getattr(model, "no_sync", None)
    with sync() if callable(sync) else contextlib.nullcontext():
        with amp.autocast():
            outputs = model(inputs)
        parts = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        loss = sum(part.float().square().mean() for part in parts)
        loss.backward()
    del outputs, parts, loss


def is_batch_norm_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError) and _BATCH_NORM_MESSAGE in str(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ------------------------------------------------------------------------------------------- the budget


@dataclass(frozen=True)
class Budget:
    bytes: int
    detail: str


def host_budget(local_ranks: int, loader_bytes: int = 0) -> Budget | None:
    """MemAvailable (or the cgroup's room) shared by the ranks on this node, minus a margin and the
    loader workers' share (None where /proc/meminfo is unreadable)."""
    release_free_heap()  # what this process freed is available to the step too
    available = host_available_bytes()
    if available is None:
        return None
    share = available // max(1, local_ranks)
    margin = max(MIN_MARGIN_BYTES, int(HOST_MARGIN_FRACTION * share))
    detail = (
        f"MemAvailable {available / GIB:.2f} GiB / {local_ranks} rank(s) on this node - margin "
        f"{margin / GIB:.2f} GiB - loader workers {loader_bytes / GIB:.2f} GiB"
    )
    return Budget(max(0, share - margin - loader_bytes), detail)


def device_budget(device: DeviceInfo) -> Budget:
    """Free device memory plus this process's cached, unused blocks, minus a margin."""
    module = _device_module(device)
    free, total = device_free_bytes(device)
    cached = max(0, int(module.memory_reserved(device.index)) - int(module.memory_allocated(device.index)))
    margin = max(MIN_MARGIN_BYTES, int(DEVICE_MARGIN_FRACTION * total))
    detail = (
        f"{device.kind} free {free / GIB:.2f} GiB + cached {cached / GIB:.2f} GiB of {total / GIB:.2f} GiB - "
        f"margin {margin / GIB:.2f} GiB"
    )
    return Budget(max(0, free + cached - margin), detail)


def loader_bytes(loader: Any, batch_bytes: int) -> int:
    """Host memory the loader's worker processes will hold: their own pages and their prefetched batches."""
    workers = int(getattr(loader, "num_workers", 0) or 0)
    if workers <= 0:
        return 0
    prefetch = int(getattr(loader, "prefetch_factor", None) or 2)
    return workers * (WORKER_OVERHEAD_BYTES + prefetch * batch_bytes)
