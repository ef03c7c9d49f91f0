"""Run a folder's training entry point with its network replaced by one 1x1 convolution, timing each step.

    cd <tree>/<folder> && python <this file> <folder> <timings.json> -- <the entry point's flags>
    cd <tree>/<folder> && python <this file> <folder> <timings.json> --count_ops -- <the entry point's flags>
    cd <tree>/<folder> && python <this file> <folder> <rates.json> --loader BATCHES RUNS -- <flags>

What remains of a training step is everything but the network: the loader, the loss, the metrics, the
mixed-precision bookkeeping, the optimizer, logging and the loop. `python -m common.bench --host_overhead`
runs this in a subprocess and reads the timings; it is a script (standard library and torch only, no
`common` import at start-up) so that it can drive any checkout of the zoo, an older one included, whose
`common` package is the one the entry point imports.

The wall clock and the process's CPU time (all its threads; loader worker processes are children and
not counted) are recorded after every optimizer step (a global optimizer hook) and at every forward (in
training or eval mode), so that the caller can take the intervals between consecutive optimizer steps
that no validation interrupted: one interval is one whole training step, however many micro-batches
(forwards) it accumulates. Each event also carries the running total of the
stand-in's own compute (its forward, and its backward from the gradient of its output to the last
gradient accumulated into its parameters): on a CPU a 1x1 convolution over 16 x 572 x 572 pixels costs
about as much as everything else, where an accelerator would take microseconds, so the caller can take
it out.

With `--count_ops` every event also carries the number of operator calls (ATen ops, forward and backward)
the training process has dispatched so far, counted by a TorchDispatchMode: the work the host hands to a
device per step, one kernel launch each on a GPU (views aside) however fast the host. Counting slows every
op, so such a run is for the count, not the timings.

With `--loader BATCHES RUNS` nothing trains: the first training loader the entry point builds through
`common.loader.build_loader` (its real Dataset, augmentation on, sampler and collate as configured) is
read again with one worker process, RUNS times (each a new epoch and a new worker, its first batch not
timed) over BATCHES batches; the samples per second and per CPU-second of that worker (/proc) are written
and the process ends there.
"""

from __future__ import annotations

import functools
import importlib
import json
import multiprocessing
import os
import runpy
import sys
import time
from typing import Any, Callable

# (kind, wall, cpu, stand-in wall so far, stand-in cpu so far, ops so far); kind: "train" or "eval"
# forward, or "step"
EVENTS: list[tuple[str, float, float, float, float, int]] = []
OWN = [0.0, 0.0]  # the stand-in's own compute so far: wall, cpu seconds
OPS = [0]  # operator calls so far (--count_ops)


def _count_ops() -> None:
    """Count every operator call of this process from now on (it stays on until the process ends)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            OPS[0] += 1
            return func(*args, **(kwargs or {}))

    OpCounter().__enter__()


def _stub_class() -> type:
    import torch

    class OneByOne(torch.nn.Module):
        """One 1x1 convolution (2-D or 3-D), optionally cropped to a valid-convolution network's output."""

        def __init__(
            self, in_ch: int, out_ch: int, dims: int = 2, output_size: Callable[[int], int] | None = None
        ):
            super().__init__()
            conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
            self.conv = conv(in_ch, out_ch, kernel_size=1)
            self.output_size = output_size
            self._mark: tuple[float, float] | None = None
            for param in self.conv.parameters():
                if hasattr(param, "register_post_accumulate_grad_hook"):
                    param.register_post_accumulate_grad_hook(self._accumulated)

        def _add_since_mark(self) -> None:
            wall, cpu = time.perf_counter(), time.process_time()
            OWN[0] += wall - self._mark[0]
            OWN[1] += cpu - self._mark[1]
            self._mark = (wall, cpu)

        def _backward_started(self, grad: torch.Tensor) -> None:
            self._mark = (time.perf_counter(), time.process_time())

        def _accumulated(self, _param: torch.Tensor) -> None:
            # Weight and bias each end with one accumulation; the later one closes the window.
            if self._mark is not None:
                self._add_since_mark()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            training = self.training and torch.is_grad_enabled()
            EVENTS.append(
                ("train" if training else "eval", time.perf_counter(), time.process_time(), *OWN, OPS[0])
            )
            self._mark = (time.perf_counter(), time.process_time())
            y = self.conv(x)
            if self.output_size is not None:
                h, w = x.shape[-2:]
                top, left = (h - self.output_size(h)) // 2, (w - self.output_size(w)) // 2
                y = y[..., top : top + self.output_size(h), left : left + self.output_size(w)]
            self._add_since_mark()
            self._mark = None
            if training and y.requires_grad:
                y.register_hook(self._backward_started)
            return y

    return OneByOne


def _record_step(*_args: Any) -> None:
    EVENTS.append(("step", time.perf_counter(), time.process_time(), *OWN, OPS[0]))


def _valid_unet_output(size: int) -> int:
    """The valid-convolution U-Net's output side (572 -> 388): four poolings, two 3x3 convs per level."""
    for _ in range(4):
        size = (size - 4) // 2
    size -= 4
    for _ in range(4):
        size = size * 2 - 4
    return size


def patch(folder: str) -> tuple[Any, bool]:
    """Replace the folder's network builder; returns the patched module and whether it is the entry point."""
    stub = _stub_class()
    if folder == "UNet_nested":
        module = importlib.import_module("train")
        module.build_model = lambda args: stub(args.input_channels, args.num_classes)
        return module, True
    if folder in ("AttU_Net", "R2U_Net"):
        import repo_path  # noqa: F401  (the folder's own: puts its repository root on sys.path)

        module = importlib.import_module("common.isic.solver")
        module.build_network = lambda model_type, img_ch=3, output_ch=1, t=3: stub(img_ch, output_ch)
        return module, False
    if folder == "VNet":
        module = importlib.import_module("train")
        module.VNet = lambda *args, **kwargs: stub(1, 2, dims=3)
        return module, True
    if folder == "UNet_mindspore":
        module = importlib.import_module("train")
        size = getattr(module, "output_size", _valid_unet_output)
        module.UNetMedical = lambda n_channels=1, n_classes=2: stub(n_channels, n_classes, output_size=size)
        return module, True
    raise SystemExit(f"[Error] stub_network: unknown folder {folder!r}")


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of process `pid` so far (Linux /proc): schedstat's nanoseconds where the kernel keeps
    them (a short run is a few clock ticks, too coarse), else user + system ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as handle:
            return int(handle.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _record_pid(pid: Any, init: Callable[[int], None] | None, worker_id: int) -> None:
    if init is not None:
        init(worker_id)
    pid.value = os.getpid()


def time_loader(loader: Any, batches: int, runs: int) -> dict[str, Any]:
    """Samples/s and samples per worker CPU-second of `loader`'s dataset and sampler with one worker."""
    from torch.utils.data import DataLoader

    sampler = loader.sampler
    if len(sampler) // loader.batch_size < batches + 1:
        raise SystemExit(
            f"[Error] stub_network --loader: the training split gives {len(sampler) // loader.batch_size} "
            f"batch(es) of {loader.batch_size}; {batches} timed batches need one more (add data or lower BATCHES)"
        )
    walls, cpus = [], []
    for run in range(runs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(run)
        pid = multiprocessing.Value("i", 0)
        one = DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=1,
            collate_fn=loader.collate_fn, drop_last=True, generator=loader.generator,
            worker_init_fn=functools.partial(_record_pid, pid, loader.worker_init_fn),
            prefetch_factor=loader.prefetch_factor or 2,
        )  # fmt: skip
        iterator = iter(one)
        next(iterator)
        cpu, start = _cpu_seconds(pid.value), time.perf_counter()
        for _ in range(batches):
            next(iterator)
        elapsed, cpu = time.perf_counter() - start, _cpu_seconds(pid.value) - cpu
        del iterator
        walls.append(batches * loader.batch_size / elapsed)
        cpus.append(batches * loader.batch_size / max(cpu, 1e-9))
    sample = loader.dataset[next(iter(sampler))]
    shapes = [
        list(t.shape)
        for t in (sample if isinstance(sample, (list, tuple)) else [sample])
        if hasattr(t, "shape")
    ]
    return {"samples_per_s": walls, "samples_per_worker_cpu_s": cpus, "batch": loader.batch_size,
            "batches": batches, "runs": runs, "dataset": type(loader.dataset).__name__,
            "train_samples": len(sampler), "sample_shapes": shapes}  # fmt: skip


def capture_training_loader(out: str, batches: int, runs: int) -> None:
    """Wrap common.loader.build_loader (before the entry point imports it) to time its first training loader."""
    import repo_path  # noqa: F401  (the folder's own: puts its repository root on sys.path)

    import common.loader

    build = common.loader.build_loader

    @functools.wraps(build)
    def timed_build(*args: Any, **kwargs: Any) -> Any:
        loader = build(*args, **kwargs)
        if kwargs.get("train"):
            with open(out, "w") as handle:
                json.dump(time_loader(loader, batches, runs), handle)
            sys.stdout.flush()
            os._exit(0)  # the measurement is all this run was for
        return loader

    common.loader.build_loader = timed_build


ENTRY = {"UNet_nested": "train.py", "VNet": "train.py", "UNet_mindspore": "train.py",
         "AttU_Net": "main.py", "R2U_Net": "main.py"}  # fmt: skip


def main(argv: list[str]) -> int:
    usage = "usage: stub_network.py FOLDER OUT_JSON [--count_ops | --loader BATCHES RUNS] -- ENTRY_FLAGS..."
    if len(argv) < 3 or "--" not in argv:
        raise SystemExit(usage)
    split = argv.index("--")
    (folder, out, *mode), flags = argv[:split], argv[split + 1 :]
    if folder not in ENTRY:
        raise SystemExit(f"[Error] stub_network: unknown folder {folder!r} (one of {', '.join(ENTRY)})")
    count_ops = mode == ["--count_ops"]
    if (
        mode
        and not count_ops
        and (len(mode) != 3 or mode[0] != "--loader" or not all(m.isdigit() and int(m) > 0 for m in mode[1:]))
    ):
        raise SystemExit(usage)
    entry = ENTRY[folder]
    # As `python train.py` from the folder: the folder first on sys.path, not this file's own folder.
    sys.path[0] = os.getcwd()
    sys.argv = [entry, *flags]
    if mode and not count_ops:
        capture_training_loader(out, int(mode[1]), int(mode[2]))
    module, is_entry = patch(folder)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_record_step)
    if count_ops:
        _count_ops()
    code: Any = 0
    try:
        if is_entry:
            module.run_main(module.main)
        else:
            runpy.run_path(entry, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    common = sys.modules.get("common")
    with open(out, "w") as handle:
        json.dump({"events": EVENTS, "exit": code if isinstance(code, int) or code is None else str(code),
                   "common": getattr(common, "__file__", None)}, handle)  # fmt: skip
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
