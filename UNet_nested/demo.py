"""Segment nuclei with a trained UNet / UNet++ and write masks and overlays (default: the validation split).

    python demo.py --resume models/dsb2018_96_UNet_woDS/model_best.pth.tar
    python demo.py --resume model_best.pth.tar --input my_images/ --output outputs/UNet_Demo

Per image, `<id>_mask.png` (0/255, at the image's own size) and `<id>_overlay.png` (prediction in red,
ground truth contour in green when known) go to `--output` (default outputs/UNet_Demo/). Without
`--input`, the validation images of the checkpoint's training data are used; with `--input` a folder in
the prepared layout (`images/` + `masks/0/` or `masks/`), every image in it. Where masks are known each
image's Dice and IoU are printed, then the mean IoU over images and the reference's batch-pooled IoU
(batches of `--iou_batch` in the listed order), both at the images' own size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
from dataset import find_samples
from inference import add_model_args, image_loader, load_model, validation_samples
from iou import REFERENCE_BATCH, batch_pooled_iou, per_image_iou

from common.cli import positive_int, run_main
from common.datacheck import check_pairs, format_problems
from common.errors import DataError
from common.imageio import read_image, read_mask
from common.predict2d import list_images, predict_images


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1) (a sigmoid probability), got {text}")
    return value


def check_inputs(paths: list[Path], masks: dict[Path, Path]) -> None:
    """Decode every input (and its mask) first: one DataError lists every bad file before any output
    is written, so a damaged file never leaves a half-written output folder."""
    if masks:
        check_pairs([(p.stem, p, masks[p]) for p in paths], read_image, read_mask)
        return
    problems = []
    for path in paths:
        try:
            read_image(path, "RGB")
        except DataError as exc:
            problems.append((exc.path or path, exc.problem))
    if problems:
        raise DataError(
            None,
            f"{len(problems)} of {len(paths)} input image(s) cannot be read:\n" + format_problems(problems),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--input", default=None, help="image file or folder (default: the validation split)")
    parser.add_argument("--output", default="outputs/UNet_Demo")
    parser.add_argument("--threshold", type=probability, default=0.5, help="foreground where sigmoid > this")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--save_prob", action="store_true", help="also write <id>_prob.png")
    parser.add_argument("--iou_batch", type=positive_int, default=REFERENCE_BATCH,
                        help="batch of the reference's batch-pooled IoU")  # fmt: skip
    args = parser.parse_args(argv)
    model, settings = load_model(args)
    if args.input and (Path(args.input) / "images").is_dir():  # a dataset folder: score every image
        samples = find_samples(args.input, settings["img_ext"], settings["mask_ext"])
        paths, masks = [s[1] for s in samples], {s[1]: s[2] for s in samples}
    elif args.input:
        paths, masks = list_images(args.input), {}
    else:
        samples = validation_samples(settings)
        paths, masks = [s[1] for s in samples], {s[1]: s[2] for s in samples}
    check_inputs(paths, masks)
    rows = predict_images(
        model, paths, image_loader(settings), args.output, "cpu", threshold=args.threshold,
        batch_size=args.batch_size, save_prob=args.save_prob,
        target_for=(lambda p: read_mask(masks[p]) if p in masks else None) if masks else None,
    )  # fmt: skip
    out = Path(args.output)
    (out / "predictions.json").write_text(json.dumps(rows, indent=1) + "\n")
    scored = [r for r in rows if r.get("dice") is not None]
    for row in rows:
        score = ""
        if row.get("dice") is not None:
            score = f"  Dice {row['dice']:.4f}  IoU {per_image_iou(row['intersection'], row['union']):.4f}"
        print(f"{Path(row['image']).name}: foreground {row['foreground_fraction']:.1%}{score}")
    print(f"wrote {len(rows)} masks and overlays to {out}")
    if scored:
        ious = [per_image_iou(r["intersection"], r["union"]) for r in scored]
        pooled = batch_pooled_iou(
            [r["intersection"] for r in scored], [r["union"] for r in scored], args.iou_batch
        )
        print(
            f"{len(scored)} images scored: mean Dice {sum(r['dice'] for r in scored) / len(scored):.4f}, "
            f"IoU {sum(ious) / len(ious):.4f} per image, {pooled:.4f} batch-pooled (batches of {args.iou_batch})"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
