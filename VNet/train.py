"""Train V-Net (Milletari et al., 3DV 2016) on LUNA16 lungs or a Medical Segmentation Decathlon task.

The ModelZoo "VNet for PyTorch" entry point (mattmacy/vnet.pytorch@a00c8ea): its flags (`--data`,
`--batchSz` per process, `--nEpochs`, `--lr`, `--lr_decay`, `--weight_decay`, `--momentum`, `--save`,
`--resume`, `--amp`, `--opt-level`, `--loss-scale`, `--device`, `--device_id`, `--device_num`, ...), its
outputs (`<save>/vnet_checkpoint.pth.tar`, `<save>/vnet_model_best.pth.tar`, `train.csv`, `test.csv`) and
its log lines:

    Train Epoch: 1.40 [32/40 (80%)] Loss: 0.4123 Error: 3.2100% Lr: 0.0010 FPS: 2.1000)
    Test set: Average loss: 0.2000, Error: 1234/393216 (0.3138%) Dice: 0.9012

Changes from the reference (references.md 4.6, 6.6): a validation split picks the best checkpoint (the
test split never does), whole validation volumes are scored by sliding-window inference (no empty
sub-volume is dropped), the target is the lung mask, Dice loss by default, the checkpoint is saved every
epoch, FPS is averaged after warm-up with the device synchronised, and TrainAccuracy is the validation
Dice (the voxel error rate gets its own `ErrorRate` summary line).
"""

from __future__ import annotations

import repo_path  # noqa: F401  # isort: skip  (puts the monorepo root on sys.path)

import argparse
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from dataset import (
    CaseReader,
    DataSpec,
    PatchDataset,
    VolumeDataset,
    check_cases,
    check_patch_size,
    parse_size,
    patch_loader,
    resolve_data,
    split_cases,
    tiles_per_volume,
    without_cases,
)
from normalize_dataset import DEFAULT_SIZE, DEFAULT_SPACING, Settings
from sliding_window import sliding_window_inference
from vnet import VNet, reference_weights_init_

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
from common.datacheck import (
    SKIPPED_LIST,
    BadSample,
    format_problems,
    skipped_count,
    skipped_note,
    write_skipped_list,
)
from common.demo_data import MARKER as DEMO_MARKER
from common.engine import StepInfo, TrainingRun, evaluate
from common.errors import ConfigError, DataError
from common.loader import build_loader, build_statistics_loader
from common.losses import CrossEntropyLoss, TwoClassDiceLoss
from common.metrics import SegmentationMetrics
from common.summary import SummaryTarget
from common.trainer import Hooks, LoopConfig, StartPoint, fit, make_optimizer, prepare

NETWORK = "VNet"
# The demo LUNA16 volumes are small (about 70 mm across): finer voxels and a smaller box keep them meaningful.
DEMO_SPACING = 1.25
DEMO_SIZE = (96, 64, 64)
PATCH_CAP = 128  # auto patch size for MSD: the common padded size, at most this per axis


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data", "--data_path", dest="data", default="",
                      help="LUNA16 tree (as distributed or normalised) or a Decathlon task folder")  # fmt: skip
    data.add_argument("--dataset", default="auto", choices=("auto", "luna16", "msd"))
    data.add_argument("--label_map", default=None,
                      help="foreground labels: '3,4' (LUNA16 default: both lungs), 'gt0' (MSD default)")  # fmt: skip
    data.add_argument("--intensity", default="auto", choices=("auto", "ct", "zscore"),
                      help="auto: CT window for LUNA16 and MSD CT, per-volume z-score for MRI")  # fmt: skip
    data.add_argument("--vox_spacing", type=positive_float, default=None,
                      help=f"LUNA16 normalisation voxel size in mm (default {DEFAULT_SPACING}; demo data {DEMO_SPACING})")  # fmt: skip
    data.add_argument("--volume_size", default=None,
                      help=f"LUNA16 normalised size ZxYxX (default {'x'.join(map(str, DEFAULT_SIZE))})")  # fmt: skip
    data.add_argument(
        "--normalize_workers", type=positive_int, default=None, help="processes for normalisation"
    )
    data.add_argument("--patch_size", default=None,
                      help="training patch ZxYxX, multiples of 16 (default: LUNA16 half the volume, the reference's "
                           "2x2x2 sub-volumes; MSD the smallest padded box holding every volume, at most 128)")  # fmt: skip
    data.add_argument("--samples_per_volume", type=non_negative_int, default=0,
                      help="patches per volume and epoch (0: as many as tile the volume)")  # fmt: skip
    data.add_argument(
        "--foreground_prob", type=float, default=1 / 3, help="share of patches centred on foreground"
    )
    data.add_argument("--flip", action="store_true", help="random mirroring of training patches")
    data.add_argument("--val_fraction", type=float, default=0.15, help="share of cases for validation")
    data.add_argument("--test_fraction", type=float, default=0.0, help="share of cases held out (never used)")
    data.add_argument("--split_seed", type=int, default=0, help="seed of the case split (not --seed)")
    data.add_argument("--split_file", default=None, help='JSON {"train": [...], "val": [...], "test": [...]}')
    data.add_argument(
        "--cache_mb",
        type=non_negative_int,
        default=1024,
        help="decoded volumes kept per process when the .npy volume cache cannot be written",
    )

    val = parser.add_argument_group("validation")
    val.add_argument("--val_patch_size", default=None, help="sliding-window size (default: --patch_size)")
    val.add_argument("--val_overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    val.add_argument("--val_batch", type=positive_int, default=1, help="windows per forward pass")

    model = parser.add_argument_group("model")
    model.add_argument("--elu", action="store_true", help="ELU activations (default PReLU, as the reference)")
    model.add_argument("--no_skip_dropout", action="store_true", help="no Dropout3d on the skip connections")
    model.add_argument("--checkpoint_stages", action="store_true",
                       help="gradient checkpointing of the down/up stages: less memory, ~30%% slower")  # fmt: skip
    model.add_argument(
        "--pretrained", default="", help="initial weights (ours or the reference's checkpoint)"
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--nEpochs", "--epochs", dest="nEpochs", type=positive_int, default=200)
    opt.add_argument("--batchSz", "--batch_size", dest="batchSz", type=positive_int, default=10,
                     help="batch per process (the ModelZoo V-Net convention)")  # fmt: skip
    opt.add_argument("--lr", type=positive_float, default=1e-3)
    opt.add_argument(
        "--lr_decay",
        "--lr-decay",
        dest="lr_decay",
        type=positive_float,
        default=0.3,
        help="MultiStepLR factor (1 = constant)",
    )
    opt.add_argument(
        "--lr_milestones", default="50,100", help="epochs at which the lr is multiplied by lr_decay"
    )
    opt.add_argument("--momentum", type=float, default=0.9, help="Adam beta1 / SGD and RMSprop momentum")
    opt.add_argument(
        "--weight_decay", "--weight-decay", dest="weight_decay", type=non_negative_float, default=1e-8
    )
    opt.add_argument("--opt", default="adam", choices=("adam", "sgd", "rmsprop"))
    opt.add_argument("--loss", default="dice", choices=("dice", "dice_ce", "nll"),
                     help="dice: V-Net soft Dice (Milletari et al. Eq. 1); dice_ce: plus cross-entropy; "
                          "nll: class-weighted NLL as the reference")  # fmt: skip

    run = parser.add_argument_group("run")
    run.add_argument("--save", default=None, help="checkpoint folder (default work/vnet.base.<UTC time>)")
    run.add_argument("--resume", default="", help="vnet_checkpoint.pth.tar to continue from")
    run.add_argument("--print", nargs="?", const="1", default=None, help=argparse.SUPPRESS)  # ModelZoo compat
    add_common_args(parser, seed=1)
    add_schedule_args(parser)
    return parser


def _is_demo_tree(path: Path) -> bool:
    try:
        return json.loads((path / DEMO_MARKER).read_text()).get("writer") == "luna16"
    except (OSError, ValueError, AttributeError):
        return False


def luna_settings(args: argparse.Namespace, path: Path) -> Settings:
    demo = _is_demo_tree(path)
    spacing = args.vox_spacing or (DEMO_SPACING if demo else DEFAULT_SPACING)
    size = (
        parse_size(args.volume_size, "--volume_size")
        if args.volume_size
        else (DEMO_SIZE if demo else DEFAULT_SIZE)
    )
    return Settings(spacing, size, args.label_map or "3,4")


def auto_patch(kind: str, shapes: list[tuple[int, ...]]) -> tuple[int, int, int]:
    """LUNA16: half the (common) volume per axis, a multiple of 16 (the reference's 2x2x2 sub-volumes).
    MSD: the smallest multiple-of-16 box holding every volume, at most PATCH_CAP per axis."""
    largest = np.max(np.asarray(shapes), axis=0)
    if kind == "luna16":
        return tuple(int(max(16, -(-(int(s) // 2) // 16) * 16)) for s in largest)
    return tuple(int(min(PATCH_CAP, max(16, -(-int(s) // 16) * 16))) for s in largest)


class DiceCE(torch.nn.Module):
    """Soft Dice + cross-entropy: the Dice term fits the overlap, the dense cross-entropy gradient speeds up
    and steadies the first epochs (the combination nnU-Net trains with)."""

    def __init__(self):
        super().__init__()
        self.dice, self.ce = TwoClassDiceLoss(squared=True), CrossEntropyLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.ce(logits, target)


def build_optimizer(args: argparse.Namespace, params, runtime) -> torch.optim.Optimizer:
    """Adam, SGD or RMSprop; Adam and SGD fused on CUDA (common.trainer.make_optimizer), the multi-tensor
    step on the CPU, which the README's CPU results were trained with."""
    if args.opt == "adam":
        return make_optimizer(torch.optim.Adam, params, runtime, fused_on_cpu=False, lr=args.lr,
                              betas=(args.momentum, 0.999), weight_decay=args.weight_decay)  # fmt: skip
    if args.opt == "sgd":
        return make_optimizer(torch.optim.SGD, params, runtime, fused_on_cpu=False, lr=args.lr,
                              momentum=args.momentum, weight_decay=args.weight_decay)  # fmt: skip
    return torch.optim.RMSprop(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def parse_milestones(text: str) -> list[int]:
    try:
        values = sorted(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise ConfigError(
            f"--lr_milestones must be comma-separated epochs such as 50,100, got {text!r}"
        ) from None
    return values


def validate_shard(spec: DataSpec, indices: list[int], runtime, skip_bad: bool = False) -> list[BadSample]:
    """Every rank reads its share of the cases; a bad file anywhere stops every rank with the full list.

    With `skip_bad` the bad cases are returned instead: those of every rank, on every rank, so all ranks
    leave out the same cases and keep the same split.
    """
    problem, bad = "", []
    try:
        bad = check_cases(spec, indices, skip_bad=skip_bad)
    except DataError as exc:
        problem = str(exc)
    (failed,) = runtime.dist.reduce_scalars([1.0 if problem else 0.0], runtime.device.device, "sum")
    if problem:
        raise DataError(None, problem)
    if failed:
        raise DataError(None, "another rank found bad data files (see its log: test/output/<rank>/)")
    return gather_bad(bad, runtime) if skip_bad else []


def gather_bad(bad: list[BadSample], runtime) -> list[BadSample]:
    """The bad samples every rank found, sorted (the same list on every rank)."""
    if not runtime.dist.initialized:
        return sorted(bad)
    # all_gather_object pickles into uint8 tensors (sizes as int64) on the device of the group's backend,
    # the current device for NCCL and HCCL, which setup_runtime has set (pytorch/pytorch
    # torch/distributed/distributed_c10d.py, all_gather_object and _get_object_coll_device); HCCL moves
    # both dtypes (Ascend/pytorch torch_npu/csrc/distributed/HCCLUtils.cpp, kScalarTypeToHcclDataType).
    shares: list[list[BadSample] | None] = [None] * runtime.dist.world_size
    torch.distributed.all_gather_object(shares, [tuple(b) for b in bad])
    return sorted({BadSample(*b) for share in shares for b in share or ()})


def drop_from_split(split: dict[str, list[str]], bad: list[BadSample], root: Path) -> dict[str, list[str]]:
    """`split` without the cases of `bad`; DataError when the training or validation split is left empty."""
    ids = {b.id for b in bad}
    kept = {part: [case for case in cases if case not in ids] for part, cases in split.items()}
    for part in ("train", "val"):
        if split[part] and not kept[part]:
            raise DataError(
                root,
                f"every case of the {part} split is bad, so it would be empty:\n"
                + format_problems([(b.path, b.problem) for b in bad if b.id in split[part]])
                + "\nFix these files, or choose another split (--val_fraction, --split_seed, --split_file).",
            )
    return kept


def skipped_notes(skipped: list[BadSample], save_dir: Path, runtime) -> list[str]:
    """List the cases left out in `<save_dir>/skipped_samples.txt` and say so (rank 0); the summary notes."""
    path = save_dir / SKIPPED_LIST
    notes = [skipped_note(skipped, path)] if skipped else []
    if runtime.is_main:
        if skipped:
            write_skipped_list(save_dir, skipped)
            print(notes[0], flush=True)
        else:  # a list left by an earlier run on other data would contradict this run's summary
            path.unlink(missing_ok=True)
    return notes


def check_batchnorm(patch: tuple[int, ...], batch: int) -> None:
    """In training, BatchNorm needs more than one value per channel; V-Net's deepest stage holds 1/16 of the
    patch per axis, so a 16x16x16 patch with one sample per process has a single one."""
    if batch * math.prod(p // 16 for p in patch) < 2:
        raise ConfigError(
            f"--patch_size {'x'.join(map(str, patch))} with --batchSz {batch}: V-Net's deepest stage sees one "
            "voxel per channel (1/16 of each axis) and BatchNorm needs more than one value per channel in "
            "training; use an axis of 32 or more (e.g. 16x16x32) or --batchSz 2 or more"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.data:
        raise ConfigError("--data (or --data_path) is required: a LUNA16 tree or a Decathlon task folder")
    # Flags and checkpoints first: a typo or an unusable file should not cost a normalisation pass.
    if args.patch_size:
        check_batchnorm(check_patch_size(parse_size(args.patch_size)), args.batchSz)
    if args.val_patch_size:
        check_patch_size(parse_size(args.val_patch_size, "--val_patch_size"), "--val_patch_size")
    milestones = parse_milestones(args.lr_milestones)
    if not 0.0 <= args.val_overlap < 1.0:
        raise ConfigError(f"--val_overlap must lie in [0, 1), got {args.val_overlap}")
    start = StartPoint.read(resume=args.resume, init=args.pretrained)
    runtime = setup_runtime(args)
    dist = runtime.dist
    data_path = Path(args.data)
    save_dir = Path(args.save or f"work/vnet.base.{datetime.now(timezone.utc):%Y-%m-%d_%H-%M-%S}")

    # ---- data --------------------------------------------------------------------------------------
    settings = luna_settings(args, data_path) if (data_path / "lung_ct_image").is_dir() else None
    spec = resolve_data(data_path, dataset=args.dataset, label_map=args.label_map, intensity=args.intensity,
                        settings=settings, workers=args.normalize_workers, log=runtime.print,
                        skip_bad=args.skip_bad_samples)  # fmt: skip
    split = split_cases(spec.ids, args.val_fraction, args.test_fraction, args.split_seed, args.split_file)
    index_of = {case_id: i for i, case_id in enumerate(spec.ids)}
    shard = [index_of[i] for i in split["train"] + split["val"]][dist.rank :: dist.world_size]
    bad = validate_shard(spec, shard, runtime, skip_bad=args.skip_bad_samples)
    if bad:
        spec, split = without_cases(spec, bad), drop_from_split(split, bad, spec.root)
        index_of = {case_id: i for i, case_id in enumerate(spec.ids)}
    train_idx = [index_of[i] for i in split["train"]]
    val_idx = [index_of[i] for i in split["val"]]
    notes = skipped_notes(spec.skipped, save_dir, runtime)
    reader = CaseReader(spec, cache_bytes=args.cache_mb << 20)
    train_shapes = [reader(i)[0].shape for i in train_idx[:64]]
    patch = check_patch_size(
        parse_size(args.patch_size) if args.patch_size else auto_patch(spec.kind, train_shapes)
    )
    if not args.patch_size and args.batchSz * math.prod(p // 16 for p in patch) < 2:
        # Volumes of at most 16 voxels per axis with one sample per process: a longer last axis (padded).
        patch = (*patch[:2], 32)
        runtime.print(f"note: patch {'x'.join(map(str, patch))} (BatchNorm needs two values per channel)")
    val_patch = check_patch_size(parse_size(args.val_patch_size, "--val_patch_size") if args.val_patch_size else patch,
                                 "--val_patch_size")  # fmt: skip
    spv = args.samples_per_volume or tiles_per_volume(np.max(np.asarray(train_shapes), axis=0), patch)
    train_set = PatchDataset(reader, train_idx, patch, spv, args.foreground_prob, args.flip, seed=args.seed)
    val_set = VolumeDataset(reader, val_idx)
    # Patches grouped by volume: a mapped volume serves several patches in a row.
    train_loader = patch_loader(train_set, args.batchSz, dist, workers=args.workers, seed=args.seed)
    val_loader = build_loader(val_set, 1, dist, train=False, workers=0)
    # --precise_bn's batches: training volumes' patches from a fixed grid, never mirrored.
    bn_loader = build_statistics_loader(train_set, args.batchSz, dist, seed=args.seed)

    # ---- model, loss, optimisation --------------------------------------------------------------------
    model = VNet(elu=args.elu, nll=True, skip_dropout=not args.no_skip_dropout,
                 checkpoint_stages=args.checkpoint_stages)  # fmt: skip
    reference_weights_init_(model)
    start.load_weights(model)
    if args.loss == "dice":
        loss_fn = TwoClassDiceLoss(squared=True)
    elif args.loss == "dice_ce":
        loss_fn = DiceCE()
    else:
        # The reference's class weights from the foreground share m: w_bg = m / (1 + m), w_fg = 1 - w_bg.
        fg = float(np.mean([reader(i)[1].mean() for i in train_idx[:64]]))
        loss_fn = CrossEntropyLoss(weight=[fg / (1 + fg), 1 - fg / (1 + fg)])
    model, optimizer = prepare(
        model, lambda m: build_optimizer(args, m.parameters(), runtime), runtime, loss_fn=loss_fn
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, args.lr_decay)

    # What a reference mask's labels mean to predict.py: the labels the normalisation kept as lung.
    lung_labels = (
        settings.lung_labels if settings else (spec.info.get("settings") or {}).get("lung_labels")
    ) or "3,4"
    config = describe_config(runtime, {
        "dataset": spec.kind, "data_root": str(spec.root), "intensity": spec.intensity,
        "label_map": spec.label_map.spec if spec.kind == "msd" else lung_labels,
        "normalization": spec.info.get("settings") if spec.kind == "luna16" else None,
        "patch_size": list(patch), "val_patch_size": list(val_patch), "samples_per_volume": spv,
        "split_sizes": {k: len(v) for k, v in split.items()},
    })  # fmt: skip
    print_config(runtime, config, save_dir / "config.json")
    runtime.print(
        f"Data: {spec.kind} at {spec.root}: {len(train_idx)} train / {len(val_idx)} validation / "
        f"{len(split['test'])} held-out test cases; {len(train_set)} patches of {'x'.join(map(str, patch))} "
        f"per epoch; validation by sliding window {'x'.join(map(str, val_patch))}, overlap {args.val_overlap}"
    )
    target = SummaryTarget.from_env(save_dir, NETWORK, args.batchSz, dist.world_size)
    run = TrainingRun(runtime, save_dir, model=model, optimizer=optimizer, scheduler=scheduler, config=config,
                      selection_key="dice_mean", target=target, latest_name="vnet_checkpoint.pth.tar",
                      best_name="vnet_model_best.pth.tar")  # fmt: skip
    start_epoch = run.start(start)
    if runtime.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    hooks = VNetHooks(args, runtime, model, val_loader, loss_fn, val_patch, save_dir,
                      append=start_epoch > 0, samples_per_epoch=len(train_loader) * args.batchSz)  # fmt: skip
    loop = LoopConfig.from_args(args, epochs=args.nEpochs, per_device_batch=args.batchSz)
    try:
        fit(
            run,
            loop,
            train_loader=train_loader,
            loss_fn=loss_fn,
            hooks=hooks,
            train_metrics=SegmentationMetrics(),
            bn_loader=bn_loader,
        )
    finally:
        hooks.close()
    last = hooks.last
    if last["dice"] is None and run.history:  # resumed after the last epoch: report the recorded numbers
        recorded = [h for h in run.history if "dice_mean" in h]
        if recorded:
            last.update(dice=recorded[-1]["dice_mean"], error=recorded[-1].get("error_rate"))
    extra = {"ErrorRate": f"{last['error']:.4f}%"} if last["error"] is not None else {}
    run.finish(last["dice"], extra_lines=extra, details={"split": split, "patch_size": list(patch)},
               notes=notes, skipped_samples=skipped_count(spec.skipped))  # fmt: skip
    if runtime.is_main and run.best_value is not None:
        print(f"Best validation Dice {run.best_value:.4f} at epoch {run.best_epoch}: {run.best_path}")
    dist.shutdown()
    return 0


class VNetHooks(Hooks):
    """The reference's log lines and train.csv / test.csv, and sliding-window validation with its error rate."""

    def __init__(self, args, runtime, model, val_loader, loss_fn, val_patch, save_dir: Path, *, append: bool,
                 samples_per_epoch: int):  # fmt: skip
        self.args, self.runtime, self.model, self.val_loader = args, runtime, model, val_loader
        self.loss_fn, self.val_patch, self.samples_per_epoch = loss_fn, val_patch, samples_per_epoch
        mode = "a" if append else "w"
        self.train_csv = open(save_dir / "train.csv", mode) if runtime.is_main else None  # noqa: SIM115
        self.test_csv = open(save_dir / "test.csv", mode) if runtime.is_main else None  # noqa: SIM115
        self.voxels = 0
        self.last: dict = {"dice": None, "error": None}

    def close(self) -> None:
        for handle in (self.train_csv, self.test_csv):
            if handle is not None:
                handle.close()

    def on_step(self, info: StepInfo) -> None:
        partial = info.epoch + (info.step - 1) / info.steps
        err = 100.0 * (1.0 - info.train_metrics["acc_pooled"]) if info.train_metrics else float("nan")
        self.runtime.print(
            f"Train Epoch: {partial:.2f} [{info.step * self.args.batchSz}/{self.samples_per_epoch} "
            f"({100.0 * info.step / info.steps:.0f}%)] Loss: {info.loss:.4f} Error: {err:.4f}% Lr: {info.lr:.4f} "
            f"FPS: {info.fps:.4f})"
        )
        if self.train_csv is not None:
            self.train_csv.write(f"{partial:.2f},{info.loss:.4f},{err:.4f},{info.fps:.4f}\n")
            self.train_csv.flush()

    def window_forward(self, net: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        self.voxels += inputs[0].numel() * inputs.shape[0]
        probs = sliding_window_inference(
            inputs, net, self.val_patch, overlap=self.args.val_overlap, batch_size=self.args.val_batch
        )
        # Log-probabilities: what the metrics and losses take as logits.
        return torch.log(probs.clamp_min(1e-7))

    def validate(self, epoch: int) -> dict:
        self.voxels = 0
        runtime = self.runtime
        val = evaluate(self.model, self.val_loader, SegmentationMetrics(), runtime, loss_fn=self.loss_fn,
                       forward=self.window_forward)  # fmt: skip
        (total,) = runtime.dist.reduce_scalars([float(self.voxels)], runtime.device.device, "sum")
        wrong = int(round((1.0 - val["acc_pooled"]) * total))
        error = 100.0 * wrong / total if total else float("nan")
        val["error_rate"] = error
        self.last.update(dice=val["dice_mean"], error=error)
        runtime.print(
            f"\nTest set: Average loss: {val['loss']:.4f}, Error: {wrong}/{int(total)} ({error:.4f}%) "
            f"Dice: {val['dice_mean']:.4f}\n"
        )
        if self.test_csv is not None:
            self.test_csv.write(f"{epoch + 1},{val['loss']:.4f},{error:.4f},{val['dice_mean']:.4f}\n")
            self.test_csv.flush()
        return val


if __name__ == "__main__":
    run_main(main)
