"""Folder-in, PNG-out inference for the 2-D models: the body of every 2-D `predict.py` and demo.

Users of the original repositories kept asking how to save masks (LeeJunHyun/Image_Segmentation#15, #28,
#70; 4uiiurz1/pytorch-nested-unet#14, #53); this writes, per image, the binary mask at the image's own size,
an overlay to look at, and optionally the probability map.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError, DataError
from common.imageio import write_png
from common.plots import overlay

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(folder_or_file: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files of a folder (not recursive, hidden files skipped), sorted; or the one file given."""
    root = Path(folder_or_file)
    allowed = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    wanted = ", ".join(sorted(allowed))
    if root.is_file():
        if root.suffix.lower() not in allowed:
            raise DataError(root, f"not an image file this script reads (extensions: {wanted})")
        return [root]
    if not root.is_dir():
        raise DataError(root, "no such file or folder")
    paths = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in allowed
    )
    if not paths:
        raise DataError(root, f"the folder holds no images (extensions: {wanted})")
    return paths


def _autocast_context(autocast: Any, device: torch.device) -> contextlib.AbstractContextManager:
    """None: fp32. A torch.dtype: torch.autocast with it. An object with `.autocast()` (common.amp's) or a
    callable returning a context manager: that."""
    if autocast is None or autocast is False:
        return contextlib.nullcontext()
    if isinstance(autocast, torch.dtype):
        return torch.autocast(device_type=device.type, dtype=autocast)
    if hasattr(autocast, "autocast"):
        return autocast.autocast()
    return autocast()


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """`<stem>`, made unique when two inputs share a stem (a.png and a.jpg, or equal names in two folders)."""
    stems = [p.stem for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    unique = [f"{p.stem}_{p.suffix.lstrip('.')}" if counts[p.stem] > 1 else p.stem for p in paths]
    seen: dict[str, int] = {}
    result = []
    for name in unique:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return result


def _binary(mask: np.ndarray) -> np.ndarray:
    """bool as is; floats above 0.5 (as the metrics binarise targets); integers above 0 (0/1 or 0/255)."""
    if mask.dtype == bool:
        return mask
    return mask > 0.5 if np.issubdtype(mask.dtype, np.floating) else mask > 0


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    """2|P∩T| / (|P| + |T|); two empty masks agree perfectly (1.0)."""
    inter = int(np.count_nonzero(pred & target))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(target))
    return 1.0 if total == 0 else 2.0 * inter / total


def _display_size(image: np.ndarray, path: Path) -> tuple[int, int]:
    if image.ndim not in (2, 3):
        raise DataError(path, f"the display image has shape {image.shape}; expected (H,W) or (H,W,3)")
    return int(image.shape[0]), int(image.shape[1])


def predict_images(
    model: nn.Module,
    paths: Sequence[Path],
    load: Callable[[Path], tuple[torch.Tensor, np.ndarray]],
    out_dir: str | Path,
    device: torch.device | str,
    threshold: float = 0.5,
    batch_size: int = 8,
    autocast: Any = None,
    save_prob: bool = False,
    target_for: Callable[[Path], np.ndarray | None] | None = None,
) -> list[dict]:
    """Segment each image of `paths` and write `<stem>_mask.png` (0/255) and `<stem>_overlay.png` to `out_dir`.

    Args:
        model: a binary segmentation network (1 or 2 output channels, or a deep-supervision list); it is
            moved to `device` and run in eval mode, its train/eval mode is restored afterwards.
        load: `path -> (input tensor (C,H,W), display image uint8 (H0,W0) or (H0,W0,3))`; the mask is
            resized back (nearest) from the network's (H,W) to the display image's (H0,W0).
        threshold: foreground where sigmoid(foreground logit) > threshold.
        batch_size: images with equal input shapes are batched together, up to this many.
        autocast: None (fp32), a torch.dtype, a `common.amp` object, or a callable returning a context.
        save_prob: also write `<stem>_prob.png`, the probability scaled to 0..255.
        target_for: `path -> bool mask (H0,W0) or None`; when given, the ground-truth contour is drawn and
            the per-image Dice (empty/empty = 1.0) is reported.

    Returns:
        One dict per input, in input order: "image", "mask", "overlay" (and "prob") as path strings,
        "foreground_fraction", and "dice" (None for an image without a target) when `target_for` is given.
    """
    # The same output-to-logit rule as validation, so predict and eval agree on 1- and 2-channel heads.
    from common.metrics import foreground_logit

    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    stems = _output_stems(paths)
    rows: list[dict | None] = [None] * len(paths)
    # Pending inputs per input shape; a full group runs at once, so memory stays at one batch per shape.
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor, np.ndarray]]] = {}

    def finish(index: int, prob: torch.Tensor, image: np.ndarray) -> None:
        path = paths[index]
        size = _display_size(image, path)
        prob = F.interpolate(prob[None, None], size=size, mode="nearest")[0, 0].numpy()
        mask = prob > threshold
        target = None if target_for is None else target_for(path)
        if target is not None:
            target = np.asarray(target)
            if target.shape[:2] != size:
                raise DataError(path, f"the target mask has shape {target.shape}, the image is {size}")
            target = _binary(target if target.ndim == 2 else target[..., 0])
        stem = stems[index]
        row = {
            "image": str(path),
            "mask": str(out_dir / f"{stem}_mask.png"),
            "overlay": str(out_dir / f"{stem}_overlay.png"),
            "foreground_fraction": float(mask.mean()) if mask.size else 0.0,
        }
        write_png(row["mask"], mask.astype(np.uint8) * 255)
        write_png(row["overlay"], overlay(image, mask, target))
        if save_prob:
            row["prob"] = str(out_dir / f"{stem}_prob.png")
            write_png(row["prob"], np.clip(np.nan_to_num(prob) * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if target_for is not None:
            row["dice"] = None if target is None else _dice(mask, target)
            if target is not None:  # for scores pooled over images (a batch-pooled IoU)
                row["intersection"] = int(np.count_nonzero(mask & target))
                row["union"] = int(np.count_nonzero(mask | target))
        rows[index] = row

    def run(group: list[tuple[int, torch.Tensor, np.ndarray]]) -> None:
        batch = torch.stack([x for _, x, _ in group]).to(device=device, dtype=torch.float32)
        with _autocast_context(autocast, device):
            output = model(batch)
        probs = torch.sigmoid(foreground_logit(output).float()).cpu()
        for (index, _, image), prob in zip(group, probs):
            finish(index, prob, image)

    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            for index, path in enumerate(paths):
                x, image = load(path)
                if not isinstance(x, torch.Tensor) or x.ndim != 3:
                    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise DataError(path, f"the loader returned an input of shape {got}; expected (C,H,W)")
                group = pending.setdefault(tuple(x.shape), [])
                group.append((index, x, np.asarray(image)))
                if len(group) >= batch_size:
                    run(pending.pop(tuple(x.shape)))
            for group in pending.values():
                run(group)
    finally:
        model.train(was_training)
    return [row for row in rows if row is not None]
