"""Train the U-Net of MindSpore's unet_medical on ISBI 2012 (Ronneberger et al., MICCAI 2015), in PyTorch.

    python train.py --data_url=/path/to/isbi2012/ [--run_distribute] [--cross_valid_ind=1|all] [--lr=...]

The configuration is src/config.py (`cfg_unet`, the original's keys and defaults); every key is a flag.
One run trains one fold of the 5-fold split (`cross_valid_ind`, default 1) and validates on its 6 pages at
the end; `--cross_valid_ind=all` trains the five folds one after the other and reports mean and spread.
Checkpoints go to --ckpt_dir (default ./ckpt_<device id of rank 0>/): `ckpt_unet_medical_adam-<epoch>_<step>.pth`
(the last keep_checkpoint_max of them), `checkpoint.pth.tar` (the latest) and `model_best.pth.tar`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
from pathlib import Path

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch
from src.checkpoints import default_ckpt_dir
from src.config import FOLDS, cfg_unet
from src.data_loader import PAD_MODES, IsbiDataset, create_dataset, load_train_data, schedule
from src.loss import CrossEntropyWithLogits
from src.unet import UNetMedical, check_input_size, output_size
from src.utils import StepLossTimeMonitor, UnetMetrics, keep_named_checkpoint, named_checkpoints

from common.checkpoint import remove_interrupted_writes
from common.cli import (
    add_common_args,
    add_schedule_args,
    describe_config,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_config,
    run_main,
    setup_runtime,
)
from common.datacheck import SKIPPED_LIST, skipped_count, skipped_note, write_skipped_list
from common.engine import Throughput, TrainingRun, evaluate
from common.errors import CheckpointError, ConfigError
from common.loader import build_loader, seed_everything
from common.summary import SummaryTarget
from common.trainer import Hooks, LoopConfig, StartPoint, fit, make_optimizer, prepare

NETWORK = "UNet_mindspore"
LATEST = "checkpoint.pth.tar"


def str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def fold_arg(text: str) -> int | str:
    if str(text).lower() == "all":
        return "all"
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if not 0 <= fold < FOLDS:
        raise argparse.ArgumentTypeError(f"must be a fold 0..{FOLDS - 1} or 'all', got {text!r}")
    return fold


def resume_arg(text: str) -> bool | str:
    """True/False as the original's `resume` key, or directly the checkpoint to continue from."""
    try:
        return str2bool(text)
    except argparse.ArgumentTypeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    cfg = cfg_unet
    parser = argparse.ArgumentParser(
        description="Train the UNet on images and target masks (ISBI 2012, MindSpore unet_medical port)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--data_url", "--data_path", dest="data_url", default="data/",
                        help="folder with train-volume.tif + train-labels.tif, or train/images + train/labels")  # fmt: skip
    parser.add_argument("-t", "--run_distribute", type=str2bool, nargs="?", const=True, default=None,
                        help="distributed run: distribute_epochs instead of epochs (default: when >1 rank)")  # fmt: skip
    group = parser.add_argument_group("configuration (src/config.py keys)")
    group.add_argument("--lr", type=positive_float, default=cfg["lr"])
    group.add_argument("--epochs", type=positive_int, default=None,
                       help=f"passes over the training pages (default: {cfg['epochs']}, or distribute_epochs)")  # fmt: skip
    group.add_argument("--distribute_epochs", type=positive_int, default=cfg["distribute_epochs"])
    group.add_argument("--batchsize", "--batch_size", dest="batchsize", type=positive_int, default=cfg["batchsize"],
                       help="images per device and step (MindSpore's batchsize)")  # fmt: skip
    group.add_argument("--cross_valid_ind", type=fold_arg, default=cfg["cross_valid_ind"],
                       help=f"validation fold 0..{FOLDS - 1}, or 'all' for the five folds in turn")  # fmt: skip
    group.add_argument("--num_classes", type=positive_int, default=cfg["num_classes"])
    group.add_argument("--num_channels", type=positive_int, default=cfg["num_channels"])
    group.add_argument("--keep_checkpoint_max", type=non_negative_int, default=cfg["keep_checkpoint_max"],
                       help="named checkpoints kept (0 = all)")  # fmt: skip
    group.add_argument("--weight_decay", type=non_negative_float, default=cfg["weight_decay"])
    group.add_argument("--resume", type=resume_arg, default=cfg["resume"],
                       help="True to continue from --resume_ckpt (exactly, for a checkpoint of this code), or a path")  # fmt: skip
    group.add_argument("--resume_ckpt", default=cfg["resume_ckpt"],
                       help="checkpoint file, or a folder holding checkpoint.pth.tar / ckpt_unet_medical_adam-*.pth")  # fmt: skip
    group.add_argument("--repeat", type=positive_int, default=cfg["repeat"],
                       help="passes per checkpoint epoch (default: all passes in one epoch, as the original)")  # fmt: skip
    group.add_argument("--image_size", type=positive_int, default=cfg["image_size"],
                       help="network input side; the output is image_size - 184 (188, 204, 220, ... work)")  # fmt: skip
    group.add_argument("--pad_mode", choices=PAD_MODES, default=cfg["pad_mode"],
                       help="'constant': the original's zero padding; 'reflect': the paper's mirroring")  # fmt: skip
    group.add_argument("--train_augment", type=str2bool, default=cfg["train_augment"])
    group.add_argument("--run_eval", type=str2bool, nargs="?", const=True, default=cfg["run_eval"],
                       help="validate every eval_interval epochs (the last epoch is always validated)")  # fmt: skip
    group = parser.add_argument_group("output and limits")
    group.add_argument("--ckpt_dir", "--save", "--output", dest="ckpt_dir", default=None,
                       help="checkpoint folder (default ./ckpt_<device id of rank 0>/, as the original; every rank resumes from it)")  # fmt: skip
    add_common_args(parser, seed=1)
    add_schedule_args(parser, val_interval=cfg["eval_interval"])
    # The original's static loss scale (FixedLossScaleManager 1024), used when --amp selects fp16.
    parser.set_defaults(loss_scale=str(int(cfg["FixedLossScaleManager"])), log_interval=1)
    return parser


def check_args(args: argparse.Namespace, world_size: int) -> None:
    if args.num_channels != 1:
        raise ConfigError(
            f"--num_channels must be 1: the ISBI 2012 pages are grey-scale, got {args.num_channels}"
        )
    if args.num_classes < 2:
        raise ConfigError(
            f"--num_classes must be at least 2 (membrane, cell interior), got {args.num_classes}"
        )
    try:
        check_input_size(args.image_size, args.image_size)
    except ValueError as exc:
        raise ConfigError(f"--image_size: {exc}") from None
    if args.run_distribute and world_size == 1:
        raise ConfigError(
            "--run_distribute asks for a distributed run but only one process was started; launch with "
            "bash scripts/run_distribute_train.sh [RANK_TABLE_FILE] [DATASET] (or torchrun)"
        )
    if args.cross_valid_ind == "all" and isinstance(args.resume, str):
        raise ConfigError("--cross_valid_ind=all resumes every fold from its own folder: pass --resume=True")


def passes(args: argparse.Namespace, distributed: bool) -> int:
    if args.epochs is not None:
        return args.epochs
    return args.distribute_epochs if distributed else cfg_unet["epochs"]


def _newest_in(folder: Path) -> Path | None:
    if (folder / LATEST).is_file():
        return folder / LATEST
    named = named_checkpoints(folder)
    return named[-1] if named else None


def find_resume_checkpoint(args: argparse.Namespace, save_dir: Path) -> Path | None:
    """The checkpoint `--resume` / `--resume_ckpt` name, or None when not resuming.

    A folder stands for its newest checkpoint (checkpoint.pth.tar, else the last ckpt_unet_medical_adam-*);
    the default resume_ckpt './' also looks in the checkpoint folder. With --cross_valid_ind=all every fold
    resumes from its own folder, and a fold without a checkpoint starts afresh.
    """
    if args.resume is False:
        return None
    if args.cross_valid_ind == "all":
        return _newest_in(save_dir)
    given = Path(args.resume if isinstance(args.resume, str) else args.resume_ckpt)
    if given.is_file():
        return given
    if not given.is_dir():
        raise CheckpointError(f"--resume: checkpoint {given} does not exist")
    folders = (
        [given, save_dir] if args.resume_ckpt == cfg_unet["resume_ckpt"] and args.resume is True else [given]
    )
    for folder in folders:
        found = _newest_in(folder)
        if found is not None:
            return found
    shown = " nor in ".join(str(f) for f in folders)
    raise CheckpointError(f"--resume: no checkpoint in {shown}; pass --resume_ckpt=FILE")


CHECKPOINT_NAMES = (LATEST, "model_best.pth.tar", "ckpt_unet_medical_adam-*.pth")


def remove_stale_temporaries(save_dir: Path, runtime) -> None:
    """Temporary checkpoint files of a run killed while writing (each as large as a checkpoint)."""
    if not runtime.is_main or not save_dir.is_dir():
        return
    for stale in remove_interrupted_writes(save_dir, CHECKPOINT_NAMES):
        runtime.print(f"removed {stale}: a checkpoint write that was interrupted")


def build_adam(model: torch.nn.Module, lr: float, weight_decay: float, runtime) -> torch.optim.Adam:
    """Adam with L2 weight decay added to the gradient, as MindSpore's nn.Adam; torch's fused kernel where
    this torch has one (2-3x faster steps on a CPU for these 31M parameters, same update)."""
    return make_optimizer(torch.optim.Adam, model.parameters(), runtime, fused_on_cpu=True, lr=lr,
                          weight_decay=weight_decay)  # fmt: skip


class FoldHooks(Hooks):
    """MindSpore's StepLossTimeMonitor lines, its named checkpoints and the fold's validation."""

    def __init__(self, args, runtime, model, val_loader, loss_fn, fold: int, run: TrainingRun, monitor):
        self.args, self.runtime, self.model, self.val_loader = args, runtime, model, val_loader
        self.loss_fn, self.fold, self.run, self.monitor = loss_fn, fold, run, monitor

    def on_step(self, info) -> None:
        self.monitor.step_end(info)

    def after_train(self, epoch: int, stats) -> None:
        self.monitor.epoch_end(epoch + 1, stats)

    def validate(self, epoch: int) -> dict:
        return evaluate(self.model, self.val_loader, UnetMetrics(), self.runtime, loss_fn=self.loss_fn)

    def on_epoch(self, r) -> None:
        if self.runtime.is_main:
            keep_named_checkpoint(
                self.run.latest_path,
                self.run.save_dir,
                r.epoch + 1,
                r.stats.steps,
                self.args.keep_checkpoint_max,
            )
        if r.val is not None:
            self.runtime.print(
                f"epoch {r.epoch + 1} validation (fold {self.fold}): dice_coeff {r.val['dice_coeff']:.4f}, "
                f"hard_dice_membrane {r.val['hard_dice_membrane']:.4f}, hard_dice_cell {r.val['hard_dice_cell']:.4f}"
            )


def train_fold(
    args, runtime, data, fold: int, save_dir: Path, config: dict, throughput: Throughput
) -> tuple[TrainingRun, dict]:
    """Train one fold; returns its run record and its final validation metrics (with the fold index)."""
    world = runtime.dist.world_size
    distributed = world > 1
    # The checkpoint to resume from is read first: a missing, corrupted or unsafe file stops the run here.
    # A file with weights only (the original's .ckpt converted, or a bare state_dict) initialises the model.
    start = StartPoint.read(resume=find_resume_checkpoint(args, save_dir), weights_only_resume="init")
    n_passes = passes(args, distributed)
    repeat = min(args.repeat or n_passes, n_passes)
    train_set, val_set = create_dataset(
        data, fold, args.image_size, args.num_classes, repeat, args.train_augment, args.pad_mode, args.seed
    )
    plan = schedule(len(train_set.pages), n_passes, repeat, world, args.batchsize)
    loop = LoopConfig.from_args(
        args, epochs=len(plan), steps_per_epoch=plan, per_device_batch=args.batchsize,
        val_interval=args.val_interval if args.run_eval else 0,
    )  # fmt: skip
    plan = loop.plan(plan[0])
    train_loader = build_loader(train_set, args.batchsize, runtime.dist, train=True, workers=args.workers, seed=args.seed)  # fmt: skip
    val_loader = build_loader(val_set, 1, runtime.dist, train=False)
    # --precise_bn's batches: the training pages, unaugmented (the MindSpore network has no BatchNorm, so
    # this only matters for networks that do).
    bn_set = IsbiDataset(
        data, train_set.pages, args.image_size, args.num_classes, False, 1, args.pad_mode, args.seed
    )
    bn_loader = build_loader(bn_set, args.batchsize, runtime.dist, train=False)
    seed_everything(args.seed)  # every fold starts from the same initial weights
    model = UNetMedical(n_channels=args.num_channels, n_classes=args.num_classes)
    start.load_weights(model)
    model, optimizer = prepare(model, lambda m: build_adam(m, args.lr, args.weight_decay, runtime), runtime)
    loss_fn = CrossEntropyWithLogits()
    remove_stale_temporaries(save_dir, runtime)
    fold_config = {**config, "fold": fold, "train_pages": train_set.pages, "val_pages": val_set.pages,
                   "passes": n_passes, "repeat_effective": repeat, "steps_per_epoch": plan}  # fmt: skip
    print_config(runtime, fold_config, save_dir / "config.json")
    target = SummaryTarget.from_env(save_dir, NETWORK, args.batchsize * world, world)
    run = TrainingRun(runtime, save_dir, model=model, optimizer=optimizer, config=fold_config,
                      selection_key="dice_coeff", target=target, latest_name=LATEST)  # fmt: skip
    run.throughput = throughput
    run.start(start)
    monitor = StepLossTimeMonitor(args.batchsize, world, runtime.print)
    runtime.print(
        f"fold {fold}: training pages {train_set.pages}, validation pages {val_set.pages}; "
        f"{len(plan)} epoch(s) of {plan[0]} step(s) at batch {args.batchsize} x {world} rank(s)"
    )
    runtime.print("dataset length is:", plan[0])
    runtime.print("============== Starting Training ==============")
    hooks = FoldHooks(args, runtime, model, val_loader, loss_fn, fold, run, monitor)
    result = fit(run, loop, train_loader=train_loader, loss_fn=loss_fn, hooks=hooks, bn_loader=bn_loader)
    budget, val = result.budget, result.last_val
    runtime.print("============== End Training ==============")
    runtime.print(
        f"trained {budget.steps} step(s) in {budget.clock.wall():.0f} s wall-clock "
        f"({budget.clock.cpu():.0f} CPU-s per thread, {torch.get_num_threads()} thread(s))"
    )
    if val is None:  # resumed from a finished run, or nothing left to train
        val = evaluate(model, val_loader, UnetMetrics(), runtime, loss_fn=loss_fn)
    runtime.print(f"============== Cross valid dice coeff is: {{'dice_coeff': {val['dice_coeff']}}}")
    return run, {"fold": fold, "steps": run.global_step, **val}


def summarise_folds(results: list[dict]) -> dict:
    """Mean, sample standard deviation, min and max of each score over the folds."""
    keys = ("dice_coeff", "iou", "hard_dice_membrane", "hard_dice_membrane_pooled", "hard_dice_cell")
    out: dict = {"folds": list(results)}
    for key in keys:
        values = [float(r[key]) for r in results]
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime = setup_runtime(args)
    world = runtime.dist.world_size
    if args.run_distribute is None:
        args.run_distribute = world > 1
    check_args(args, world)
    if args.ckpt_dir is None:
        args.ckpt_dir = default_ckpt_dir(runtime)  # rank 0's folder on every rank: resume finds it
    save_root = Path(args.ckpt_dir)
    data = load_train_data(args.data_url, skip_bad=args.skip_bad_samples)
    runtime.print(
        f"ISBI 2012 data: {len(data)} pages of {data.images.shape[1]}x{data.images.shape[2]} from {data.source} "
        f"({data.layout}); input {args.image_size} -> output {output_size(args.image_size)}, pad {args.pad_mode}"
    )
    notes = [skipped_note(data.skipped, save_root / SKIPPED_LIST)] if data.skipped else []
    if runtime.is_main:
        if data.skipped:
            write_skipped_list(save_root, data.skipped)
            print(notes[0], flush=True)
        else:  # a list left by an earlier run on other data would contradict this run's summary
            (save_root / SKIPPED_LIST).unlink(missing_ok=True)
    for note in data.label_notes:
        runtime.print(f"warning: {note}")
    config = describe_config(
        runtime, extra={"cfg_unet": cfg_unet, "network": NETWORK, "label_notes": data.label_notes}
    )
    folds = list(range(FOLDS)) if args.cross_valid_ind == "all" else [args.cross_valid_ind]
    throughput = Throughput(args.warmup_steps)
    results, run = [], None
    for fold in folds:
        save_dir = save_root / f"fold{fold}" if len(folds) > 1 else save_root
        run = None  # the previous fold's model and optimizer can go before the next one is built
        gc.collect()
        run, result = train_fold(args, runtime, data, fold, save_dir, config, throughput)
        results.append(result)
    last = results[-1]
    extra = {
        "HardDiceMembrane": f"{last['hard_dice_membrane']:.4f}",
        "CrossValidFold": str(args.cross_valid_ind),
    }
    details: dict = {"validation": last, "thresholded_label_files": len(data.label_notes)}
    accuracy = last["dice_coeff"]
    if len(results) > 1:
        cv = summarise_folds(results)
        accuracy = cv["dice_coeff"]["mean"]
        extra.update(
            HardDiceMembrane=f"{cv['hard_dice_membrane']['mean']:.4f}",
            CrossValidDiceStd=f"{cv['dice_coeff']['std']:.4f}",
        )
        details["cross_validation"] = cv
        runtime.print(
            f"============== {len(results)}-fold cross validation: dice_coeff {cv['dice_coeff']['mean']:.4f} "
            f"+- {cv['dice_coeff']['std']:.4f} (min {cv['dice_coeff']['min']:.4f}, max {cv['dice_coeff']['max']:.4f}); "
            f"hard_dice_membrane {cv['hard_dice_membrane']['mean']:.4f} +- {cv['hard_dice_membrane']['std']:.4f}"
        )
        if runtime.is_main:
            (save_root / "cv_summary.json").write_text(json.dumps(cv, indent=2) + "\n")
    run.finish(accuracy, extra_lines=extra, details=details, notes=notes,
               skipped_samples=skipped_count(data.skipped))  # fmt: skip
    runtime.dist.shutdown()
    return 0 if all(math.isfinite(r["dice_coeff"]) for r in results) else 1


if __name__ == "__main__":
    run_main(main)
