"""Masks and overlays for a folder of images with a trained ISIC network (the reference had no predict).

    python predict.py --input some/images --output predictions [--pth_path models/AttU_Net/model_best.pth.tar]

Per image: `<stem>_mask.png` (0/255, at the image's own size), `<stem>_overlay.png` (prediction in red,
ground truth contour in green when --gt_dir holds `<stem>_segmentation.png`) and, with --save_prob, the
probability map. `predictions.json` lists every file with its foreground fraction (and Dice with --gt_dir).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common.checkpoint import load_weights
from common.device import DEVICE_CHOICES, select_device
from common.errors import ConfigError, ModelZooError
from common.imageio import read_image, read_mask
from common.isic.dataset import check_image_size, preprocess
from common.isic.prepare import GT_SUFFIX
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
    parser.add_argument("--t", type=int, default=3, help="recurrent steps of the R2 models")
    parser.add_argument("--image_size", type=int, default=224, help="the size the network was trained at")
    parser.add_argument("--model_path", default="./models", help="where main.py wrote <model_type>/")
    parser.add_argument(
        "--pth_path", default="", help="weights (default <model_path>/<model_type>/model_best.pth.tar)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="foreground where sigmoid(logit) > this")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--gt_dir", default="", help="folder of <stem>_segmentation.png for contours and Dice"
    )
    parser.add_argument("--save_prob", action="store_true", help="also write <stem>_prob.png")
    parser.add_argument("--device", default="auto", type=str.lower, choices=DEVICE_CHOICES)
    parser.add_argument("--device_id", "--cuda_idx", "--npu_idx", dest="device_id", type=int, default=None)
    if defaults:
        parser.set_defaults(**dict(defaults))
    return parser


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
    device = select_device(args.device, args.device_id)
    model = build_network(args.model_type, t=args.t)
    load_weights(model, weights)
    paths = list_images(args.input)
    gt_dir = Path(args.gt_dir) if args.gt_dir else None

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
    try:
        run(args)
    except ModelZooError as exc:
        print(f"[Error] {exc}", flush=True)
        return 1
    return 0
