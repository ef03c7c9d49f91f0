"""normalize_dataset.py: geometry of the output box, the round trip back to the scan, label convention,
errors a user meets, the parallel path on the demo writer's output, and the real files in ../shared/data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from geometry import Grid, centered_grid, grid_of, resample_array
from intensity import HU_WINDOW, LabelMap, denormalize_ct, normalize_ct
from normalize_dataset import (
    CT_DIR,
    MARKER,
    MASK_DIR,
    OUT_CT_DIR,
    OUT_MASK_DIR,
    Settings,
    ensure_normalized,
    main,
    normalize_tree,
    process_case,
)

from common.demo_data import write_luna16
from common.errors import ConfigError, DataError
from common.imageio import Volume, read_volume, write_volume
from common.testing import shared_data

FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def phantom(shape=(24, 40, 36), spacing=(2.5, 0.8, 0.7), origin=(30.0, -20.0, -300.0), direction=FLIP_X):
    """A chest-like phantom: body (40 HU), two lungs (labels 3, 4; a smooth -900..-700 HU ramp), trachea (5)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    labels = np.zeros(shape, np.int16)
    labels[np.hypot((x - 0.45) / 0.3, y / 0.6) < 1] = 3
    labels[np.hypot((x + 0.45) / 0.3, y / 0.6) < 1] = 4
    labels[(np.hypot(x, y + 0.1) < 0.12) & (z > 0)] = 5
    ct = np.where(np.hypot(x / 0.95, y / 0.9) < 1, 40.0, -1024.0)
    ct = np.where(np.isin(labels, (3, 4)), -800 + 100 * y, ct)
    ct = np.where(labels == 5, -1000.0, ct)
    geometry = dict(spacing=spacing, origin=origin, direction=direction)
    return Volume(ct.astype(np.int16), **geometry), Volume(labels, **geometry)


def write_case(root, case_id, ct: Volume, mask: Volume, ext=".mhd"):
    write_volume(root / CT_DIR / f"{case_id}{ext}", ct.array, like=ct, compress=False)
    write_volume(root / MASK_DIR / f"{case_id}{ext}", mask.array, like=mask)


def test_centered_grid_keeps_the_centre_and_direction():
    grid = Grid((24, 40, 36), (2.5, 0.8, 0.7), (30.0, -20.0, -300.0), FLIP_X)
    for size in (None, (16, 16, 16), (64, 48, 32)):
        box = centered_grid(grid, 1.5, size)
        assert np.allclose(box.center(), grid.center()) and box.direction == grid.direction
        assert box.spacing == (1.5, 1.5, 1.5)
    assert centered_grid(grid, 1.5).size == (40, 21, 17)  # round(24*2.5/1.5), round(40*0.8/1.5), ...


def test_output_box_and_round_trip_back_to_the_scan(tmp_path):
    ct, mask = phantom()
    settings = Settings(vox_spacing=1.0, size=(64, 48, 32))
    report = process_case("case", *_paths(tmp_path, ct, mask), settings, out_dir=tmp_path / "out")
    out_ct = read_volume(tmp_path / "out" / OUT_CT_DIR / "case.mhd")
    out_mask = read_volume(tmp_path / "out" / OUT_MASK_DIR / "case.mhd")
    assert out_ct.array.shape == (64, 48, 32) and out_ct.array.dtype == np.float32
    assert out_ct.spacing == (1.0, 1.0, 1.0) and out_ct.direction == FLIP_X
    assert np.allclose(grid_of(out_ct).center(), grid_of(ct).center(), atol=1e-3)  # origin moved with the box
    assert set(np.unique(out_mask.array)) == {0, 1} and out_mask.array.dtype == np.uint8
    assert out_ct.array.min() == pytest.approx(normalize_ct(np.array(HU_WINDOW[0])), abs=1e-6)
    assert out_ct.array.max() <= normalize_ct(np.array(HU_WINDOW[1])) + 1e-6
    # Back onto the scan's own grid: the lungs (3, 4; not the trachea, 5) come back, HU inside them too.
    back = resample_array(out_mask.array, grid_of(out_mask), grid_of(ct), "nearest", 0).astype(bool)
    lung = np.isin(mask.array, (3, 4))
    assert 2 * (back & lung).sum() / (back.sum() + lung.sum()) > 0.95
    assert not (back & (mask.array == 5)).any()
    hu = denormalize_ct(resample_array(out_ct.array, grid_of(out_ct), grid_of(ct), "linear", 0))
    inner = lung & (np.abs(np.gradient(mask.array.astype(float))).sum(0) == 0)
    assert np.abs(hu[inner] - ct.array[inner]).mean() < 15
    assert report.labels == [0, 3, 4, 5] and 0.97 < report.lung_kept < 1.03 and not report.warnings


def _paths(root, ct, mask, case_id="case"):
    write_case(root, case_id, ct, mask)
    return root / CT_DIR / f"{case_id}.mhd", root / MASK_DIR / f"{case_id}.mhd"


def test_same_grid_is_an_exact_identity_and_labels_follow_the_setting(tmp_path):
    ct, mask = phantom(shape=(16, 32, 48), spacing=(2.0, 2.0, 2.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    paths = _paths(tmp_path, ct, mask)
    process_case("case", *paths, Settings(2.0, (16, 32, 48)), tmp_path / "a")
    process_case("case", *paths, Settings(2.0, (16, 32, 48), lung_labels="3,4,5"), tmp_path / "b")
    out = read_volume(tmp_path / "a" / OUT_CT_DIR / "case.mhd")
    assert np.allclose(out.origin, ct.origin, atol=1e-4)
    assert np.allclose(out.array, normalize_ct(ct.array), atol=1e-5)
    lungs = read_volume(tmp_path / "a" / OUT_MASK_DIR / "case.mhd").array
    airways = read_volume(tmp_path / "b" / OUT_MASK_DIR / "case.mhd").array
    assert np.array_equal(lungs, np.isin(mask.array, (3, 4)))
    assert np.array_equal(airways, mask.array > 0)


def test_crop_loss_and_non_hu_data_are_reported(tmp_path):
    ct, mask = phantom()
    small = process_case("case", *_paths(tmp_path, ct, mask), Settings(1.0, (16, 16, 16)))
    assert small.lung_kept < 0.5 and any("keeps only" in w for w in small.warnings)
    scaled = Volume((ct.array.astype(np.float32) + 1024) / 2000, ct.spacing, ct.origin, ct.direction)
    report = process_case("case", *_paths(tmp_path / "s", scaled, mask), Settings(2.0, (32, 32, 32)))
    assert any("Hounsfield" in w for w in report.warnings)


def test_every_bad_case_is_named_in_one_error_and_nothing_is_marked_complete(tmp_path):
    ct, mask = phantom(shape=(16, 16, 16))
    write_case(tmp_path, "good", ct, mask)
    write_case(tmp_path, "moved", ct, Volume(mask.array, mask.spacing, (0.0, 0.0, 0.0), mask.direction))
    nan_ct = Volume(ct.array.astype(np.float32), ct.spacing, ct.origin, ct.direction)
    nan_ct.array[3, 4, 5] = np.nan
    write_case(tmp_path, "nan", nan_ct, mask)
    write_volume(tmp_path / CT_DIR / "lonely.mhd", ct.array, like=ct)
    with pytest.raises(DataError, match="CT has no lung mask") as err:
        normalize_tree(tmp_path, Settings(2.0, (16, 16, 16)), workers=1, log=lambda _: None)
    assert "lonely.mhd" in str(err.value)
    for leftover in (tmp_path / CT_DIR).glob("lonely.*"):
        leftover.unlink()
    with pytest.raises(DataError) as err:
        normalize_tree(tmp_path, Settings(2.0, (16, 16, 16)), workers=1, log=lambda _: None)
    text = str(err.value)
    assert "2 of 3 case(s)" in text and "origin" in text and "1 NaN" in text
    assert "moved.mhd" in text and "nan.mhd" in text
    assert not (tmp_path / MARKER).exists() and (tmp_path / OUT_CT_DIR / "good.mhd").exists()


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="multiples of 16"):
        Settings(2.5, (128, 150, 160))
    with pytest.raises(ConfigError, match="--label_map"):
        Settings(2.5, (128, 160, 160), lung_labels="lungs")
    assert LabelMap.parse("gt0")(np.array([0, 1, 2])).tolist() == [False, True, True]


def test_demo_writer_output_in_parallel_then_reused(tmp_path, capsys):
    root = write_luna16(tmp_path / "luna", n=2, shape=(16, 32, 32))
    assert main([str(root), "4", "16", "16", "16", "--workers", "2", "--dry-run"]) == 0
    assert not (root / OUT_CT_DIR).exists()
    assert main([str(root), "4", "16", "16", "16", "--workers", "2"]) == 0
    marker = json.loads((root / MARKER).read_text())
    assert len(marker["cases"]) == 2 and marker["settings"]["size"] == [16, 16, 16]
    assert len(list((root / OUT_MASK_DIR).glob("*.zraw"))) == 2
    assert ensure_normalized(root, Settings(4.0, (16, 16, 16)), log=print) == root
    other = ensure_normalized(root, Settings(4.0, (16, 32, 32)), workers=1, log=print)
    assert other == root / "normalized_4mm_16x32x32" and (other / MARKER).exists()
    out = capsys.readouterr().out
    assert "reusing" in out or out.count("normalising") == 2


def _link_case(src_dir, name, target_dir, new_stem):
    """Symlink a real volume (and its .zraw) into a tree under a new stem, bytes untouched."""
    target_dir.mkdir(parents=True, exist_ok=True)
    src = src_dir / name
    if name.endswith(".mhd"):
        header = src.read_text().replace(src.with_suffix(".zraw").name, f"{new_stem}.zraw")
        (target_dir / f"{new_stem}.mhd").write_text(header)
        os.symlink(src.with_suffix(".zraw"), target_dir / f"{new_stem}.zraw")
    else:
        os.symlink(src, target_dir / f"{new_stem}.nii.gz")


@pytest.mark.shared_data
def test_real_luna16_masks_read_and_keep_their_label_convention(tmp_path):
    masks = shared_data("luna16", "seg-lungs-LUNA16")
    for header in sorted(masks.glob("*.mhd")):
        uid = header.stem
        _link_case(masks, header.name, tmp_path / MASK_DIR, uid)
        labels = read_volume(header)
        # No real CT ships with these masks: a CT on the same grid, air outside, -850 HU lungs, 40 HU body.
        ct = np.where(np.isin(labels.array, (3, 4)), -850, np.where(labels.array == 5, -1000, 40)).astype(
            np.int16
        )
        write_volume(tmp_path / CT_DIR / f"{uid}.mhd", ct, like=labels, compress=False)
    marker = normalize_tree(tmp_path, Settings(), workers=1, log=lambda _: None)
    for report in marker["reports"]:
        assert report["labels"] == [0, 3, 4, 5] and report["lung_kept"] > 0.99 and not report["warnings"]
        mask = read_volume(tmp_path / OUT_MASK_DIR / f"{report['id']}.mhd")
        assert mask.array.shape == (128, 160, 160)
        lung_ml = mask.array.sum() * 2.5**3 / 1000
        assert lung_ml == pytest.approx(report["lung_ml"], rel=0.02) and 2000 < lung_ml < 9000
        # label 3 is the left lung: patient left is +x in LPS, so its centroid lies right of the trachea.
    labels = read_volume(sorted(masks.glob("*.mhd"))[0]).array
    x3, x5 = np.nonzero(labels == 3)[2].mean(), np.nonzero(labels == 5)[2].mean()
    assert x3 > x5


@pytest.mark.shared_data
def test_real_ct_in_hounsfield_units(tmp_path):
    source = shared_data("ct_totalseg")
    _link_case(source, "example_ct_sm.nii.gz", tmp_path / CT_DIR, "example")
    _link_case(source, "example_seg.nii.gz", tmp_path / MASK_DIR, "example")
    settings = Settings(3.0, (32, 112, 128), lung_labels="10,11,12,13,14")
    marker = normalize_tree(tmp_path, settings, workers=1, log=lambda _: None)
    (report,) = marker["reports"]
    assert report["lung_kept"] > 0.97 and not report["warnings"]
    ct = read_volume(tmp_path / OUT_CT_DIR / "example.nii.gz".replace(".nii.gz", ".mhd"))
    source_ct = read_volume(source / "example_ct_sm.nii.gz")
    assert ct.direction == source_ct.direction
    hu = denormalize_ct(ct.array)
    assert hu.min() == pytest.approx(-1000, abs=0.5) and hu.max() == pytest.approx(400, abs=0.5)
    body = hu > -300
    assert 0.1 < body.mean() < 0.6 and abs(float(np.median(hu[body]))) < 100  # soft tissue near 0-60 HU
