"""A tiny end-to-end training script over the common runtime, used by common's tests only.

It is a real entry point (flags, runtime, seeded data, engine, checkpoints, summary) with a toy network
and a procedural dataset, so the shared machinery can be tested in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from common.cli import add_common_args, add_schedule_args, describe_config, print_config, setup_runtime  # noqa: E402
from common.engine import TrainingRun, evaluate  # noqa: E402
from common.loader import SeededDataset, build_loader, build_statistics_loader  # noqa: E402
from common.losses import build_loss  # noqa: E402
from common.metrics import SegmentationMetrics  # noqa: E402
from common.summary import SummaryTarget  # noqa: E402
from common.trainer import Hooks, LoopConfig, StartPoint, fit, prepare  # noqa: E402


class Squares(SeededDataset):
    """Noisy images with a bright square; the mask is the square. Augmentation: random flips."""

    def __init__(self, n: int, size: int = 16, seed: int = 0, offset: int = 0):
        self.n, self.size, self.seed, self.offset = n, size, seed, offset

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, rng: np.random.Generator | None):
        gen = np.random.default_rng(index + self.offset)
        mask = np.zeros((self.size, self.size), np.float32)
        half = int(gen.integers(2, self.size // 3))
        cy, cx = gen.integers(half, self.size - half, size=2)
        mask[cy - half : cy + half, cx - half : cx + half] = 1
        image = mask * 0.8 + gen.normal(0, 0.3, mask.shape).astype(np.float32)
        if rng is not None and rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return torch.from_numpy(image.copy())[None], torch.from_numpy(mask.copy())[None]


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)
        )

    def forward(self, x):
        return self.body(x)


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_path", default="")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--save", default="toy_run")
    parser.add_argument("--resume", default="")
    parser.add_argument("--evaluate", default="", help="evaluate these weights and write metrics JSON")
    parser.add_argument("--metrics_out", default="")
    parser.add_argument("--crash_after_epoch", type=int, default=-1, help="exit(17) after this epoch (tests)")
    parser.add_argument("--rss_log", default="", help="append this rank's resident memory (kB) per epoch")
    parser.add_argument(
        "--die_rank", type=int, default=-1, help="this rank exits(3) at the first epoch (tests)"
    )
    parser.add_argument(
        "--nan_after_step", type=int, default=-1, help="make the loss NaN from this step (tests)"
    )
    add_common_args(parser, seed=3, workers=0)
    add_schedule_args(parser)
    args = parser.parse_args(argv)
    runtime = setup_runtime(args)
    model = ToyNet()
    train_set, val_set = Squares(24, seed=args.seed), Squares(10, offset=1000)
    train_loader = build_loader(
        train_set,
        args.batch_size // runtime.dist.world_size,
        runtime.dist,
        train=True,
        workers=args.workers,
        seed=args.seed,
    )
    val_loader = build_loader(val_set, 3, runtime.dist, train=False)
    metrics = SegmentationMetrics()
    if args.evaluate:
        from common.checkpoint import load_weights

        load_weights(model, args.evaluate)
        model.to(runtime.device.device)
        result = evaluate(model, val_loader, metrics, runtime)
        if runtime.is_main and args.metrics_out:
            Path(args.metrics_out).write_text(json.dumps(result))
        runtime.dist.shutdown()
        return 0
    base_loss = build_loss("BCEDiceLoss")
    step_counter = {"n": 0}

    def loss_fn(out, target):
        step_counter["n"] += 1
        loss = base_loss(out, target)
        if 0 <= args.nan_after_step < step_counter["n"]:
            loss = loss * float("nan")
        return loss

    start = StartPoint.read(resume=args.resume)
    start.load_weights(model)
    model, optimizer = prepare(model, lambda m: torch.optim.Adam(m.parameters(), lr=args.lr), runtime)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.9)
    config = describe_config(runtime)
    print_config(runtime, config, Path(args.save) / "config.json")
    target = SummaryTarget.from_env(args.save, "Toy", args.batch_size, runtime.dist.world_size)
    run = TrainingRun(runtime, args.save, model=model, optimizer=optimizer, scheduler=scheduler, config=config,
                      selection_key="dice_mean", target=target)  # fmt: skip
    run.start(start)

    class ToyHooks(Hooks):
        def on_step(self, s):
            runtime.print(
                f"Epoch [{s.epoch + 1}/{args.epochs}], Step:[{s.step}/{s.steps}], Loss: {s.loss:.4f}"
            )

        def after_train(self, epoch, stats):
            if runtime.dist.rank == args.die_rank:
                os._exit(3)

        def validate(self, epoch):
            return evaluate(model, val_loader, metrics, runtime, loss_fn=base_loss)

        def on_epoch(self, result):
            runtime.print(f"[Validation] Dice: {result.val['dice_mean']:.4f}")
            if args.rss_log:
                with open(f"{args.rss_log}.{runtime.dist.rank}", "a") as handle:
                    handle.write(f"{_rss_kb()}\n")
            if result.epoch == args.crash_after_epoch:
                raise SystemExit(17)

    per_device = args.batch_size // runtime.dist.world_size
    loop = LoopConfig.from_args(args, epochs=args.epochs, per_device_batch=per_device)
    bn_loader = build_statistics_loader(train_set, per_device, runtime.dist, seed=args.seed)
    fit(run, loop, train_loader=train_loader, loss_fn=loss_fn, hooks=ToyHooks(), bn_loader=bn_loader)
    run.finish(run.history[-1]["dice_mean"] if run.history else None)
    if runtime.is_main and args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps(run.history[-1]))
    runtime.dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
