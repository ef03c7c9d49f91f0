"""The data pipeline: file pairing, the seeded split, the decoded cache, augmentation and tensors."""

from __future__ import annotations

import dataset as ds
import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import ConfigError, DataError

MEAN = np.array(ds.IMAGENET_MEAN, np.float32)
STD = np.array(ds.IMAGENET_STD, np.float32)


def _write_prepared(root, n: int = 6, size: int = 32, mask_dir: str = "masks/0", seed: int = 0):
    """n grey-on-black images whose mask is the bright square: pixel value 200 inside, 20 outside."""
    gen = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / mask_dir).mkdir(parents=True)
    masks = {}
    for i in range(n):
        mask = np.zeros((size, size), bool)
        top, left = gen.integers(0, size // 2, size=2)
        mask[top : top + size // 3, left : left + size // 4] = True
        image = np.where(mask, 200, 20).astype(np.uint8)
        image = np.stack([image, image // 2 + 5 * i, image], axis=2)
        Image.fromarray(image, "RGB").save(root / "images" / f"id{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(root / mask_dir / f"id{i:02d}.png")
        masks[f"id{i:02d}"] = mask
    return masks


def test_split_is_the_seeded_80_20_split_of_sorted_ids():
    ids = [f"{i:04x}" for i in range(670)]
    train, val = ds.split_ids(ids)
    assert (len(train), len(val)) == (536, 134)  # the reference's 536 / 134
    assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
    shuffled = list(reversed(ids))
    assert ds.split_ids(shuffled) == (train, val)  # listing order no longer matters
    # sklearn's ShuffleSplit: n_test = ceil(0.2 n); test = first n_test of RandomState(41).permutation(n)
    perm = np.random.RandomState(41).permutation(50)
    small = [f"s{i:02d}" for i in range(50)]
    train50, val50 = ds.split_ids(small[::-1])
    assert val50 == [small[i] for i in perm[:10]] and train50 == [small[i] for i in perm[10:]]
    assert ds.split_ids(small, random_state=7)[1] != val50
    with pytest.raises(ConfigError, match="at least 2 images"):
        ds.split_ids(["only"])
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        ds.split_ids(small, test_size=1.0)


def test_find_samples_pairs_by_id_and_lists_every_problem(tmp_path):
    _write_prepared(tmp_path / "a", n=3)
    pairs = ds.find_samples(tmp_path / "a")
    assert [p[0] for p in pairs] == ["id00", "id01", "id02"]
    assert pairs[0][2] == tmp_path / "a" / "masks" / "0" / "id00.png"
    _write_prepared(tmp_path / "b", n=2, mask_dir="masks")  # masks/ without the class folder
    assert len(ds.find_samples(tmp_path / "b")) == 2
    (tmp_path / "a" / "images" / "extra.png").write_bytes(b"")
    (tmp_path / "a" / "masks" / "0" / "id01.png").unlink()
    with pytest.raises(DataError) as info:
        ds.find_samples(tmp_path / "a")
    message = str(info.value)
    assert "extra.png: image has no mask" in message and "id01.png: image has no mask" in message
    with pytest.raises(DataError, match="set --img_ext"):
        ds.find_samples(tmp_path / "b", img_ext=".jpg")
    with pytest.raises(DataError, match="images folder not found"):
        ds.find_samples(tmp_path / "nothing")


def test_custom_extensions(tmp_path):
    _write_prepared(tmp_path, n=2)
    for path in (tmp_path / "masks" / "0").iterdir():
        path.rename(path.with_name(path.stem + "_mask.png"))
    pairs = ds.find_samples(tmp_path, mask_ext="_mask.png")
    assert [p[0] for p in pairs] == ["id00", "id01"]


def test_cache_rows_are_the_decoded_files_and_validation_normalises_once(tmp_path):
    masks = _write_prepared(tmp_path, n=4, size=32)
    samples = ds.find_samples(tmp_path)
    images, mask_map = ds.cached_arrays(samples, 32, 32, 3, log=lambda _: None)
    assert images.shape == (4, 32, 32, 3) and mask_map.shape == (4, 32, 32)
    assert (tmp_path / ".cache").is_dir()
    data = ds.NucleiDataset(images, mask_map, [2, 0], ["id02", "id00"])
    x, y = data[0]  # an integer key: no augmentation
    raw = np.array(Image.open(tmp_path / "images" / "id02.png")).astype(np.float32)
    expected = ((raw / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert x.abs().max() > 1.0  # standardised once, not divided by 255 again (reference bug)
    assert y.dtype == torch.float32 and y.shape == (1, 32, 32)
    np.testing.assert_array_equal(y[0].numpy(), masks["id02"].astype(np.float32))
    # A second call reuses the cache files.
    stamp = (tmp_path / ".cache" / "nested_unet_images_32x32_c3.npy").stat().st_mtime_ns
    ds.cached_arrays(samples, 32, 32, 3, log=lambda _: pytest.fail("cache rebuilt"))
    assert (tmp_path / ".cache" / "nested_unet_images_32x32_c3.npy").stat().st_mtime_ns == stamp


def test_cache_resizes_to_the_training_size_and_checks_files_first(tmp_path):
    _write_prepared(tmp_path, n=3, size=64)
    samples = ds.find_samples(tmp_path)
    images, masks = ds.cached_arrays(samples, 32, 48, 1, log=lambda _: None)
    assert images.shape == (3, 32, 48, 1) and masks.shape == (3, 32, 48)
    assert set(np.unique(np.asarray(masks[0]))) <= {0, 1}
    (tmp_path / "images" / "id01.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="id01.png: cannot decode"):
        ds.cached_arrays(ds.find_samples(tmp_path), 32, 32, 3, log=lambda _: None)


def _damage(root):
    """Truncate id01's image, remove id03's mask; returns the two files a message must name."""
    image = root / "images" / "id01.png"
    image.write_bytes(image.read_bytes()[:60])
    (root / "masks" / "0" / "id03.png").unlink()
    return image, root / "images" / "id03.png"


def test_bad_samples_are_refused_by_default_every_file_named(tmp_path):
    _write_prepared(tmp_path, n=6)
    truncated, lonely = _damage(tmp_path)
    with pytest.raises(DataError) as info:
        ds.list_samples(tmp_path, skip_bad=False)
    assert f"{lonely}: image has no mask" in str(info.value) and "--skip_bad_samples" in str(info.value)
    samples, _ = ds.list_samples(tmp_path, skip_bad=True)
    with pytest.raises(DataError) as info:
        ds.check_samples(samples, 32, 32, 3, log=lambda _: None, skip_bad=False)
    message = str(info.value)
    assert f"{truncated}: cannot decode" in message and "1 problem(s) in 1 file(s) out of 5 pairs" in message
    assert "--skip_bad_samples" in message
    assert not list(tmp_path.rglob("*.npy"))


def test_bad_samples_are_left_out_and_returned_with_skip_bad(tmp_path):
    masks = _write_prepared(tmp_path, n=6)
    truncated, lonely = _damage(tmp_path)
    samples, unpaired = ds.list_samples(tmp_path, skip_bad=True)
    assert [(b.id, b.path, b.problem) for b in unpaired] == [("id03", str(lonely), "image has no mask")]
    kept, unreadable = ds.check_samples(samples, 32, 32, 3, log=lambda _: None, skip_bad=True)
    assert [b.id for b in unreadable] == ["id01"] and unreadable[0].path == str(truncated)
    assert [s[0] for s in kept] == ["id00", "id02", "id04", "id05"]
    images, mask_map = ds.cached_arrays(kept, 32, 32, 3, log=lambda _: None, checked=True)
    assert images.shape[0] == 4
    np.testing.assert_array_equal(np.asarray(mask_map[1]).astype(bool), masks["id02"])
    # The cache of exactly these samples is valid now: nothing is decoded again.
    again = ds.check_samples(kept, 32, 32, 3, log=lambda _: pytest.fail("decoded again"), skip_bad=False)
    assert again == (kept, [])


def test_training_augmentation_is_seeded_and_keeps_image_and_mask_aligned(tmp_path):
    _write_prepared(tmp_path, n=3, size=32)
    images, masks = ds.cached_arrays(ds.find_samples(tmp_path), 32, 32, 3, log=lambda _: None)
    data = ds.NucleiDataset(images, masks, [0, 1, 2], ["id00", "id01", "id02"], seed=3)
    variants = set()
    for epoch in range(12):
        x, y = data[(epoch, 1)]
        x2, y2 = data[(epoch, 1)]
        assert torch.equal(x, x2) and torch.equal(y, y2)  # same key, same sample
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
        # Undo the normalisation: the brightest channel of foreground pixels (200 before the colour op, which
        # moves it by at most about 50) stays above 120, the background's (20) below it, wherever the
        # geometric ops moved them.
        pixels = x.numpy().transpose(1, 2, 0) * STD + MEAN
        value = pixels.max(axis=2) * 255
        np.testing.assert_array_equal(value > 120, y[0].numpy() > 0.5)
        variants.add(y.numpy().tobytes())
    assert len(variants) > 3  # rotations and flips happen


def test_colour_ops_follow_albumentations():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rng = np.random.default_rng(0)
    beta = np.random.default_rng(0).uniform(-0.2, 0.2)
    bright = ds.random_brightness(image, rng)
    np.testing.assert_array_equal(
        bright, np.clip(np.arange(256) + np.float32(beta * 255), 0, 255).astype(np.uint8).reshape(16, 16)
    )
    alpha = np.random.default_rng(1).uniform(0.8, 1.2)
    contrast = ds.random_contrast(image, np.random.default_rng(1))
    expected = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(contrast.ravel(), expected)


def test_non_square_quarter_turns_are_resized_back():
    rng = np.random.default_rng(0)
    image = np.zeros((16, 32, 3), np.uint8)
    mask = np.zeros((16, 32), np.uint8)
    shapes = {ds.augment_pair(image, mask, rng, 16, 32)[1].shape for _ in range(20)}
    assert shapes == {(16, 32)}


def test_repeats_fill_one_batch_per_rank():
    assert ds.repeats_for(40, 16, 1) == 1
    assert ds.repeats_for(19, 64, 2) == 7  # 19 * 7 // 2 = 66 >= 64
    assert ds.repeats_for(19, 16, 1) == 1
    assert ds.repeats_for(5, 8, 1) == 2
