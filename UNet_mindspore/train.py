"""Train the U-Net of MindSpore's unet_medical on ISBI 2012 (Ronneberger et al., MICCAI 2015), in PyTorch.

    python train.py --data_url=/path/to/isbi2012/ [--run_distribute] [--cross_valid_ind=1|all] [--lr=...]

The configuration is src/config.py (`cfg_unet`, the original's keys and defaults); every key is a flag.
One run trains one fold of the 5-fold split (`cross_valid_ind`, default 1) and validates on its 6 pages at
the end; `--cross_valid_ind=all` trains the five folds one after the other and reports mean and spread.
Checkpoints go to --ckpt_dir (default ./ckpt_<device id>/): `ckpt_unet_medical_adam-<epoch>_<step>.pth`
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
from src.config import FOLDS, cfg_unet
from src.data_loader import PAD_MODES, create_dataset, load_train_data, schedule
from src.loss import CrossEntropyWithLogits
from src.unet import UNetMedical, check_input_size, output_size
from src.utils import StepLossTimeMonitor, UnetMetrics, keep_named_checkpoint, named_checkpoints

from common.checkpoint import load_checkpoint, load_weights, remove_interrupted_writes
from common.cli import (
    add_common_args,
    apply_conv_flag,
    describe_config,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    print_config,
    run_main,
    setup_runtime,
)
from common.clock import BASES, Clock
from common.engine import Throughput, TrainingRun, evaluate, train_one_epoch
from common.errors import CheckpointError, ConfigError
from common.loader import build_loader, seed_everything

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
    group.add_argument("--eval_interval", type=positive_int, default=cfg["eval_interval"])
    group = parser.add_argument_group("output and limits")
    group.add_argument("--ckpt_dir", "--save", "--output", dest="ckpt_dir", default=None,
                       help="checkpoint folder (default ./ckpt_<device id>/, as the original)")  # fmt: skip
    group.add_argument("--train_steps", "--max_steps", dest="train_steps", type=non_negative_int, default=0,
                       help="stop after this many optimizer steps in all (0 = the full schedule; perf runs)")  # fmt: skip
    group.add_argument("--time_limit", type=non_negative_float, default=0.0,
                       help="train only the steps that fit in this many seconds (0 = no limit)")  # fmt: skip
    group.add_argument("--time_limit_basis", choices=BASES, default="wall",
                       help="seconds of wall clock, or CPU seconds per torch thread (a shared machine)")  # fmt: skip
    add_common_args(parser, seed=1, workers=4)
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


def fit_resume_state(state: object, path: Path | None, model: torch.nn.Module) -> bool:
    """Fit the weights of the checkpoint to resume from into `model`, before anything is written.

    A checkpoint of another network or shape raises CheckpointError naming the file and the mismatched
    keys (a missing, corrupted or unsafe file was refused by load_checkpoint already, before the model was
    built). Returns whether it holds a full training state of this code.
    """
    if path is None:
        return False
    load_weights(model, state, name=str(path))
    return isinstance(state, dict) and "optimizer" in state and "epoch" in state


def resume(run: TrainingRun, path: Path | None, state: object, training_state: bool, runtime) -> int:
    """Exact resume from a training state of this code; a weights-only file was loaded as initial weights."""
    if path is None:
        return 0
    if training_state:
        return run.resume(path, state)
    runtime.print(f"Loaded weights from {path}: no training state in it, so training starts at epoch 1")
    return 0


CHECKPOINT_NAMES = (LATEST, "model_best.pth.tar", "ckpt_unet_medical_adam-*.pth")


def remove_stale_temporaries(save_dir: Path, runtime) -> None:
    """Temporary checkpoint files of a run killed while writing (each as large as a checkpoint)."""
    if not runtime.is_main or not save_dir.is_dir():
        return
    for stale in remove_interrupted_writes(save_dir, CHECKPOINT_NAMES):
        runtime.print(f"removed {stale}: a checkpoint write that was interrupted")


class TimeBudget(Clock):
    """--time_limit at step granularity: each epoch runs only the steps that fit the time left, judged by
    the mean time of the steps so far (checkpoints included); the ranks agree on the slowest estimate.
    The seconds are common.clock's: wall clock, or CPU seconds per torch thread on a shared machine.
    """

    def __init__(self, seconds: float, basis: str = "wall"):
        super().__init__(basis)
        self.seconds = seconds
        self.steps = 0

    def exhausted(self) -> bool:
        return 0 < self.seconds <= self.elapsed()

    def spent_steps(self, steps: int) -> None:
        self.steps += steps

    def steps_that_fit(self, planned: int, runtime) -> int:
        if self.seconds <= 0 or self.steps == 0:
            return planned
        per_step = self.elapsed() / self.steps
        fit = max(0, int((self.seconds - self.elapsed()) / per_step))
        # Every rank must run the same number of steps, or DDP waits forever: take the smallest.
        (neg,) = runtime.dist.reduce_scalars([-min(fit, planned)], runtime.device.device, "max")
        return int(-neg)


def build_adam(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.Adam:
    """Adam with L2 weight decay added to the gradient, as MindSpore's nn.Adam; with `fused`, torch's fused
    kernel where this torch has one (2-3x faster steps on a CPU for these 31M parameters, same update)."""
    if fused:
        try:
            return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_fold(
    args, runtime, data, fold: int, save_dir: Path, config: dict, throughput: Throughput
) -> tuple[TrainingRun, dict]:
    """Train one fold; returns its run record and its final validation metrics (with the fold index)."""
    world = runtime.dist.world_size
    distributed = world > 1
    # The checkpoint to resume from is read first: a missing, corrupted or unsafe file stops the run here.
    resume_path = find_resume_checkpoint(args, save_dir)
    resume_state = load_checkpoint(resume_path) if resume_path is not None else None
    n_passes = passes(args, distributed)
    repeat = min(args.repeat or n_passes, n_passes)
    train_set, val_set = create_dataset(
        data, fold, args.image_size, args.num_classes, repeat, args.train_augment, args.pad_mode, args.seed
    )
    plan = schedule(len(train_set.pages), n_passes, repeat, world, args.batchsize)
    if args.train_steps:
        plan = cap_steps(plan, args.train_steps)
    train_loader = build_loader(train_set, args.batchsize, runtime.dist, train=True, workers=args.workers, seed=args.seed)  # fmt: skip
    val_loader = build_loader(val_set, 1, runtime.dist, train=False)
    seed_everything(args.seed)  # every fold starts from the same initial weights
    model = UNetMedical(n_channels=args.num_channels, n_classes=args.num_classes).to(runtime.device.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = apply_conv_flag(runtime, model)
    fused = runtime.device.kind in ("cpu", "cuda") and runtime.amp.backend != "apex"
    optimizer = build_adam(model, args.lr, args.weight_decay, fused)
    model, optimizer = runtime.amp.prepare(model, optimizer)
    model = runtime.dist.wrap(model, runtime.device)
    if args.compile:
        model = torch.compile(model)
    loss_fn = CrossEntropyWithLogits()
    training_state = fit_resume_state(resume_state, resume_path, model)
    remove_stale_temporaries(save_dir, runtime)
    fold_config = {**config, "fold": fold, "train_pages": train_set.pages, "val_pages": val_set.pages,
                   "passes": n_passes, "repeat_effective": repeat, "steps_per_epoch": plan}  # fmt: skip
    print_config(runtime, fold_config, save_dir / "config.json")
    run = TrainingRun(runtime, save_dir, model=model, optimizer=optimizer, config=fold_config,
                      selection_key="dice_coeff", network=NETWORK, batch_size=args.batchsize * world,
                      latest_name=LATEST)  # fmt: skip
    run.throughput = throughput
    start = resume(run, resume_path, resume_state, training_state, runtime)
    resume_state = None  # the optimizer holds its own copy now
    monitor = StepLossTimeMonitor(args.batchsize, world, runtime.print)
    runtime.print(
        f"fold {fold}: training pages {train_set.pages}, validation pages {val_set.pages}; "
        f"{len(plan)} epoch(s) of {plan[0]} step(s) at batch {args.batchsize} x {world} rank(s)"
    )
    runtime.print("dataset length is:", plan[0])
    runtime.print("============== Starting Training ==============")
    budget, val = TimeBudget(args.time_limit, args.time_limit_basis), None
    for epoch in range(start, len(plan)):
        steps = budget.steps_that_fit(plan[epoch], runtime)
        if steps == 0:
            runtime.print(
                f"time limit of {args.time_limit:g} s reached before epoch {epoch + 1} of {len(plan)}"
            )
            break
        run.begin_epoch(epoch, train_loader)
        stats = train_one_epoch(model, train_loader, loss_fn, optimizer, runtime, epoch=epoch,
                                throughput=run.throughput, global_step=run.global_step,
                                on_log=monitor.step_end, max_steps=steps)  # fmt: skip
        budget.spent_steps(stats.steps)
        monitor.epoch_end(epoch + 1, stats)
        stop = epoch == len(plan) - 1 or steps < plan[epoch] or budget.exhausted()
        periodic = args.run_eval and (epoch + 1) % args.eval_interval == 0
        val = evaluate(model, val_loader, UnetMetrics(), runtime, loss_fn=loss_fn) if (stop or periodic) else None  # fmt: skip
        run.end_epoch(epoch, stats, val)
        if runtime.is_main:
            keep_named_checkpoint(run.latest_path, save_dir, epoch + 1, stats.steps, args.keep_checkpoint_max)
        if val is not None:
            runtime.print(
                f"epoch {epoch + 1} validation (fold {fold}): dice_coeff {val['dice_coeff']:.4f}, "
                f"hard_dice_membrane {val['hard_dice_membrane']:.4f}, hard_dice_cell {val['hard_dice_cell']:.4f}"
            )
        if stop and epoch < len(plan) - 1:
            runtime.print(
                f"time limit of {args.time_limit:g} s ({args.time_limit_basis}) reached after {budget.steps} "
                f"step(s), {budget.elapsed():.0f} s"
            )
            break
    runtime.print("============== End Training ==============")
    runtime.print(
        f"trained {budget.steps} step(s) in {budget.wall():.0f} s wall-clock "
        f"({budget.cpu():.0f} CPU-s per thread, {torch.get_num_threads()} thread(s))"
    )
    if val is None:  # resumed from a finished run, or nothing left to train
        val = evaluate(model, val_loader, UnetMetrics(), runtime, loss_fn=loss_fn)
    runtime.print(f"============== Cross valid dice coeff is: {{'dice_coeff': {val['dice_coeff']}}}")
    return run, {"fold": fold, "steps": run.global_step, **val}


def cap_steps(plan: list[int], limit: int) -> list[int]:
    """The epochs of `plan` cut to `limit` steps in all."""
    out, left = [], limit
    for steps in plan:
        if left <= 0:
            break
        out.append(min(steps, left))
        left -= out[-1]
    return out


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
        args.ckpt_dir = f"ckpt_{runtime.device.index}"
    save_root = Path(args.ckpt_dir)
    data = load_train_data(args.data_url)
    runtime.print(
        f"ISBI 2012 data: {len(data)} pages of {data.images.shape[1]}x{data.images.shape[2]} from {data.source} "
        f"({data.layout}); input {args.image_size} -> output {output_size(args.image_size)}, pad {args.pad_mode}"
    )
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
    run.finish(accuracy, extra_lines=extra, details=details)
    runtime.dist.shutdown()
    return 0 if all(math.isfinite(r["dice_coeff"]) for r in results) else 1


if __name__ == "__main__":
    run_main(main)
