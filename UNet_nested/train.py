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
    check_samples,
    list_samples,
    repeats_for,
    split_ids,
)
from iou import REFERENCE_BATCH, DSBScores, per_image_iou
from preprocess_dsb2018 import STAGE1_TREE, locate_stage1, prepared_skips, preprocess

from common.cache import default_cache_dir
from common.cli import (
    add_common_args,
    add_schedule_args,
    describe_config,
    positive_float,
    positive_int,
    print_config,
    run_main,
    setup_runtime,
)
from common.datacheck import SKIPPED_LIST, BadSample, skipped_count, skipped_note, write_skipped_list
from common.demo_data import MARKER as DEMO_MARKER
from common.engine import StepInfo, TrainingRun, evaluate
from common.errors import CheckpointError, ConfigError, DataError
from common.loader import build_loader, build_statistics_loader, per_rank_batch
from common.losses import DeepSupervisionLoss, build_loss
from common.metrics import SegmentationMetrics
from common.registry import get_model_builder, list_models
from common.summary import RunSummary, SummaryTarget, write_summary
from common.trainer import Hooks, LoopConfig, StartPoint, fit, make_optimizer, prepare

LOSS_NAMES = ("BCEDiceLoss", "LovaszHingeLoss", "BCEWithLogitsLoss")
SCHEDULERS = ("CosineAnnealingLR", "ReduceLROnPlateau", "MultiStepLR", "ConstantLR")
# log.csv: the reference's columns, then Dice, HD95, wall seconds since the start and process CPU seconds.
LOG_COLUMNS = {"epoch": "epoch", "lr": "lr", "loss": "train_loss", "iou": "train_iou", "val_loss": "val_loss",
               "val_iou": "jaccard_mean", "val_dice": "dice_mean", "val_hd95": "hd95_mean",
               "val_hd95_excluded": "hd95_excluded",
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

    group = parser.add_argument_group("checkpoints and evaluation")
    group.add_argument("--name", default=None, help="run name (default: <dataset>_<arch>_<wDS|woDS>)")
    group.add_argument("--models_dir", default="models")
    group.add_argument(
        "--resume", default="", help="training: continue this checkpoint; --evaluate: score it"
    )
    group.add_argument("--pretrained", default="", help="initial weights (a state_dict or a checkpoint)")
    group.add_argument("-e", "--evaluate", action="store_true", help="one validation pass of --resume")
    group.add_argument(
        "--eval_split", choices=("val", "all"), default="val",
        help="--evaluate scores the validation split of --data_path (val), or every image in it (all: a "
        "held-out folder of your own)",
    )  # fmt: skip
    group.add_argument(
        "--iou_batch", type=positive_int, default=REFERENCE_BATCH,
        help="--evaluate: batch size of the reference's batch-pooled IoU (its validation batch: 16)",
    )  # fmt: skip
    add_common_args(parser, seed=5)
    add_schedule_args(parser)
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
    if args.max_steps and args.evaluate:
        raise ConfigError("--max_steps (--train_steps) applies to training, not to --evaluate")
    if not 0.0 < args.val_split < 1.0:  # before the data is decoded, which can take minutes
        raise ConfigError(f"--val_split must lie strictly between 0 and 1, got {args.val_split}")


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


def _folder_id(path: str) -> str:
    """The Kaggle sample folder a listed path is or lies in (`stage1_train/<id>/images/<file>`)."""
    listed = Path(path)
    return listed.parent.parent.name if listed.parent.name in ("images", "masks") else listed.name


def preparation_skips(root: Path, log=print) -> list[BadSample]:
    """The sample folders left out when the prepared folder `root` was made (its manifest); [] if none."""
    skipped = [BadSample(_folder_id(path), path, problem) for path, problem in prepared_skips(root)]
    if skipped:
        log(
            f"WARNING: {len(skipped)} sample folder(s) of the download were skipped when {root} was prepared "
            f"(listed in its {SKIPPED_LIST}); training uses the others"
        )
    return skipped


def resolve_data(args: argparse.Namespace, log=print) -> tuple[Path, str, list[BadSample]]:
    """(folder with images/ and masks/, dataset name, folders its preparation left out); prepares a Kaggle
    download when needed (bad folders refused, or left out with --skip_bad_samples)."""
    data_path = Path(args.data_path)
    if not data_path.exists():
        raise DataError(data_path, f"--data_path does not exist. Expected layout:\n{EXPECTED_TREE}")
    if not data_path.is_dir():
        raise DataError(data_path, f"--data_path is a file, not a folder. Expected layout:\n{EXPECTED_TREE}")
    if not any(not entry.name.startswith(".") for entry in data_path.iterdir()):
        raise DataError(data_path, f"--data_path is an empty folder. Expected layout:\n{EXPECTED_TREE}")
    if (data_path / "images").is_dir():
        return data_path, args.dataset or data_path.name, preparation_skips(data_path, log)
    # The built-in demo data gets its own name, so its runs never overwrite a real run's checkpoints.
    demo = "demo_" if (data_path / DEMO_MARKER).exists() else ""
    dataset = args.dataset or f"{demo}dsb2018_{size_tag(args)}"
    if (data_path / dataset / "images").is_dir():
        return data_path / dataset, dataset, preparation_skips(data_path / dataset, log)
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
    report = preprocess(stage1, prepared, args.input_h, args.input_w, log=log, skip_bad=args.skip_bad_samples)
    if report.reused:
        log(f"Using the prepared data in {prepared} ({len(report.written)} images; made from {stage1})")
    return prepared, dataset, report.skipped


class TrainIoU:
    """Training IoU for the step log: mean over the epoch's images and over the last batch."""

    def __init__(self):
        self.epoch, self.batch = SegmentationMetrics(), SegmentationMetrics()

    def reset(self) -> None:
        self.epoch.reset()

    def update(self, outputs, targets) -> None:
        self.batch.reset()
        self.batch.update(outputs, targets)
        self.epoch.merge(self.batch)  # scored once: each op is a kernel launch on a device

    def compute(self) -> dict[str, float]:
        return {"iou": self.epoch.compute()["jaccard_mean"], "iou_last": self.batch.compute()["jaccard_mean"]}

    # The epoch's IoU is summed over ranks at the epoch's end; the last batch's stays this rank's.
    def state_tensor(self) -> torch.Tensor:
        return self.epoch.state_tensor()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        self.epoch.load_state_tensor(state)


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
        f"Dice {val['dice_mean']:6.4f}\tHD95 {val['hd95_mean']:.2f} ({hd95_left_out(val)})"
    )
    runtime.print(f"[npu id: {runtime.dist.rank} ] [AVG-IOU] * Iou {val['jaccard_mean']:.4f}")


def hd95_left_out(val: dict) -> str:
    """HD95 is a mean over the images where it is defined: say how many were left out (an empty mask
    on one side only has no surface distance)."""
    return f"{int(val.get('hd95_excluded', 0))} of {int(val.get('n_images', 0))} images left out"


def write_csv(path: Path, header, rows) -> None:
    """Write a CSV through a temporary file, so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def write_log_csv(path: Path, history: list[dict]) -> None:
    """models/<name>/log.csv with the reference's columns (plus Dice and HD95), rewritten every epoch."""
    write_csv(path, LOG_COLUMNS, ([row.get(key, "") for key in LOG_COLUMNS.values()] for row in history))


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
    bn_set: NucleiDataset  # the training images with the evaluation transform (--precise_bn)
    extra: dict  # for config.json and summary.json
    notes: list[str]  # for the final result: how many bad samples were left out and where they are listed


def _none_left(root: Path, bad: list[BadSample]) -> DataError:
    return DataError(root, f"every sample is bad ({len(bad)} problem(s)), so none is left to use")


def load_data(args: argparse.Namespace, runtime, batch: int) -> Data:
    """Resolve (and prepare) the data, check and cache it, split it and build both datasets.

    Bad samples are refused, or with --skip_bad_samples left out before the split (so the split is drawn
    from the samples used), counted and listed in `<save_dir>/skipped_samples.txt`.
    """
    root, dataset, prepared_out = resolve_data(args, log=runtime.print)
    skip = args.skip_bad_samples
    samples, unpaired = list_samples(root, args.img_ext, args.mask_ext, skip_bad=skip)
    if not samples:
        raise _none_left(root, unpaired)
    h, w, c = args.input_h, args.input_w, args.input_channels
    samples, unreadable = check_samples(samples, h, w, c, log=runtime.print, skip_bad=skip)
    if not samples:
        raise _none_left(root, unpaired + unreadable)
    train_ids, val_ids = split_ids([s[0] for s in samples], args.val_split, args.split_seed)
    if args.evaluate and args.eval_split == "all":
        val_ids = sorted(s[0] for s in samples)
    images, masks = cached_arrays(samples, h, w, c, log=runtime.print, checked=True)
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
    bn_set = NucleiDataset(images, masks, [row_of[i] for i in train_ids], train_ids)
    if args.evaluate and args.eval_split == "all":
        runtime.print(
            f"Data: {root} | all {len(val_ids)} images scored (--eval_split=all) | {args.input_h}x{args.input_w}"
        )
    else:
        runtime.print(
            f"Data: {root} | {len(train_ids)} train / {len(val_ids)} val images (sorted ids, test_size "
            f"{args.val_split}, random_state {args.split_seed}) | {args.input_h}x{args.input_w}"
        )
    name = args.name or f"{dataset}_{args.arch}_{'wDS' if args.deep_supervision else 'woDS'}"
    save_dir = Path(args.models_dir) / name
    # The preparation's own list stays in <prepared>/; this run's list holds every sample it left out
    # (an evaluation's beside its summary, so the training run's list stays as it was).
    bad = [*prepared_out, *unpaired, *unreadable]
    list_dir = save_dir / "eval" if args.evaluate else save_dir
    notes = [skipped_note(bad, list_dir / SKIPPED_LIST)] if bad else []
    if runtime.is_main:
        if bad:
            write_skipped_list(list_dir, bad)
            print(notes[0], flush=True)
        else:  # a list left by an earlier run on other data would contradict this run's summary
            (list_dir / SKIPPED_LIST).unlink(missing_ok=True)
    extra = {"data_root": str(root.resolve()), "dataset": dataset, "name": name,
             "train_images": len(train_ids), "val_images": len(val_ids), "train_repeats": repeats,
             "skipped_samples": skipped_count(bad), "skipped": [[b.path, b.problem] for b in bad]}  # fmt: skip
    return Data(root, name, save_dir, train_set, val_set, bn_set, extra, notes)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module, runtime) -> torch.optim.Optimizer:
    """Adam or SGD; fused on CUDA (common.trainer.make_optimizer), the multi-tensor step on the CPU, which
    the README's CPU results were trained with."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "Adam":
        return make_optimizer(torch.optim.Adam, params, runtime, fused_on_cpu=False, lr=args.lr,
                              weight_decay=args.weight_decay)  # fmt: skip
    return make_optimizer(torch.optim.SGD, params, runtime, fused_on_cpu=False, lr=args.lr, momentum=args.momentum,
                          nesterov=args.nesterov, weight_decay=args.weight_decay)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    # Checkpoints first: a missing, damaged or unsafe file stops the run before minutes of preparation.
    if args.evaluate:
        start = StartPoint.read(init=evaluation_weights(args), init_flag="--resume")
    else:
        start = StartPoint.read(resume=args.resume, init=args.pretrained)
    runtime = setup_runtime(args)
    batch = per_rank_batch(args.batch_size, runtime.dist.world_size)
    data = load_data(args, runtime, batch)
    val_loader = build_loader(data.val_set, batch, runtime.dist, train=False, workers=0)
    base_loss = build_loss(args.loss)
    loss_fn = DeepSupervisionLoss(base_loss) if args.deep_supervision else base_loss
    if args.evaluate:
        return run_evaluation(args, runtime, start, val_loader, loss_fn, data)
    train_loader = build_loader(
        data.train_set, batch, runtime.dist, train=True, workers=args.workers, seed=args.seed
    )
    return run_training(args, runtime, start, loss_fn, train_loader, val_loader, data)


class NestedHooks(Hooks):
    """The reference's log lines, its log.csv and the ModelZoo FPS line."""

    def __init__(self, args, runtime, model, val_loader, loss_fn, data: Data, run: TrainingRun):
        self.args, self.runtime, self.model, self.val_loader = args, runtime, model, val_loader
        self.loss_fn, self.data, self.run = loss_fn, data, run
        self.progress = ProgressLog(runtime)
        self.metrics = SegmentationMetrics(compute_hd95=True)
        self.started = time.time()

    def on_step(self, info: StepInfo) -> None:
        if info.step <= self.runtime.options.log_interval:
            self.progress.reset()
        self.progress(info)

    def after_train(self, epoch: int, stats) -> None:
        world = self.runtime.dist.world_size
        fps = stats.fps(world)
        if not math.isfinite(fps):  # all of this epoch's steps were warm-up steps
            fps = stats.images * world / stats.seconds if stats.seconds > 0 else math.nan
        self.runtime.print(f"[npu id: {self.runtime.dist.rank} ] * FPS@all {fps:.3f}")

    def validate(self, epoch: int) -> dict:
        val = evaluate(self.model, self.val_loader, self.metrics, self.runtime, loss_fn=self.loss_fn)
        print_validation(self.runtime, val, len(self.data.val_set))
        return val

    def record(self, epoch: int, stats, val) -> dict:
        # Wall time since the start, and this process's CPU time (all threads): on a shared machine the
        # second tells how long the run would take alone.
        return {"elapsed_s": round(time.time() - self.started, 1), "cpu_s": round(time.process_time(), 1)}

    def on_epoch(self, r) -> None:
        run = self.run
        train_iou = (r.stats.train_metrics or {}).get("iou", math.nan)
        best = run.best_value if run.best_value is not None else math.nan
        val = r.val or {}
        self.runtime.print(
            f"Epoch [{r.epoch + 1}/{r.epochs}] loss {r.stats.loss_mean:.4f} - iou {train_iou:.4f} - "
            f"val_loss {val.get('loss', math.nan):.4f} - val_iou {val.get('jaccard_mean', math.nan):.4f} - "
            f"val_dice {val.get('dice_mean', math.nan):.4f} - best val_iou {best:.4f} (epoch {run.best_epoch}) - "
            f"{time.time() - self.started:.0f} s"
        )
        if self.runtime.is_main:
            write_log_csv(self.data.save_dir / "log.csv", run.history)


def run_training(args, runtime, start: StartPoint, loss_fn, train_loader, val_loader, data: Data) -> int:
    """The epochs, their log lines and checkpoints, and the ModelZoo summary."""
    batch = per_rank_batch(args.batch_size, runtime.dist.world_size)
    loop = LoopConfig.from_args(
        args, epochs=args.epochs, per_device_batch=batch,
        early_stopping=args.early_stopping if args.early_stopping >= 0 else None,
    )  # fmt: skip
    epochs = len(loop.plan(len(train_loader)))
    model = build_model(args)
    start.load_weights(model)
    model, optimizer = prepare(model, lambda m: build_optimizer(args, m, runtime), runtime, loss_fn=loss_fn)
    scheduler = build_scheduler(args, optimizer, epochs)
    config = describe_config(
        runtime, {**data.extra, "epochs_run": epochs, "steps_per_epoch": len(train_loader)}
    )
    target = SummaryTarget.from_env(data.save_dir, args.arch, args.batch_size, runtime.dist.world_size)
    run = TrainingRun(runtime, data.save_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      config=config, selection_key="jaccard_mean", target=target)  # fmt: skip
    # Resume first: a checkpoint that cannot be used stops the run before config.json is overwritten.
    run.start(start)
    print_config(runtime, config, data.save_dir / "config.json")
    hooks = NestedHooks(args, runtime, model, val_loader, loss_fn, data, run)
    bn_loader = build_statistics_loader(data.bn_set, batch, runtime.dist, seed=args.seed)
    fit(run, loop, train_loader=train_loader, loss_fn=loss_fn, hooks=hooks, train_metrics=TrainIoU(),
        bn_loader=bn_loader)  # fmt: skip
    accuracy = 100.0 * run.best_value if run.best_value is not None else None
    run.finish(accuracy, details=summary_details(run, data.extra), notes=data.notes,
               skipped_samples=data.extra["skipped_samples"])  # fmt: skip
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


def evaluation_weights(args: argparse.Namespace) -> str | None:
    """The checkpoint --evaluate scores when --resume names one; a missing file is refused at once."""
    if args.resume and not Path(args.resume).is_file():
        raise _missing_for_evaluation(Path(args.resume))
    return args.resume or None


def write_scores(path: Path, ids: list[str], counts: list[tuple[int, int]]) -> None:
    """One row per scored image: id, |P n T|, |P u T|, IoU (at the network's input size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ([i, inter, union, f"{per_image_iou(inter, union):.6f}"] for i, (inter, union) in zip(ids, counts))
    write_csv(path, ["id", "intersection", "union", "iou"], rows)


def run_evaluation(args, runtime, start: StartPoint, val_loader, loss_fn, data: Data) -> int:
    """One sharded pass of a checkpoint: both IoUs, the per-image scores, and the ModelZoo `_eval` summary."""
    path = start.init_path or data.save_dir / "model_best.pth.tar"
    if start.init_path is None:
        if not path.is_file():
            raise _missing_for_evaluation(path)
        start = StartPoint.read(init=path, init_flag="--resume")
    model = build_model(args)
    runtime.amp.follow(start.init_state)
    start.load_weights(model)
    model.to(runtime.device.device)
    scored = "every image" if args.eval_split == "all" else "the validation split"
    runtime.print(f"Evaluating {path} on {len(data.val_set)} images of {data.root} ({scored})")
    scores = DSBScores(len(data.val_set), runtime.dist.rank, runtime.dist.world_size, args.iou_batch)
    val = evaluate(model, val_loader, scores, runtime, loss_fn=loss_fn)
    print_validation(runtime, val, len(data.val_set))
    runtime.print(
        f"IoU: {val['jaccard_mean']:.4f} per image (mean over {len(data.val_set)} images); "
        f"{val['iou_batch_pooled']:.4f} batch-pooled as the reference computes it (batches of {args.iou_batch} "
        "in the split's order, pooled, averaged over batches)"
    )
    if runtime.is_main:
        eval_dir = data.save_dir / "eval"
        write_scores(eval_dir / "scores.csv", data.val_set.ids, scores.image_counts())
        runtime.print(f"Per-image scores: {eval_dir / 'scores.csv'}")
        config = describe_config(runtime, {**data.extra, "checkpoint": str(path)})
        target = SummaryTarget.from_env(eval_dir, args.arch, args.batch_size,
                                        runtime.dist.world_size, mode="eval")  # fmt: skip
        details = {"checkpoint": str(path), "iou": val["jaccard_mean"], "iou_batch_pooled": val["iou_batch_pooled"],
                   "iou_batch": args.iou_batch, "dice": val["dice_mean"], "hd95": val["hd95_mean"],
                   "scored": {"data_root": str(data.root), "split": args.eval_split, "images": len(data.val_set),
                              "ids": list(data.val_set.ids), "scores_csv": str(eval_dir / "scores.csv")},
                   "validation": val, "device": runtime.device.as_dict(), "config": config, **data.extra}  # fmt: skip
        # ModelZoo _eval: TrainAccuracy is the validation IoU in percent, ActualLoss the validation loss.
        write_summary(target, RunSummary(train_accuracy=100.0 * val["jaccard_mean"], actual_loss=val["loss"],
                                         step_losses=[val["loss"]], details=details, notes=data.notes,
                                         skipped_samples=data.extra["skipped_samples"]))  # fmt: skip
    runtime.dist.shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
