from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy.signal import savgol_filter

from common.plots import overlay, plot_curves, plot_progress, save_overlays, smooth

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n: int, nan_at: int | None = None) -> list[dict]:
    rows = []
    for e in range(1, n + 1):
        rows.append(
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "val_loss": 1.2 / e,
                "dice_mean": 0.5 + 0.05 * e,
                "lr": 1e-3 * 0.5**e,
                "epoch_time": 10.0 + e,
            }
        )
    if nan_at is not None:
        rows[nan_at]["train_loss"] = math.nan
        rows[nan_at]["dice_mean"] = float("nan")
    return rows


def _assert_png(path, min_size=(400, 300)):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
    assert path.stat().st_size > 5_000  # four panels with axes and text, not an empty canvas


@pytest.mark.parametrize(
    "history",
    [
        _history(1),
        _history(5),
        _history(5, nan_at=2),
        # val_loss missing everywhere, the metric missing in one epoch, lr None
        [{"epoch": 1, "train_loss": 0.9, "lr": None, "epoch_time": 3.0}, {"epoch": 2, "train_loss": 0.7}],
    ],
    ids=["1-epoch", "5-epochs", "nan", "missing-keys"],
)
def test_plot_progress_writes_png(tmp_path, history):
    out = plot_progress(history, tmp_path, "dice_mean", "Dice")
    assert out == tmp_path / "progress.png"
    _assert_png(out)
    # No temporary files are left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["progress.png"]


def test_plot_progress_explicit_file_and_overwrite(tmp_path):
    target = tmp_path / "sub" / "curves.png"
    plot_progress(_history(2), target, "dice_mean", "Dice")
    first = target.read_bytes()
    plot_progress(_history(4), target, "dice_mean", "Dice")
    assert target.read_bytes() != first
    _assert_png(target)


def test_overlay_shape_dtype_and_colours():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(20, 24), dtype=np.uint8)
    pred = np.zeros((20, 24), bool)
    pred[5:12, 6:15] = True
    target = np.zeros((20, 24), bool)
    target[8:16, 10:20] = True

    out = overlay(image, pred, target, alpha=0.4)
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8

    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float64)
    outside = ~pred & ~target
    np.testing.assert_array_equal(out[outside], rgb[outside].astype(np.uint8))

    # Prediction interior (not on either contour): the alpha blend towards red, computed independently.
    interior = np.zeros_like(pred)
    interior[6:11, 7:14] = True
    interior &= ~target
    expected = np.round(0.6 * rgb[interior] + 0.4 * np.array([255.0, 0.0, 0.0]))
    np.testing.assert_allclose(out[interior].astype(np.float64), expected, atol=1)
    assert (out[interior][:, 0] >= rgb[interior][:, 0] - 1).all()

    # Contours: the prediction's border is red, the target's border is green.
    assert (out[5, 6:10] == [255, 0, 0]).all()
    assert (out[15, 10:20] == [0, 255, 0]).all()
    assert (out[8:16, 19] == [0, 255, 0]).all()
    # Target interior that the prediction does not cover stays untouched.
    np.testing.assert_array_equal(out[14, 16], rgb[14, 16].astype(np.uint8))


def test_overlay_empty_masks_and_input_kinds():
    image = np.linspace(0, 1, 12 * 10).reshape(12, 10)
    out = overlay(image)
    np.testing.assert_array_equal(out[..., 0], np.round(image * 255).astype(np.uint8))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()

    colour = np.random.default_rng(1).integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    empty = np.zeros((8, 9), bool)
    np.testing.assert_array_equal(overlay(colour, empty, empty), colour)

    with pytest.raises(ValueError, match="shape"):
        overlay(colour, np.zeros((9, 8), bool))


def test_overlay_mask_touching_border_has_contour():
    image = np.zeros((6, 6), np.uint8)
    pred = np.ones((6, 6), bool)  # everything: only the image border is a contour
    out = overlay(image, pred, alpha=0.5)
    assert (out[0] == [255, 0, 0]).all() and (out[:, -1] == [255, 0, 0]).all()
    assert (out[2:4, 2:4] == [128, 0, 0]).all()


def test_save_overlays(tmp_path):
    images = [np.full((10, 10), i * 40, np.uint8) for i in range(4)]
    preds = [np.eye(10, dtype=bool)] * 4
    paths = save_overlays(images, preds, None, [f"case{i}" for i in range(4)], tmp_path / "ov", max_items=3)
    assert [p.name for p in paths] == ["case0_overlay.png", "case1_overlay.png", "case2_overlay.png"]
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            arr = np.asarray(img)
        np.testing.assert_array_equal(arr, overlay(images[i], preds[i]))
    assert sorted(q.name for q in (tmp_path / "ov").iterdir()) == [p.name for p in paths]


@pytest.mark.parametrize("window", [None, 5, 6, 50])
def test_plot_curves(tmp_path, window):
    rng = np.random.default_rng(2)
    series = {
        "AttU_Net": list(np.exp(-np.arange(30) / 10) + rng.normal(0, 0.05, 30)),
        "R2U_Net": list(np.exp(-np.arange(30) / 8)),
        "short": [0.5],
        "with-nan": [1.0, float("nan"), 0.8, 0.7, 0.6, 0.5],
    }
    out = plot_curves(series, tmp_path / "loss.png", "epoch", "loss", "Loss curves", smooth_window=window)
    assert out == tmp_path / "loss.png"
    _assert_png(out)


def test_smooth():
    line = np.linspace(3.0, -1.0, 20)
    # Order-1 Savitzky-Golay reproduces a straight line exactly, noise is reduced.
    np.testing.assert_allclose(smooth(line, 5), line, atol=1e-12)
    noisy = line + np.random.default_rng(3).normal(0, 0.2, 20)
    out = smooth(noisy, 6)  # even: widened to 7
    np.testing.assert_allclose(out, savgol_filter(noisy, 7, 1))
    assert np.abs(out - line).mean() < np.abs(noisy - line).mean()
    assert smooth(line, None) is None
    assert smooth(line, 2) is None
    assert smooth(line[:4], 5) is None
    assert smooth([1.0, float("nan"), 2.0, 3.0, 4.0], 3) is None
