"""Measurements behind the README tables: training memory per batch and size, and sliding-window cost.

    python3 benchmark.py memory [--sizes 32x64x64 64x80x80] [--batches 1 2 4] [--steps 2]
    python3 benchmark.py sliding_window [--volume 128x256x256] [--patch 64x128x128] [--overlap 0.5]
    python3 benchmark.py loader --data DIR [--synthetic 24] [--batch 8] [--batches 16] [--runs 3]

memory: each configuration (patch size, batch, with and without `--checkpoint_stages`) runs in a fresh
process that builds V-Net and Adam and takes `--steps` training steps (forward, soft Dice loss, backward,
optimizer step) on random volumes. On the CPU the number is the process's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), which includes Python, torch, the weights, gradients and
Adam's two moments (about 0.75 GB for V-Net's 45.6M parameters) plus the activations; on an accelerator
it is `torch.<device>.max_memory_allocated()`.

sliding_window: the time of `sliding_window_inference` over a whole volume (Gaussian blending, output
accumulated on the model's device) against the same number of plain forward passes of window-sized
inputs; the ratio is the cost of extracting windows, weighting and accumulating.

loader: training patches per second from a DataLoader with one worker process (median of `--runs` runs
of `--batches` batches, each run a new epoch and a new worker, its first batch not timed), and patches
per CPU-second of that worker (from /proc: what one core yields on a machine shared with other work),
for three ways of reading LUNA16-sized volumes:
each worker decoding the MetaImage files with an LRU cache (LUNA16's ratio of 1 GiB to 888 volumes
unless `--before_cache_mb`) under a global patch shuffle; the memory-mapped `.npy` cache under the same
shuffle; the `.npy` cache with volume-grouped patches (`patch_loader`). `--synthetic N` first writes N
normalised cases of LUNA16's size (128 x 160 x 160 float32 CT, 0/1 lung mask) to `--data` when missing.
"""

from __future__ import annotations

import repo_path  # noqa: F401  # isort: skip  (puts the monorepo root on sys.path)

import argparse
import functools
import itertools
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from dataset import (
    CaseReader,
    PatchDataset,
    VolumeGroupedSampler,
    check_cases,
    default_volume_cache_dir,
    parse_size,
    resolve_data,
    tiles_per_volume,
)
from intensity import normalize_ct
from normalize_dataset import DEFAULT_SIZE, DEFAULT_SPACING, OUT_CT_DIR, OUT_MASK_DIR
from sliding_window import sliding_window_inference, window_starts
from torch.utils.data import DataLoader
from vnet import VNet

from common.bench import describe_cpu
from common.cli import run_main
from common.device import select_device
from common.errors import ConfigError
from common.imageio import write_volume
from common.loader import EpochKeyedSampler, seed_worker
from common.losses import TwoClassDiceLoss

LUNA16_CASES = 888
SYNTHETIC_MARKER = "synthetic_luna16.json"


def _peak_mb(device) -> float:
    if device.kind == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB
    return getattr(torch, device.kind).max_memory_allocated(device.index) / 2**20


def memory_probe(
    size: tuple[int, int, int], batch: int, checkpointing: bool, steps: int, device_name: str
) -> dict:
    """One configuration, in this process: peak memory and seconds per step."""
    device = select_device(device_name)
    torch.manual_seed(0)
    model = VNet(elu=False, nll=True, checkpoint_stages=checkpointing).to(device.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = TwoClassDiceLoss()
    x = torch.randn(batch, 1, *size, device=device.device)
    target = (torch.rand(batch, 1, *size, device=device.device) > 0.9).float()
    before = _peak_mb(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return {"size": list(size), "batch": batch, "checkpoint_stages": checkpointing, "device": device.kind,
            "peak_mb": round(_peak_mb(device), 1), "before_first_step_mb": round(before, 1),
            "step_s": round(min(times), 2)}  # fmt: skip


def run_memory(args: argparse.Namespace) -> int:
    rows = []
    for size, batch, ckpt in itertools.product(args.sizes, args.batches, (False, True)):
        command = [sys.executable, __file__, "_probe", "x".join(map(str, parse_size(size))), str(batch),
                   str(int(ckpt)), str(args.steps), args.device]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            row = {
                "size": size,
                "batch": batch,
                "checkpoint_stages": ckpt,
                "error": proc.stderr.strip()[-300:],
            }
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| patch (D x H x W) | batch | checkpoint_stages | peak memory (MiB) | s / step |")
    print("|---|---|---|---|---|")
    for row in rows:
        size = "x".join(map(str, row["size"])) if isinstance(row["size"], list) else row["size"]
        peak = row.get("peak_mb", row.get("error", "?"))
        print(
            f"| {size} | {row['batch']} | {'on' if row['checkpoint_stages'] else 'off'} | {peak} | {row.get('step_s', '')} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def run_sliding_window(args: argparse.Namespace) -> int:
    device = select_device(args.device)
    volume, patch = parse_size(args.volume, "--volume"), parse_size(args.patch, "--patch")
    torch.manual_seed(0)
    model = VNet(elu=False, nll=True).to(device.device).eval()
    x = torch.randn(1, 1, *volume, device=device.device)
    count = len(list(itertools.product(*(window_starts(v, p, args.overlap) for v, p in zip(volume, patch)))))
    windows = torch.randn(args.batch, 1, *patch, device=device.device)
    with torch.no_grad():
        model(windows[:1])  # warm-up (allocator, kernels)
        device.synchronize()
        start = time.perf_counter()
        for first in range(0, count, args.batch):
            model(windows[: min(args.batch, count - first)])
        device.synchronize()
        plain = time.perf_counter() - start
        start = time.perf_counter()
        out = sliding_window_inference(x, model, patch, overlap=args.overlap, batch_size=args.batch)
        device.synchronize()
        blended = time.perf_counter() - start
    result = {"device": device.describe(), "volume": list(volume), "patch": list(patch), "overlap": args.overlap,
              "windows": count, "batch": args.batch, "plain_forward_s": round(plain, 2),
              "sliding_window_s": round(blended, 2), "ratio": round(blended / plain, 3),
              "output_shape": list(out.shape)}  # fmt: skip
    print(json.dumps(result))
    return 0


def write_synthetic_luna(out: Path, n: int, size: Sequence[int] = DEFAULT_SIZE, seed: int = 0) -> Path:
    """`n` cases of a normalised LUNA16 tree of LUNA16's size, as normalize_dataset.py writes them (float32
    .mhd/.raw CT, 0/1 .mhd/.zraw mask); the lungs, two ellipsoids, fill about a fifth of the box."""
    params = {"n": n, "size": list(size), "seed": seed}
    try:
        if json.loads((out / SYNTHETIC_MARKER).read_text()) == params:
            return out
    except (OSError, ValueError):
        pass
    rng = np.random.default_rng(seed)
    z, y, x = (np.linspace(-1, 1, s, dtype=np.float32) for s in size)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    for i in range(n):
        dz, dy, dx = rng.uniform(-0.08, 0.08, 3)
        body = (y - dy) ** 2 / 0.55**2 + (x - dx) ** 2 / 0.8**2 < 1
        lungs = np.zeros(size, bool)
        for side in (-1, 1):
            lungs |= ((z - dz) / 0.8) ** 2 + ((y - dy) / 0.55) ** 2 + ((x - dx - 0.36 * side) / 0.3) ** 2 < 1
        hu = np.where(body, rng.normal(40, 30, size), -1000.0).astype(np.float32)
        hu[lungs] = rng.normal(-850, 60, int(lungs.sum()))
        geometry = {"spacing": (DEFAULT_SPACING,) * 3}
        write_volume(out / OUT_CT_DIR / f"synthetic{i:03d}.mhd", normalize_ct(hu), compress=False, **geometry)
        write_volume(out / OUT_MASK_DIR / f"synthetic{i:03d}.mhd", lungs.astype(np.uint8), **geometry)
    (out / SYNTHETIC_MARKER).write_text(json.dumps(params) + "\n")
    return out


def _record_pid(pid, worker_id: int) -> None:
    seed_worker(worker_id)
    pid.value = os.getpid()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed_run(data: PatchDataset, sampler, epoch: int, batch: int, batches: int) -> tuple[float, float]:
    """(patches per second, patches per CPU-second of the worker) of a one-worker DataLoader over `batches`
    batches after an untimed one; the worker holds as many batches in flight at both ends, so its CPU time
    in between is that of `batches` batches."""
    sampler.set_epoch(epoch)
    pid = multiprocessing.Value("i", 0)
    loader = DataLoader(data, batch_size=batch, sampler=sampler, num_workers=1, drop_last=True,
                        worker_init_fn=functools.partial(_record_pid, pid))  # fmt: skip
    iterator = iter(loader)
    next(iterator)
    cpu, start = _cpu_seconds(pid.value), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds(pid.value) - cpu
    del iterator
    return batches * batch / elapsed, batches * batch / max(cpu, 1e-9)


def _reads_per_patch(cases: Sequence[int], capacity: int) -> float:
    """Volume reads per patch of a least-recently-used cache holding `capacity` volumes."""
    held: list[int] = []
    reads = 0
    for case in cases:
        if case in held:
            held.remove(case)
        else:
            reads += 1
        held.append(case)
        if len(held) > capacity:
            held.pop(0)
    return reads / max(1, len(cases))


def run_loader(args: argparse.Namespace) -> int:
    from train import auto_patch  # the patch train.py picks by default

    data_path = Path(args.data)
    if args.synthetic:
        write_synthetic_luna(data_path, args.synthetic)
    spec = resolve_data(data_path, log=print)
    cache = default_volume_cache_dir(spec)
    start = time.perf_counter()
    check_cases(spec, skip_bad=False)
    print(f"volume cache {cache}: ready in {time.perf_counter() - start:.1f} s for {len(spec.cases)} case(s)")
    first = CaseReader(spec)(0)
    case_mb = (first[0].nbytes + first[1].nbytes) / 2**20
    patch = parse_size(args.patch) if args.patch else auto_patch("luna16", [first[0].shape])
    spv = args.samples_per_volume or tiles_per_volume(first[0].shape, patch)
    before_mb = (
        args.before_cache_mb if args.before_cache_mb is not None else 1024 * len(spec.cases) / LUNA16_CASES
    )
    cases = list(range(len(spec.cases)))
    if len(cases) * spv // args.batch < args.batches + 1:
        raise ConfigError(
            f"{len(cases)} case(s) x {spv} patches give {len(cases) * spv // args.batch} batches of {args.batch}; "
            f"--batches {args.batches} needs one more: lower it or add cases (--synthetic)"
        )
    setups = {
        f"decoded per worker, LRU {before_mb:.0f} MiB, shuffled patches": (
            CaseReader(spec, cache_bytes=int(before_mb * 2**20), disk_cache=False), "shuffle"),
        "memory-mapped .npy, shuffled patches": (CaseReader(spec), "shuffle"),
        "memory-mapped .npy, volume-grouped patches": (CaseReader(spec), "grouped"),
    }  # fmt: skip
    print(f"{len(cases)} volumes of {'x'.join(map(str, first[0].shape))} ({case_mb:.1f} MiB each), patch "
          f"{'x'.join(map(str, patch))}, {spv} per volume, batch {args.batch}; {describe_cpu()}, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    rows = []
    for name, (reader, order) in setups.items():
        data = PatchDataset(reader, cases, patch, spv, seed=args.seed)
        if order == "grouped":
            sampler = VolumeGroupedSampler(data)
        else:
            sampler = EpochKeyedSampler(
                data, num_replicas=1, rank=0, shuffle=True, seed=args.seed, drop_last=True
            )
        walls, cpus = [], []
        for run in range(args.runs):
            wall, cpu = _timed_run(data, sampler, run, args.batch, args.batches)
            walls.append(wall)
            cpus.append(cpu)
        sampler.set_epoch(0)
        sequence = [data.locate(*key)[0] for key in sampler]
        # Decoded volumes: misses of the LRU; mapped volumes: patches whose volume differs from the previous one's.
        capacity = int(before_mb // case_mb) if reader.store is None else 1
        row = {"loader": name, "patches_per_s_1_worker": [round(v, 1) for v in walls],
               "patches_per_worker_cpu_s": [round(v, 1) for v in cpus],
               "volume_reads_per_patch": round(_reads_per_patch(sequence, capacity), 3)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| loader | patches/s, 1 worker (median) | patches per worker CPU-s (median) | volumes loaded per patch |"
    )
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['loader']} | {np.median(row['patches_per_s_1_worker']):.1f} | "
              f"{np.median(row['patches_per_worker_cpu_s']):.1f} | {row['volume_reads_per_patch']} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_probe":  # one memory configuration in a fresh process (see run_memory)
        size, batch, ckpt, steps, device = argv[1:6]
        print(json.dumps(memory_probe(parse_size(size), int(batch), ckpt == "1", int(steps), device)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    memory = sub.add_parser("memory", help="peak training memory per patch size, batch and checkpointing")
    memory.add_argument("--sizes", nargs="+", default=["32x64x64", "64x80x80"])
    memory.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4])
    memory.add_argument("--steps", type=int, default=2)
    memory.add_argument("--json", default="")
    sliding = sub.add_parser("sliding_window", help="sliding-window inference vs plain forward passes")
    sliding.add_argument("--volume", default="128x256x256", help="D x H x W")
    sliding.add_argument("--patch", default="64x128x128")
    sliding.add_argument("--overlap", type=float, default=0.5)
    sliding.add_argument("--batch", type=int, default=1)
    for sub_parser in (memory, sliding):
        sub_parser.add_argument("--device", default="auto")
    loader = sub.add_parser("loader", help="training patches per second from one DataLoader worker")
    loader.add_argument(
        "--data", required=True, help="LUNA16 or Decathlon tree (written first with --synthetic)"
    )
    loader.add_argument(
        "--synthetic", type=int, default=0, help="write this many LUNA16-sized cases to --data"
    )
    loader.add_argument(
        "--patch", default="", help="patch ZxYxX (default: train.py's for LUNA16, half the volume)"
    )
    loader.add_argument("--samples_per_volume", type=int, default=0, help="0: as many as tile the volume")
    loader.add_argument("--batch", type=int, default=8)
    loader.add_argument("--batches", type=int, default=16, help="timed batches per run")
    loader.add_argument("--runs", type=int, default=3)
    loader.add_argument("--before_cache_mb", type=float, default=None,
                        help="LRU of the decoding loader (default 1024 x cases / 888, LUNA16's ratio)")  # fmt: skip
    loader.add_argument("--seed", type=int, default=0)
    loader.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.what == "loader":
        return run_loader(args)
    return run_memory(args) if args.what == "memory" else run_sliding_window(args)


if __name__ == "__main__":
    run_main(main)
