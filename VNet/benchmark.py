"""Measurements behind the README tables: training memory per batch and size, and sliding-window cost.

    python3 benchmark.py memory [--sizes 32x64x64 64x80x80] [--batches 1 2 4] [--steps 2]
    python3 benchmark.py sliding_window [--volume 128x256x256] [--patch 64x128x128] [--overlap 0.5]

memory: each configuration (patch size, batch, with and without `--checkpoint_stages`) runs in a fresh
process that builds V-Net and Adam and takes `--steps` training steps (forward, soft Dice loss, backward,
optimizer step) on random volumes. On the CPU the number is the process's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), which includes Python, torch, the weights, gradients and
Adam's two moments (about 0.75 GB for V-Net's 45.6M parameters) plus the activations; on an accelerator
it is `torch.<device>.max_memory_allocated()`.

sliding_window: the time of `sliding_window_inference` over a whole volume (Gaussian blending, output
accumulated on the model's device) against the same number of plain forward passes of window-sized
inputs; the ratio is the cost of extracting windows, weighting and accumulating.
"""

from __future__ import annotations

import repo_path  # noqa: F401  # isort: skip  (puts the monorepo root on sys.path)

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from dataset import parse_size
from sliding_window import sliding_window_inference, window_starts
from vnet import VNet

from common.cli import run_main
from common.device import select_device
from common.losses import TwoClassDiceLoss


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
    args = parser.parse_args(argv)
    return run_memory(args) if args.what == "memory" else run_sliding_window(args)


if __name__ == "__main__":
    run_main(main)
