"""Train or evaluate UNet / UNet++ (NestedUNet) on DSB 2018 nuclei, the ModelZoo "UNet for PyTorch" way.

    python train.py --data_path inputs --arch UNet --epochs 100 -b 16            # 1 process
    bash test/train_full_1p.sh --data_path=/data/dsb2018                          # ModelZoo scripts
    python train.py --evaluate --resume models/dsb2018_96_UNet_woDS/model_best.pth.tar

Reference: 4uiiurz1/pytorch-nested-unet @ 557ea02 and its Ascend port UNet_for_PyTorch (references.md 3, 6.5).
`--data_path` may be the prepared folder (images/ + masks/0/), a folder holding it (`--dataset` names it,
as `inputs/dsb2018_96`), or the Kaggle download (a folder with `stage1_train/`), which is prepared once
with preprocess_dsb2018.py and reused. Checkpoints go to `models/<dataset>_<arch>_<wDS|woDS>/`
(`checkpoint.pth.tar` every epoch, `model_best.pth.tar` when the validation IoU improves, `config.json`,
`log.csv`). The validation IoU is the mean over validation images of |P n T| / |P u T| (an empty
prediction on an empty mask scores 1); the ModelZoo TrainAccuracy is the best epoch's value in percent.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import archs
import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch
from dataset import (
    EXPECTED_TREE,
    SPLIT_RANDOM_STATE,
    SPLIT_TEST_SIZE,
    NucleiDataset,
    cached_arrays,
    find_samples,
    repeats_for,
    split_ids,
)
from preprocess_dsb2018 import STAGE1_TREE, locate_stage1, prepared_skips, preprocess

from common.cache import default_cache_dir
from common.checkpoint import load_checkpoint, load_weights
from common.cli import (
    add_common_args,
    apply_conv_flag,
    describe_config,
    non_negative_int,
    positive_float,
    positive_int,
    print_config,
    run_main,
    setup_runtime,
)
from common.demo_data import MARKER as DEMO_MARKER
from common.engine import StepInfo, TrainingRun, evaluate, train_one_epoch
from common.errors import CheckpointError, ConfigError, DataError
from common.loader import build_loader, per_rank_batch
from common.losses import DeepSupervisionLoss, build_loss
from common.metrics import SegmentationMetrics
from common.registry import get_model_builder, list_models

LOSS_NAMES = ("BCEDiceLoss", "LovaszHingeLoss", "BCEWithLogitsLoss")
SCHEDULERS = ("CosineAnnealingLR", "ReduceLROnPlateau", "MultiStepLR", "ConstantLR")
# log.csv: the reference's columns, then Dice, HD95, wall seconds since the start and process CPU seconds.
LOG_COLUMNS = {"epoch": "epoch", "lr": "lr", "loss": "train_loss", "iou": "train_iou", "val_loss": "val_loss",
               "val_iou": "jaccard_mean", "val_dice": "dice_mean", "val_hd95": "hd95_mean",
               "elapsed_s": "elapsed_s", "cpu_s": "cpu_s"}  # fmt: skip
FAMILY = archs.FAMILY


def str2bool(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case); the reference accepted only 'true'/'false'."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data_path", default="inputs", help="prepared folder, its parent, or the Kaggle download"
    )
    group.add_argument("--dataset", default=None, help="prepared folder name (default: dsb2018_<input_w>)")
    group.add_argument(
        "--prepared_dir", default=None,
        help="where a Kaggle download is prepared (default: <data_path>/<dataset>, or a cache folder when "
        "data_path is read-only)",
    )  # fmt: skip
    group.add_argument("--img_ext", default=".png")
    group.add_argument("--mask_ext", default=".png")
    group.add_argument("--input_w", type=positive_int, default=96)
    group.add_argument("--input_h", type=positive_int, default=96)
    group.add_argument("--input_channels", type=positive_int, default=3)
    group.add_argument("--num_classes", type=positive_int, default=1)
    group.add_argument("--val_split", type=float, default=SPLIT_TEST_SIZE, help="validation fraction")
    group.add_argument("--split_seed", type=int, default=SPLIT_RANDOM_STATE, help="random_state of the split")

    group = parser.add_argument_group("model and loss")
    group.add_argument("--arch", "-a", default="UNet", help=f"one of {', '.join(list_models(FAMILY))}")
    group.add_argument(
        "--deep_supervision", type=str2bool, nargs="?", const=True, default=False,
        help="UNet++ only: train the four heads (loss averaged), score the last",
    )  # fmt: skip
    group.add_argument("--loss", default="LovaszHingeLoss", choices=LOSS_NAMES)

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=positive_int, default=100)
    group.add_argument("-b", "--batch_size", type=positive_int, default=16, help="global batch size")
    group.add_argument(
        "--train_steps", type=non_negative_int, default=0,
        help="performance runs: stop after this many steps in total (the epoch count follows; wins over --epochs)",
    )  # fmt: skip
    group.add_argument("--optimizer", default="Adam", choices=("Adam", "SGD"))
    group.add_argument("--lr", "--learning_rate", type=positive_float, default=1e-3)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight_decay", type=float, default=1e-4)
    group.add_argument("--nesterov", type=str2bool, nargs="?", const=True, default=False)
    group.add_argument("--scheduler", default="CosineAnnealingLR", choices=SCHEDULERS)
    group.add_argument("--min_lr", type=float, default=1e-5)
    group.add_argument("--factor", type=float, default=0.1, help="ReduceLROnPlateau factor")
    group.add_argument("--patience", type=int, default=2, help="ReduceLROnPlateau patience")
    group.add_argument("--milestones", default="1,2", help="MultiStepLR epochs, comma separated")
    group.add_argument("--gamma", type=float, default=2 / 3, help="MultiStepLR factor")
    group.add_argument(
        "--early_stopping", type=int, default=-1, help="stop after N epochs without a better IoU"
    )
    group.add_argument(
        "--time_limit", type=float, default=0.0,
        help="stop before this many seconds (wall, since the script started) would be exceeded; 0 = no limit",
    )  # fmt: skip

    group = parser.add_argument_group("checkpoints and evaluation")
    group.add_argument("--name", default=None, help="run name (default: <dataset>_<arch>_<wDS|woDS>)")
    group.add_argument("--models_dir", default="models")
    group.add_argument(
        "--resume", default="", help="training: continue this checkpoint; --evaluate: score it"
    )
    group.add_argument("--pretrained", default="", help="initial weights (a state_dict or a checkpoint)")
    group.add_argument("-e", "--evaluate", action="store_true", help="one validation pass of --resume")
    add_common_args(parser, seed=5, workers=0)
    return parser


# ----------------------------------------------------------------------------------------------- checks


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--input_w", args.input_w), ("--input_h", args.input_h)):
        if value % archs.SIZE_DIVISOR:
            low = value // archs.SIZE_DIVISOR * archs.SIZE_DIVISOR
            high = low + archs.SIZE_DIVISOR
            raise ConfigError(
                f"{flag} must be a multiple of {archs.SIZE_DIVISOR} (four 2x poolings), got {value}; "
                f"use {low or high} or {high}"
            )
    if args.num_classes != 1:
        raise ConfigError(
            f"--num_classes must be 1: DSB 2018 masks are binary (masks/0/), got {args.num_classes}"
        )
    if args.input_channels not in (1, 3):
        raise ConfigError(f"--input_channels must be 1 (grey) or 3 (RGB), got {args.input_channels}")
    get_model_builder(args.arch, family=FAMILY, flag="--arch")
    if args.deep_supervision and args.arch != "NestedUNet":
        raise ConfigError(
            f"--deep_supervision needs --arch NestedUNet (UNet has one head), got --arch {args.arch}"
        )
    if args.scheduler == "MultiStepLR":
        parse_milestones(args.milestones)
    if args.train_steps and args.evaluate:
        raise ConfigError("--train_steps applies to training, not to --evaluate")


def parse_milestones(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--milestones must be positive epoch numbers separated by commas, got {text!r}")
    return values


# ----------------------------------------------------------------------------------------------- data


def size_tag(args: argparse.Namespace) -> str:
    return str(args.input_w) if args.input_w == args.input_h else f"{args.input_w}x{args.input_h}"


def _writable(folder: Path) -> bool:
    try:
        mode = os.stat(folder).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(folder, os.W_OK)


def resolve_data(args: argparse.Namespace, log=print) -> tuple[Path, str]:
    """(folder with images/ and masks/, dataset name); prepares a Kaggle download when needed."""
    data_path = Path(args.data_path)
    if not data_path.exists():
        raise DataError(data_path, f"--data_path does not exist. Expected layout:\n{EXPECTED_TREE}")
    if not data_path.is_dir():
        raise DataError(data_path, f"--data_path is a file, not a folder. Expected layout:\n{EXPECTED_TREE}")
    if not any(not entry.name.startswith(".") for entry in data_path.iterdir()):
        raise DataError(data_path, f"--data_path is an empty folder. Expected layout:\n{EXPECTED_TREE}")
    if (data_path / "images").is_dir():
        return data_path, args.dataset or data_path.name
    # The built-in demo data gets its own name, so its runs never overwrite a real run's checkpoints.
    demo = "demo_" if (data_path / DEMO_MARKER).exists() else ""
    dataset = args.dataset or f"{demo}dsb2018_{size_tag(args)}"
    if (data_path / dataset / "images").is_dir():
        return data_path / dataset, dataset
    stage1 = locate_stage1(data_path)
    if stage1 is None:
        raise DataError(
            data_path,
            f"holds neither a prepared dataset ({dataset}/images/) nor stage1_train/.\nPrepared layout:\n"
            f"{EXPECTED_TREE}\nKaggle layout:\n{STAGE1_TREE}",
        )
    if args.prepared_dir:
        prepared = Path(args.prepared_dir)
    elif _writable(data_path):
        prepared = data_path / dataset
    else:
        prepared = default_cache_dir(data_path) / dataset
    report = preprocess(stage1, prepared, args.input_h, args.input_w, log=log)
    if report.reused:
        log(f"Using the prepared data in {prepared} ({len(report.written)} images; made from {stage1})")
    return prepared, dataset


class TrainIoU:
    """Training IoU for the step log: mean over the epoch's images and over the last batch."""

    def __init__(self):
        self.epoch, self.batch = SegmentationMetrics(), SegmentationMetrics()

    def reset(self) -> None:
        self.epoch.reset()

    def update(self, outputs, targets) -> None:
        self.batch.reset()
        self.batch.update(outputs, targets)
        self.epoch.update(outputs, targets)

    def compute(self) -> dict[str, float]:
        return {"iou": self.epoch.compute()["jaccard_mean"], "iou_last": self.batch.compute()["jaccard_mean"]}


class ProgressLog:
    """The reference's ProgressMeter line: `Epoch: [e][ i/N]<TAB>Time v (avg)<TAB>Data v (avg)<TAB>Loss ...`."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.reset()

    def reset(self) -> None:
        self.steps, self.time_sum, self.data_sum, self.last_step = 0, 0.0, 0.0, 0

    def __call__(self, s: StepInfo) -> None:
        window = s.step - self.last_step
        self.last_step = s.step
        self.steps += window
        self.time_sum += s.step_time * window
        self.data_sum += s.data_time * window
        iou = s.train_metrics or {}
        width = len(str(s.steps))
        self.runtime.print(
            f"Epoch: [{s.epoch + 1}][{s.step:{width}d}/{s.steps}]\t"
            f"Time {s.step_time:6.3f} ({self.time_sum / self.steps:6.3f})\t"
            f"Data {s.data_time:6.3f} ({self.data_sum / self.steps:6.3f})\t"
            f"Loss {s.loss:6.8f} ({s.loss_avg:6.8f})\t"
            f"Iou {iou.get('iou_last', math.nan):6.4f} ({iou.get('iou', math.nan):6.4f})"
        )


def print_validation(runtime, val: dict, count: int) -> None:
    width = len(str(count))
    runtime.print(
        f"Test: [{count:{width}d}/{count}]\tLoss {val['loss']:.4e}\tIou {val['jaccard_mean']:6.4f}\t"
        f"Dice {val['dice_mean']:6.4f}\tHD95 {val['hd95_mean']:.2f}"
    )
    runtime.print(f"[npu id: {runtime.dist.rank} ] [AVG-IOU] * Iou {val['jaccard_mean']:.4f}")


def write_log_csv(path: Path, history: list[dict]) -> None:
    """models/<name>/log.csv with the reference's columns (plus Dice and HD95), rewritten every epoch."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LOG_COLUMNS)
        for row in history:
            writer.writerow([row.get(key, "") for key in LOG_COLUMNS.values()])
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- main


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    builder = get_model_builder(args.arch, family=FAMILY, flag="--arch")
    return builder(args.num_classes, args.input_channels, deep_supervision=args.deep_supervision)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, epochs: int):
    if args.scheduler == "CosineAnnealingLR":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=args.min_lr)
    if args.scheduler == "ReduceLROnPlateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=args.factor, patience=args.patience, min_lr=args.min_lr
        )
    if args.scheduler == "MultiStepLR":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, parse_milestones(args.milestones), args.gamma)
    return None


def out_of_time(runtime, started: float, epoch_start: float, limit: float) -> bool:
    """Whether one more epoch, as long as the last one, would end after `limit` seconds (any rank decides)."""
    now = time.time()
    late = torch.tensor([float(now + (now - epoch_start) - started > limit)], device=runtime.device.device)
    runtime.dist.all_reduce(late, "max")
    return bool(late.item() > 0)


def best_record(run: TrainingRun) -> dict:
    if run.best_epoch is None:
        return {}
    return next((r for r in run.history if r.get("epoch") == run.best_epoch), {})


@dataclass
class Data:
    """The datasets of one run and where its checkpoints go."""

    root: Path
    name: str
    save_dir: Path
    train_set: NucleiDataset
    val_set: NucleiDataset
    extra: dict  # for config.json and summary.json


def load_data(args: argparse.Namespace, runtime, batch: int) -> Data:
    """Resolve (and prepare) the data, check and cache it, split it and build both datasets."""
    root, dataset = resolve_data(args, log=runtime.print)
    # Folders the preparation left out (no image, no masks, unreadable): counted in summary.json.
    skipped = prepared_skips(root)
    if skipped:
        runtime.print(
            f"WARNING: {len(skipped)} sample folder(s) of the download were skipped when {root} was prepared "
            "(listed in its .prepared.json); training uses the others"
        )
    samples = find_samples(root, args.img_ext, args.mask_ext)
    train_ids, val_ids = split_ids([s[0] for s in samples], args.val_split, args.split_seed)
    images, masks = cached_arrays(samples, args.input_h, args.input_w, args.input_channels, log=runtime.print)
    row_of = {s[0]: i for i, s in enumerate(samples)}
    world = runtime.dist.world_size
    repeats = 1 if args.evaluate else repeats_for(len(train_ids), batch, world)
    if repeats > 1:
        runtime.print(
            f"WARNING: the training split has {len(train_ids)} images, fewer than one batch of {batch} per rank "
            f"on {world} rank(s); each epoch lists it {repeats} times (differently augmented)."
        )
    train_set = NucleiDataset(
        images, masks, [row_of[i] for i in train_ids], train_ids, seed=args.seed, repeats=repeats
    )
    val_set = NucleiDataset(images, masks, [row_of[i] for i in val_ids], val_ids)
    runtime.print(
        f"Data: {root} | {len(train_ids)} train / {len(val_ids)} val images (sorted ids, test_size "
        f"{args.val_split}, random_state {args.split_seed}) | {args.input_h}x{args.input_w}"
    )
    name = args.name or f"{dataset}_{args.arch}_{'wDS' if args.deep_supervision else 'woDS'}"
    extra = {"data_root": str(root.resolve()), "dataset": dataset, "name": name,
             "train_images": len(train_ids), "val_images": len(val_ids), "train_repeats": repeats,
             "skipped_samples": len(skipped), "skipped": [list(s) for s in skipped]}  # fmt: skip
    return Data(root, name, Path(args.models_dir) / name, train_set, val_set, extra)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "Adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(
        params, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay
    )


def main(argv: list[str] | None = None) -> int:
    # Seconds since the test script started (MODELZOO_START_TIME), else since this process started.
    started = float(os.environ.get("MODELZOO_START_TIME", time.time()))
    args = build_parser().parse_args(argv)
    check_args(args)
    states = read_checkpoints(args)
    runtime = setup_runtime(args)
    batch = per_rank_batch(args.batch_size, runtime.dist.world_size)
    data = load_data(args, runtime, batch)
    pin = runtime.device.kind == "cuda"
    val_loader = build_loader(data.val_set, batch, runtime.dist, train=False, pin_memory=pin)
    model = build_model(args)
    if args.pretrained:
        load_weights(model, states["pretrained"], name=args.pretrained)
        runtime.print(f"Initial weights from {args.pretrained}")
    model = model.to(runtime.device.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = apply_conv_flag(runtime, model)
    base_loss = build_loss(args.loss)
    loss_fn = DeepSupervisionLoss(base_loss) if args.deep_supervision else base_loss
    if args.evaluate:
        return run_evaluation(args, runtime, model, val_loader, loss_fn, data, states.get("resume"))
    train_loader = build_loader(
        data.train_set, batch, runtime.dist, train=True, workers=args.workers, seed=args.seed, pin_memory=pin
    )
    return run_training(args, runtime, model, loss_fn, train_loader, val_loader, data, started)


def run_training(args, runtime, model, loss_fn, train_loader, val_loader, data: Data, started: float) -> int:
    """The epochs, their log lines and checkpoints, and the ModelZoo summary."""
    world = runtime.dist.world_size
    steps_per_epoch = len(train_loader)
    epochs = math.ceil(args.train_steps / steps_per_epoch) if args.train_steps else args.epochs
    optimizer = build_optimizer(args, model)
    model, optimizer = runtime.amp.prepare(model, optimizer)
    scheduler = build_scheduler(args, optimizer, epochs)
    if args.compile:
        model = torch.compile(model)
    model = runtime.dist.wrap(model, runtime.device)
    config = describe_config(
        runtime, {**data.extra, "epochs_run": epochs, "steps_per_epoch": steps_per_epoch}
    )
    run = TrainingRun(runtime, data.save_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      config=config, selection_key="jaccard_mean", network=args.arch,
                      batch_size=args.batch_size)  # fmt: skip
    # Resume first: a checkpoint that cannot be used stops the run before config.json is overwritten.
    start = run.resume(args.resume)
    print_config(runtime, config, data.save_dir / "config.json")
    planned = args.train_steps - run.global_step if args.train_steps else steps_per_epoch * (epochs - start)
    if 0 < planned <= run.throughput.warmup_steps:
        # A run shorter than the warm-up would report no FPS at all: time all but its first step.
        run.throughput.warmup_steps = planned - 1
        runtime.print(
            f"Note: only {planned} training step(s) planned; FPS skips {planned - 1} warm-up step(s)"
        )
    metrics = SegmentationMetrics(compute_hd95=True)
    progress, train_iou = ProgressLog(runtime), TrainIoU()
    steps_left = args.train_steps - run.global_step if args.train_steps else None
    for epoch in range(start, epochs):
        if steps_left is not None and steps_left <= 0:
            break
        epoch_start = time.time()
        run.begin_epoch(epoch, train_loader)
        progress.reset()
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, train_loader, loss_fn, optimizer, runtime, epoch=epoch,
                                throughput=run.throughput, on_log=progress, train_metrics=train_iou,
                                global_step=run.global_step, max_steps=steps_left)  # fmt: skip
        if steps_left is not None:
            steps_left -= stats.steps
        fps = stats.fps(world)
        if not math.isfinite(fps):  # all of this epoch's steps were warm-up steps
            fps = stats.images * world / stats.seconds if stats.seconds > 0 else math.nan
        runtime.print(f"[npu id: {runtime.dist.rank} ] * FPS@all {fps:.3f}")
        val = evaluate(model, val_loader, metrics, runtime, loss_fn=loss_fn)
        print_validation(runtime, val, len(data.val_set))
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val["loss"])
        elif scheduler is not None:
            scheduler.step()
        # Wall time since the start, and this process's CPU time (all threads): on a shared machine the
        # second tells how long the run would take alone.
        run.end_epoch(epoch, stats, val, lr=lr, elapsed_s=round(time.time() - started, 1),
                      cpu_s=round(time.process_time(), 1))  # fmt: skip
        train_iou_value = (stats.train_metrics or {}).get("iou", math.nan)
        best_iou = run.best_value if run.best_value is not None else math.nan
        runtime.print(
            f"Epoch [{epoch + 1}/{epochs}] loss {stats.loss_mean:.4f} - iou {train_iou_value:.4f} - "
            f"val_loss {val['loss']:.4f} - val_iou {val['jaccard_mean']:.4f} - val_dice {val['dice_mean']:.4f}"
            f" - best val_iou {best_iou:.4f} (epoch {run.best_epoch}) - {time.time() - started:.0f} s"
        )
        if runtime.is_main:
            write_log_csv(data.save_dir / "log.csv", run.history)
        if args.early_stopping >= 0 and run.best_epoch is not None:
            if epoch + 1 - run.best_epoch >= args.early_stopping:
                runtime.print(f"=> early stopping: no better validation IoU for {args.early_stopping} epochs")
                break
        if args.time_limit > 0 and epoch + 1 < epochs:
            if out_of_time(runtime, started, epoch_start, args.time_limit):
                runtime.print(
                    f"=> time limit: another epoch would end after {args.time_limit:.0f} s; stopping"
                )
                break

    accuracy = 100.0 * run.best_value if run.best_value is not None else None
    run.finish(accuracy, details=summary_details(run, data.extra))
    if runtime.is_main and run.best_value is not None:
        print(f"Best validation IoU {run.best_value:.4f} at epoch {run.best_epoch}: {run.best_path}")
    runtime.dist.shutdown()
    return 0


def summary_details(run: TrainingRun, extra: dict) -> dict:
    """summary.json additions: the best and the last epoch's IoU, Dice and HD95."""
    best = best_record(run)
    last = run.history[-1] if run.history else {}
    return {
        "metric": "IoU = mean over validation images of |P n T| / |P u T| (empty/empty = 1); "
        "TrainAccuracy = best epoch's IoU in percent",
        "iou_best": run.best_value,
        "iou_best_epoch": run.best_epoch,
        "dice_best_epoch": best.get("dice_mean"),
        "hd95_best_epoch": best.get("hd95_mean"),
        "iou_last": last.get("jaccard_mean"),
        "dice_last": last.get("dice_mean"),
        "hd95_last": last.get("hd95_mean"),
        **extra,
    }


def _missing_for_evaluation(path: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} does not exist: train first (bash test/train_full_1p.sh or train_full_8p.sh) "
        "or pass the checkpoint with --resume=PATH (test scripts: --pth_path=PATH)"
    )


def read_checkpoints(args: argparse.Namespace) -> dict:
    """Read --pretrained and --resume before any data is prepared or any network built: a missing, damaged
    or unsafe file stops the run at once (named, with the reason), not after minutes of preparation.

    Returns the states that are used as they are (--pretrained, and --resume with --evaluate); a training
    state is read again by TrainingRun.resume, so it is not held in memory meanwhile."""
    if args.evaluate and args.resume and not Path(args.resume).is_file():
        raise _missing_for_evaluation(Path(args.resume))
    states = {}
    if args.pretrained:
        states["pretrained"] = load_checkpoint(args.pretrained)
    if args.resume:
        state = load_checkpoint(args.resume)
        if args.evaluate:
            states["resume"] = state
    return states


def run_evaluation(args, runtime, model, val_loader, loss_fn, data: Data, state=None) -> int:
    """One sharded validation pass of a checkpoint and the ModelZoo `_eval` summary."""
    path = Path(args.resume) if args.resume else data.save_dir / "model_best.pth.tar"
    if state is None and not path.is_file():
        raise _missing_for_evaluation(path)
    load_weights(model, state if state is not None else path, name=str(path))
    runtime.print(f"Evaluating {path} on {len(data.val_set)} validation images")
    val = evaluate(model, val_loader, SegmentationMetrics(compute_hd95=True), runtime, loss_fn=loss_fn)
    print_validation(runtime, val, len(data.val_set))
    config = describe_config(runtime, {**data.extra, "checkpoint": str(path)})
    run = TrainingRun(runtime, data.save_dir / "eval", model=model,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config,
                      selection_key="jaccard_mean", network=args.arch, batch_size=args.batch_size,
                      mode="eval")  # fmt: skip
    run.step_losses = [val["loss"]]  # ModelZoo _eval: ActualLoss is the validation loss
    details = {"checkpoint": str(path), "iou": val["jaccard_mean"], "dice": val["dice_mean"],
               "hd95": val["hd95_mean"], "validation": val, **data.extra}  # fmt: skip
    run.finish(100.0 * val["jaccard_mean"], details=details)
    runtime.dist.shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
