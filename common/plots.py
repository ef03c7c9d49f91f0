"""Pictures a user looks at: the training progress figure, curve comparisons and mask overlays.

Figures are drawn with matplotlib's object API on an Agg canvas, so importing this module never selects a
backend or touches pyplot's global state in the caller. Every file is written to a temporary name in the
target folder and moved into place with `os.replace`, so a crash or a concurrent reader never sees half a
PNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import ndimage

from common.imageio import write_png

PRED_COLOUR = (255, 0, 0)  # red: prediction fill and contour
TARGET_COLOUR = (0, 255, 0)  # green: ground-truth contour


@contextlib.contextmanager
def _atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would survive the rename and hide the picture from other users.
    tmp_path = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with _atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    return path


def _column(history: Sequence[dict], key: str) -> np.ndarray:
    """One value per epoch as float; missing keys, None and non-numbers become NaN (drawn as gaps)."""
    values = []
    for row in history:
        value = row.get(key)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            values.append(math.nan)
    return np.asarray(values, dtype=np.float64)


def _draw(ax, x: np.ndarray, y: np.ndarray, label: str | None = None, **kwargs) -> bool:
    """Plot with markers (a single epoch is otherwise invisible); False when there is nothing finite."""
    if not np.isfinite(y).any():
        return False
    ax.plot(x, y, marker="o", markersize=3, label=label, **kwargs)
    return True


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_progress(history: Sequence[dict], path: str | Path, metric_key: str, metric_label: str) -> Path:
    """Four panels (loss, validation metric, learning rate, epoch time) per epoch; returns the PNG path.

    `path` is either the PNG file or a folder, in which case `progress.png` is written inside it. Missing
    keys and NaN values leave gaps instead of failing, so a diverged or first epoch still draws.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path / "progress.png"
    epochs = _column(history, "epoch")
    fallback = np.arange(1, len(history) + 1, dtype=np.float64)
    epochs = np.where(np.isfinite(epochs), epochs, fallback)

    fig = Figure(figsize=(11, 7.5), dpi=100)
    axes = fig.subplots(2, 2)
    ax_loss, ax_metric, ax_lr, ax_time = axes.ravel()

    drawn = _draw(ax_loss, epochs, _column(history, "train_loss"), label="train")
    drawn |= _draw(ax_loss, epochs, _column(history, "val_loss"), label="validation")
    if drawn:
        ax_loss.legend(loc="best")
    else:
        _no_data(ax_loss)
    ax_loss.set_title("Loss")

    metric = _column(history, metric_key)
    if _draw(ax_metric, epochs, metric, color="tab:green"):
        best = int(np.nanargmax(metric))
        ax_metric.set_title(f"Validation {metric_label} (best {metric[best]:.4f} at epoch {epochs[best]:g})")
    else:
        _no_data(ax_metric)
        ax_metric.set_title(f"Validation {metric_label}")

    lr = _column(history, "lr")
    if _draw(ax_lr, epochs, lr, color="tab:orange"):
        finite = lr[np.isfinite(lr)]
        # Schedules span decades; a log axis keeps the tail readable, but only when it can be drawn.
        if (finite > 0).all() and finite.max() / finite.min() > 10:
            ax_lr.set_yscale("log")
    else:
        _no_data(ax_lr)
    ax_lr.set_title("Learning rate")

    if not _draw(ax_time, epochs, _column(history, "epoch_time"), color="tab:purple"):
        _no_data(ax_time)
    ax_time.set_title("Epoch time (s)")

    for ax in axes.ravel():
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    # Fixed margins: tight_layout measures every tick label and doubled the time of a per-epoch call.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.95, wspace=0.22, hspace=0.32)
    return _save_figure(fig, path)


def smooth(values: Sequence[float], window: int | None) -> np.ndarray | None:
    """Savitzky-Golay (order 1) smoothing, or None when it does not apply: no window, a window below 3,
    a series shorter than the window, or NaN/inf in it. An even window is widened by one."""
    if window is None or window < 3:
        return None
    window = window if window % 2 == 1 else window + 1
    y = np.asarray(values, dtype=np.float64)
    if len(y) < window or not np.isfinite(y).all():
        return None
    from scipy.signal import savgol_filter  # here: 1.6 s to import, and only loss-curve plots smooth

    return savgol_filter(y, window, 1)


def plot_curves(
    series: dict[str, Sequence[float]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    smooth_window: int | None = None,
) -> Path:
    """Line plot of named series against their index (1-based).

    With `smooth_window`, each series long enough and free of NaN is also drawn smoothed with a
    Savitzky-Golay filter of order 1 (an even window is widened by one); the raw values stay as a faint line.
    """
    path = Path(path)
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    for name, values in series.items():
        y = np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
        x = np.arange(1, len(y) + 1)
        smoothed = smooth(y, smooth_window)
        if smoothed is not None:
            line = ax.plot(x, y, alpha=0.3)[0]
            ax.plot(x, smoothed, color=line.get_color(), label=name)
        else:
            ax.plot(x, y, marker="o" if len(y) == 1 else None, markersize=3, label=name)
    if series:
        ax.legend(loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.1, top=0.93)
    return _save_figure(fig, path)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"overlay expects an (H,W) or (H,W,3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        # Float images are taken to be in [0,1]; anything else is clipped rather than wrapped.
        image = np.clip(np.nan_to_num(image.astype(np.float64)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image.copy()


def _as_mask(mask: np.ndarray | None, shape: tuple[int, int], what: str) -> np.ndarray | None:
    """bool as is, floats above 0.5 (probabilities), integers above 0 (0/1 or 0/255 masks)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise ValueError(f"overlay: {what} has shape {mask.shape}, the image is {shape}")
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.floating):
        return mask > 0.5
    return mask > 0


def _contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary: mask pixels with a background 4-neighbour (the image border counts as background)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(
    image: np.ndarray,
    pred: np.ndarray | None = None,
    target: np.ndarray | None = None,
    alpha: float = 0.4,
) -> np.ndarray:
    """RGB uint8 picture of `image` with the prediction (red fill and contour) and the target (green contour).

    Pixels outside both masks keep the image's values exactly.
    """
    rgb = _as_rgb(image)
    shape = rgb.shape[:2]
    pred_mask = _as_mask(pred, shape, "pred")
    target_mask = _as_mask(target, shape, "target")
    if pred_mask is not None and pred_mask.any():
        colour = np.asarray(PRED_COLOUR, dtype=np.float64)
        blended = (1.0 - alpha) * rgb[pred_mask].astype(np.float64) + alpha * colour
        rgb[pred_mask] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        rgb[_contour(pred_mask)] = PRED_COLOUR
    if target_mask is not None and target_mask.any():
        # Drawn last so the ground truth stays visible where the two boundaries coincide.
        rgb[_contour(target_mask)] = TARGET_COLOUR
    return rgb


def save_overlays(
    images: Sequence[np.ndarray],
    preds: Sequence[np.ndarray | None] | None,
    targets: Sequence[np.ndarray | None] | None,
    names: Sequence[str],
    out_dir: str | Path,
    max_items: int = 8,
) -> list[Path]:
    """Write `<name>_overlay.png` for the first `max_items` images; returns the written paths."""
    out_dir = Path(out_dir)
    written = []
    for i, (image, name) in enumerate(zip(images, names)):
        if i >= max_items:
            break
        pred = None if preds is None else preds[i]
        target = None if targets is None else targets[i]
        # Only the last path component: a name must not write outside out_dir.
        stem = Path(str(name)).name
        path = out_dir / f"{stem}_overlay.png"
        write_png(path, overlay(image, pred, target))
        written.append(path)
    return written
