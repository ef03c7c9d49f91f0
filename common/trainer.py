"""The one training runtime of every folder: start-up from checkpoints, model preparation, the outer loop.

An entry point parses its flags, turns them into typed objects and hands them in:

    options = RunOptions.from_args(args)                       # common.cli
    start = StartPoint.read(resume=args.resume, init=args.pretrained)   # checked before any data work
    runtime = setup_runtime(options)
    model, optimizer = prepare(net, make_optimizer, runtime, loss_fn=loss)
    start.load_weights(model)                                  # keys checked before anything is written
    run = TrainingRun(runtime, save_dir, model=model, optimizer=optimizer, ..., target=target)
    run.start(start)                                           # resume: optimizer, RNG, history, ...
    result = fit(run, LoopConfig(epochs=100, ...), train_loader=..., loss_fn=loss, hooks=FolderHooks())

The folder supplies what is its own through `Hooks`: its step and epoch log lines, its validation
(the metric, the forward pass, e.g. a sliding window) and its files. Everything else happens here, in one
order for every folder: stop conditions (epochs, step cap, time limit, early stopping), validation
cadence, scheduler stepping, best checkpoint, CSV/plot/summary through `TrainingRun`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from common import memory, precise_bn
from common.checkpoint import load_checkpoint, load_weights, unwrap_model
from common.cli import Runtime, apply_conv_flag
from common.clock import BASES, Clock
from common.engine import EpochStats, StepInfo, TrainingRun, current_lr, to_device, train_one_epoch
from common.errors import CheckpointError, ConfigError

# ----------------------------------------------------------------------------------------------- start-up


def is_training_state(state: Any) -> bool:
    """A checkpoint written by `TrainingRun` (weights, optimizer, epoch, RNG, ...), not bare weights."""
    return isinstance(state, dict) and "optimizer" in state and "epoch" in state


def read_checkpoint_file(path: str | Path, flag: str) -> Any:
    """Read a checkpoint a flag names, weights only (nothing in it runs), memory-mapped where possible.

    A missing, truncated, corrupted or code-carrying file is refused here, before any data is prepared.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist ({flag}: no such checkpoint file)")
    return load_checkpoint(path, mmap=True)


@dataclass
class StartPoint:
    """What a run starts from: nothing, initial weights (`init`), or a training state to resume.

    `read` applies one rule for every entry point:
    * `--resume` must name a training state of this code; bare weights are refused with a pointer to the
      initial-weights flag, unless `weights_only_resume="init"` (the MindSpore U-Net loads them as initial
      weights, as its original did).
    * the initial-weights flag loads weights; when `init_may_resume` and the file is a training state
      (ISIC's `--pth_path`), the run resumes from it instead.
    """

    resume_path: Path | None = None
    resume_state: Any = None
    init_path: Path | None = None
    init_state: Any = None
    messages: list[str] = field(default_factory=list)

    @classmethod
    def read(
        cls,
        *,
        resume: str | Path | None = None,
        init: str | Path | None = None,
        resume_flag: str = "--resume",
        init_flag: str = "--pretrained",
        init_may_resume: bool = False,
        weights_only_resume: str = "refuse",
    ) -> StartPoint:
        if weights_only_resume not in ("refuse", "init"):
            raise ValueError("weights_only_resume must be 'refuse' or 'init'")
        start = cls()
        if resume:
            state = read_checkpoint_file(resume, resume_flag)
            if is_training_state(state):
                start.resume_path, start.resume_state = Path(resume), state
            elif weights_only_resume == "init":
                start.init_path, start.init_state = Path(resume), state
                start.messages.append(
                    f"Loaded weights from {resume}: no training state in it, so training starts at epoch 1"
                )
            else:
                raise CheckpointError(
                    f"{resume} holds weights only, not a training state; use it with {init_flag} (initial "
                    f"weights) or pass a checkpoint written by this code's training to {resume_flag}"
                )
        if init and start.resume_path is None:
            state = read_checkpoint_file(init, init_flag)
            if init_may_resume and is_training_state(state):
                start.resume_path, start.resume_state = Path(init), state
            else:
                start.init_path, start.init_state = Path(init), state
                start.messages.append(f"Initial weights from {init}")
        return start

    @property
    def resuming(self) -> bool:
        return self.resume_path is not None

    def load_weights(self, model: torch.nn.Module) -> None:
        """Fit the start weights into `model` now: a checkpoint of another network or shape stops the run
        (naming the file and the keys) before config.json or any checkpoint is written."""
        if self.resume_state is not None:
            load_weights(unwrap_model(model), self.resume_state, name=str(self.resume_path))
        elif self.init_state is not None:
            load_weights(unwrap_model(model), self.init_state, name=str(self.init_path))
            self.init_state = None  # the model holds the weights now


# ----------------------------------------------------------------------------------------------- prepare


def memory_format_for(
    model: torch.nn.Module, *, channels_last: bool | None = True, device_kind: str = "cuda"
) -> torch.memory_format:
    """The memory format `prepare` gives the model (and `to_device` its inputs).

    `channels_last` True (`--channels_last`): channels_last for a network of 2-D convolutions,
    channels_last_3d for one of 3-D convolutions. False (`--no-channels_last`): contiguous. None (the
    default, auto): channels_last for a 2-D network on CUDA, where cuDNN's NHWC kernels are faster;
    contiguous elsewhere, and for 3-D networks, whose channels_last_3d is only used when asked for.
    """
    has_2d = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    has_3d = any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    if channels_last is None:
        channels_last = device_kind == "cuda" and has_2d and not has_3d
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if has_3d else torch.channels_last


def make_optimizer(
    cls: type[torch.optim.Optimizer], params: Iterable, runtime: Runtime, *, fused_on_cpu: bool, **kwargs: Any
) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)`, with torch's fused kernel (`fused=True`) on CUDA, and on the CPU where
    `fused_on_cpu`, wherever this torch has one for the class and device (Adam, AdamW, SGD); not under
    apex, which wraps the optimizer itself. The fused step updates every parameter in one pass and on CUDA
    takes the skip verdict of a non-finite step as a device tensor, so the step never waits for the
    device (common.amp). Other classes (RMSprop), devices and torch versions get the default step.
    """
    params = list(params)
    kind = runtime.device.kind
    if runtime.amp.backend != "apex" and (kind == "cuda" or (kind == "cpu" and fused_on_cpu)):
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for this class, device or torch version
    return cls(params, **kwargs)


def prepare(
    model: torch.nn.Module,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    runtime: Runtime,
    *,
    loss_fn: Any = None,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model ready to train, in one order for every folder:

    device -> memory format -> convolution algorithm -> optimizer (built on the placed parameters) ->
    AMP (apex must wrap model and optimizer before DDP) -> DDP -> compile (of the DDP module, so the
    compiled graph includes DDP's hooks and its bucketing sees one module).
    A loss that is a module (class weights as buffers) moves to the device with the model.
    Load start weights into `model` before calling this: apex O2 copies the fp32 master weights from the
    model at `amp.initialize` (NVIDIA/apex apex/amp/_process_optimizer.py, `lazy_init_with_master_weights`),
    so weights loaded afterwards would leave the master copy stale.
    """
    options, device = runtime.options, runtime.device.device
    model = model.to(device)
    if isinstance(loss_fn, torch.nn.Module):
        loss_fn.to(device)
    memory_format = memory_format_for(
        model, channels_last=options.channels_last, device_kind=runtime.device.kind
    )
    if memory_format != torch.contiguous_format:
        model = model.to(memory_format=memory_format)
    # The batch copies (common.engine.to_device) read the resolved choice: inputs follow the model.
    runtime.options = replace(options, channels_last=memory_format != torch.contiguous_format)
    model = apply_conv_flag(runtime, model)
    optimizer = make_optimizer(model)
    model, optimizer = runtime.amp.prepare(model, optimizer)
    model = runtime.dist.wrap(model, runtime.device)
    if options.compile:
        model = torch.compile(model)
    return model, optimizer


def batch_to_device(runtime: Runtime) -> Callable:
    """The step's batch copy: asynchronous, and in the model's memory format when channels_last is on."""
    channels_last = runtime.options.channels_last

    def prepare_batch(batch: Any, device: torch.device, _unused: bool = False):
        return to_device(batch, device, channels_last)

    return prepare_batch


# ----------------------------------------------------------------------------------------------- memory


def first_batch(loader: Iterable) -> Any:
    """The loader's first batch, read in this process: no worker is started, and the sampler's keys
    are those of the first step (a DistributedSampler's order depends only on its seed and epoch)."""
    if isinstance(loader, Sequence):
        return loader[0]
    dataset = getattr(loader, "dataset", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    collate = getattr(loader, "collate_fn", None)
    if (
        dataset is not None
        and batch_sampler is not None
        and collate is not None
        and not isinstance(dataset, torch.utils.data.IterableDataset)
    ):
        keys = next(iter(batch_sampler))
        return collate([dataset[key] for key in keys])
    return next(iter(loader))


def _probe(
    run: TrainingRun, inputs: Any, targets: Any, loss_fn: Callable, meter: memory.PeakMeter, batch: int
) -> tuple[dict[int, int], int, int | None]:
    """Peak growth of a step at two small micro-batches; (points, smallest trainable micro-batch, the
    micro-batch that ran out of device memory if one did). Buffers and gradients are restored."""
    model = unwrap_model(run.model)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = run.model.training
    run.model.train()
    points: dict[int, int] = {}
    smallest, fails_at = 1, None
    sizes = sorted({1, min(2, batch)})
    try:
        while sizes:
            size = sizes.pop(0)
            try:
                chunk = (memory.take(inputs, size), memory.take(targets, size))
                points[size] = meter.measure(
                    functools.partial(memory.probe_step, run.model, *chunk, loss_fn, run.runtime.amp)
                )
            except (ValueError, RuntimeError) as exc:
                if memory.is_batch_norm_error(exc) and size == 1 and batch >= 2:
                    smallest, sizes = 2, sorted({2, min(4, batch)})  # BatchNorm: two values per channel
                    continue
                if not memory.is_out_of_memory(exc):
                    raise
                fails_at = size
                if run.runtime.device.is_accelerator:
                    getattr(torch, run.runtime.device.kind).empty_cache()
                break
            finally:
                for param in run.model.parameters():
                    param.grad = None
                for buffer, saved in buffers:
                    buffer.copy_(saved)
    finally:
        run.model.train(was_training)
    return points, smallest, fails_at


def plan_batch(
    run: TrainingRun, train_loader: Iterable, loss_fn: Callable, prepare_batch: Callable | None = None
) -> memory.BatchPlan:
    """Whether the per-device batch fits the memory budget, and the micro-batches it trains in.

    `--micro_batch auto` measures a step at 1 and 2 samples (`common.memory`), projects the per-device
    batch and, if it does not fit, picks the fewest micro-batches that do; `off` refuses a batch that
    does not fit, naming the largest that does; a number splits every batch into that many. The ranks
    agree on the result. The plan is printed, and `TrainingRun.finish` writes it to summary.json.
    """
    runtime = run.runtime
    setting = memory.parse_micro_batch(getattr(runtime.options, "micro_batch", "auto"))
    prepare_batch = prepare_batch or batch_to_device(runtime)
    inputs, targets = prepare_batch(
        first_batch(train_loader), runtime.device.device, runtime.options.channels_last
    )
    loaded = int(inputs.shape[0])
    batch = int(getattr(train_loader, "batch_size", None) or loaded)
    model = unwrap_model(run.model)
    batch_bytes = memory.tensor_bytes(inputs) + memory.tensor_bytes(targets)
    plan = memory.BatchPlan(
        setting=str(setting), per_device_batch=batch, micro_batches=1, micro_batch_sizes=[batch],
        device=runtime.device.kind, batch_norm=memory.has_batch_norm(model),
    )  # fmt: skip
    line, budget, smallest, fails_at, extra = None, None, 1, None, 0
    if not isinstance(setting, int):
        # Every rank reads the budget before any rank probes: ranks on one node share its memory.
        runtime.dist.barrier()
        if runtime.device.is_accelerator and runtime.device.device.type == runtime.device.kind:
            budget = memory.device_budget(runtime.device)
        else:
            workers = memory.loader_bytes(train_loader, batch_bytes)
            budget = memory.host_budget(runtime.dist.local_world_size, workers)
        runtime.dist.barrier()
        meter = memory.PeakMeter(runtime.device)
        points, smallest, fails_at = _probe(run, inputs, targets, loss_fn, meter, min(batch, loaded))
        extra = memory.optimizer_extra_bytes(run.optimizer) + batch_bytes
        if points:
            line = memory.MemoryLine.through(list(points.items()))
            plan.measured = {n: p / memory.MIB for n, p in points.items()}
            plan.fixed_mb, plan.per_sample_mb = line.fixed / memory.MIB, line.per_sample / memory.MIB
            plan.extra_mb = extra / memory.MIB
            plan.projected_full_batch_mb = (line.at(batch) + extra) / memory.MIB
        if budget is not None:
            plan.budget_mb, plan.budget_detail = budget.bytes / memory.MIB, budget.detail
    else:
        meter = memory.PeakMeter(runtime.device)
    if line is None and fails_at is None:
        decision = memory.decide(setting, batch, None, 0, None)
    else:
        decision = memory.decide(
            setting, batch, line or memory.MemoryLine(0.0, math.inf), extra,
            budget.bytes if budget is not None else None, smallest, fails_at,
        )  # fmt: skip
    # One verdict for every rank: the most micro-batches any rank needs, the smallest batch all can fit.
    needs = decision.micro_batches if decision.micro_batches > 0 else batch + 1
    needed, neg_largest = runtime.dist.reduce_scalars(
        [needs, -decision.largest_fitting], runtime.device.device, "max"
    )
    micro_batches, largest = int(needed), int(-neg_largest)
    plan.largest_fitting_batch = largest if line is not None or fails_at is not None else None
    world = runtime.dist.world_size
    if (setting == "off" and largest < batch) or micro_batches > batch:
        raise ConfigError(_does_not_fit(plan, setting, largest, smallest, world))
    plan.micro_batches = micro_batches
    plan.micro_batch_sizes = memory.chunk_sizes(batch, micro_batches)
    if line is not None:
        plan.projected_peak_mb = (line.at(plan.micro_batch_sizes[0]) + extra) / memory.MIB
    plan.meter, plan.peak_meter = meter.name, meter
    for text in plan.describe():
        runtime.print(text)
    meter.restart()
    run.batch_plan = plan  # for TrainingRun.finish (summary.json)
    return plan


def _first_micro_batch(prepare_batch: Callable, size: int, micro_batches: int) -> Callable:
    """`prepare_batch` cut to the first micro-batch: a step on it fits where the whole batch may not."""
    if micro_batches <= 1:
        return prepare_batch

    def first(batch: Any, device: torch.device, channels_last: bool = False) -> tuple[Any, Any]:
        inputs, targets = prepare_batch(batch, device, channels_last)
        return memory.take(inputs, size), memory.take(targets, size)

    return first


def _does_not_fit(plan: memory.BatchPlan, setting: str | int, largest: int, smallest: int, world: int) -> str:
    """The error for a per-device batch that does not fit: what was measured, and what would fit."""
    need = (
        f"needs about {plan.projected_full_batch_mb / 1024:.2f} GiB"
        if plan.projected_full_batch_mb is not None
        else "ran out of device memory"
    )
    budget = (
        f"the budget is {plan.budget_mb / 1024:.2f} GiB ({plan.budget_detail})"
        if plan.budget_mb is not None
        else ""
    )
    head = f"the per-device batch of {plan.per_device_batch} {need} per step; {budget}".rstrip("; ")
    if setting == "off":
        if largest < 1:
            return f"{head}: not even one sample fits. Free memory, or use a smaller input size."
        return (
            f"{head}. The largest per-device batch that fits is {largest} (a global batch of "
            f"{largest * world} on {world} rank(s)): lower the batch size to that, or drop --micro_batch off "
            "to accumulate gradients over micro-batches."
        )
    return (
        f"{head}, and even micro-batches of {smallest} do not fit: free memory, or use a smaller input size."
    )


# ----------------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class LoopConfig:
    """When the outer loop stops and how often it validates.

    Args:
        epochs: epochs planned.
        max_steps: training steps in all, over every epoch (0: no cap); the last epoch may be partial.
        time_limit: seconds of training (0: none). Each epoch runs only the steps that still fit, judged by
            the mean time per step so far, validation and checkpoints included; every rank agrees.
        time_basis: "wall", or "cpu" (CPU seconds per torch thread: a budget on a shared machine).
        val_interval: validate after every N-th epoch (0: never periodically), and after the last one
            whatever stopped the run.
        early_stopping: stop after this many epochs without a better selection metric (None: never).
        steps_per_epoch: a plan of steps per epoch (the MindSpore U-Net's passes); default: the loader's
            length for each of `epochs` epochs.
        precise_bn_batches: before each validation, recompute BatchNorm statistics over this many batches
            per rank of `fit`'s `bn_loader` (0: keep the running averages; `common.precise_bn`).
        precise_bn_compare: validate with the running averages (what the run keeps), then once more with
            recomputed statistics, recorded as `precise_bn_<key>` columns; the running averages are put
            back. Training is the same either way (BatchNorm trains on batch statistics), so one run
            measures both settings.
    """

    epochs: int
    max_steps: int = 0
    time_limit: float = 0.0
    time_basis: str = "wall"
    val_interval: int = 1
    early_stopping: int | None = None
    steps_per_epoch: Sequence[int] | None = None
    precise_bn_batches: int = 0
    precise_bn_compare: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 and not self.steps_per_epoch:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.time_basis not in BASES:
            raise ConfigError(f"time basis must be one of {', '.join(BASES)}, got {self.time_basis!r}")
        if self.val_interval < 0:
            raise ConfigError(
                f"validation interval must be >= 0 (0: after the last epoch only), got {self.val_interval}"
            )

    @classmethod
    def from_args(cls, args: Any, *, epochs: int, per_device_batch: int, **overrides: Any) -> LoopConfig:
        """From the flags of `common.cli.add_schedule_args`, at the entry point."""
        values = dict(
            epochs=epochs,
            max_steps=args.max_steps,
            time_limit=args.time_limit,
            time_basis=args.time_limit_basis,
            val_interval=args.val_interval,
            precise_bn_batches=precise_bn.batches_per_rank(
                args.precise_bn, args.precise_bn_batches, per_device_batch
            ),
            precise_bn_compare=args.precise_bn == "compare",
        )
        values.update(overrides)
        return cls(**values)

    def plan(self, loader_steps: int) -> list[int]:
        """Steps of each epoch, the step cap applied."""
        plan = list(self.steps_per_epoch) if self.steps_per_epoch else [loader_steps] * self.epochs
        if not self.max_steps:
            return plan
        capped, left = [], self.max_steps
        for steps in plan:
            if left <= 0:
                break
            capped.append(min(steps, left))
            left -= capped[-1]
        return capped


class TimeBudget:
    """The time limit at step granularity: how many of an epoch's steps still fit (the ranks agree)."""

    def __init__(self, seconds: float, basis: str = "wall"):
        self.seconds = seconds
        self.clock = Clock(basis)
        self.steps = 0

    @property
    def limited(self) -> bool:
        return self.seconds > 0

    def exhausted(self) -> bool:
        return self.limited and self.clock.elapsed() >= self.seconds

    def steps_that_fit(self, planned: int, runtime: Runtime) -> int:
        if not self.limited:
            return planned
        elapsed = self.clock.elapsed()
        fit = planned if self.steps == 0 else max(0, int((self.seconds - elapsed) / (elapsed / self.steps)))
        if elapsed >= self.seconds:
            fit = 0
        # Every rank must run the same number of steps, or DDP waits forever: take the smallest.
        (neg,) = runtime.dist.reduce_scalars([-min(fit, planned)], runtime.device.device, "max")
        return int(-neg)


@dataclass
class EpochResult:
    """What `Hooks.on_epoch` receives after the epoch is recorded and checkpointed."""

    epoch: int  # 0-based
    epochs: int  # planned
    stats: EpochStats
    val: dict[str, float] | None
    improved: bool
    lr_before: float
    lr_after: float
    stopping: str | None  # why the loop stops after this epoch, None when it goes on


class Hooks:
    """What a folder adds to the loop; every method is optional except `validate` when it validates."""

    def on_step(self, info: StepInfo) -> None:
        """Every `--log_interval` steps and at an epoch's last step (the folder's step log line)."""

    def after_train(self, epoch: int, stats: EpochStats) -> None:
        """After an epoch's training steps, before validation (the folder's epoch/FPS lines)."""

    def validate(self, epoch: int) -> dict[str, float] | None:
        """Score the validation split (all ranks); the dict holds the selection metric."""
        return None

    def record(self, epoch: int, stats: EpochStats, val: dict[str, float] | None) -> dict[str, Any]:
        """Extra columns for this epoch's history row."""
        return {}

    def on_epoch(self, result: EpochResult) -> None:
        """After the epoch's checkpoint (the folder's CSV, best-model line, extra checkpoints)."""


@dataclass
class FitResult:
    epochs_run: int
    stopped_by: str  # "epochs", "max_steps", "time_limit", "early_stopping" or "nothing_left"
    last_val: dict[str, float] | None
    budget: TimeBudget


def _step_scheduler(scheduler: Any, val: dict[str, float] | None) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if val is not None and math.isfinite(val.get("loss", math.nan)):
            scheduler.step(val["loss"])
        return
    scheduler.step()


def _adjust_warmup(run: TrainingRun, planned_steps: int) -> None:
    """A run shorter than the warm-up would report no FPS at all: time its second half."""
    if 0 < planned_steps <= run.throughput.warmup_steps:
        run.throughput.warmup_steps = planned_steps // 2
        run.runtime.print(
            f"Note: only {planned_steps} training step(s) planned; FPS skips the first {planned_steps // 2}"
        )


def _validate_with_precise_bn(
    run: TrainingRun, loop: LoopConfig, hooks: Hooks, epoch: int, bn_loader: Iterable | None, prepare_batch
) -> dict[str, float]:
    """--precise_bn=compare: the validation with recomputed statistics, the running averages put back."""
    layers = precise_bn.batchnorm_layers(run.model)
    kept = [(t, t.clone()) for m in layers for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    precise_bn.recompute_bn_statistics(
        run.model, bn_loader, run.runtime, batches=loop.precise_bn_batches, prepare_batch=prepare_batch
    )
    run.runtime.print("With recomputed BatchNorm statistics (--precise_bn=compare; not kept):")
    val = hooks.validate(epoch) or {}
    for tensor, value in kept:
        tensor.copy_(value)
    run.runtime.print("With the running averages (kept):")
    return {
        f"precise_bn_{'val_loss' if k == 'loss' else k}": v for k, v in val.items() if isinstance(v, float)
    }


def fit(
    run: TrainingRun,
    loop: LoopConfig,
    *,
    train_loader: Iterable,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    hooks: Hooks | None = None,
    train_metrics: Any | None = None,
    prepare_batch: Callable | None = None,
    bn_loader: Iterable | None = None,
) -> FitResult:
    """Train from `run.start_epoch` until the first stop condition; validate, schedule and checkpoint.

    `bn_loader`: training samples with the evaluation transform, in a fixed order, for
    `loop.precise_bn_batches` (required when that is set).
    """
    hooks = hooks or Hooks()
    if loop.precise_bn_batches and bn_loader is None:
        raise ValueError("precise_bn_batches is set but fit received no bn_loader")
    runtime, optimizer = run.runtime, run.optimizer
    has_batchnorm = bool(precise_bn.batchnorm_layers(run.model))
    runtime.print(precise_bn.describe(loop.precise_bn_batches, loop.precise_bn_compare, has_batchnorm))
    plan = loop.plan(len(train_loader))  # type: ignore[arg-type]
    _adjust_warmup(run, sum(plan[run.start_epoch :]))
    prepare_batch = prepare_batch or batch_to_device(runtime)
    micro_batches = 1
    if sum(plan[run.start_epoch :]) > 0:
        # Before anything runs a step at the full batch, which may not fit (--amp=auto measures in fp32,
        # the larger of its two choices); before the time limit starts.
        batch_plan = plan_batch(run, train_loader, loss_fn, prepare_batch)
        micro_batches = batch_plan.micro_batches
        # --amp=auto on the CPU: bf16 or fp32, timed on this model at the size of one micro-batch
        settle_batch = _first_micro_batch(prepare_batch, batch_plan.micro_batch_sizes[0], micro_batches)
        runtime.amp.settle(runtime, run.model, optimizer, train_loader, loss_fn, settle_batch)
    budget = TimeBudget(loop.time_limit, loop.time_basis)
    stopped_by, last_val, epochs_run = "nothing_left", None, 0
    for epoch in range(run.start_epoch, len(plan)):
        steps = budget.steps_that_fit(plan[epoch], runtime)
        if steps == 0:
            runtime.print(
                f"time limit of {loop.time_limit:g} s ({loop.time_basis}) reached before epoch {epoch + 1} "
                f"of {len(plan)}"
            )
            stopped_by = "time_limit"
            break
        run.begin_epoch(epoch, train_loader)
        lr_before = current_lr(optimizer)
        stats = train_one_epoch(
            run.model, train_loader, loss_fn, optimizer, runtime, epoch=epoch, throughput=run.throughput,
            on_log=hooks.on_step, train_metrics=train_metrics, prepare_batch=prepare_batch,
            max_steps=steps, global_step=run.global_step, micro_batches=micro_batches,
        )  # fmt: skip
        budget.steps += stats.steps
        epochs_run += 1
        stopping = None
        if epoch == len(plan) - 1:
            stopping = "max_steps" if loop.max_steps and sum(plan) >= loop.max_steps else "epochs"
        elif steps < plan[epoch] or budget.exhausted():
            stopping = "time_limit"
        hooks.after_train(epoch, stats)
        val = None
        periodic = loop.val_interval > 0 and (epoch + 1) % loop.val_interval == 0
        compared: dict[str, float] = {}
        if periodic or stopping is not None:
            if loop.precise_bn_compare:
                compared = _validate_with_precise_bn(run, loop, hooks, epoch, bn_loader, prepare_batch)
            elif loop.precise_bn_batches:
                precise_bn.recompute_bn_statistics(
                    run.model,
                    bn_loader,
                    runtime,
                    batches=loop.precise_bn_batches,
                    prepare_batch=prepare_batch,
                )
            val = hooks.validate(epoch)
            last_val = val if val is not None else last_val
        _step_scheduler(run.scheduler, val)
        # The history's lr is the one this epoch trained with, not the next epoch's.
        improved = run.end_epoch(
            epoch, stats, val, **{"lr": lr_before, **compared, **hooks.record(epoch, stats, val)}
        )
        if stopping is None and loop.early_stopping is not None and run.best_epoch is not None:
            if epoch + 1 - run.best_epoch >= loop.early_stopping:
                stopping = "early_stopping"
        hooks.on_epoch(EpochResult(epoch, len(plan), stats, val, improved, lr_before, current_lr(optimizer),
                                   stopping))  # fmt: skip
        if stopping is not None:
            stopped_by = stopping
            if stopping == "time_limit":
                runtime.print(
                    f"time limit of {loop.time_limit:g} s ({loop.time_basis}) reached after {budget.steps} "
                    f"step(s) of this run, {budget.clock.elapsed():.0f} s"
                )
            elif stopping == "early_stopping":
                runtime.print(
                    f"=> early stopping: no better {run.selection_key} for {loop.early_stopping} epoch(s)"
                )
            break
    else:
        if epochs_run:
            stopped_by = "epochs"
    return FitResult(epochs_run=epochs_run, stopped_by=stopped_by, last_val=last_val, budget=budget)
