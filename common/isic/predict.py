"""Masks and overlays for a folder of images with a trained ISIC network (the reference had no predict).

    python predict.py --input some/images --output predictions [--pth_path models/AttU_Net/model_best.pth.tar]

Per image: `<stem>_mask.png` (0/255, at the image's own size), `<stem>_overlay.png` (prediction in red,
ground truth contour in green when --gt_dir holds `<stem>_segmentation.png`) and, with --save_prob, the
probability map. `predictions.json` lists every file with its foreground fraction (and Dice with --gt_dir).
The checkpoint, every input image and every ground-truth mask are checked before the model is built, so
a bad input stops the run with one message and no masks written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.checkpoint import load_checkpoint, load_weights
from common.cli import positive_int, status_of
from common.datacheck import format_problems
from common.device import DEVICE_CHOICES, select_device
from common.errors import ConfigError, DataError
from common.imageio import read_image, read_mask
from common.isic.dataset import check_image_size, preprocess
from common.isic.prepare import GT_SUFFIX, read_header
from common.isic.solver import MODEL_TYPES, build_network
from common.predict2d import list_images, predict_images


def build_parser(
    defaults: Mapping[str, Any] | None = None, prog: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--input", required=True, help="an image or a folder of images (.jpg, .png, ...)")
    parser.add_argument("--output", default="./predictions", help="folder for masks and overlays")
    parser.add_argument("--model_type", default="U_Net", choices=MODEL_TYPES)
    parser.add_argument("--t", type=positive_int, default=3, help="recurrent steps of the R2 models")
    parser.add_argument(
        "--image_size", type=positive_int, default=224, help="the size the network was trained at"
    )
    parser.add_argument("--model_path", default="./models", help="where main.py wrote <model_type>/")
    parser.add_argument(
        "--pth_path", default="", help="weights (default <model_path>/<model_type>/model_best.pth.tar)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="foreground where sigmoid(logit) > this")
    parser.add_argument("--batch_size", type=positive_int, default=4)
    parser.add_argument(
        "--gt_dir", default="", help="folder of <stem>_segmentation.png for contours and Dice"
    )
    parser.add_argument("--save_prob", action="store_true", help="also write <stem>_prob.png")
    parser.add_argument("--device", default="auto", type=str.lower, choices=DEVICE_CHOICES)
    parser.add_argument("--device_id", "--cuda_idx", "--npu_idx", dest="device_id", type=int, default=None)
    if defaults:
        parser.set_defaults(**dict(defaults))
    return parser


def check_inputs(paths: list[Path], gt_dir: Path | None) -> None:
    """Every input image opens, and every ground-truth mask found has its image's size: one DataError
    lists all problems before the model is built or any mask is written."""
    problems: list[tuple[Path, str]] = []
    for path in paths:
        mask = gt_dir / f"{path.stem}{GT_SUFFIX}.png" if gt_dir is not None else None
        try:
            image = read_header(path, "image")
            if mask is not None and mask.is_file():
                size = read_header(mask, "mask").shape
                if size != image.shape[:2]:
                    problems.append((mask, f"size {size} differs from image {path.name} {image.shape[:2]}"))
        except DataError as exc:
            problems.append((exc.path or path, exc.problem))
    if problems:
        raise DataError(
            paths[0].parent, f"{len(problems)} problem(s) in the input:\n" + format_problems(problems)
        )


def run(args: argparse.Namespace) -> list[dict]:
    check_image_size(args.image_size)
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold is a probability and must lie in (0, 1), got {args.threshold}")
    weights = (
        Path(args.pth_path)
        if args.pth_path
        else Path(args.model_path) / args.model_type / "model_best.pth.tar"
    )
    if not weights.is_file():
        raise ConfigError(f"no weights at {weights}: train first or pass --pth_path")
    state = load_checkpoint(weights)  # corrupted or unsafe files fail before anything else
    paths = list_images(args.input)
    gt_dir = Path(args.gt_dir) if args.gt_dir else None
    if gt_dir is not None and not gt_dir.is_dir():
        raise DataError(gt_dir, "--gt_dir is not a folder of <id>_segmentation.png masks")
    check_inputs(paths, gt_dir)
    device = select_device(args.device, args.device_id)
    model = build_network(args.model_type, t=args.t)
    load_weights(model, state, name=str(weights))
    del state

    def load(path: Path):
        image = read_image(path, "RGB")
        return preprocess(image, args.image_size), image

    def target_for(path: Path) -> np.ndarray | None:
        mask = gt_dir / f"{path.stem}{GT_SUFFIX}.png"
        return read_mask(mask) if mask.is_file() else None

    rows = predict_images(model, paths, load, args.output, device.device, threshold=args.threshold,
                          batch_size=args.batch_size, save_prob=args.save_prob,
                          target_for=target_for if gt_dir else None)  # fmt: skip
    out = Path(args.output)
    (out / "predictions.json").write_text(
        json.dumps({"weights": str(weights), "images": rows}, indent=1) + "\n"
    )
    dice = [r["dice"] for r in rows if r.get("dice") is not None]
    extra = f", mean Dice {np.mean(dice):.4f} over {len(dice)} image(s) with ground truth" if dice else ""
    print(f"Wrote masks and overlays of {len(rows)} image(s) to {out}{extra}")
    return rows


def main(argv: Sequence[str] | None = None, defaults: Mapping[str, Any] | None = None,
         prog: str | None = None) -> int:  # fmt: skip
    args = build_parser(defaults, prog).parse_args(argv)
    return status_of(lambda: run(args))
