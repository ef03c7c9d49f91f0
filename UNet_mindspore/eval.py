"""Evaluate a U-Net checkpoint on its fold's validation pages of ISBI 2012 and segment the test volume.

    python eval.py --data_url=/path/to/isbi2012/ --ckpt_path=ckpt_0/ckpt_unet_medical_adam-1_600.pth

Prints the original's line `============== Cross valid dice coeff is: {'dice_coeff': X}` (soft Dice over
both classes, comparable with MindSpore's 0.9086), then the hard membrane Dice and the rest, and writes to
--output_dir: summary.json (per slice and aggregated: dice_coeff, IoU, hard Dice pooled and per slice,
HD95), the ModelZoo `<CaseName>.log` of an `_eval` case, overlays of the validation pages, and, when a
test volume is found (test-volume.tif or test/images beside the data), `test-labels-pred.tif`: the
predicted labels page for page in the labels' convention (255 = cell interior, 0 = membrane) with overlays.

Image size, padding, classes and fold default to the values the checkpoint was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch
from src.config import FOLDS, cfg_unet
from src.data_loader import (
    PAD_MODES,
    center_crop,
    create_dataset,
    find_test_volume,
    load_test_pages,
    load_train_data,
    preprocess,
    resize,
)
from src.unet import UNetMedical, check_input_size, output_size
from src.utils import CELL, MEMBRANE, UnetMetrics

from common.checkpoint import load_checkpoint, load_weights
from common.cli import add_common_args, positive_int, run_main, setup_runtime
from common.datacheck import SKIPPED_LIST, skipped_count, skipped_note, write_skipped_list
from common.errors import ConfigError
from common.imageio import write_tiff_stack
from common.plots import save_overlays
from common.summary import RunSummary, SummaryTarget, write_summary

NETWORK = "UNet_mindspore"


def str2bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on", "false", "0", "no", "n", "off"):
        return value in ("true", "1", "yes", "y", "on")
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate a UNet checkpoint on the cross-validation fold (ISBI 2012)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-d", "--data_url", "--data_path", dest="data_url", default="data/")
    parser.add_argument("-p", "--ckpt_path", "--checkpoint_file_path", "--pth_path", dest="ckpt_path",
                        default="ckpt_unet_medical_adam-1_600.pth", help="checkpoint to evaluate")  # fmt: skip
    parser.add_argument("--cross_valid_ind", type=int, choices=range(FOLDS), default=None,
                        help="fold to validate on (default: the checkpoint's, else 1)")  # fmt: skip
    parser.add_argument("--image_size", type=positive_int, default=None, help="default: the checkpoint's")
    parser.add_argument("--pad_mode", choices=PAD_MODES, default=None, help="default: the checkpoint's")
    parser.add_argument("--num_classes", type=positive_int, default=None, help="default: the checkpoint's")
    parser.add_argument("--output_dir", default="outputs/eval", help="summary.json, overlays, predictions")
    parser.add_argument("--predict_test", type=str2bool, default=True,
                        help="also segment the test volume when one is found")  # fmt: skip
    parser.add_argument("--test_volume", default=None,
                        help="test-volume.tif or a folder of test pages (default: found beside --data_url)")  # fmt: skip
    parser.add_argument("--max_overlays", type=int, default=8, help="overlay pictures written per split")
    add_common_args(parser, seed=1, workers=0)
    return parser


def settings(args: argparse.Namespace, state: object) -> dict:
    """Flags first, then the configuration saved in the checkpoint, then src/config.py."""
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    saved = saved if isinstance(saved, dict) else {}
    out = {}
    for key in ("image_size", "pad_mode", "num_classes"):
        flag = getattr(args, key)
        out[key] = flag if flag is not None else saved.get(key, cfg_unet[key])
    fold = args.cross_valid_ind if args.cross_valid_ind is not None else saved.get("fold")
    out["cross_valid_ind"] = int(fold) if isinstance(fold, int) else cfg_unet["cross_valid_ind"]
    try:
        check_input_size(out["image_size"], out["image_size"])
    except ValueError as exc:
        raise ConfigError(f"--image_size: {exc}") from None
    return out


@torch.no_grad()
def predict_pages(model, pages: np.ndarray, image_size: int, pad_mode: str, runtime) -> np.ndarray:
    """Class map (N, H, W) of each page: the network's softmax at its output size, resized to the page."""
    labels = np.empty(pages.shape, np.uint8)
    for i, page in enumerate(pages):
        x, _ = preprocess(page, None, image_size, pad_mode)
        with runtime.amp.autocast():
            logits = model(torch.from_numpy(x)[None, None].to(runtime.device.device))
        prob = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        full = np.stack([resize(p, page.shape[0], page.shape[1]) for p in prob])
        labels[i] = full.argmax(0)
    return labels


def overlay_image(image: torch.Tensor, out_size: int) -> np.ndarray:
    """The network input's centre (the region the output covers) as uint8 for a picture."""
    x = center_crop(image[0].numpy(), out_size)
    return np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime = setup_runtime(args)
    if runtime.dist.world_size > 1:
        raise ConfigError("eval.py runs on one device; start it without torchrun")
    # Every input is read and checked before the model is built or anything is written.
    data = load_train_data(args.data_url, skip_bad=args.skip_bad_samples)
    for note in data.label_notes:
        print(f"warning: {note}", flush=True)
    out_dir = Path(args.output_dir)
    # The list goes beside this evaluation's summary (written at the end, with the other results).
    notes = [skipped_note(data.skipped, out_dir / SKIPPED_LIST)] if data.skipped else []
    for note in notes:
        print(note, flush=True)
    test_volume = Path(args.test_volume) if args.test_volume else find_test_volume(args.data_url)
    test_pages = load_test_pages(test_volume) if args.predict_test and test_volume is not None else None
    state = load_checkpoint(args.ckpt_path)
    cfg = settings(args, state)
    image_size, out_size, fold = cfg["image_size"], output_size(cfg["image_size"]), cfg["cross_valid_ind"]
    model = UNetMedical(n_channels=1, n_classes=cfg["num_classes"])
    load_weights(model, state, name=str(args.ckpt_path))
    runtime.amp.follow(state)
    state = None
    model.to(runtime.device.device).eval()
    _, val_set = create_dataset(data, fold, image_size, cfg["num_classes"], pad_mode=cfg["pad_mode"])
    print(
        f"Evaluating {args.ckpt_path} on fold {fold} (pages {val_set.pages}) of {data.source}: input "
        f"{image_size} -> output {out_size}, pad {cfg['pad_mode']}, {runtime.device.describe()}",
        flush=True,
    )
    print("============== Starting Evaluating ============", flush=True)
    metrics = UnetMetrics(compute_hd95=True)
    per_slice, pictures, preds, targets = [], [], [], []
    for index in range(len(val_set)):
        image, target = val_set[index]
        with torch.no_grad(), runtime.amp.autocast():
            logits = model(image[None].to(runtime.device.device))
        record = metrics.update(logits.float(), target[None])[0]
        record = {"page": val_set.names[index], **record}
        per_slice.append(record)
        print(
            f"page {record['page']}: single dice coeff is: {record['dice_coeff']}, IOU is: {record['iou']}, "
            f"hard_dice_membrane {record['hard_dice_membrane']:.4f}, hd95_membrane {record['hd95_membrane']:.2f}",
            flush=True,
        )
        pictures.append(overlay_image(image, out_size))
        preds.append(logits.float().argmax(1)[0].cpu().numpy() == MEMBRANE)
        targets.append(target.argmax(0).numpy() == MEMBRANE)
    result = metrics.compute()
    print(f"============== Cross valid dice coeff is: {{'dice_coeff': {result['dice_coeff']}}}")
    print(f"============== Cross valid IOU is: {result['iou']}")
    print(
        f"============== Hard Dice of the membrane class: {result['hard_dice_membrane']:.4f} per slice, "
        f"{result['hard_dice_membrane_pooled']:.4f} pooled; HD95 {result['hd95_membrane']:.2f} px; "
        f"hard Dice of the cell interior: {result['hard_dice_cell']:.4f}",
        flush=True,
    )
    save_overlays(pictures, preds, targets, [f"val_page{n}" for n in val_set.names], out_dir / "overlays",
                  args.max_overlays)  # fmt: skip
    details = {
        "checkpoint": str(args.ckpt_path),
        "data_url": str(data.source),
        "fold": fold,
        "image_size": image_size,
        "output_size": out_size,
        "pad_mode": cfg["pad_mode"],
        "metrics": result,
        "per_slice": per_slice,
        "label_convention": {"0": "membrane", "1": "cell interior (label value 255)"},
        "label_notes": data.label_notes,
    }
    if test_pages is not None:
        pages, names = test_pages
        labels = predict_pages(model, pages, image_size, cfg["pad_mode"], runtime)
        written = out_dir / "test-labels-pred.tif"
        write_tiff_stack(written, np.where(labels == CELL, 255, 0).astype(np.uint8))
        save_overlays(list(pages), list(labels == MEMBRANE), None, [f"test_page{n}" for n in names],
                      out_dir / "overlays", args.max_overlays)  # fmt: skip
        details["test_prediction"] = {"source": str(test_volume), "pages": len(names), "file": str(written)}
        print(f"Predicted {len(names)} test pages of {test_volume}: {written}", flush=True)
    target = SummaryTarget.from_env(out_dir, NETWORK, 1, 1, "eval")
    extra = {
        "IOU": f"{result['iou']:.4f}",
        "HardDiceMembrane": f"{result['hard_dice_membrane']:.4f}",
        "HD95Membrane": f"{result['hd95_membrane']:.2f}",
    }
    if data.skipped:
        write_skipped_list(out_dir, data.skipped)
    else:  # a list left by an earlier evaluation would contradict this one's summary
        (out_dir / SKIPPED_LIST).unlink(missing_ok=True)
    summary = RunSummary(train_accuracy=result["dice_coeff"], extra_lines=extra, details=details, notes=notes,
                         skipped_samples=skipped_count(data.skipped))  # fmt: skip
    write_summary(target, summary)
    print(f"Summary: {target.output_dir / 'summary.json'}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
