"""One benchmark for every model of the zoo, and for any other implementation through a factory.

    python -m common.bench --model R2AttU_Net --batch 16 --size 224 --amp O2 --channels_last --compile
    python -m common.bench --model_factory /path/to/their_archs.py:UNet --factory_kwargs '{"num_classes": 1}'
    python -m common.bench --sweep                       # the README table, one row per model
    python -m common.bench --host_overhead --folder UNet_nested [--tree /path/to/other/checkout]
    python -m common.bench --loader --folder AttU_Net
    python -m common.bench --projection --results results.jsonl --loader_rate VNet=185.5

For each configuration it measures, with the device synchronised around every timed step:

* training images/s: batch / median step time (zero_grad, forward, loss, backward, optimizer step) over
  the steps after `--warmup` (torch.compile's compilation and `--conv_algo auto`'s per-layer timing fall
  in the first warm-up step, reported apart as `compile_seconds`);
* inference images/s: the same for a no-grad forward in eval mode;
* data-wait fraction: time blocked on a DataLoader of pre-generated pinned tensors, over the step time
  (the loader machinery's own cost; real datasets report theirs in each run's summary.json);
* peak memory: device (allocator peak) and host (max RSS of this process);
* FLOPs per training step, counted once with torch.utils.flop_counter, and achieved FLOP/s; against the
  device's peak when it is known (`--peak_tflops` sets it).

Three more modes measure what surrounds the network, on a folder's real training entry point and its
demo data (`common.demo_data`, written once under `--data_dir`), at the folder's training batch and size:

* `--host_overhead`: the entry point runs in a subprocess with its network replaced by one 1x1
  convolution (`common/stub_network.py`), so the step keeps the loader, loss, metrics, mixed-precision
  bookkeeping, optimizer and loop; per step, the median wall time and the median CPU time of the
  training process (its loader workers excluded) over the steps after `--warmup`, median of `--runs`
  runs. `--tree` points at another checkout of the zoo (e.g. an older commit) to measure it the same way;
* `--loader`: samples/s of the folder's real training Dataset (augmentation on) through one DataLoader
  worker process, and samples per CPU-second of that worker, median of `--runs` runs of `--batches`;
* `--projection`: from those JSON lines (`--results`), the one-device bounds: compute (training FLOPs per
  image at half the dense bf16 peak of `--projection_device`), host (1 / host CPU-seconds per image),
  loader (`--projection_workers` x the per-core loader rate), and their minimum.

Results are printed as one JSON line per configuration plus a readable table. Models are built by the
factories in `MODELS` (file path relative to the repository root, then the callable): `common` never
imports a model folder, it loads the file the table names, like any other factory.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.amp import MixedPrecision
from common.device import DeviceInfo, select_device
from common.engine import train_step
from common.errors import ConfigError
from common.trainer import memory_format_for
from common.winograd import ALGOS, apply_conv_algo

ROOT = Path(__file__).resolve().parent.parent

# name -> (factory "file.py:callable" or "module:callable", kwargs, input (C, *spatial) at the README size)
MODELS: dict[str, tuple[str, dict, tuple[int, ...]]] = {
    "U_Net": ("common.networks.attention_r2unet:U_Net", {"img_ch": 3, "output_ch": 1}, (3, 224, 224)),
    "R2U_Net": (
        "common.networks.attention_r2unet:R2U_Net",
        {"img_ch": 3, "output_ch": 1, "t": 3},
        (3, 224, 224),
    ),
    "AttU_Net": ("common.networks.attention_r2unet:AttU_Net", {"img_ch": 3, "output_ch": 1}, (3, 224, 224)),
    "R2AttU_Net": (
        "common.networks.attention_r2unet:R2AttU_Net",
        {"img_ch": 3, "output_ch": 1, "t": 3},
        (3, 224, 224),
    ),
    "UNet": ("UNet_nested/archs.py:UNet", {"num_classes": 1, "input_channels": 3}, (3, 96, 96)),
    "NestedUNet": ("UNet_nested/archs.py:NestedUNet", {"num_classes": 1, "input_channels": 3}, (3, 96, 96)),
    "UNetMedical": (
        "UNet_mindspore/src.unet.unet_model:UNetMedical",
        {"n_channels": 1, "n_classes": 2},
        (1, 572, 572),
    ),
    "VNet": ("VNet/vnet.py:VNet", {"elu": False, "nll": True}, (1, 64, 80, 80)),
}

# Dense peak TFLOP/s by device name fragment and dtype (vendor data sheets), for the utilisation column.
PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "V100": {"fp32": 15.7, "fp16": 125.0},
    "Ascend910": {"fp32": 64.0, "fp16": 256.0},
}


def load_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """`pkg.module:callable`, `path/to/file.py:callable`, or `folder/pkg.module:callable` (the module is
    imported with `folder` on sys.path). Relative paths are tried from the cwd, then the repo root."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError(
            f"--model_factory {spec!r} must look like package.module:function or file.py:function"
        )
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and not path.exists():
            path = ROOT / target
        if not path.is_file():
            raise ConfigError(f"--model_factory: {path} does not exist")
        # The file's folder goes on sys.path so that its own sibling imports work (as when run from there).
        for folder in (str(ROOT), str(path.parent)):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        name = f"_bench_{path.stem}_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    elif "/" in target:
        folder, _, dotted = target.rpartition("/")
        folder_path = Path(folder) if Path(folder).is_dir() else ROOT / folder
        if not folder_path.is_dir():
            raise ConfigError(f"--model_factory: folder {folder_path} does not exist")
        for entry in (str(ROOT), str(folder_path)):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        module = importlib.import_module(dotted)
    else:
        module = importlib.import_module(target)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"--model_factory: {target} has no attribute {attr!r}") from None


@dataclass
class BenchResult:
    model: str
    device: str
    batch: int
    input_shape: list[int]
    precision: str
    channels_last: bool
    compile: bool
    conv_algo: str
    train_images_per_s: float | None
    train_step_ms_median: float | None
    infer_images_per_s: float | None
    data_wait_fraction: float | None
    compile_seconds: float | None
    params: int
    train_gflop_per_step: float | None
    achieved_tflops: float | None
    peak_tflops: float | None
    utilisation: float | None
    peak_device_mem_mb: float | None
    peak_host_rss_mb: float
    torch: str
    steps: int
    warmup: int


def _first_output(out: Any) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out


def _loss(out: Any) -> torch.Tensor:
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(o.float().square().mean() for o in outs) / len(outs)


def _step_loss(out: Any, _targets: Any) -> torch.Tensor:
    """A loss for `train_step` that needs no targets: every output element gets a gradient."""
    return _loss(out)


def _count_flops(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        _loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _peak_device_mb(info: DeviceInfo) -> float | None:
    if info.kind == "cuda":
        return torch.cuda.max_memory_allocated(info.index) / 2**20
    if info.kind == "npu":
        return torch.npu.max_memory_allocated(info.index) / 2**20
    return None


def _reset_peak(info: DeviceInfo) -> None:
    if info.kind == "cuda":
        torch.cuda.reset_peak_memory_stats(info.index)
    elif info.kind == "npu":
        torch.npu.reset_peak_memory_stats(info.index)


def _peak_tflops(info: DeviceInfo, precision: str, override: float | None) -> float | None:
    if override:
        return override
    for fragment, table in PEAK_TFLOPS.items():
        if fragment.lower() in info.name.lower().replace(" ", ""):
            return table.get(precision)
    return None


def run_benchmark(
    name: str,
    factory: Callable[..., torch.nn.Module],
    kwargs: dict,
    input_shape: tuple[int, ...],
    *,
    batch: int,
    device: DeviceInfo,
    precision: str = "fp32",
    channels_last: bool = False,
    compile_model: bool = False,
    conv_algo: str = "direct",
    steps: int = 10,
    warmup: int = 3,
    inference: bool = True,
    workers: int = 0,
    peak_tflops: float | None = None,
) -> BenchResult:
    """Time one configuration. `precision` is fp32, bf16 or fp16 (autocast; fp16 with a loss scaler)."""
    if steps < 1 or batch < 1:
        raise ConfigError("--steps and --batch must be at least 1")
    torch.manual_seed(0)
    dev = device.device
    model = factory(**kwargs).to(dev)
    params = sum(p.numel() for p in model.parameters())
    # The trainers' rule for --channels_last: channels_last_3d for a network of 3-D convolutions
    memory_format = memory_format_for(model, channels_last=channels_last, device_kind=device.kind)
    model = model.to(memory_format=memory_format)
    # The trainers' own mixed precision and step (common.engine.train_step), so the benchmark times what
    # training runs: autocast, loss scaling, the finite-gradient check and the update.
    amp = MixedPrecision(device, enabled=precision != "fp32", opt_level="O1",
                         dtype="auto" if precision == "fp32" else precision)  # fmt: skip
    autocast = amp.autocast
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
    flops = _count_flops(
        model, torch.randn(batch, *input_shape, device=dev).contiguous(memory_format=memory_format)
    )
    # After the FLOP count: it counts the convolutions the network defines, whatever algorithm runs them.
    apply_conv_algo(model, conv_algo)
    runner = torch.compile(model) if compile_model else model
    samples = torch.randn(batch * 2, *input_shape)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(samples), batch_size=batch, num_workers=workers,
        pin_memory=device.is_accelerator, persistent_workers=workers > 0,
    )  # fmt: skip

    def batches():
        while True:
            yield from loader

    stream = batches()
    _reset_peak(device)
    times, waits = [], []
    compile_seconds = None
    model.train()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        (x,) = next(stream)
        x = x.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
        t1 = time.perf_counter()
        train_step(runner, x, None, _step_loss, optimizer, amp)
        device.synchronize()
        t2 = time.perf_counter()
        if i == 0 and (compile_model or conv_algo == "auto"):
            compile_seconds = t2 - t0
        if i >= warmup:
            times.append(t2 - t0)
            waits.append(t1 - t0)
    step = statistics.median(times)
    infer_rate = None
    if inference:
        runner.eval()
        infer_times = []
        with torch.no_grad():
            for i in range(warmup + steps):
                (x,) = next(stream)
                x = x.to(dev, non_blocking=True).contiguous(memory_format=memory_format)
                t0 = time.perf_counter()
                with autocast():
                    _first_output(runner(x))
                device.synchronize()
                if i >= warmup:
                    infer_times.append(time.perf_counter() - t0)
        infer_rate = batch / statistics.median(infer_times)
    achieved = flops / step / 1e12 if flops else None
    peak = _peak_tflops(device, precision, peak_tflops)
    return BenchResult(
        model=name,
        device=f"{device.kind}:{device.index} {device.name}",
        batch=batch,
        input_shape=list(input_shape),
        precision=precision,
        channels_last=memory_format != torch.contiguous_format,
        compile=compile_model,
        conv_algo=conv_algo,
        train_images_per_s=batch / step,
        train_step_ms_median=step * 1000,
        infer_images_per_s=infer_rate,
        data_wait_fraction=sum(waits) / sum(times),
        compile_seconds=compile_seconds,
        params=params,
        train_gflop_per_step=flops / 1e9 if flops else None,
        achieved_tflops=achieved,
        peak_tflops=peak,
        utilisation=achieved / peak if achieved and peak else None,
        peak_device_mem_mb=_peak_device_mb(device),
        peak_host_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        torch=str(torch.__version__),
        steps=steps,
        warmup=warmup,
    )


def format_table(results: list[BenchResult]) -> str:
    header = f"{'model':<14}{'batch':>6}  {'input':<14}{'prec':<6}{'CL':<4}{'cmp':<5}{'conv':<9}{'train img/s':>12}{'infer img/s':>12}{'wait':>7}{'TFLOP/s':>9}{'mem MB':>9}"
    rows = [header, "-" * len(header)]
    for r in results:
        shape = "x".join(map(str, r.input_shape))
        rows.append(
            f"{r.model:<14}{r.batch:>6}  {shape:<14}{r.precision:<6}{'y' if r.channels_last else 'n':<4}"
            f"{'y' if r.compile else 'n':<5}{r.conv_algo:<9}{r.train_images_per_s or 0:>12.2f}{r.infer_images_per_s or 0:>12.2f}"
            f"{(r.data_wait_fraction or 0) * 100:>6.1f}%{r.achieved_tflops or 0:>9.3f}"
            f"{(r.peak_device_mem_mb or r.peak_host_rss_mb):>9.0f}"
        )
    return "\n".join(rows)


# ------------------------------------------------------------------ host overhead, loaders and projections


@dataclass(frozen=True)
class FolderCase:
    """How `--host_overhead` and `--loader` run one folder's training entry point on its demo data."""

    demo: str  # common.demo_data dataset name
    demo_n: int | None  # its --n (None: the writer's default)
    batch: int  # the folder's training batch per device (its test/train_performance_1p.sh)
    input: str  # what one sample is at the training size, for the tables
    model: str  # the MODELS entry whose FLOPs the projection counts
    steps_per_epoch: int  # on this demo data, for entry points that stop only at whole epochs

    def flags(self, folder: str, data: Path, out: Path, steps: int, workers: int) -> list[str]:
        """The entry point's flags; only spellings that every version of the zoo accepts (the step caps'
        older names --train_steps and --max_iters are aliases of --max_steps now)."""
        common = ["--workers", str(workers), "--amp"]
        if folder == "UNet_nested":
            return ["--data_path", str(data), "--arch", "UNet", "-b", str(self.batch), "--epochs", "1000",
                    "--train_steps", str(steps), "--models_dir", str(out / "models"), *common]  # fmt: skip
        if folder in ("AttU_Net", "R2U_Net"):
            return ["--mode", "train", "--data_path", str(data), "--model_type", self.model, "--image_size", "224",
                    "--batch_size", str(self.batch), "--num_epochs", "1000", "--max_iters", str(steps),
                    "--model_path", str(out / "models"), "--result_path", str(out / "result"), *common]  # fmt: skip
        if folder == "UNet_mindspore":
            return ["--data_url", str(data), "--batchsize", str(self.batch), "--epochs", "1000", "--repeat", "12",
                    "--train_steps", str(steps), "--ckpt_dir", str(out / "ckpt"), *common]  # fmt: skip
        if folder == "VNet":  # whole epochs: older versions have no step cap
            epochs = max(1, math.ceil(steps / self.steps_per_epoch))
            return ["--data", str(data), "--batchSz", str(self.batch), "--nEpochs", str(epochs),
                    "--save", str(out / "vnet"), *common]  # fmt: skip
        raise ConfigError(f"--folder {folder!r}: no training case")


FOLDER_CASES: dict[str, FolderCase] = {
    "UNet_nested": FolderCase("dsb2018", 400, 16, "3x96x96", "UNet", 20),
    "AttU_Net": FolderCase("isic2018", 400, 16, "3x224x224", "AttU_Net", 17),
    "R2U_Net": FolderCase("isic2018", 400, 16, "3x224x224", "R2AttU_Net", 17),
    "UNet_mindspore": FolderCase("isbi2012", None, 16, "1x572x572", "UNetMedical", 18),
    "VNet": FolderCase("luna16", 24, 8, "1x64x80x80", "VNet", 20),
}
# V-Net's loader reads patches through its own volume-grouped sampler (VNet/benchmark.py loader measures it).
LOADER_FOLDERS = ("UNet_nested", "AttU_Net", "R2U_Net", "UNet_mindspore")
STUB = ROOT / "common" / "stub_network.py"

# Published 8-device training FPS (the ports' READMEs) of the model each folder trains, for the projection table.
PUBLISHED_8_CARD: dict[str, list[tuple[float, str]]] = {
    "UNet_nested": [(2332, "8 V100")],
    "AttU_Net": [(846, "8 NPU")],
    "R2U_Net": [(304, "8 V100"), (393, "8 NPU")],
    "VNet": [(218, "8 NPU")],
}


def describe_cpu() -> str:
    """The CPU model, whether it has bf16 instructions, and the core count (Linux /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    return f"{model}, avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, {os.cpu_count()} core(s)"


def tree_label(tree: Path) -> str:
    """`<short commit>` of a checkout, `+ working tree` when it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return str(tree)
    return f"{commit} + working tree" if dirty else commit


def step_times(events: list, warmup: int) -> dict[str, list[float]]:
    """Seconds of each training step after the first `warmup`, from the events of common/stub_network.py
    (kind, wall, cpu, stand-in wall so far, stand-in cpu so far[, ops so far]): the interval between
    consecutive optimizer steps, leaving out every interval that an eval-mode forward (validation)
    interrupted. `wall`, `cpu`: the whole step; `own_wall`, `own_cpu`: the stand-in's own forward and
    backward within it; `host_cpu`: the CPU time of everything else; `forwards`: training forwards per step
    (micro-batches); `ops`: operator calls per step (0 unless the run counted them)."""
    keys = ("wall", "cpu", "own_wall", "own_cpu", "host_cpu", "forwards", "ops")
    times: dict[str, list[float]] = {key: [] for key in keys}
    previous = None
    step = forwards = 0
    for kind, wall, cpu, own_wall, own_cpu, *counted in events:
        ops = counted[0] if counted else 0
        if kind == "eval":
            previous = None
        elif kind == "train":
            forwards += 1
        elif kind == "step":
            step += 1
            if previous is not None and step > warmup:
                times["wall"].append(wall - previous[0])
                times["cpu"].append(cpu - previous[1])
                times["own_wall"].append(own_wall - previous[2])
                times["own_cpu"].append(own_cpu - previous[3])
                times["host_cpu"].append(times["cpu"][-1] - times["own_cpu"][-1])
                times["forwards"].append(forwards)
                times["ops"].append(ops - previous[4])
            previous = (wall, cpu, own_wall, own_cpu, ops)
            forwards = 0
    return times


def demo_data(case: FolderCase, data_dir: Path) -> Path:
    """The folder's demo dataset under `data_dir` (written once; reused while complete)."""
    out = data_dir / (case.demo if case.demo_n is None else f"{case.demo}_{case.demo_n}")
    command = [sys.executable, "-m", "common.demo_data", case.demo, "--out", str(out), "--if-missing"]
    if case.demo_n is not None:
        command += ["--n", str(case.demo_n)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(
            f"--data_dir {data_dir}: writing the {case.demo} demo data failed: {proc.stderr.strip()[-400:]}"
        )
    return out


def run_stub(folder: str, tree: Path, out: Path, mode: list[str], flags: list[str], threads: int) -> dict:
    """One run of common/stub_network.py in `tree`/`folder`; its JSON, or a ConfigError with the log's tail."""
    result = out / "result.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # The checkout under test must provide `common` (its repo_path puts it first); nothing from ours.
    env.pop("PYTHONPATH", None)
    for key in [k for k in env if k.startswith("MODELZOO_")]:
        env.pop(key)
    log = out / "run.log"
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, str(STUB), folder, str(result), *mode, "--", *flags],
                              cwd=tree / folder, env=env, stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip
    tail = log.read_text(errors="replace").strip()[-1500:]
    if not result.is_file():
        raise ConfigError(
            f"{tree / folder}: the run wrote no result (exit {proc.returncode}); log {log}:\n{tail}"
        )
    data = json.loads(result.read_text())
    if proc.returncode != 0 and not data.get("samples_per_s"):
        raise ConfigError(f"{tree / folder}: the run failed (exit {proc.returncode}); log {log}:\n{tail}")
    if data.get("common") and not Path(data["common"]).resolve().is_relative_to(tree):
        raise ConfigError(
            f"{tree / folder}: the run imported {data['common']}, not the checkout's own common/"
        )
    return data


def _case_and_tree(folder: str, tree: str | Path | None) -> tuple[FolderCase, Path]:
    if folder not in FOLDER_CASES:
        raise ConfigError(f"--folder {folder!r}: one of {', '.join(FOLDER_CASES)}")
    tree = Path(tree).resolve() if tree else ROOT
    if not (tree / folder).is_dir() or not (tree / "common").is_dir():
        raise ConfigError(f"--tree {tree}: not a checkout of the zoo (no {folder}/ or common/ in it)")
    return FOLDER_CASES[folder], tree


def _data_dir(data_dir: str | Path | None, tree: Path) -> Path:
    """Demo data per checkout: each version prepares and caches it in its own format beside it."""
    base = Path(data_dir) if data_dir else Path(tempfile.gettempdir()) / "modelzoo_bench_data"
    return base / hashlib.sha1(str(tree).encode()).hexdigest()[:10]


def host_overhead(folder: str, *, tree: str | Path | None = None, steps: int = 40, warmup: int = 5,
                  runs: int = 3, workers: int = 2, threads: int = 1, data_dir: str | Path | None = None,
                  case: FolderCase | None = None, count_ops: bool = True) -> dict:  # fmt: skip
    """Host overhead per training step of `folder` (network: one 1x1 convolution), median of `runs` runs;
    with `count_ops`, one more run counts the operator calls per step (the median step: not a logging one)."""
    base_case, tree = _case_and_tree(folder, tree)
    case = case or base_case
    if steps <= warmup + 1 or runs < 1:
        raise ConfigError(
            f"--steps ({steps}) must exceed --warmup ({warmup}) + 1, and --runs must be at least 1"
        )
    data = demo_data(case, _data_dir(data_dir, tree))
    medians: dict[str, list[float]] = {}
    counts = []
    with tempfile.TemporaryDirectory(prefix="host_overhead_") as tmp:
        for run in range(runs):
            out = Path(tmp) / f"run{run}"
            out.mkdir()
            events = run_stub(folder, tree, out, [], case.flags(folder, data, out, steps, workers), threads)[
                "events"
            ]
            times = step_times(events, warmup)
            if not times["wall"]:
                raise ConfigError(
                    f"{tree / folder}: no training step after the {warmup} warm-up steps was timed"
                )
            for key, values in times.items():
                medians.setdefault(key, []).append(statistics.median(values))
            counts.append(len(times["wall"]))
        ops = None
        if count_ops:
            out = Path(tmp) / "ops"
            out.mkdir()
            flags = case.flags(folder, data, out, steps, workers)
            ops = statistics.median(step_times(run_stub(folder, tree, out, ["--count_ops"], flags, threads)["events"],
                                               warmup)["ops"])  # fmt: skip
    medians.pop("ops")
    forwards = medians.pop("forwards")
    ms = {key: 1000 * statistics.median(values) for key, values in medians.items()}
    return {
        "mode": "host_overhead", "folder": folder, "tree": str(tree), "version": tree_label(tree),
        "batch": case.batch, "input": case.input, "steps_timed": counts, "workers": workers, "threads": threads,
        "forwards_per_step": statistics.median(forwards), "host_cpu_ms_per_step": ms["host_cpu"], "host_cpu_ms_per_image": ms["host_cpu"] / case.batch,
        "host_bound_images_per_s": 1000 * case.batch / ms["host_cpu"], "ops_per_step": ops,
        "cpu_ms_per_step": ms["cpu"], "stub_cpu_ms_per_step": ms["own_cpu"], "wall_ms_per_step": ms["wall"],
        "runs": {key: [round(1000 * v, 2) for v in values] for key, values in medians.items()},
        "cpu": describe_cpu(), "load_average": os.getloadavg()[0], "torch": str(torch.__version__),
    }  # fmt: skip


def loader_throughput(folder: str, *, tree: str | Path | None = None, batches: int = 16, runs: int = 3,
                      threads: int = 1, data_dir: str | Path | None = None,
                      case: FolderCase | None = None) -> dict:  # fmt: skip
    """Samples/s of the folder's training loader with one worker, and per CPU-second of that worker."""
    base_case, tree = _case_and_tree(folder, tree)
    case = case or base_case
    if folder not in LOADER_FOLDERS:
        raise ConfigError(
            f"--loader --folder {folder}: V-Net's patch loader has its own measurement "
            "(cd VNet && python benchmark.py loader --data DIR --synthetic 24)"
        )
    if batches < 1 or runs < 1:
        raise ConfigError("--batches and --runs must be at least 1")
    data = demo_data(case, _data_dir(data_dir, tree))
    with tempfile.TemporaryDirectory(prefix="loader_") as tmp:
        flags = case.flags(folder, data, Path(tmp), 1, 1)
        rates = run_stub(folder, tree, Path(tmp), ["--loader", str(batches), str(runs)], flags, threads)
    if "samples_per_s" not in rates:
        raise ConfigError(f"{tree / folder}: the entry point built no training loader through common.loader")
    return {
        "mode": "loader", "folder": folder, "tree": str(tree), "version": tree_label(tree), "batch": rates["batch"],
        "input": case.input, "dataset": rates["dataset"], "sample_shapes": rates["sample_shapes"],
        "batches": batches, "runs": runs,
        "samples_per_s": statistics.median(rates["samples_per_s"]),
        "samples_per_worker_cpu_s": statistics.median(rates["samples_per_worker_cpu_s"]),
        "samples_per_s_runs": [round(v, 1) for v in rates["samples_per_s"]],
        "samples_per_worker_cpu_s_runs": [round(v, 1) for v in rates["samples_per_worker_cpu_s"]],
        "cpu": describe_cpu(), "load_average": os.getloadavg()[0], "torch": str(torch.__version__),
    }  # fmt: skip


def train_flops_per_image(model: str) -> float:
    """Training FLOPs (forward + backward) per image of a MODELS entry at its README size, counted with
    torch.utils.flop_counter on the meta device (shapes only: nothing is computed)."""
    factory, kwargs, shape = MODELS[model]
    with torch.device("meta"):
        net = load_factory(factory)(**kwargs)
        x = torch.empty(2, *shape)  # 2: BatchNorm needs more than one value per channel
    flops = _count_flops(net, x)
    if not flops:
        raise ConfigError("torch.utils.flop_counter is not available in this torch")
    return flops / 2


def projection(folder: str, *, flops_per_image: float, host_cpu_s_per_image: float | None,
               loader_per_core: float | None, peak_tflops: float, workers: int = 8) -> dict:  # fmt: skip
    """One device's projected training images/s: the least of the compute bound (FLOPs at `peak_tflops`),
    the host bound (one core running the step's host side) and the loader bound (`workers` cores)."""
    bounds = {"compute": peak_tflops * 1e12 / flops_per_image}
    if host_cpu_s_per_image:
        bounds["host"] = 1 / host_cpu_s_per_image
    if loader_per_core:
        bounds["loader"] = workers * loader_per_core
    limit = min(bounds, key=bounds.get)
    published = PUBLISHED_8_CARD.get(folder, [])
    best = max((fps for fps, _ in published), default=None)
    return {"mode": "projection", "folder": folder, "train_gflop_per_image": flops_per_image / 1e9,
            **{f"{name}_bound": value for name, value in bounds.items()},
            "projected_images_per_s": bounds[limit], "bound_by": limit, "peak_tflops": peak_tflops,
            "loader_workers": workers,
            "published_8_card": " / ".join(f"{fps:g} ({where})" for fps, where in published) or "-",
            "projected_over_best_published": bounds[limit] / best if best else None}  # fmt: skip


def projection_table(rows: list[dict]) -> str:
    lines = [
        "| folder (model, input, batch) | train GFLOP/image | compute bound | host bound | loader bound | "
        "projected 1 device | bound by | published 8 devices | projected / best published |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = FOLDER_CASES[r["folder"]]
        cells = [f"{r[k]:.0f}" if r.get(k) else "-" for k in ("compute_bound", "host_bound", "loader_bound")]
        lines.append(
            f"| {r['folder']} ({case.model}, {case.input}, {case.batch}) | {r['train_gflop_per_image']:.1f} | "
            f"{' | '.join(cells)} | **{r['projected_images_per_s']:.0f}** | {r['bound_by']} | {r['published_8_card']} | "
            + (
                f"{r['projected_over_best_published']:.2f}x |"
                if r["projected_over_best_published"]
                else "- |"
            )
        )
    return "\n".join(lines)


def read_results(path: str | Path, tree: Path) -> tuple[dict[str, float], dict[str, float]]:
    """From a --json file, per folder measured in `tree`: host CPU-seconds per image and loader samples per
    worker CPU-second, each the median over that folder's --host_overhead / --loader rows (invocations)."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--results {path}: {exc}") from None
    host: dict[str, list[float]] = {}
    loader: dict[str, list[float]] = {}
    for r in rows:
        if r.get("tree") != str(tree):
            continue
        if r.get("mode") == "host_overhead":
            host.setdefault(r["folder"], []).append(r["host_cpu_ms_per_image"] / 1000)
        elif r.get("mode") == "loader":
            loader.setdefault(r["folder"], []).append(r["samples_per_worker_cpu_s"])
    return (
        {k: statistics.median(v) for k, v in host.items()},
        {k: statistics.median(v) for k, v in loader.items()},
    )


def _loader_rates(items: list[str]) -> dict[str, float]:
    rates = {}
    for item in items:
        folder, sep, value = item.partition("=")
        try:
            rates[folder] = float(value)
        except ValueError:
            raise ConfigError(
                f"--loader_rate {item!r} must look like FOLDER=SAMPLES_PER_CORE_SECOND"
            ) from None
        if not sep or folder not in FOLDER_CASES or rates[folder] <= 0:
            raise ConfigError(f"--loader_rate {item!r} must look like FOLDER=SAMPLES_PER_CORE_SECOND (FOLDER one of "
                              f"{', '.join(FOLDER_CASES)}, a positive rate)")  # fmt: skip
    return rates


def _host_loader_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["mode"] == "host_overhead":
            lines.append(f"host overhead {r['folder']:<15} {r['version']:<24} batch {r['batch']:>3} {r['input']:<11} "
                         f"host CPU {r['host_cpu_ms_per_step']:8.2f} ms/step ({r['host_cpu_ms_per_image']:.3f} ms/image, "
                         f"bound {r['host_bound_images_per_s']:.0f} img/s); with the 1x1 conv's own "
                         f"{r['stub_cpu_ms_per_step']:.2f}: {r['cpu_ms_per_step']:.2f} CPU, "
                         f"{r['wall_ms_per_step']:.2f} wall"
                         + (f"; {r['ops_per_step']:.0f} ops/step" if r.get("ops_per_step") else ""))  # fmt: skip
        else:
            lines.append(f"loader        {r['folder']:<15} {r['version']:<24} batch {r['batch']:>3} {r['input']:<11} "
                         f"{r['samples_per_s']:8.1f} samples/s with 1 worker, "
                         f"{r['samples_per_worker_cpu_s']:.1f} per worker CPU-second")  # fmt: skip
    return "\n".join(lines)


SWEEP_BATCH = {"U_Net": 4, "R2U_Net": 2, "AttU_Net": 4, "R2AttU_Net": 2, "UNet": 16, "NestedUNet": 16,
               "UNetMedical": 1, "VNet": 1}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), help="a model of the zoo")
    parser.add_argument(
        "--model_factory", help="any implementation: package.module:function or file.py:function"
    )
    parser.add_argument("--factory_kwargs", default="{}", help="JSON keyword arguments for the factory")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument(
        "--size", type=int, nargs="+", default=None, help="spatial size (one number: square/cube)"
    )
    parser.add_argument("--channels", type=int, default=None, help="input channels (with --model_factory)")
    parser.add_argument(
        "--amp", default="O0", help="O0 = fp32; O1-O3 = autocast (bf16 on CPU, fp16 elsewhere)"
    )
    parser.add_argument("--amp_dtype", choices=("auto", "bf16", "fp16"), default="auto")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--conv_algo", choices=ALGOS, default="direct",
        help="3x3 convolutions on CPU: direct (oneDNN), winograd (F(4x4,3x3)), auto (time both per layer)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 10; --host_overhead: 40 in all)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed first steps (default 3; --host_overhead: 5)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="loader workers (default 0; --host_overhead: 2)"
    )
    parser.add_argument("--no_inference", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sweep", action="store_true", help="every model of the zoo at its README size")
    parser.add_argument("--json", help="append the JSON lines to this file")
    group = parser.add_argument_group(
        "a folder's training entry point (network replaced by a 1x1 convolution)"
    )
    group.add_argument("--host_overhead", action="store_true", help="host time per training step")
    group.add_argument("--loader", action="store_true", help="training loader samples/s with one worker")
    group.add_argument("--projection", action="store_true", help="one-device bounds from --results")
    group.add_argument("--folder", choices=sorted(FOLDER_CASES), nargs="+", help="the folder(s) to measure")
    group.add_argument("--no_count_ops", action="store_true",
                       help="--host_overhead: skip the extra run that counts operator calls per step")  # fmt: skip
    group.add_argument("--tree", default=None, help="the checkout to measure (default: this one)")
    group.add_argument(
        "--data_dir", default=None, help="where the demo data is written (default: a temp folder)"
    )
    group.add_argument("--runs", type=int, default=3, help="runs; the tables give their median")
    group.add_argument("--batches", type=int, default=16, help="--loader: timed batches per run")
    group.add_argument("--results", help="--projection: the --json file of --host_overhead and --loader runs")
    group.add_argument(
        "--loader_rate", action="append", default=[], metavar="FOLDER=RATE",
        help="--projection: samples per loader-core second measured elsewhere (V-Net: VNet/benchmark.py loader)",
    )  # fmt: skip
    group.add_argument("--projection_device", default="H100", choices=sorted(PEAK_TFLOPS))
    group.add_argument("--projection_workers", type=int, default=8, help="loader workers (cores) per device")
    args = parser.parse_args(argv)
    if args.host_overhead or args.loader or args.projection:
        return _folder_modes(args, parser)
    args.steps = 10 if args.steps is None else args.steps
    args.warmup = 3 if args.warmup is None else args.warmup
    args.workers = 0 if args.workers is None else args.workers
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    precision = "fp32"
    if args.amp.upper() != "O0":
        precision = {"auto": "bf16" if device.kind == "cpu" else "fp16"}.get(args.amp_dtype, args.amp_dtype)
    if args.sweep:
        jobs = [(name, *MODELS[name]) for name in MODELS]
    elif args.model_factory:
        channels = args.channels or 3
        size = args.size or [96]
        size = size * 2 if len(size) == 1 else size  # one number: a square (give three for a 3-D model)
        jobs = [(args.model_factory, args.model_factory, json.loads(args.factory_kwargs), (channels, *size))]
    elif args.model:
        factory, kwargs, shape = MODELS[args.model]
        kwargs = {**kwargs, **json.loads(args.factory_kwargs)}
        if args.size:
            size = args.size * (len(shape) - 1) if len(args.size) == 1 else args.size
            shape = (shape[0], *size)
        jobs = [(args.model, factory, kwargs, shape)]
    else:
        parser.error("give --model, --model_factory or --sweep")
    results = []
    for name, factory, kwargs, shape in jobs:
        batch = args.batch or SWEEP_BATCH.get(name, 4)
        result = run_benchmark(
            name, load_factory(factory), kwargs, tuple(shape), batch=batch, device=device, precision=precision,
            channels_last=args.channels_last, compile_model=args.compile, conv_algo=args.conv_algo, steps=args.steps, warmup=args.warmup,
            inference=not args.no_inference, workers=args.workers, peak_tflops=args.peak_tflops,
        )  # fmt: skip
        line = json.dumps(asdict(result))
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(line + "\n")
        results.append(result)
    print(format_table(results))
    return 0


def _emit(rows: list[dict], path: str | None) -> None:
    for row in rows:
        line = json.dumps(row)
        print(line, flush=True)
        if path:
            with open(path, "a") as handle:
                handle.write(line + "\n")


def _folder_modes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """--host_overhead, --loader and --projection."""
    if sum((args.host_overhead, args.loader, args.projection)) != 1:
        parser.error("give one of --host_overhead, --loader, --projection")
    threads = args.threads or 1
    if args.projection:
        if not args.results:
            parser.error(
                "--projection needs --results (the --json file of --host_overhead and --loader runs)"
            )
        tree = Path(args.tree).resolve() if args.tree else ROOT
        given = _loader_rates(args.loader_rate)
        host, rates = read_results(args.results, tree)
        rates.update(given)
        # Half the dense bf16 peak: what well-tuned convolution training sustains (an assumption, not a measurement).
        peak = (args.peak_tflops or PEAK_TFLOPS[args.projection_device]["bf16"]) / 2
        rows = []
        for folder in args.folder or sorted(set(host) | set(rates)):
            rows.append(projection(
                folder, flops_per_image=train_flops_per_image(FOLDER_CASES[folder].model), peak_tflops=peak,
                host_cpu_s_per_image=host.get(folder), loader_per_core=rates.get(folder),
                workers=args.projection_workers,
            ))  # fmt: skip
        _emit(rows, args.json)
        print(f"compute bound at {peak:g} TFLOP/s (half the dense bf16 peak); loader bound = "
              f"{args.projection_workers} workers x per-core rate")  # fmt: skip
        print(projection_table(rows))
        return 0
    if not args.folder:
        parser.error("--host_overhead and --loader need --folder")
    rows = []
    for folder in args.folder:
        if args.host_overhead:
            row = host_overhead(
                folder, tree=args.tree, steps=args.steps or 40, warmup=5 if args.warmup is None else args.warmup,
                runs=args.runs, workers=2 if args.workers is None else args.workers, threads=threads,
                data_dir=args.data_dir, count_ops=not args.no_count_ops,
            )  # fmt: skip
        else:
            row = loader_throughput(folder, tree=args.tree, batches=args.batches, runs=args.runs, threads=threads,
                                    data_dir=args.data_dir)  # fmt: skip
        _emit([row], args.json)
        rows.append(row)
    print(f"{describe_cpu()}; load average {os.getloadavg()[0]:.1f}")
    print(_host_loader_table(rows))
    return 0


if __name__ == "__main__":
    from common.cli import run_main

    run_main(main)
