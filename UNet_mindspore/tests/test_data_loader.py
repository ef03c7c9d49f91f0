"""ISBI 2012 reading, the 5-fold split, preprocessing and augmentation (references.md section 5.3)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from src.data_loader import (
    IsbiData,
    IsbiDataset,
    create_dataset,
    find_test_volume,
    get_val_train_indices,
    load_test_pages,
    load_train_data,
    pad_to,
    preprocess,
    resize,
    schedule,
    to_one_hot,
    train_data_augmentation,
)

from common.errors import ConfigError, DataError
from common.testing import shared_data

# Validation pages per fold of the original split, computed with numpy's legacy RandomState (references 5.3).
EXPECTED_VAL = {
    0: [0, 3, 12, 15, 21, 25],
    1: [4, 6, 7, 9, 18, 19],
    2: [1, 8, 14, 20, 23, 29],
    3: [5, 11, 16, 17, 22, 27],
    4: [2, 10, 13, 24, 26, 28],
}


def _write_stacks(folder, images, labels, test=None):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "train-volume.tif", images, photometric="minisblack")
    tifffile.imwrite(folder / "train-labels.tif", labels, photometric="minisblack")
    if test is not None:
        tifffile.imwrite(folder / "test-volume.tif", test, photometric="minisblack")
    return folder


def _synthetic(pages=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (pages, size, size), dtype=np.uint8)
    labels = np.where(rng.random((pages, size, size)) < 0.78, 255, 0).astype(np.uint8)
    return images, labels


# ------------------------------------------------------------------------------------------------ split


def test_five_folds_give_the_reference_pages_and_partition_the_stack():
    seen = []
    for fold, expected in EXPECTED_VAL.items():
        train, val = get_val_train_indices(30, fold)
        assert sorted(val.tolist()) == expected
        assert len(train) == 24 and not set(train) & set(val)
        assert sorted([*train, *val]) == list(range(30))
        seen += val.tolist()
    assert sorted(seen) == list(range(30))


def test_split_is_the_rotated_legacy_permutation_and_leaves_global_numpy_alone():
    permutation = np.arange(6)
    np.random.RandomState(0).shuffle(permutation)
    for fold in range(5):
        train, val = get_val_train_indices(6, fold)
        rotated = np.roll(permutation, fold * round(0.2 * 6))  # deque.rotate(n) is a right roll
        assert train.tolist() == rotated[:5].tolist() and val.tolist() == rotated[5:].tolist()
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    get_val_train_indices(30, 1)
    assert np.random.rand() == expected
    train, val = get_val_train_indices(30, None)
    assert len(train) == 30 and len(val) == 0


def test_schedule_keeps_the_original_step_counts():
    assert schedule(24, 400, 400, 1, 16) == [600]  # 1p: one epoch of 600 steps, ckpt ...-1_600
    assert schedule(24, 400, 40, 1, 16) == [60] * 10
    assert schedule(24, 1600, 1600, 8, 16) == [300]  # 8p: 300 steps per device
    assert schedule(24, 1600, 160, 8, 16) == [30] * 10
    assert schedule(24, 400, 7, 1, 16) == [10] * 60  # 24*7 = 168 samples -> 10 full batches per epoch
    assert schedule(24, 10, 3, 1, 16) == [4, 4, 4, 3]  # the last epoch carries the remainder of 15
    with pytest.raises(ConfigError, match="less than one batch"):
        schedule(3, 1, 1, 2, 2)


# ------------------------------------------------------------------------------------------------ reading


@pytest.fixture(scope="module")
def real_stack_dir(tmp_path_factory):
    """The 30 real ISBI slices of ../shared/data stacked into the challenge's multipage TIFFs."""
    root = shared_data("isbi2012")
    stacks = {}
    for name, folder in (("images", "train/images"), ("labels", "train/labels"), ("test", "test/images")):
        files = sorted((root / folder).glob("*.tif"), key=lambda p: int(p.stem))
        stacks[name] = np.stack([tifffile.imread(p) for p in files])
    out = tmp_path_factory.mktemp("isbi_stacks")
    return _write_stacks(out, stacks["images"], stacks["labels"], stacks["test"]), stacks


@pytest.mark.shared_data
def test_real_multipage_tiffs_and_the_slice_folder_give_the_same_pages(real_stack_dir):
    folder, stacks = real_stack_dir
    from_tiff = load_train_data(folder)
    from_slices = load_train_data(shared_data("isbi2012"))
    assert from_tiff.layout == "tiff" and from_slices.layout == "slices"
    assert from_tiff.images.shape == (30, 512, 512) and from_tiff.images.dtype == np.uint8
    assert np.array_equal(from_tiff.images, stacks["images"])
    assert np.array_equal(from_tiff.images, from_slices.images)
    assert np.array_equal(from_tiff.labels, from_slices.labels)
    assert from_slices.names == [str(i) for i in range(30)]  # numeric order: 2 before 10
    # Label convention: 255 = cell interior -> True -> class 1; about 78% of the pixels.
    assert np.array_equal(from_tiff.labels, stacks["labels"] == 255)
    fractions = from_tiff.labels.mean(axis=(1, 2))
    assert 0.72 < fractions.min() and fractions.max() < 0.84 and abs(fractions.mean() - 0.78) < 0.01
    pages, names = load_test_pages(find_test_volume(folder))
    assert pages.shape == (30, 512, 512) and names[:2] == ["0", "1"]
    slices, _ = load_test_pages(find_test_volume(shared_data("isbi2012")))
    assert np.array_equal(pages, slices)


@pytest.mark.shared_data
def test_real_fold_one_targets_follow_the_label_convention(real_stack_dir):
    data = load_train_data(real_stack_dir[0])
    train, valid = create_dataset(data, 1, 252, augment=False)
    assert sorted(valid.pages) == EXPECTED_VAL[1] and len(train) == 24
    image, target = valid[0]
    assert image.shape == (1, 252, 252) and target.shape == (2, 68, 68)
    assert torch.equal(target.sum(0), torch.ones(68, 68))  # one-hot
    # At the output size the cell interior (class 1) still covers most of the page.
    assert 0.6 < target[1].mean().item() < 0.95
    assert image.min() >= -1 and image.max() <= 1
    assert torch.count_nonzero(image[0, :92]) == 0  # the original's zero padding (92 pixels)


def test_data_errors_name_the_file_and_the_rule(tmp_path):
    images, labels = _synthetic()
    with pytest.raises(DataError, match="train/images"):
        load_train_data(tmp_path)  # empty folder: the message shows the expected layout
    folder = tmp_path / "stack"
    folder.mkdir()
    tifffile.imwrite(folder / "train-volume.tif", images, photometric="minisblack")
    with pytest.raises(DataError, match="train-labels.tif: file not found"):
        load_train_data(folder)
    tifffile.imwrite(folder / "train-labels.tif", labels[:4], photometric="minisblack")
    with pytest.raises(DataError, match="4 pages of 16x16, but train-volume.tif has 6 pages"):
        load_train_data(folder)
    tifffile.imwrite(folder / "train-labels.tif", np.where(labels > 0, 7, 0).astype(np.uint8))
    with pytest.raises(DataError, match="train-labels.tif \\(page 0\\).*neither 0/1 nor 0/255"):
        load_train_data(folder)
    tifffile.imwrite(folder / "train-volume.tif", images.astype(np.uint16), photometric="minisblack")
    with pytest.raises(DataError, match="uint16; expected 8-bit"):
        load_train_data(folder)


def _slices_with_bad_files(root, pages: int = 6):
    """One page file per slice; page 1's image cut short, page 4's label removed. Returns both files."""
    images, labels = _synthetic(pages=pages)
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    for i in range(pages):
        tifffile.imwrite(root / "train" / "images" / f"{i}.tif", images[i])
        tifffile.imwrite(root / "train" / "labels" / f"{i}.tif", labels[i])
    cut = root / "train" / "images" / "1.tif"
    cut.write_bytes(cut.read_bytes()[:100])
    (root / "train" / "labels" / "4.tif").unlink()
    return images, labels, cut, root / "train" / "images" / "4.tif"


def test_bad_page_files_are_refused_by_default_every_one_named(tmp_path):
    _, _, cut, lonely = _slices_with_bad_files(tmp_path)
    with pytest.raises(DataError) as info:
        load_train_data(tmp_path)
    assert f"{lonely}: image has no mask" in str(info.value) and "--skip_bad_samples" in str(info.value)
    (tmp_path / "train" / "images" / "4.tif").unlink()
    with pytest.raises(DataError) as info:
        load_train_data(tmp_path)
    assert f"{cut}: " in str(info.value) and "1 problem(s) in 1 file(s) out of 5 pairs" in str(info.value)
    assert "--skip_bad_samples" in str(info.value)


def test_bad_page_files_are_left_out_and_listed_with_skip_bad(tmp_path):
    images, labels, cut, lonely = _slices_with_bad_files(tmp_path)
    data = load_train_data(tmp_path, skip_bad=True)
    assert data.names == ["0", "2", "3", "5"]
    assert np.array_equal(data.images, images[[0, 2, 3, 5]]) and np.array_equal(
        data.labels, labels[[0, 2, 3, 5]] == 255
    )
    assert sorted((b.id, b.path) for b in data.skipped) == [("1", str(cut)), ("4", str(lonely))]
    assert load_train_data(tmp_path / "train", skip_bad=True).names == data.names


def test_slice_folder_pairs_by_name(tmp_path):
    images, labels = _synthetic(pages=4)
    for i in range(4):
        (tmp_path / "train" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "labels").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "train" / "images" / f"{i}.tif", images[i])
        tifffile.imwrite(tmp_path / "train" / "labels" / f"{i}.tif", labels[i])
    data = load_train_data(tmp_path)
    assert np.array_equal(data.images, images) and np.array_equal(data.labels, labels == 255)
    assert load_train_data(tmp_path / "train").names == ["0", "1", "2", "3"]
    tifffile.imwrite(tmp_path / "train" / "labels" / "9.tif", labels[0])
    with pytest.raises(DataError, match="9.tif: mask has no image"):
        load_train_data(tmp_path)


# ------------------------------------------------------------------------------------------------ transforms


def test_resize_is_half_pixel_bilinear_without_antialiasing():
    out = resize(np.array([[0.0, 1.0]], np.float32), 1, 4)
    assert np.allclose(out, [[0.0, 0.25, 0.75, 1.0]])  # OpenCV INTER_LINEAR: centres at (i + 0.5) / 2 - 0.5
    down = resize(np.arange(16, dtype=np.float32).reshape(4, 4), 2, 2)
    assert np.allclose(down, [[2.5, 4.5], [10.5, 12.5]])  # plain 2x2 means, no wider antialias filter


def test_preprocess_scales_resizes_and_pads_as_the_original():
    page = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    label = page >= 128
    x, y = preprocess(page, label, 188)  # output size 4: no resize, 92 pixels of padding
    assert x.shape == y.shape == (188, 188) and x.dtype == np.float32
    assert np.allclose(x[92:96, 92:96], page / 127.5 - 1, atol=1e-6)
    assert np.array_equal(y[92:96, 92:96], label.astype(np.float32))
    assert np.count_nonzero(x[:92]) == 0 and np.count_nonzero(y[:, 96:]) == 0
    big, _ = preprocess(np.full((8, 8), 255, np.uint8), None, 188)  # 8 -> 4 then padded
    assert np.allclose(big[92:96, 92:96], 1.0)
    mirrored = pad_to(np.arange(4, dtype=np.float32).reshape(2, 2), 6, "reflect")
    assert np.array_equal(mirrored[2:4, 2:4], [[0, 1], [2, 3]])
    assert np.array_equal(mirrored[1, 2:4], [2, 3]) and np.array_equal(mirrored[2, 1], 1)  # edge not repeated
    xr, _ = preprocess(page, label, 188, "reflect")
    assert np.allclose(xr[91, 92:96], page[1] / 127.5 - 1, atol=1e-6)
    with pytest.raises(ConfigError, match="pad_mode"):
        pad_to(mirrored, 8, "edge")


class ScriptedRng:
    """Hands out fixed draws in the order the augmentation makes them."""

    def __init__(self, randoms, uniforms):
        self.randoms, self.uniforms = list(randoms), list(uniforms)

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, low=0.0, high=1.0):
        return low + (high - low) * self.uniforms.pop(0)


def test_augmentation_flips_crops_shifts_and_resizes_back():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (40, 40)).astype(np.float32)
    mask = (rng.random((40, 40)) > 0.5).astype(np.float32)
    # Flip up/down only, the full box, brightness +0.2 (u = 1): clip(flipud(image) + 0.2).
    out_img, out_mask = train_data_augmentation(image, mask, ScriptedRng([0.9, 0.1], [0, 0, 0, 0, 1.0]))
    assert np.allclose(out_img, np.clip(image[::-1] + 0.2, -1, 1)) and np.array_equal(out_mask, mask[::-1])
    # Flip left/right, box [6:34) x [12:40) (u = 0.5, 0.5 -> left 6, right 34; u = 1, 0 -> top 12, bottom 40).
    out_img, out_mask = train_data_augmentation(
        image, mask, ScriptedRng([0.1, 0.9], [0.5, 0.5, 1.0, 0.0, 0.5])
    )
    crop = torch.from_numpy(np.ascontiguousarray(image[:, ::-1][12:40, 6:34]))[None, None]
    expected = F.interpolate(crop, size=(40, 40), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert np.allclose(out_img, expected, atol=1e-6)  # brightness u = 0.5 -> shift 0
    assert out_mask.shape == (40, 40) and out_mask.min() >= 0 and out_mask.max() <= 1
    a = train_data_augmentation(image, mask, np.random.default_rng([1, 2, 3]))
    b = train_data_augmentation(image, mask, np.random.default_rng([1, 2, 3]))
    assert np.array_equal(a[0], b[0]) and a[0].min() >= -1 and a[0].max() <= 1


def test_one_hot_width_is_num_classes_whatever_the_content():
    membrane_only = np.zeros((4, 4), np.float32)
    assert to_one_hot(membrane_only, 2).shape == (2, 4, 4)  # the original gave 1 channel here
    assert np.array_equal(to_one_hot(membrane_only, 2)[0], np.ones((4, 4)))
    assert to_one_hot(np.full((4, 4), 0.6, np.float32), 3)[1].sum() == 16


def test_dataset_repeats_pages_and_seeds_augmentation_by_key():
    images, labels = _synthetic(pages=6, size=32)
    data = IsbiData(images, labels == 255, source=None, layout="tiff", names=[str(i) for i in range(6)])
    train, valid = create_dataset(data, 1, 188, repeat=3, augment=True, seed=7)
    assert len(train) == 15 and len(valid) == 1 and valid.pages == [0]
    x, target = train[(0, 4)]
    assert x.shape == (1, 188, 188) and target.shape == (2, 4, 4)
    assert torch.equal(train[(0, 4)][0], x) and not torch.equal(train[(1, 4)][0], x)
    plain = IsbiDataset(data, train.pages, 188, augment=False)
    expected, _ = preprocess(images[train.pages[1]], labels[train.pages[1]] == 255, 188)
    assert torch.equal(plain[1][0][0], torch.from_numpy(expected))
    assert torch.equal(train[1][0], plain[1][0])  # an integer key is never augmented (evaluation)
    with pytest.raises(ConfigError, match="num_classes must be at least 2"):
        IsbiDataset(data, [0], 188, num_classes=1)
