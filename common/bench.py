"""One benchmark for every model of the zoo, and for any other implementation through a factory.

    python -m common.bench --model R2AttU_Net --batch 16 --size 224 --amp O2 --channels_last --compile
    python -m common.bench --model_factory /path/to/their_archs.py:UNet --factory_kwargs '{"num_classes": 1}'
    python -m common.bench --sweep                       # the README table, one row per model

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

Results are printed as one JSON line per configuration plus a readable table. Models are built by the
factories in `MODELS` (file path relative to the repository root, then the callable): `common` never
imports a model folder, it loads the file the table names, like any other factory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.device import DeviceInfo, select_device
from common.errors import ConfigError
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
    memory_format = (
        torch.channels_last if channels_last and len(input_shape) == 3 else torch.contiguous_format
    )
    model = model.to(memory_format=memory_format)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    autocast = (
        (lambda: torch.autocast(device.kind, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    )
    scaler = torch.amp.GradScaler(device.kind) if precision == "fp16" else None
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
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = _loss(runner(x))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
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
        channels_last=memory_format == torch.channels_last,
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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--no_inference", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--sweep", action="store_true", help="every model of the zoo at its README size")
    parser.add_argument("--json", help="append the JSON lines to this file")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
