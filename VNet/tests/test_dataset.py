"""The data layer: layout detection, the Decathlon loader (real MSD Hippocampus and synthetic trees),
LUNA16 normalised trees (ours and the ModelZoo script's int16 output), splits and patch sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dataset import (
    CaseReader,
    PatchDataset,
    VolumeDataset,
    check_cases,
    check_patch_size,
    parse_size,
    resolve_data,
    split_cases,
    tiles_per_volume,
    without_cases,
)
from intensity import normalize_ct
from normalize_dataset import OUT_CT_DIR, OUT_MASK_DIR

from common.cache import CACHE_DIR_ENV
from common.errors import ConfigError, DataError
from common.imageio import write_volume
from common.testing import shared_data


@pytest.fixture(autouse=True)
def _volume_cache_in_tmp(tmp_path, monkeypatch):
    """Cached volumes of read-only trees (the shared real data) go to the test's folder, not ~/.cache."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "volume_cache"))


def write_msd(root, n=3, shape=(20, 28, 24), modality=None, hidden=True):
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.normal(100 + 50 * i, 20, shape).astype(np.float32)
        label = np.zeros(shape, np.uint8)
        label[5:12, 8:16, 6:14] = 1
        label[12:15, 8:16, 6:14] = 2
        write_volume(root / "imagesTr" / f"case_{i:03d}.nii.gz", image)
        write_volume(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    if hidden:  # macOS resource forks in the official MSD tarballs
        (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
        (root / "labelsTr" / "._case_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    if modality:
        (root / "dataset.json").write_text(json.dumps({"modality": {"0": modality}}))
    return root


def test_msd_layout_intensity_and_label_maps(tmp_path):
    spec = resolve_data(write_msd(tmp_path), log=lambda _: None)
    assert spec.kind == "msd" and spec.intensity == "zscore" and len(spec.cases) == 3
    image, target, spacing = CaseReader(spec)(1)
    assert image.dtype == np.float32 and abs(image.mean()) < 1e-4 and abs(image.std() - 1) < 1e-3
    assert target.dtype == np.uint8 and target.sum() == 10 * 8 * 8 and spacing == (1.0, 1.0, 1.0)
    only_two = CaseReader(resolve_data(tmp_path, label_map="2", log=lambda _: None))(0)[1]
    assert only_two.sum() == 3 * 8 * 8
    ct = resolve_data(write_msd(tmp_path / "ct", modality="CT"), log=lambda _: None)
    assert ct.intensity == "ct"
    assert np.allclose(CaseReader(ct)(0)[0], normalize_ct(_raw(ct, 0)))


def _raw(spec, index):
    from common.imageio import read_volume

    return read_volume(spec.cases[index][1]).array


def test_missing_label_and_unknown_tree_are_clear_errors(tmp_path):
    write_msd(tmp_path, hidden=False)
    (tmp_path / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DataError, match="image has no mask"):
        resolve_data(tmp_path, log=lambda _: None)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="Decathlon"):
        resolve_data(tmp_path / "other", log=lambda _: None)
    with pytest.raises(ConfigError, match="--dataset luna16"):
        resolve_data(tmp_path, dataset="luna16", log=lambda _: None)


def _msd_with_bad_cases(root):
    """Five cases; case_001's image cut short, case_003's label removed. Returns both files."""
    write_msd(root, n=5, hidden=False)
    cut = root / "imagesTr" / "case_001.nii.gz"
    cut.write_bytes(cut.read_bytes()[:200])
    (root / "labelsTr" / "case_003.nii.gz").unlink()
    return cut, root / "imagesTr" / "case_003.nii.gz"


def test_bad_cases_are_refused_by_default_every_file_named(tmp_path):
    cut, lonely = _msd_with_bad_cases(tmp_path)
    with pytest.raises(DataError) as info:
        resolve_data(tmp_path, log=lambda _: None)
    assert f"{lonely}: image has no mask" in str(info.value) and "--skip_bad_samples" in str(info.value)
    spec = resolve_data(tmp_path, log=lambda _: None, skip_bad=True)
    with pytest.raises(DataError) as info:
        check_cases(spec, skip_bad=False)
    message = str(info.value)
    assert f"{cut}: " in message and "1 problem(s) in 1 file(s) out of 4 pairs" in message
    assert "--skip_bad_samples" in message


def test_bad_cases_are_left_out_and_listed_with_skip_bad(tmp_path):
    cut, lonely = _msd_with_bad_cases(tmp_path)
    spec = resolve_data(tmp_path, log=lambda _: None, skip_bad=True)
    assert spec.ids == ["case_000", "case_001", "case_002", "case_004"]
    assert [(b.id, b.path) for b in spec.skipped] == [("case_003", str(lonely))]
    # One rank's share: only the cases it reads are checked.
    assert check_cases(spec, [0, 2], skip_bad=False) == []
    bad = check_cases(spec, skip_bad=True)
    assert [(b.id, b.path) for b in bad] == [("case_001", str(cut))]
    kept = without_cases(spec, bad)
    assert kept.ids == ["case_000", "case_002", "case_004"] and spec.ids[1] == "case_001"
    assert [b.id for b in kept.skipped] == ["case_001", "case_003"]
    assert CaseReader(kept)(1)[1].sum() == 10 * 8 * 8


def test_modelzoo_int16_luna_tree_is_scaled_at_load_time(tmp_path):
    hu = np.full((32, 32, 32), -1000, np.int16)
    hu[8:24, 8:24, 8:24] = -800
    mask = (hu == -800).astype(np.uint8)
    write_volume(tmp_path / OUT_CT_DIR / "uid.mhd", hu, spacing=(2.5, 2.5, 2.5))
    write_volume(tmp_path / OUT_MASK_DIR / "uid.mhd", mask, spacing=(2.5, 2.5, 2.5))
    spec = resolve_data(tmp_path, log=lambda _: None)
    image, target, _ = CaseReader(spec)(0)
    assert spec.kind == "luna16" and np.allclose(image, normalize_ct(hu)) and np.array_equal(target, mask)


def test_split_is_fixed_disjoint_and_can_come_from_a_file(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    split = split_cases(ids, 0.15)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (8, 2, 0)
    assert split == split_cases(list(reversed(ids)), 0.15)
    three = split_cases(ids, 0.2, 0.2, seed=1)
    assert sorted(three["train"] + three["val"] + three["test"]) == ids and len(three["test"]) == 2
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ids[:7], "val": ids[7:]}))
    assert split_cases(ids, split_file=path)["val"] == ids[7:]
    path.write_text(json.dumps({"train": ids, "val": ids[:1]}))
    with pytest.raises(ConfigError, match="must not share"):
        split_cases(ids, split_file=path)
    with pytest.raises(ConfigError, match="validation"):
        split_cases(ids, 0.0)


def test_patch_sizes_are_checked_and_parsed():
    assert parse_size("64x80x80") == (64, 80, 80) and parse_size("48") == (48, 48, 48)
    with pytest.raises(ConfigError, match="use 48x64x48"):
        check_patch_size((35, 51, 35))
    assert tiles_per_volume((128, 160, 160), (64, 80, 80)) == 8  # the reference's 2x2x2 sub-volumes


def test_patches_are_padded_seeded_and_tile_without_a_generator(tmp_path):
    spec = resolve_data(write_msd(tmp_path, shape=(20, 40, 24)), log=lambda _: None)
    data = PatchDataset(CaseReader(spec), [0, 2], (32, 32, 32), samples_per_volume=2, foreground_prob=1.0)
    assert len(data) == 4
    image, target = data[(3, 1)]
    assert image.shape == target.shape == (1, 32, 32, 32) and image.dtype == torch.float32
    assert target.sum() > 0  # foreground_prob=1 centres the patch on the label
    assert torch.equal(image, data[(3, 1)][0])  # same (epoch, index): same patch, whatever the worker
    free = PatchDataset(CaseReader(spec), [0, 2], (32, 32, 32), samples_per_volume=2, foreground_prob=0.0)
    assert len({free[(epoch, 1)][0].sum().item() for epoch in range(6)}) > 1  # y offsets 0..8 drawn anew
    tiles = [data[i][0] for i in (0, 1)]  # no generator: the two tiles along y (40 -> 0..32, 8..40)
    assert not torch.equal(tiles[0], tiles[1])
    padded = image[0, :, :, 0]
    case, _ = data.locate(3, 1)
    assert float(padded.min()) == pytest.approx(float(CaseReader(spec)(case)[0].min()))
    whole, mask = VolumeDataset(CaseReader(spec), [1])[0]
    assert whole.shape == mask.shape == (1, 20, 40, 24)


@pytest.mark.shared_data
def test_real_msd_hippocampus():
    root = shared_data("msd_hippocampus_3d")
    spec = resolve_data(root, label_map="gt0", log=lambda _: None)
    assert spec.kind == "msd" and spec.intensity == "zscore" and len(spec.cases) == 10
    split = split_cases(spec.ids, 0.15)
    assert len(split["train"]) == 8 and len(split["val"]) == 2
    reader = CaseReader(spec)
    for index in range(10):
        image, target, spacing = reader(index)
        assert image.dtype == np.float32 and np.isfinite(image).all() and spacing == (1.0, 1.0, 1.0)
        assert 0.005 < target.mean() < 0.1 and set(np.unique(target)) == {0, 1}
    data = PatchDataset(reader, range(8), (48, 48, 48), samples_per_volume=2)
    image, target = data[(0, 5)]
    assert image.shape == (1, 48, 48, 48) and target.sum() > 0
