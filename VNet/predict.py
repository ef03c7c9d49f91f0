"""Segment whole CT/MRI volumes with a trained V-Net and write masks in each input's exact geometry.

    python3 predict.py --checkpoint work/<run>/vnet_model_best.pth.tar --input scans/ --output masks/ \
        [--reference refs/] [--tta] [--overlap 0.5] [--format .nii.gz]

Each input (.mhd/.mha + .raw/.zraw, .nii, .nii.gz, .nrrd; a file or a folder of them) goes through the
training preprocessing the checkpoint recorded: LUNA16-trained models resample the scan to the training
voxel size (trilinear, in HU) and apply the CT window; Decathlon models keep the grid and normalise the
intensity as in training. Sliding-window inference (sliding_window.py) covers a volume of any size with
windows of the training patch, Gaussian-blended; `--tta` adds mirrored windows. The foreground
probability is resampled back onto the input's grid before thresholding, so the mask has the input's
size, spacing, origin and direction exactly, and is written as .mhd (+ .zraw) or .nii.gz.

With `--reference` (a mask file, or a folder with masks named like the inputs), Dice and HD95 (in mm,
from the input's spacing) are printed per case and written to `metrics.json` beside the masks.
"""

from __future__ import annotations

import repo_path  # noqa: F401  # isort: skip  (puts the monorepo root on sys.path)

import argparse
import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from dataset import check_patch_size, parse_size, read_finite
from geometry import centered_grid, grid_of, resample_array
from intensity import LabelMap, normalize_intensity
from sliding_window import sliding_window_inference
from vnet import VNet

from common.checkpoint import extract_state_dict, load_checkpoint, load_weights
from common.cli import positive_int, run_main
from common.datacheck import format_problems
from common.device import DEVICE_CHOICES, select_device
from common.errors import ConfigError, DataError
from common.imageio import (
    VOLUME_EXTENSIONS,
    Volume,
    check_finite,
    read_volume,
    same_geometry,
    strip_volume_ext,
    volume_ext,
    write_volume,
)
from common.metrics import hd95

OUTPUT_FORMATS = ("same", ".nii.gz", ".mhd")


@dataclass
class Preprocessing:
    """How the checkpoint's training data was prepared, so inference repeats it."""

    intensity: str  # "ct" or "zscore"
    spacing: float | None  # isotropic voxel size the network saw (LUNA16), or None: keep the grid
    patch: tuple[int, int, int]
    label_map: str  # reference-mask labels that count as foreground


def preprocessing_from_config(config: dict) -> Preprocessing:
    """Read what train.py recorded (config.json, also inside every checkpoint)."""
    patch = tuple(config.get("val_patch_size") or config.get("patch_size") or (64, 80, 80))
    if config.get("dataset") == "msd":
        return Preprocessing(config.get("intensity", "zscore"), None, patch, config.get("label_map") or "gt0")
    norm = config.get("normalization") or {}
    return Preprocessing("ct", norm.get("vox_spacing", 2.5), patch, config.get("label_map") or "3,4")


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[VNet, dict]:
    """The V-Net of a checkpoint (ours or the reference's) in eval mode, and its training config."""
    state = load_checkpoint(checkpoint)
    config = state.get("config", {}) if isinstance(state, dict) else {}
    model = VNet(elu=bool(config.get("elu", False)), nll=True)
    load_weights(model, extract_state_dict(state, str(checkpoint)), name=str(checkpoint))
    return model.to(device).eval(), config


def list_volumes(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if volume_ext(path) is None:
            raise DataError(path, f"not a volume file ({', '.join(VOLUME_EXTENSIONS)})")
        return [path]
    if not path.is_dir():
        raise DataError(path, "no such file or folder")
    found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and volume_ext(p))
    if not found:
        raise DataError(path, f"the folder holds no volumes ({', '.join(VOLUME_EXTENSIONS)})")
    return found


def predict_probability(
    model: torch.nn.Module,
    volume: Volume,
    prep: Preprocessing,
    *,
    overlap: float = 0.5,
    sw_batch: int = 1,
    tta: bool = False,
    device: torch.device | str = "cpu",
    accumulate_on: str | torch.device | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> np.ndarray:
    """Foreground probability (float32) on the input volume's own grid."""
    source = grid_of(volume)
    array = volume.array
    if prep.spacing is not None:
        target = centered_grid(source, prep.spacing)
        fill = -1000.0 if prep.intensity == "ct" else float(array.min())
        array = resample_array(array, source, target, "linear", fill)
    else:
        target = source
    inputs = torch.from_numpy(normalize_intensity(array, prep.intensity))[None, None]
    with torch.no_grad(), autocast or contextlib.nullcontext():
        probs = sliding_window_inference(
            inputs,
            model,
            prep.patch,
            overlap=overlap,
            batch_size=sw_batch,
            tta=tta,
            device=device,
            accumulate_device=accumulate_on,
        )
    foreground = probs[0, 1].float().cpu().numpy()
    if prep.spacing is not None:
        foreground = resample_array(foreground, target, source, "linear", 0.0)
    return foreground


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P and R| / (|P| + |R|); 1.0 when both are empty."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


def output_path(out_dir: Path, source: Path, fmt: str) -> Path:
    ext = volume_ext(source) if fmt == "same" else fmt
    if ext not in (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd"):
        ext = ".nii.gz"
    return out_dir / f"{strip_volume_ext(source.name)}{ext}"


def find_reference(reference: Path | None, source: Path) -> Path | None:
    if reference is None:
        return None
    if reference.is_file():
        return reference
    stem = strip_volume_ext(source.name)
    matches = [p for p in list_volumes(reference) if strip_volume_ext(p.name) == stem]
    if not matches:
        raise DataError(reference, f"no reference mask named {stem}.* for {source.name}")
    return matches[0]


def check_inputs(inputs: Sequence[Path], reference: Path | None) -> None:
    """Read every input (and its reference mask) once before anything is written: one DataError lists every
    unreadable file, non-finite CT and reference on another grid, so no run stops half-way through a folder."""
    problems: list[tuple[Path, str]] = []
    for path in inputs:
        try:
            volume = read_finite(path)
            ref_path = find_reference(reference, path)
            if ref_path is not None:
                diff = same_geometry(volume, read_volume(ref_path), tol=1e-3)
                if diff:
                    problems.append((ref_path, f"reference mask geometry differs from {path.name}: {diff}"))
        except DataError as exc:
            problems.append((exc.path or path, exc.problem))
    if problems:
        raise DataError(
            Path(inputs[0]).parent,
            f"{len(problems)} problem(s) with {len(inputs)} input volume(s); nothing was written:\n"
            + format_problems(problems),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", "--pth_path", "--resume", dest="checkpoint", required=True)
    parser.add_argument("--input", required=True, help="a volume file or a folder of volumes")
    parser.add_argument("--output", required=True, help="output folder (or file name for one input)")
    parser.add_argument("--reference", default=None, help="reference mask file or folder: Dice and HD95")
    parser.add_argument("--reference_labels", default=None,
                        help="labels of the reference that are foreground (default: as in training)")  # fmt: skip
    parser.add_argument("--format", default="same", choices=OUTPUT_FORMATS, help="mask file type")
    parser.add_argument("--patch_size", default=None, help="window ZxYxX (default: the training patch)")
    parser.add_argument("--vox_spacing", type=float, default=None,
                        help="resample to this voxel size in mm first (default: as in training; 0 = never)")  # fmt: skip
    parser.add_argument("--intensity", default=None, choices=("ct", "zscore"), help="default: as in training")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--sw_batch", type=positive_int, default=1, help="windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="average the 8 mirrorings of every window")
    parser.add_argument("--threshold", type=float, default=0.5, help="foreground probability threshold")
    parser.add_argument("--save_probabilities", action="store_true", help="also write the probability map")
    parser.add_argument("--accumulate_on", default=None, choices=("device", "cpu"),
                        help="where the blended output lives (cpu: least accelerator memory)")  # fmt: skip
    parser.add_argument("--amp", action="store_true", help="fp16 (bf16 on CPU) autocast")
    parser.add_argument("--device", default="auto", type=str.lower, choices=DEVICE_CHOICES)
    parser.add_argument("--device_id", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold must lie in (0, 1), got {args.threshold}")
    if not 0.0 <= args.overlap < 1.0:
        raise ConfigError(f"--overlap must lie in [0, 1), got {args.overlap}")
    if args.vox_spacing is not None and args.vox_spacing < 0:
        raise ConfigError(
            f"--vox_spacing must be a positive number of mm (0: keep the grid), got {args.vox_spacing}"
        )
    patch = check_patch_size(parse_size(args.patch_size)) if args.patch_size else None
    # The inputs first (cheap next to a 180 MB checkpoint, and the usual mistake).
    inputs = list_volumes(args.input)
    reference = Path(args.reference) if args.reference else None
    check_inputs(inputs, reference)
    info = select_device(args.device, args.device_id)
    device = info.device
    model, config = load_model(args.checkpoint, device)
    prep = preprocessing_from_config(config)
    if patch is not None:
        prep.patch = patch
    if args.vox_spacing is not None:
        prep.spacing = args.vox_spacing or None
    if args.intensity:
        prep.intensity = args.intensity
    labels = LabelMap.parse(args.reference_labels or prep.label_map)
    out = Path(args.output)
    single_file = len(inputs) == 1 and volume_ext(out) is not None
    out_dir = out.parent if single_file else out
    out_dir.mkdir(parents=True, exist_ok=True)
    accumulate = "cpu" if args.accumulate_on == "cpu" else None
    autocast = None
    if args.amp:
        autocast = torch.autocast(
            device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16
        )
    print(
        f"V-Net on {info.describe()}: {len(inputs)} volume(s); windows {'x'.join(map(str, prep.patch))}, "
        f"overlap {args.overlap}, TTA {'on' if args.tta else 'off'}; intensity {prep.intensity}; "
        f"{'resampled to ' + str(prep.spacing) + ' mm' if prep.spacing else 'native grid'}"
    )
    results: list[dict[str, Any]] = []
    for path in inputs:
        start = time.perf_counter()
        volume = read_volume(path)
        check_finite(volume.array, path)
        prob = predict_probability(model, volume, prep, overlap=args.overlap, sw_batch=args.sw_batch,
                                   tta=args.tta, device=device, accumulate_on=accumulate, autocast=autocast)  # fmt: skip
        mask = (prob > args.threshold).astype(np.uint8)
        target = out if single_file else output_path(out_dir, path, args.format)
        write_volume(target, mask, like=volume)
        if args.save_probabilities:
            write_volume(target.with_name(f"prob_{target.name}"), prob.astype(np.float32), like=volume)
        row: dict[str, Any] = {"case": strip_volume_ext(path.name), "mask": str(target),
                               "foreground_ml": float(mask.sum() * np.prod(volume.spacing) / 1000),
                               "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        ref_path = find_reference(reference, path)
        if ref_path is not None:
            ref = read_volume(ref_path)
            diff = same_geometry(volume, ref, tol=1e-3)
            if diff:
                raise DataError(ref_path, f"reference mask geometry differs from {path.name}: {diff}")
            truth = labels(ref.array)
            row["dice"] = dice_score(mask.astype(bool), truth)
            row["hd95_mm"] = hd95(mask.astype(bool), truth, spacing=volume.spacing)
        results.append(row)
        scores = "".join(
            f", {k} {row[k]:.4f}" for k in ("dice", "hd95_mm") if k in row and math.isfinite(row[k])
        )
        print(
            f"{path.name}: {row['foreground_ml']:.1f} ml foreground{scores} ({row['seconds']} s) -> {target}"
        )
    if reference is not None:
        dices = [r["dice"] for r in results]
        finite = [r["hd95_mm"] for r in results if math.isfinite(r["hd95_mm"])]
        summary = {"mean_dice": float(np.mean(dices)),
                   "mean_hd95_mm": float(np.mean(finite)) if finite else None,
                   "hd95_infinite": len(results) - len(finite), "cases": results}  # fmt: skip
        for r in results:  # JSON has no infinity: an empty prediction against a non-empty mask -> null
            r["hd95_mm"] = r["hd95_mm"] if math.isfinite(r["hd95_mm"]) else None
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(
            f"mean Dice {summary['mean_dice']:.4f}, mean HD95 {summary['mean_hd95_mm']} mm over {len(results)}"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
