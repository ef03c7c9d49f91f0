"""The train / test program of AttU_Net/ and R2U_Net/: LeeJunHyun/Image_Segmentation's main.py + solver.py.

    python main.py --mode train --model_type AttU_Net --data_path /data/ISIC2018 [--num_epochs 150 ...]
    python main.py --mode test  --model_type AttU_Net --data_path /data/ISIC2018

Training (the reference's recipe, faults fixed as listed in shared/docs/references.md 2.7): Adam(lr,
(beta1, beta2)); lr constant, then lowered by lr / num_epochs_decay after each of the last
`--num_epochs_decay` epochs; BCE-with-logits on binary masks; after each epoch validation, and the
checkpoint with the best validation Dice + Jaccard (means over images) becomes `model_best.pth.tar`.
At the end the best checkpoint is scored on the validation and the TEST split (HD95 included). The
command-line values are used as given (the reference overwrote lr, epochs, decay and augmentation with
random draws). `--mode test` scores a checkpoint on the test split (the reference re-ran validation).

Log lines (shared/docs/modelzoo.md A.5, AttU_Net/R2U_Net rows), metrics as per-image means:
    Epoch [e/N], Step:[i/n], Loss: %.4f, [Training] Acc: %.4f, SE: ..., SP: ..., PC: ..., F1: ..., JS: ..., DC: ...
    Epoch [e/N], Loss: %.4f,
    [Training] Acc: %.4f, SE: ..., DC: %.4f, FPS: %.2f
    [Validation] Acc: %.4f, SE: ..., SP: ..., PC: ..., F1: ..., JS: ..., DC: %.4f
The printed Loss is the mean over the epoch's steps (the reference printed the sum). FPS is global
images per second over the timed steps (after --warmup_steps). TrainAccuracy in the ModelZoo summary is
the validation pixel accuracy of the best checkpoint, as the originals' tables report it; Dice, Jaccard, SE, SP, PC,
F1 and HD95 of validation and test go into summary.json.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from common.checkpoint import load_weights, remove_interrupted_writes, unwrap_model
from common.cli import (
    Runtime,
    add_common_args,
    add_schedule_args,
    describe_config,
    non_negative_int,
    positive_float,
    positive_int,
    print_config,
    setup_runtime,
    status_of,
)
from common.datacheck import SKIPPED_LIST, BadSample, skipped_count, skipped_note, write_skipped_list
from common.engine import StepInfo, TrainingRun, evaluate
from common.errors import ConfigError
from common.isic.dataset import ISICDataset, build_split, check_image_size
from common.isic.losscurve import CURVE_KEYS, split_hash, write_curve
from common.isic.prepare import DEFAULT_SPLIT_SEED, prepared_skips, resolve_data_path
from common.loader import build_loader, build_statistics_loader, per_rank_batch
from common.losses import build_loss
from common.metrics import SegmentationMetrics
from common.registry import get_model_builder
from common.summary import RunSummary, SummaryTarget, write_summary
from common.trainer import Hooks, LoopConfig, StartPoint, fit, make_optimizer, prepare, read_checkpoint_file

MODEL_TYPES = ("U_Net", "R2U_Net", "AttU_Net", "R2AttU_Net")
R2_MODELS = ("R2U_Net", "R2AttU_Net")
# Names of the seven scores in the log lines, in the reference's order.
LINE_SCORES = (
    ("Acc", "acc"),
    ("SE", "se"),
    ("SP", "sp"),
    ("PC", "pc"),
    ("F1", "f1"),
    ("JS", "jaccard"),
    ("DC", "dice"),
)
SUMMARY_SCORES = ("acc", "se", "sp", "pc", "f1", "jaccard", "dice")
RESULT_HEADER = ["model_type", "acc", "SE", "SP", "PC", "F1", "JS", "DC", "HD95", "lr", "best_epoch",
                 "num_epochs", "num_epochs_decay", "augmentation_prob", "checkpoint"]  # fmt: skip


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _beta(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def build_parser(
    defaults: Mapping[str, Any] | None = None, prog: str | None = None
) -> argparse.ArgumentParser:
    """Every flag of main.py; `defaults` are the folder's (e.g. model_type="AttU_Net")."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train or test U_Net / R2U_Net / AttU_Net / R2AttU_Net on ISIC 2018 Task 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("model (reference flags)")
    group.add_argument("--model_type", default="U_Net", choices=MODEL_TYPES)
    group.add_argument("--image_size", type=positive_int, default=224, help="training size, a multiple of 16")
    group.add_argument("--t", type=positive_int, default=3, help="recurrent steps of R2U_Net / R2AttU_Net")
    group.add_argument(
        "--img_ch", type=positive_int, default=3, help="input channels (ISIC images are RGB: 3)"
    )
    group.add_argument("--output_ch", type=positive_int, default=1, help="output channels (binary: 1)")

    group = parser.add_argument_group("training (reference flags)")
    group.add_argument("--mode", default="train", choices=("train", "test"))
    group.add_argument("--num_epochs", "--epochs", dest="num_epochs", type=positive_int, default=100)
    group.add_argument("--num_epochs_decay", type=non_negative_int, default=70,
                       help="the lr falls linearly to 0 over this many last epochs")  # fmt: skip
    group.add_argument("--batch_size", "--batch-size", dest="batch_size", type=positive_int, default=1,
                       help="global batch size (each of N ranks takes batch_size / N)")  # fmt: skip
    group.add_argument("--lr", type=positive_float, default=0.0002)
    group.add_argument("--beta1", type=_beta, default=0.5, help="Adam beta1")
    group.add_argument("--beta2", type=_beta, default=0.999, help="Adam beta2")
    group.add_argument("--augmentation_prob", type=_probability, default=0.4)
    group.add_argument("--dry_run", action="store_true",
                       help="prepare and check the data and flags, write the loss-curve header, train nothing")  # fmt: skip
    group.add_argument("--log_step", dest="log_interval", type=positive_int, default=argparse.SUPPRESS,
                       help="alias of --log_interval")  # fmt: skip

    group = parser.add_argument_group("data and files")
    group.add_argument("--data_path", default="./dataset",
                       help="ISIC 2018 as distributed (the two folders or zips) or dataset.py's output")  # fmt: skip
    group.add_argument("--split_seed", type=int, default=DEFAULT_SPLIT_SEED,
                       help="seed of the 70/10/20 split made when --data_path is not split yet")  # fmt: skip
    group.add_argument(
        "--model_path", default="./models", help="checkpoints go to <model_path>/<model_type>/"
    )
    group.add_argument("--result_path", default="./result",
                       help="result.csv and loss_curve.csv go to <result_path>/<model_type>/")  # fmt: skip
    group.add_argument("--pth_path", default="",
                       help="train: a checkpoint.pth.tar resumes, a plain state_dict (the reference's .pkl) "
                       "initialises; test: the weights to score (default: the best checkpoint)")  # fmt: skip
    group.add_argument("--pretrained", action="store_true", help="accepted for compatibility; see --pth_path")
    group.add_argument("--resume", default="", help="a checkpoint.pth.tar of this code to continue from")

    add_common_args(parser, seed=12345)
    add_schedule_args(parser)
    if defaults:
        parser.set_defaults(**dict(defaults))
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Rules argparse cannot express; ConfigError states the rule."""
    check_image_size(args.image_size)
    if args.img_ch != 3:
        raise ConfigError(f"--img_ch must be 3: ISIC images are RGB (got {args.img_ch})")
    if args.output_ch != 1:
        raise ConfigError(f"--output_ch must be 1: one lesion logit per pixel (got {args.output_ch})")


def build_network(model_type: str, img_ch: int = 3, output_ch: int = 1, t: int = 3) -> torch.nn.Module:
    """One of the four networks of common.networks; `t` only matters for the R2 models."""
    import common.networks  # noqa: F401  (registers the ISIC family)

    builder = get_model_builder(model_type, family="isic")
    kwargs: dict[str, Any] = {"img_ch": img_ch, "output_ch": output_ch}
    if model_type in R2_MODELS:
        kwargs["t"] = t
    return builder(**kwargs)


def build_optimizer(
    model: torch.nn.Module, args: argparse.Namespace, runtime: Runtime
) -> torch.optim.Optimizer:
    """Adam(lr, (beta1, beta2)), no weight decay, as the reference; the fused kernel where torch has one.

    The fused CPU/CUDA kernel updates the 35-39 M parameters in one pass; on a small CPU that is several
    times faster than the multi-tensor loop, whose step otherwise costs as much as the forward pass.
    """
    return make_optimizer(torch.optim.Adam, model.parameters(), runtime, fused_on_cpu=True, lr=args.lr,
                          betas=(args.beta1, args.beta2))  # fmt: skip


def lr_factor(epoch: int, num_epochs: int, num_epochs_decay: int) -> float:
    """The reference's schedule as a multiplier for 0-based `epoch`.

    lr stays at lr0 for epochs 0 .. N - D and after every later epoch falls by lr0 / D, so the last
    epoch trains with lr0 / D and the rate reaches 0 after it (N = num_epochs, D = num_epochs_decay).
    """
    if num_epochs_decay <= 0:
        return 1.0
    decrements = max(0, epoch - max(0, num_epochs - num_epochs_decay))
    return max(0.0, 1.0 - decrements / num_epochs_decay)


def scores_text(metrics: Mapping[str, float]) -> str:
    """'Acc: 0.9000, SE: ..., DC: 0.8000' from per-image means."""
    return ", ".join(f"{name}: {metrics.get(f'{key}_mean', math.nan):.4f}" for name, key in LINE_SCORES)


def step_line(info: StepInfo, num_epochs: int) -> str:
    text = f"Epoch [{info.epoch + 1}/{num_epochs}], Step:[{info.step}/{info.steps}], Loss: {info.loss:.4f}"
    if info.train_metrics:
        text += f", [Training] {scores_text(info.train_metrics)}"
    return text


def epoch_lines(
    epoch: int, num_epochs: int, loss: float, train_metrics: Mapping[str, float] | None, fps: float
) -> str:
    head = f"Epoch [{epoch + 1}/{num_epochs}], Loss: {loss:.4f}, "
    return f"{head}\n[Training] {scores_text(train_metrics or {})}, FPS: {fps:.2f}"


def _with_score(val: dict[str, float]) -> dict[str, float]:
    val = dict(val)
    val["score"] = val["dice_mean"] + val["jaccard_mean"]
    return val


def _summary_scores(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {name: metrics.get(f"{name}_mean") for name in SUMMARY_SCORES}
    out.update(
        hd95=metrics.get("hd95_mean"),
        hd95_excluded=metrics.get("hd95_excluded"),  # images without a defined HD95, not in its mean
        dice_pooled=metrics.get("dice_pooled"),
        jaccard_pooled=metrics.get("jaccard_pooled"),
        loss=metrics.get("loss"),
        images=metrics.get("n_images"),
    )
    return out


def _append_result(path: Path, row: Sequence[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(RESULT_HEADER)
        writer.writerow(row)


def _result_row(
    args: argparse.Namespace, metrics: Mapping[str, float], best_epoch: Any, weights: Path
) -> list:
    scores = [f"{metrics.get(f'{k}_mean', math.nan):.6f}" for k in SUMMARY_SCORES]
    return [args.model_type, *scores, f"{metrics.get('hd95_mean', math.nan):.4f}", args.lr, best_epoch,
            args.num_epochs, args.num_epochs_decay, args.augmentation_prob, str(weights)]  # fmt: skip


class Session:
    """The pieces both modes share: data root, datasets and loaders, model, loss."""

    def __init__(self, args: argparse.Namespace, runtime: Runtime):
        self.args, self.runtime = args, runtime
        self.log: Callable[[str], None] = runtime.print
        self.root = resolve_data_path(
            args.data_path, seed=args.split_seed, log=self.log, skip_bad=args.skip_bad_samples
        )
        self.per_rank = per_rank_batch(args.batch_size, runtime.dist.world_size)
        self.save_dir = Path(args.model_path) / args.model_type
        self.result_dir = Path(args.result_path) / args.model_type
        self.loss_fn = build_loss("BCEWithLogitsLoss")
        self.datasets: dict[str, ISICDataset] = {}

    def check_batch_norm(self) -> None:
        """BatchNorm needs more than one value per channel at the (image_size / 16)^2 bottleneck."""
        bottleneck = (self.args.image_size // 16) ** 2
        if bottleneck * self.per_rank < 2:
            raise ConfigError(
                f"--image_size {self.args.image_size} with {self.per_rank} image(s) per rank leaves BatchNorm one "
                "value per channel at the 1x1 bottleneck; use --image_size >= 32 or >= 2 images per rank"
            )

    def dataset(self, split: str, augmentation_prob: float = 0.0) -> ISICDataset:
        if split not in self.datasets:
            self.datasets[split] = build_split(
                self.root, split, self.args.image_size, augmentation_prob=augmentation_prob,
                seed=self.args.seed, log=self.log, skip_bad=self.args.skip_bad_samples,
            )  # fmt: skip
        return self.datasets[split]

    def skipped(self) -> list[BadSample]:
        """The samples left out: by the preparation of the split, and from the splits built so far."""
        found = [*prepared_skips(self.root), *(b for ds in self.datasets.values() for b in ds.skipped)]
        return sorted(set(found))

    def report_skipped(self, folder: Path) -> tuple[list[str], int]:
        """(summary notes, count) of the samples left out; rank 0 lists them in `<folder>/skipped_samples.txt`
        and prints the note. Call after the splits the run uses are built."""
        skipped = self.skipped()
        notes = [skipped_note(skipped, folder / SKIPPED_LIST)] if skipped else []
        if self.runtime.is_main:
            if skipped:
                write_skipped_list(folder, skipped)
                self.log(notes[0])
            else:  # a list left by an earlier run on other data would contradict this run's summary
                (folder / SKIPPED_LIST).unlink(missing_ok=True)
        return notes, skipped_count(skipped)

    def eval_loader(self, split: str):
        return build_loader(self.dataset(split), self.per_rank, self.runtime.dist, train=False,
                            workers=self.args.workers)  # fmt: skip

    def network(self) -> torch.nn.Module:
        a = self.args
        return build_network(a.model_type, a.img_ch, a.output_ch, a.t)

    def score(self, model: torch.nn.Module, split: str, hd95: bool = False) -> dict[str, float]:
        metrics = SegmentationMetrics(compute_hd95=hd95)
        return evaluate(model, self.eval_loader(split), metrics, self.runtime, loss_fn=self.loss_fn)

    def curve_config(self) -> dict[str, Any]:
        a = self.args
        splits = {s: self.dataset(s).ids for s in ("train", "valid", "test")}
        values = {k: getattr(a, k, None) for k in CURVE_KEYS}
        values.update(
            max_iters=a.max_steps,  # the curve files' name for the step cap (--max_iters is its alias)
            t=a.t if a.model_type in R2_MODELS else None,
            world_size=self.runtime.dist.world_size,
            split=split_hash(splits),
        )
        return values


class ISICHooks(Hooks):
    """The reference's step, epoch, validation, learning-rate and best-model lines."""

    def __init__(self, session: Session, model: torch.nn.Module, val_loader, run: TrainingRun):
        self.session, self.model, self.val_loader, self.run = session, model, val_loader, run
        self.args, self.log = session.args, session.log
        self.metrics = SegmentationMetrics(device=session.runtime.device.device)

    def on_step(self, info: StepInfo) -> None:
        self.log(step_line(info, self.args.num_epochs))

    def after_train(self, epoch: int, stats) -> None:
        fps = stats.fps(self.session.runtime.dist.world_size)
        self.log(epoch_lines(epoch, self.args.num_epochs, stats.loss_mean, stats.train_metrics, fps))

    def validate(self, epoch: int) -> dict:
        session = self.session
        val = evaluate(self.model, self.val_loader, self.metrics, session.runtime, loss_fn=session.loss_fn)
        val = _with_score(val)
        self.log(f"[Validation] {scores_text(val)}")
        return val

    def on_epoch(self, r) -> None:
        if r.lr_after != r.lr_before:
            self.log(f"Decay learning rate to lr: {r.lr_after}.")
        if r.improved:
            self.log(f"Best {self.args.model_type} model score : {r.val['score']:.4f}")


def run_train(args: argparse.Namespace, runtime: Runtime, start: StartPoint) -> None:
    session = Session(args, runtime)
    session.check_batch_norm()
    log = session.log
    train_set = session.dataset("train", args.augmentation_prob)
    session.dataset("valid")
    session.dataset("test")
    notes, skipped = session.report_skipped(session.save_dir)
    if args.dry_run:
        _dry_run(session)
        return
    train_loader = build_loader(train_set, session.per_rank, runtime.dist, train=True, workers=args.workers,
                                seed=args.seed)  # fmt: skip
    val_loader = session.eval_loader("valid")
    model = session.network()
    start.load_weights(model)  # a checkpoint of another network stops the run before anything is written
    model, optimizer = prepare(model, lambda m: build_optimizer(m, args, runtime), runtime)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, args.num_epochs, args.num_epochs_decay)
    )
    if runtime.is_main:
        for leftover in remove_interrupted_writes(
            session.save_dir, ("checkpoint.pth.tar", "model_best.pth.tar")
        ):
            log(f"Removed {leftover}, left by a run killed while writing a checkpoint")
    curve_config = session.curve_config()
    config = describe_config(runtime, extra={"prepared_data": str(session.root), "curve": curve_config})
    print_config(runtime, config, session.save_dir / "config.json")
    log(f"Data: {session.root} | train {len(train_set)}, valid {len(session.dataset('valid'))}, "
        f"test {len(session.dataset('test'))} images | {len(train_loader)} steps per epoch")  # fmt: skip
    target = SummaryTarget.from_env(
        session.save_dir, args.model_type, args.batch_size, runtime.dist.world_size
    )
    run = TrainingRun(runtime, session.save_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                      config=config, selection_key="score", target=target, plot_metric="dice_mean")  # fmt: skip
    run.start(start)
    loop = LoopConfig.from_args(args, epochs=args.num_epochs, per_device_batch=session.per_rank)
    # --precise_bn's batches: the training images without augmentation (plain keys skip it).
    bn_loader = build_statistics_loader(train_set, session.per_rank, runtime.dist, workers=args.workers,
                                        seed=args.seed)  # fmt: skip
    fit(run, loop, train_loader=train_loader, loss_fn=session.loss_fn, hooks=ISICHooks(session, model, val_loader, run),
        train_metrics=SegmentationMetrics(device=runtime.device.device), bn_loader=bn_loader)  # fmt: skip
    _finish_training(session, run, model, notes, skipped)


def _dry_run(session: Session) -> None:
    """Data prepared and decoded, flags checked: write the curve header (no steps) and stop."""
    config = describe_config(
        session.runtime, extra={"prepared_data": str(session.root), "curve": session.curve_config()}
    )
    print_config(session.runtime, config)
    if session.runtime.is_main:
        path = write_curve(session.result_dir / "loss_curve.csv", session.curve_config(), [])
        session.log(f"Dry run: data and flags checked, nothing trained. Loss-curve header: {path}")


def _finish_training(
    session: Session, run: TrainingRun, model: torch.nn.Module, notes: list[str], skipped: int
) -> None:
    """Score the best checkpoint on validation and test, write the curve, result row and summary."""
    args, runtime, log = session.args, session.runtime, session.log
    runtime.dist.barrier()  # rank 0 wrote the best checkpoint; every rank reads it
    weights = run.best_path if run.best_path.exists() else run.latest_path
    if weights.exists():
        load_weights(unwrap_model(model), weights)
    val = session.score(model, "valid", hd95=True)
    test = session.score(model, "test", hd95=True)
    log(f"Best checkpoint {weights} (epoch {run.best_epoch}):")
    log(
        f"[Validation] {scores_text(val)}, HD95: {val['hd95_mean']:.4f} ({int(val['hd95_excluded'])} image(s) left out)"
    )
    log(
        f"[Test] {scores_text(test)}, HD95: {test['hd95_mean']:.4f} ({int(test['hd95_excluded'])} image(s) left out)"
    )
    curve_path = session.result_dir / "loss_curve.csv"
    if runtime.is_main:
        write_curve(curve_path, session.curve_config(), run.step_losses)
        _append_result(session.result_dir / "result.csv", _result_row(args, test, run.best_epoch, weights))
        log(f"Loss curve: {curve_path}")
    run.finish(
        val["acc_mean"],
        details={
            "model_type": args.model_type,
            "train_accuracy_is": "validation pixel accuracy (per-image mean) of the best checkpoint",
            "best_validation": _summary_scores(val),
            "test": _summary_scores(test),
            "loss_curve": str(curve_path),
            "prepared_data": str(session.root),
        },
        notes=notes,
        skipped_samples=skipped,
    )


def run_test(args: argparse.Namespace, runtime: Runtime) -> None:
    weights = (
        Path(args.pth_path)
        if args.pth_path
        else Path(args.model_path) / args.model_type / "model_best.pth.tar"
    )
    if not weights.is_file():
        raise ConfigError(
            f"no weights at {weights}: train first (--mode train with the same --model_type and --model_path) "
            "or pass --pth_path=<checkpoint or the reference's .pkl>"
        )
    state = read_checkpoint_file(weights, "--pth_path")  # corrupted or unsafe: refused before the data work
    session = Session(args, runtime)
    test_images = len(session.dataset("test"))  # the data is checked and decoded before the model is built
    notes, skipped = session.report_skipped(session.result_dir)
    model = session.network()
    load_weights(model, state, name=str(weights))
    runtime.amp.follow(state)
    model.to(runtime.device.device)
    best_epoch = state.get("best_epoch") if isinstance(state, dict) else None
    stored = state.get("config") if isinstance(state, dict) else None
    del state  # a training state holds the optimizer too
    session.log(f"Testing {args.model_type} weights {weights} on {test_images} test images")
    test = session.score(model, "test", hd95=True)
    session.log(
        f"[Test] {scores_text(test)}, HD95: {test['hd95_mean']:.4f} ({int(test['hd95_excluded'])} image(s) left out)"
    )
    if not runtime.is_main:
        return
    # The training settings of the row come from the checkpoint when it records them.
    trained = argparse.Namespace(**vars(args))
    for key in ("lr", "num_epochs", "num_epochs_decay", "augmentation_prob"):
        if isinstance(stored, dict) and key in stored:
            setattr(trained, key, stored[key])
    _append_result(session.result_dir / "result.csv", _result_row(trained, test, best_epoch, weights))
    target = SummaryTarget.from_env(session.result_dir, args.model_type, args.batch_size,
                                    runtime.dist.world_size, mode="eval")  # fmt: skip
    write_summary(
        target,
        RunSummary(
            train_accuracy=test["acc_mean"],
            actual_loss=test["loss"],
            details={
                "model_type": args.model_type,
                "weights": str(weights),
                "train_accuracy_is": "test pixel accuracy (per-image mean)",
                "test": _summary_scores(test),
                "prepared_data": str(session.root),
                "config": describe_config(runtime),
            },
            notes=notes,
            skipped_samples=skipped,
        ),
    )


def main(argv: Sequence[str] | None = None, defaults: Mapping[str, Any] | None = None,
         prog: str | None = None) -> int:  # fmt: skip
    """Parse, set up the runtime and run the chosen mode; a user error prints one `[Error]` line and
    returns 2 (the status `common.cli.run_main` gives every entry point)."""
    parser = build_parser(defaults, prog)
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    runtime = None

    def run() -> None:
        nonlocal runtime
        start = None
        if args.mode == "train":
            # Checkpoints are read and checked before the data is prepared and the images decoded.
            start = StartPoint.read(resume=args.resume, init=args.pth_path, init_flag="--pth_path",
                                    init_may_resume=True)  # fmt: skip
        runtime = setup_runtime(args)
        if args.mode == "train":
            run_train(args, runtime, start)
        else:
            run_test(args, runtime)

    try:
        return status_of(run)
    finally:
        if runtime is not None:
            runtime.dist.shutdown()
