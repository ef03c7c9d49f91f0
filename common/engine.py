"""The training loop pieces every folder shares: a step, an epoch, a sharded evaluation, and the run record.

A folder's train.py builds its data, model, loss and optimizer, then drives these pieces and prints its
own ModelZoo log lines from the numbers they return (through `on_log`). Design choices:

* The step does not call `.item()`: losses stay on the device and are fetched every `log_interval`
  steps (the finite-gradient check of `MixedPrecision.step` is the only synchronisation).
* Throughput is global images per second over every step after `warmup_steps`, timed between device
  synchronisations, never the maximum of noisy single steps.
* Evaluation runs on every rank over its shard; metric sums and losses are all-reduced, so 1 and N
  ranks report the same numbers.
* `TrainingRun` owns the checkpoints (atomic `latest` each epoch, `best` by the folder's selection
  metric), exact resume (model, optimizer, scheduler, scaler, epoch, best, history, RNG), the progress
  plot and the ModelZoo summary.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from common.checkpoint import (
    link_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from common.cli import Runtime
from common.errors import CheckpointError
from common.loader import seed_everything
from common.memory import MIB, device_peak_allocated_bytes, peak_host_rss_bytes
from common.summary import RunSummary, SummaryTarget, write_summary

CHECKPOINT_FORMAT = 1


def to_device(
    batch: Any, device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a (image, mask, ...) batch, copied asynchronously from pinned memory.

    `channels_last`: the model is in channels_last (2-D) or channels_last_3d (3-D), and so are the inputs.
    """
    inputs, targets = batch[0], batch[1]
    inputs = inputs.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    elif channels_last and inputs.dim() == 5:
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    return inputs, targets


@dataclass
class StepInfo:
    """Handed to a folder's `on_log` every `log_interval` steps and at the last step of an epoch."""

    epoch: int  # 0-based
    step: int  # 1-based within the epoch
    steps: int  # steps in this epoch
    global_step: int
    loss: float  # this step's loss
    loss_avg: float  # mean over the epoch so far
    lr: float
    step_time: float  # mean seconds per step since the last log line (device-synchronised)
    data_time: float  # mean seconds per step waiting for the loader since the last log line
    fps: float  # global images per second since the last log line
    train_metrics: dict[str, float] | None = None


@dataclass
class EpochStats:
    loss_mean: float
    last_loss: float
    steps: int
    images: int
    skipped_steps: int
    seconds: float
    data_wait_seconds: float
    timed_images: int
    timed_seconds: float
    step_losses: list[float] = field(default_factory=list)
    train_metrics: dict[str, float] | None = None

    def fps(self, world_size: int = 1) -> float:
        """Global images/s of this epoch's timed steps (equal ranks assumed; `finish` reduces exactly)."""
        return self.timed_images * world_size / self.timed_seconds if self.timed_seconds > 0 else float("nan")

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / self.seconds if self.seconds > 0 else 0.0


class Throughput:
    """Counts images and synchronised time over all steps after the first `warmup_steps` of the run."""

    def __init__(self, warmup_steps: int = 5):
        self.warmup_steps = warmup_steps
        self.steps_seen = 0
        self.images = 0
        self.seconds = 0.0
        self.data_wait = 0.0
        self.wall = 0.0


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _iterate(loader: Iterable, show_bar: bool, desc: str) -> Iterable:
    if show_bar:
        try:
            from tqdm import tqdm

            return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return loader


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    *,
    epoch: int,
    throughput: Throughput,
    on_log: Callable[[StepInfo], None] | None = None,
    train_metrics: Any | None = None,
    prepare_batch: Callable = to_device,
    max_steps: int | None = None,
    global_step: int = 0,
    micro_batches: int = 1,
) -> EpochStats:
    """One pass over `loader`. Steps whose gradients are not finite are skipped and counted.

    `micro_batches` > 1: each batch's gradients are accumulated over that many chunks (`train_step`).
    """
    device, amp, world = runtime.device, runtime.amp, runtime.dist.world_size
    channels_last = runtime.options.channels_last
    log_every = max(1, runtime.options.log_interval)
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    model.train()
    if train_metrics is not None:
        train_metrics.reset()
    loss_sum = torch.zeros((), dtype=device.accumulate_dtype, device=device.device)
    pending: list[torch.Tensor] = []
    step_losses: list[float] = []
    skipped_before = amp.skipped_steps
    images = timed_images = 0
    data_wait = timed_seconds = 0.0
    window_start, window_data, window_images, window_steps = time.perf_counter(), 0.0, 0, 0
    timing_from: float | None = None
    epoch_start = time.perf_counter()
    show_bar = runtime.is_main and sys.stdout.isatty()
    iterator = iter(_iterate(loader, show_bar, f"epoch {epoch + 1}"))
    step = 0
    while step < steps:
        if timing_from is None and throughput.steps_seen >= throughput.warmup_steps:
            # Timed from the start of the first step after the warm-up, so every later step counts (also
            # the first step of each epoch, and epochs of a single step).
            device.synchronize()
            timing_from = time.perf_counter()
        wait_start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        waited = time.perf_counter() - wait_start
        step += 1
        inputs, targets = prepare_batch(batch, device.device, channels_last)
        outputs, loss = train_step(
            model, inputs, targets, loss_fn, optimizer, amp, micro_batches=micro_batches
        )
        detached = loss.detach().float()
        loss_sum += detached
        pending.append(detached)
        if train_metrics is not None:
            train_metrics.update(_detach(outputs), targets)
        batch_images = int(inputs.shape[0])
        images += batch_images
        data_wait += waited
        window_data += waited
        window_images += batch_images
        window_steps += 1
        throughput.steps_seen += 1
        if timing_from is not None:
            timed_images += batch_images
        if step % log_every == 0 or step == steps:
            values = torch.stack(pending).tolist()  # the one host sync per log interval
            amp.settle_skips()  # skipped steps counted on the device, and the divergence check
            pending.clear()
            step_losses.extend(values)
            now = time.perf_counter()
            if on_log is not None:
                device.synchronize()
                now = time.perf_counter()
                elapsed = now - window_start
                on_log(
                    StepInfo(
                        epoch=epoch,
                        step=step,
                        steps=steps,
                        global_step=global_step + step,
                        loss=values[-1],
                        loss_avg=float(loss_sum) / step,
                        lr=current_lr(optimizer),
                        step_time=elapsed / window_steps,
                        data_time=window_data / window_steps,
                        fps=window_images * world / elapsed if elapsed > 0 else float("nan"),
                        train_metrics=train_metrics.compute() if train_metrics is not None else None,
                    )
                )
            window_start, window_data, window_images, window_steps = now, 0.0, 0, 0
    if pending:
        step_losses.extend(torch.stack(pending).tolist())
    # The epoch's loss and training metrics over every rank's shard (the step lines stay rank 0's running
    # values): a few numbers once per epoch, and every rank gets here, so the collective always matches.
    totals = torch.stack([loss_sum, torch.full_like(loss_sum, step)])
    runtime.dist.all_reduce(totals)
    train_result = None
    if train_metrics is not None:
        state = train_metrics.state_tensor().to(device.device)
        runtime.dist.all_reduce(state)
        train_metrics.load_state_tensor(state)
        train_result = train_metrics.compute()
    device.synchronize()
    end = time.perf_counter()
    if timing_from is not None:
        timed_seconds = end - timing_from
    epoch_seconds = end - epoch_start
    throughput.images += timed_images
    throughput.seconds += timed_seconds
    throughput.data_wait += data_wait
    throughput.wall += epoch_seconds
    total_loss, total_steps = totals.tolist()
    return EpochStats(
        loss_mean=total_loss / max(total_steps, 1),
        last_loss=step_losses[-1] if step_losses else float("nan"),
        steps=step,
        images=images,
        skipped_steps=amp.skipped_steps - skipped_before,
        seconds=epoch_seconds,
        data_wait_seconds=data_wait,
        timed_images=timed_images,
        timed_seconds=timed_seconds,
        step_losses=step_losses,
        train_metrics=train_result,
    )


def train_step(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    amp: Any,
    *,
    micro_batches: int = 1,
) -> tuple[Any, torch.Tensor]:
    """One optimizer step, the same for every trainer and for `common.bench`: forward and loss under
    autocast, backward (scaled), and the update unless a gradient is not finite (`amp.step` skips and
    counts it). Returns the outputs and the loss, still on the device: nothing here reads them back.

    `micro_batches` > 1 splits the batch into that many chunks (as equal as possible) and accumulates
    their gradients before the one update: each chunk's loss is weighted by its share of the batch, so a
    loss that is a mean over samples gives the gradients of the whole batch. Under DDP only the last
    chunk's backward all-reduces. The returned outputs (detached) and loss cover every chunk.
    """
    count = int(inputs.shape[0])
    if micro_batches <= 1 or count <= 1:
        with amp.autocast():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
        amp.zero_grad(optimizer)
        amp.backward(loss, optimizer)
        amp.step(optimizer)
        return outputs, loss
    chunks = min(micro_batches, count)
    pieces = zip(_split(inputs, chunks), _split(targets, chunks))
    amp.zero_grad(optimizer)
    parts: list[Any] = []
    total: torch.Tensor | None = None
    with _accumulating_backward(amp, optimizer, inputs.device) as backward:
        for index, (chunk_inputs, chunk_targets) in enumerate(pieces):
            last = index == chunks - 1
            share = chunk_inputs.shape[0] / count
            with _gradient_sync(model, last):
                with amp.autocast():
                    chunk_outputs = model(chunk_inputs)
                    chunk_loss = loss_fn(chunk_outputs, chunk_targets)
                backward(chunk_loss * share, index == 0)
            weighted = chunk_loss.detach().float() * share
            total = weighted if total is None else total + weighted
            parts.append(_detach_only(chunk_outputs))
            del chunk_outputs, chunk_loss  # the chunk's graph is freed before the next forward
    amp.step(optimizer)
    return _concat(parts), total


def _split(value: Any, chunks: int) -> list[Any]:
    """`chunks` views along the batch dimension of a tensor, of each tensor in a list/tuple, or None."""
    if isinstance(value, torch.Tensor):
        return list(torch.tensor_split(value, chunks))
    if isinstance(value, (list, tuple)):
        return [type(value)(parts) for parts in zip(*(_split(v, chunks) for v in value))]
    return [value] * chunks


def _detach_only(outputs: Any) -> Any:
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(o.detach() for o in outputs)
    return outputs.detach()


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], (list, tuple)):
        return type(parts[0])(torch.cat(group) for group in zip(*parts))
    return torch.cat(parts)


def _gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` for all but the last chunk: the forward and backward of a chunk must both run
    inside it (the flag is read at forward time, torch/nn/parallel/distributed.py `no_sync`)."""
    no_sync = getattr(model, "no_sync", None)
    if sync or not callable(no_sync):
        return contextlib.nullcontext()
    return no_sync()


@contextlib.contextmanager
def _accumulating_backward(amp: Any, optimizer: torch.optim.Optimizer, device: torch.device):
    """Yields `backward(loss, first)` for the chunks of one step, scaled like `amp.backward`.

    * torch.amp GradScaler: `scale(loss).backward()` per chunk and one `step`, the accumulation pattern of
      the PyTorch AMP examples (docs/source/notes/amp_examples.rst, "Gradient accumulation").
      torch_npu's GradScaler clears the NPU overflow flag only in the first `scale()` of a step
      (torch_npu/npu/amp/grad_scaler.py, `_clear_overflow_flag`), so an earlier chunk's overflow counts.
    * the fp32 and static-scale paths on an NPU in saturation mode: `amp.backward` clears the overflow
      flag before each backward, so only the first chunk goes through it; later chunks add their
      gradients without clearing, and `amp.step` reads the flag once, for all of them.
    * apex: one `amp.scale_loss` for the whole step, every chunk's loss multiplied by the scale it yields.
      NVIDIA apex's own accumulation recipe is `delay_unscale=True` on every backward but the last
      (docs/source/advanced.rst, "Gradient accumulation across iterations"; apex/amp/handle.py skips the
      unscale and master-gradient copy on such an exit and runs them once on the last). Ascend's apex
      clears the NPU overflow flag on *every* `scale_loss` entry with a dynamic scale and finds overflow
      only through that flag (Ascend/apex patch/npu.patch: handle.py `clear_npu_overflow_flag()` before
      the yield, scaler.py `unscale_python` reading `get_npu_overflow_flag()`), so a chunk's overflow
      would be cleared by the next chunk's entry and its saturated gradients applied. One context per
      step is what delay_unscale achieves on NVIDIA (one prepare, one unscale and overflow check on the
      summed gradients) and on Ascend keeps the flag raised by any chunk until the check.
    """
    if getattr(amp, "backend", None) == "apex":
        # The scale as a tensor: scale_loss yields loss.float() * loss_scale for the loss given.
        with amp._apex.scale_loss(torch.ones((), device=device), optimizer) as scale:
            yield lambda loss, first: (loss.float() * scale).backward()
        return
    scaler = getattr(amp, "_scaler", None)

    def backward(loss: torch.Tensor, first: bool) -> None:
        if first:
            amp.backward(loss, optimizer)
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

    yield backward


def _detach(outputs: Any) -> Any:
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(o.detach().float() for o in outputs)
    return outputs.detach().float()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    metrics: Any,
    runtime: Runtime,
    *,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    prepare_batch: Callable = to_device,
    forward: Callable[[torch.nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, float]:
    """Metrics over the whole split: each rank scores its shard, the sums are all-reduced.

    `forward(model, inputs)` replaces `model(inputs)` (e.g. sliding-window inference); the result is
    what `metrics.update` and `loss_fn` receive.
    """
    channels_last = runtime.options.channels_last
    device = runtime.device.device
    was_training = model.training
    runtime.dist.broadcast_buffers(model)
    model.eval()
    metrics.to(device)  # a rank with no batch must still all-reduce a tensor on the group's device
    metrics.reset()
    loss_sum = torch.zeros((), dtype=runtime.device.accumulate_dtype, device=device)
    count = torch.zeros((), dtype=runtime.device.accumulate_dtype, device=device)
    for batch in loader:
        inputs, targets = prepare_batch(batch, device, channels_last)
        with runtime.amp.autocast():
            outputs = forward(model, inputs) if forward is not None else model(inputs)
        outputs = _detach(outputs)
        if loss_fn is not None:
            loss_sum += loss_fn(outputs, targets).to(loss_sum.dtype) * inputs.shape[0]
        count += inputs.shape[0]
        metrics.update(outputs, targets)
    state = metrics.state_tensor()
    runtime.dist.all_reduce(state)
    metrics.load_state_tensor(state)
    totals = torch.stack([loss_sum, count])
    runtime.dist.all_reduce(totals)
    result = metrics.compute()
    result["loss"] = float(totals[0] / totals[1]) if loss_fn is not None and totals[1] > 0 else float("nan")
    model.train(was_training)
    return result


class TrainingRun:
    """Checkpoints, resume, history, plot and summary of one training run.

    Args:
        runtime: from `common.cli.setup_runtime`.
        save_dir: where `latest_name`, `best_name`, config.json, history and progress.png go.
        model / optimizer / scheduler: the live objects (model may be DDP-wrapped or compiled).
        selection_key: the key of the validation dict that picks the best checkpoint.
        selection_mode: "max" or "min".
        target: where the ModelZoo summary goes and under which case name (the entry point builds it,
            from the test script's settings when one launched the run: `SummaryTarget.from_env`).
    """

    def __init__(
        self,
        runtime: Runtime,
        save_dir: str | Path,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        config: dict | None = None,
        selection_key: str,
        selection_mode: str = "max",
        target: SummaryTarget,
        latest_name: str = "checkpoint.pth.tar",
        best_name: str = "model_best.pth.tar",
        plot_metric: str | None = None,
    ):
        if selection_mode not in ("max", "min"):
            raise ValueError("selection_mode must be 'max' or 'min'")
        self.runtime = runtime
        self.save_dir = Path(save_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.config = config or {}
        self.selection_key, self.selection_mode = selection_key, selection_mode
        self.latest_path = self.save_dir / latest_name
        self.best_path = self.save_dir / best_name
        self.plot_metric = plot_metric or selection_key
        self.target = target
        self.throughput = Throughput(runtime.options.warmup_steps)
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.start_epoch = 0
        self.global_step = 0
        self.skipped_steps = 0
        self._last_plot = -math.inf
        if runtime.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)

    # ---- resume -----------------------------------------------------------------------------------
    def start(self, start: Any) -> int:
        """Resume from a `common.trainer.StartPoint` that holds a training state; returns the first epoch."""
        for message in start.messages:
            self.runtime.print(message)
        if not start.resuming:
            return 0
        epoch = self.resume(start.resume_path, start.resume_state)
        start.resume_state = None  # the optimizer holds its own copy now
        return epoch

    def resume(self, path: str | Path | None, state: dict | None = None) -> int:
        """Restore everything from a checkpoint written by `end_epoch`; returns the epoch to start at.

        `state`: the checkpoint already read from `path` (a caller that checked it before building the model
        need not read hundreds of MB twice).
        """
        if not path:
            return 0
        if state is None:
            state = load_checkpoint(path, map_location="cpu")
        if not isinstance(state, dict) or "optimizer" not in state or "epoch" not in state:
            raise CheckpointError(
                f"{path} holds weights only, not a training state; use it with --pretrained/--pth_path "
                "(initial weights) or pass a checkpoint.pth.tar written by this code to --resume"
            )
        load_weights(self.model, state, name=str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: optimizer state does not fit this optimizer ({exc})") from exc
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("amp"):
            self.runtime.amp.load_state_dict(state["amp"])
        self.history = list(state.get("history", []))
        self.step_losses = list(state.get("step_losses", []))
        self.best_value = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.global_step = int(state.get("global_step", 0))
        self.start_epoch = int(state["epoch"])
        if state.get("rng") is not None:
            set_rng_state(state["rng"])
        self.runtime.print(
            f"Resumed from {path}: {self.start_epoch} epoch(s) done, best {self.selection_key} = {self.best_value}"
        )
        return self.start_epoch

    # ---- epochs -----------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, *loaders: Any) -> None:
        """Seeds depend only on (seed, epoch): a resumed epoch replays exactly."""
        seed_everything(self.runtime.options.seed * 1000 + epoch)
        for loader in loaders:
            sampler = getattr(loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)

    def is_better(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.selection_mode == "max" else value < self.best_value

    def end_epoch(
        self, epoch: int, stats: EpochStats, val: dict[str, float] | None = None, **extra: Any
    ) -> bool:
        """Record the epoch, write `latest` (and `best` when the selection metric improved), plot.

        Returns True when this epoch is the new best.
        """
        self.global_step += stats.steps
        self.step_losses.extend(stats.step_losses)
        self.skipped_steps += stats.skipped_steps
        lr = current_lr(self.optimizer)
        record = {
            "epoch": epoch + 1,
            "train_loss": stats.loss_mean,
            "last_loss": stats.last_loss,
            "lr": lr,
            "epoch_time": stats.seconds,
            "fps": stats.fps(self.runtime.dist.world_size),
            "data_wait_fraction": stats.data_wait_fraction,
            "skipped_steps": stats.skipped_steps,
        }
        if stats.train_metrics:
            record.update({f"train_{k}": v for k, v in stats.train_metrics.items()})
        if val:
            record.update({("val_loss" if k == "loss" else k): v for k, v in val.items()})
        record.update(extra)
        self.history.append(record)
        improved = val is not None and self.is_better(val.get(self.selection_key))
        if improved:
            self.best_value, self.best_epoch = float(val[self.selection_key]), epoch + 1
        if self.runtime.is_main:
            state = self.state_dict(epoch + 1)
            save_checkpoint(state, self.latest_path)
            if improved:
                link_checkpoint(self.latest_path, self.best_path)
            self._plot(final=False)
        return improved

    def state_dict(self, epochs_done: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": epochs_done,
            "global_step": self.global_step,
            "arch": type(unwrap_model(self.model)).__name__,
            "state_dict": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "amp": self.runtime.amp.state_dict(),
            "best_metric": self.best_value,
            "best_epoch": self.best_epoch,
            "selection_key": self.selection_key,
            "history": _plain(self.history),
            "step_losses": self.step_losses,
            "rng": rng_state(),
            "config": _plain(self.config),
        }

    def _plot(self, final: bool) -> None:
        # A plot costs about a second on a small CPU; short epochs would spend much of their time on it.
        now = time.monotonic()
        if not final and now - self._last_plot < 30.0:
            return
        self._last_plot = now
        try:
            from common.plots import plot_progress

            plot_progress(self.history, self.save_dir / "progress.png", self.plot_metric, self.plot_metric)
        except Exception as exc:  # noqa: BLE001 - a plot must never stop training
            print(f"warning: progress plot not written ({exc})", file=sys.stderr)

    # ---- the end ----------------------------------------------------------------------------------
    def global_fps(self) -> float:
        """Images per second over all ranks: summed timed images over the slowest rank's timed seconds."""
        (images,) = self.runtime.dist.reduce_scalars(
            [self.throughput.images], self.runtime.device.device, "sum"
        )
        (seconds,) = self.runtime.dist.reduce_scalars(
            [self.throughput.seconds], self.runtime.device.device, "max"
        )
        return images / seconds if seconds > 0 else float("nan")

    def finish(
        self,
        train_accuracy: float | str | None,
        *,
        extra_lines: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
        notes: Iterable[str] = (),
        skipped_samples: int = 0,
    ) -> Path | None:
        """Write the ModelZoo summary (rank 0). Call on every rank: the FPS reduction is collective.

        `notes`: lines printed with the final result (e.g. how many bad samples were left out and where
        they are listed); `skipped_samples`: samples left out of the data (0 for a run on all of it).
        """
        fps = self.global_fps()
        if not self.runtime.is_main:
            return None
        if self.history:
            self._plot(final=True)
        data_wait = self.throughput.data_wait / self.throughput.wall if self.throughput.wall > 0 else 0.0
        payload = {
            "device": self.runtime.device.as_dict(),
            "amp_type": self.runtime.amp.amp_type,
            "precision": self.runtime.amp.describe(),
            "world_size": self.runtime.dist.world_size,
            "selection_key": self.selection_key,
            "best_metric": self.best_value,
            "best_epoch": self.best_epoch,
            "epochs_done": len(self.history),
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "timed_images": self.throughput.images,
            "timed_seconds": self.throughput.seconds,
            "data_wait_fraction": data_wait,
            "checkpoint_latest": str(self.latest_path),
            "checkpoint_best": str(self.best_path),
            "config": _plain(self.config),
            "history": self.history,
            **_memory_details(self.runtime, getattr(self, "batch_plan", None)),  # plan_batch sets it
        }
        payload.update(details or {})
        if (self.save_dir / "progress.png").exists() and self.target.output_dir != self.save_dir:
            import shutil

            self.target.output_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.save_dir / "progress.png", self.target.output_dir / "progress.png")
        summary = RunSummary(
            fps=fps,
            train_accuracy=train_accuracy,
            actual_loss=self.step_losses[-1] if self.step_losses else None,
            step_losses=self.step_losses,
            extra_lines=extra_lines or {},
            details=payload,
            notes=list(notes),
            skipped_samples=skipped_samples,
        )
        return write_summary(self.target, summary)


def _memory_details(runtime: Runtime, plan: Any | None) -> dict[str, Any]:
    """summary.json's memory figures: the process's peak resident size, the accelerator's peak allocated
    memory, and the batch plan with the peak the training steps reached beside its projection."""
    memory: dict[str, Any] = {"peak_host_rss_mb": peak_host_rss_bytes() / MIB}
    device_peak = device_peak_allocated_bytes(runtime.device)
    if device_peak is not None:
        memory["peak_device_allocated_mb"] = device_peak / MIB
    if plan is not None:
        plan.record_observed()
        memory["batch_plan"] = plan.as_dict()
    return memory


def _plain(value: Any) -> Any:
    """Configuration as plain data (weights_only checkpoints accept nothing else)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)  # str subclasses (torch.__version__) and objects would need unpickling code
