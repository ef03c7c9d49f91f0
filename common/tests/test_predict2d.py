from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.errors import DataError
from common.plots import overlay
from common.predict2d import list_images, predict_images


def _threshold_net(channels: int = 1) -> nn.Module:
    """logit = x - 0.5 (1 channel), or the two-class pair (0, x - 0.5): foreground exactly where x > 0.5."""
    net = nn.Conv2d(1, channels, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[-1] = 1.0
        net.bias[-1] = -0.5
    return net


def _write_images(folder: Path) -> dict[str, np.ndarray]:
    """Two sizes; no pixel value near 127.5, so the threshold is never a float tie."""
    rng = np.random.default_rng(0)
    images = {}
    for name, shape in (("b_small", (12, 16)), ("a_large", (20, 14)), ("c_small", (12, 16))):
        img = rng.choice(np.array([0, 40, 100, 160, 220, 255], np.uint8), size=shape)
        Image.fromarray(img).save(folder / f"{name}.png")
        images[name] = img
    return images


def _load_native(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    image = np.asarray(Image.open(path).convert("L"))
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None], image


def _load_half(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """The network sees every second pixel; the mask must come back at the full size."""
    image = np.asarray(Image.open(path).convert("L"))
    return torch.from_numpy(image[::2, ::2].astype(np.float32) / 255.0)[None], image


def _read(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.mark.parametrize("channels", [1, 2])
def test_masks_at_original_size(tmp_path, channels):
    src = tmp_path / "in"
    src.mkdir()
    images = _write_images(src)
    paths = list_images(src)
    assert [p.stem for p in paths] == ["a_large", "b_small", "c_small"]

    model = _threshold_net(channels).train()
    batches = []
    model.register_forward_hook(lambda m, inputs, out: batches.append(tuple(inputs[0].shape)))
    rows = predict_images(model, paths, _load_native, tmp_path / "out", "cpu", batch_size=2, save_prob=True)
    assert model.training  # mode restored
    # The two 12x16 images share a batch; the 20x14 one runs alone at the end.
    assert batches == [(2, 1, 12, 16), (1, 1, 20, 14)]
    assert [Path(r["image"]).stem for r in rows] == ["a_large", "b_small", "c_small"]
    for row in rows:
        stem = Path(row["image"]).stem
        expected = images[stem] > 127
        mask = _read(row["mask"])
        assert Path(row["mask"]).name == f"{stem}_mask.png"
        assert mask.shape == expected.shape and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, expected.astype(np.uint8) * 255)
        assert row["foreground_fraction"] == pytest.approx(expected.mean())
        np.testing.assert_array_equal(_read(row["overlay"]), overlay(images[stem], expected))
        prob = 1.0 / (1.0 + np.exp(-(images[stem] / 255.0 - 0.5)))
        np.testing.assert_allclose(_read(row["prob"]), np.round(prob * 255), atol=1)
        assert "dice" not in row


def test_mask_resized_back_and_dice(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    images = _write_images(src)
    targets = {name: img > 127 for name, img in images.items()}
    targets["b_small"] = np.zeros_like(targets["b_small"])  # a wrong target: dice must drop
    paths = list_images(src)

    rows = predict_images(
        _threshold_net(),
        paths,
        _load_half,
        tmp_path / "out",
        torch.device("cpu"),
        target_for=lambda p: None if p.stem == "c_small" else targets[p.stem],
    )
    for row in rows:
        stem = Path(row["image"]).stem
        image = images[stem]
        # Nearest upsampling by exactly 2 repeats each low-resolution pixel in a 2x2 block.
        low = image[::2, ::2] > 127
        expected = np.repeat(np.repeat(low, 2, axis=0), 2, axis=1)[: image.shape[0], : image.shape[1]]
        mask = _read(row["mask"]) > 0
        assert mask.shape == image.shape
        np.testing.assert_array_equal(mask, expected)

        if stem == "c_small":
            assert row["dice"] is None
            continue
        target = targets[stem]
        inter = np.logical_and(expected, target).sum()
        dice = 2 * inter / (expected.sum() + target.sum()) if expected.sum() + target.sum() else 1.0
        assert row["dice"] == pytest.approx(dice)
        np.testing.assert_array_equal(_read(row["overlay"]), overlay(image, expected, target))
    by_stem = {Path(r["image"]).stem: r["dice"] for r in rows}
    assert by_stem["b_small"] == 0.0 and 0.0 < by_stem["a_large"] < 1.0


def test_threshold_and_duplicate_stems(tmp_path):
    img = np.array([[0, 100], [160, 255]], np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    Image.fromarray(img).save(tmp_path / "x.bmp")
    paths = list_images(tmp_path)
    rows = predict_images(_threshold_net(), paths, _load_native, tmp_path / "out", "cpu", threshold=0.6)
    # sigmoid(x - 0.5) > 0.6  <=>  x > 0.5 + logit(0.6) ~ 0.905, i.e. only the 255 pixel.
    names = sorted(Path(r["mask"]).name for r in rows)
    assert names == ["x_bmp_mask.png", "x_png_mask.png"]
    for row in rows:
        np.testing.assert_array_equal(_read(row["mask"]), [[0, 0], [0, 255]])


def test_bad_loader_output_names_file(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "flat.png")
    with pytest.raises(DataError, match="flat.png"):
        predict_images(
            _threshold_net(),
            list_images(tmp_path),
            lambda p: (torch.zeros(4, 4), np.zeros((4, 4), np.uint8)),
            tmp_path / "out",
            "cpu",
        )


def test_list_images(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.tiff", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.tiff"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    assert [p.name for p in list_images(tmp_path, extensions=("png",))] == ["b.PNG"]

    with pytest.raises(DataError, match="missing"):
        list_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty") as info:
        list_images(empty)
    assert info.value.path == empty
    with pytest.raises(DataError, match="notes.txt"):
        list_images(tmp_path / "notes.txt")


@pytest.mark.parametrize("kind", ["dtype", "callable"])
def test_autocast_paths(tmp_path, kind):
    img = np.array([[0, 40], [220, 255]], np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    entered = []

    def context():
        entered.append(True)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    autocast = torch.bfloat16 if kind == "dtype" else context
    rows = predict_images(
        _threshold_net(), list_images(tmp_path), _load_native, tmp_path / "out", "cpu", autocast=autocast
    )
    np.testing.assert_array_equal(_read(rows[0]["mask"]), [[0, 0], [255, 255]])
    assert entered == ([] if kind == "dtype" else [True])
