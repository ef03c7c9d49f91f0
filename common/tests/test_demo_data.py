from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image, ImageSequence

from common import demo_data
from common.demo_data import (
    MARKER,
    WRITERS,
    ensure_demo_dataset,
    main,
    write_dsb2018,
    write_isbi2012,
    write_isic2018,
    write_luna16,
)
from common.errors import ConfigError, DataError
from common.testing import REPO_ROOT, shared_data

HEX64 = re.compile(r"[0-9a-f]{64}")
LUNA_UID = re.compile(r"1\.3\.6\.1\.4\.1\.14519\.5\.2\.1\.6279\.6001\.[1-9][0-9]{29}")


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root (markers included, the lock file excluded) by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != demo_data.LOCK
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    return 2.0 * np.logical_and(pred, target).sum() / (pred.sum() + target.sum())


def _mhd_keys(path: Path) -> list[str]:
    return [line.split("=")[0].strip() for line in path.read_text().splitlines() if "=" in line]


def _mhd_header(path: Path) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in path.read_text().splitlines())}


@pytest.fixture(scope="module")
def defaults(tmp_path_factory) -> dict[str, Path]:
    """Each dataset written once at its default parameters (as the training scripts get it)."""
    root = tmp_path_factory.mktemp("demo")
    return {name: writer(root / name) for name, writer in WRITERS.items()}


# ---------------------------------------------------------------------------------------------- layouts
def test_isic2018_layout(defaults):
    out = defaults["isic2018"]
    images = sorted((out / "ISIC2018_Task1-2_Training_Input").iterdir())
    masks = sorted((out / "ISIC2018_Task1_Training_GroundTruth").iterdir())
    assert [p.name for p in images] == [f"ISIC_{i:07d}.jpg" for i in range(40)]
    assert [p.name for p in masks] == [f"ISIC_{i:07d}_segmentation.png" for i in range(40)]
    sizes = set()
    for image_path, mask_path in zip(images, masks):
        with Image.open(image_path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert "jfif" in image.info and not image.info.get("progressive")  # baseline JFIF like ISIC
            rgb = np.asarray(image, np.float32)
        with Image.open(mask_path) as mask:
            assert mask.format == "PNG" and mask.mode == "L" and mask.size == image.size
            m = np.asarray(mask)
        assert set(np.unique(m)) == {0, 255}
        lesion = m == 255
        assert 0.02 < lesion.mean() < 0.5
        # The lesion is darker and browner (less blue relative to red) than the skin around it.
        assert rgb[lesion].mean() < rgb[~lesion].mean() - 15
        sizes.add(image.size)
    assert sizes <= {(320, 240), (288, 216), (256, 192)} and len(sizes) >= 2


def test_dsb2018_layout(defaults):
    root = defaults["dsb2018"] / "stage1_train"
    folders = sorted(root.iterdir())
    assert len(folders) == 24
    stained = 0
    for folder in folders:
        assert HEX64.fullmatch(folder.name)
        assert sorted(p.name for p in folder.iterdir()) == ["images", "masks"]
        assert [p.name for p in (folder / "images").iterdir()] == [f"{folder.name}.png"]
        with Image.open(folder / "images" / f"{folder.name}.png") as image:
            assert image.mode == "RGBA" and image.size in demo_data.DSB_SIZES
            rgba = np.asarray(image)
        assert (rgba[..., 3] == 255).all()
        mask_paths = sorted((folder / "masks").iterdir())
        assert len(mask_paths) >= 3
        cover = np.zeros(rgba.shape[:2], np.int32)
        for path in mask_paths:
            assert HEX64.fullmatch(path.stem) and path.suffix == ".png"
            with Image.open(path) as mask:
                assert mask.mode == "L" and mask.size == image.size
                m = np.asarray(mask)
            assert set(np.unique(m)) == {0, 255}
            cover += m == 255
        assert cover.max() == 1  # one nucleus per file, no two overlap
        rgb = rgba[..., :3].astype(np.float32)
        if np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 5:  # H&E-like: dark purple nuclei on light tissue
            stained += 1
            assert rgb[cover == 1].mean() < rgb[cover == 0].mean() - 40
        else:  # fluorescence: grey, bright nuclei on dark background
            assert np.array_equal(rgb[..., 0], rgb[..., 2])
            assert rgb[cover == 1].mean() > rgb[cover == 0].mean() + 30
    assert 0 < stained < len(folders)


def test_isbi2012_layout(defaults):
    out = defaults["isbi2012"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "test-volume.tif",
        "train-labels.tif",
        "train-volume.tif",
    ]
    stacks = {
        name: tifffile.imread(out / f"{name}.tif") for name in ("train-volume", "train-labels", "test-volume")
    }
    for stack in stacks.values():
        assert stack.shape == (30, 256, 256) and stack.dtype == np.uint8
    labels = stacks["train-labels"]
    assert set(np.unique(labels)) == {0, 255}
    interior = (labels == 255).mean(axis=(1, 2))
    assert ((interior > 0.70) & (interior < 0.85)).all(), interior  # the real slices: 73-83 %
    volume = stacks["train-volume"].astype(np.float32)
    assert volume[labels == 0].mean() < volume[labels == 255].mean() - 30  # membranes are dark
    assert not np.array_equal(stacks["train-volume"], stacks["test-volume"])
    # The MindSpore loader reads the stacks page by page with PIL.
    with Image.open(out / "train-labels.tif") as tif:
        pages = [np.asarray(page) for page in ImageSequence.Iterator(tif)]
    assert len(pages) == 30 and np.array_equal(np.stack(pages), labels)


def test_luna16_layout(defaults):
    out = defaults["luna16"]
    ct_headers = sorted((out / "lung_ct_image").glob("*.mhd"))
    assert len(ct_headers) == 6
    assert sorted(p.name for p in (out / "lung_ct_image").iterdir()) == sorted(
        [p.name for p in ct_headers] + [p.with_suffix(".raw").name for p in ct_headers]
    )
    for ct_path in ct_headers:
        uid = ct_path.stem
        assert LUNA_UID.fullmatch(uid)
        mask_path = out / "seg-lungs-LUNA16" / f"{uid}.mhd"
        assert (out / "seg-lungs-LUNA16" / f"{uid}.zraw").is_file()
        ct_header, mask_header = _mhd_header(ct_path), _mhd_header(mask_path)
        assert ct_header["ElementType"] == mask_header["ElementType"] == "MET_SHORT"
        assert ct_header["CompressedData"] == "False" and ct_header["ElementDataFile"] == f"{uid}.raw"
        assert mask_header["CompressedData"] == "True" and mask_header["ElementDataFile"] == f"{uid}.zraw"
        assert ct_header["DimSize"] == "96 96 48"  # x y z in the header, for a (48, 96, 96) z,y,x array

        ct_image, mask_image = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(mask_path))
        for image in (ct_image, mask_image):
            assert image.GetPixelID() == sitk.sitkInt16
        assert ct_image.GetSize() == mask_image.GetSize() == (96, 96, 48)
        assert ct_image.GetSpacing() == mask_image.GetSpacing()
        assert ct_image.GetOrigin() == mask_image.GetOrigin()
        assert ct_image.GetDirection() == mask_image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        sx, sy, sz = ct_image.GetSpacing()
        assert 0.6 <= sx == sy <= 0.8 and 2.2 <= sz <= 2.8

        ct, labels = sitk.GetArrayFromImage(ct_image), sitk.GetArrayFromImage(mask_image)
        assert set(np.unique(labels)) == {0, 3, 4, 5}
        centroids = {}
        for label in (3, 4, 5):
            index_zyx = np.argwhere(labels == label).mean(axis=0)
            centroids[label] = np.array(
                ct_image.TransformContinuousIndexToPhysicalPoint(index_zyx[::-1].tolist())
            )
        assert centroids[3][0] > centroids[4][0]  # LPS: patient left (label 3) is +x
        assert centroids[5][2] > max(centroids[3][2], centroids[4][2])  # trachea is superior

        assert -1024 <= ct.min() and ct.max() <= 3071
        assert abs(np.median(ct[:, :3, :3]) + 1000) < 30  # air in the corners
        lung = np.isin(labels, (3, 4))
        assert -920 < np.median(ct[lung]) < -780
        # The trachea is only a few voxels wide, so the blur raises its rim; its core stays at air.
        assert np.median(ct[labels == 5]) < -750 and np.percentile(ct[labels == 5], 10) < -950
        body = (labels == 0) & (ct > -500)
        assert -60 < np.median(ct[body]) < 120


# ------------------------------------------------------------------------------- comparison with real data
def test_formats_match_the_real_samples(tmp_path):
    isic = shared_data("isic2018")
    real_jpg = next((isic / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))
    real_png = next((isic / "ISIC2018_Task1_Training_GroundTruth").glob("*.png"))
    out = write_isic2018(tmp_path / "isic", n=1)
    ours_jpg = out / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg"
    ours_png = out / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000000_segmentation.png"
    for real, ours in ((real_jpg, ours_jpg), (real_png, ours_png)):
        with Image.open(real) as a, Image.open(ours) as b:
            assert (a.format, a.mode) == (b.format, b.mode)
            assert ("jfif" in a.info) == ("jfif" in b.info)
    assert len(real_jpg.stem) == len(ours_jpg.stem)

    dsb = shared_data("dsb2018", "stage1_train")
    real_folder = sorted(dsb.iterdir())[0]
    ours_folder = next((write_dsb2018(tmp_path / "dsb", n=1) / "stage1_train").iterdir())
    for sub in ("images", "masks"):
        with (
            Image.open(next((real_folder / sub).iterdir())) as a,
            Image.open(next((ours_folder / sub).iterdir())) as b,
        ):
            assert (a.format, a.mode) == (b.format, b.mode)

    isbi = shared_data("isbi2012")
    ours = write_isbi2012(tmp_path / "isbi", pages=2, size=64)
    for real, stack in (
        ("train/images/0.tif", "train-volume.tif"),
        ("train/labels/0.tif", "train-labels.tif"),
    ):
        real_page = tifffile.imread(isbi / real)
        our_pages = tifffile.imread(ours / stack)
        assert real_page.dtype == our_pages.dtype == np.uint8
        if "labels" in real:
            assert set(np.unique(real_page)) == set(np.unique(our_pages)) == {0, 255}


def test_luna16_headers_and_label_sides_match_real_masks(tmp_path):
    real_dir = shared_data("luna16", "seg-lungs-LUNA16")
    real_header = sorted(real_dir.glob("*.mhd"))[0]
    out = write_luna16(tmp_path, n=1, shape=(16, 32, 32))
    ours = next((out / "seg-lungs-LUNA16").glob("*.mhd"))
    assert _mhd_keys(ours) == _mhd_keys(real_header)
    real, mine = _mhd_header(real_header), _mhd_header(ours)
    for key in (
        "ObjectType",
        "NDims",
        "BinaryData",
        "CompressedData",
        "ElementType",
        "AnatomicalOrientation",
    ):
        assert real[key] == mine[key], key
    assert (
        real["ElementDataFile"] == real_header.stem + ".zraw"
        and mine["ElementDataFile"] == ours.stem + ".zraw"
    )
    assert len(real_header.stem) == len(ours.stem)
    # The convention this module relies on: in the real masks label 3 lies at larger physical x than 4.
    image = sitk.ReadImage(str(real_header))
    labels = sitk.GetArrayViewFromImage(image)[::4, ::4, ::4]
    x_of = {}
    for label in (3, 4):
        index = np.argwhere(labels == label).mean(axis=0) * 4
        x_of[label] = image.TransformContinuousIndexToPhysicalPoint(index[::-1].tolist())[0]
    assert x_of[3] > x_of[4]


# --------------------------------------------------------------------------------------------- determinism
SMALL = {
    "isic2018": {"n": 2},
    "dsb2018": {"n": 2},
    "isbi2012": {"pages": 2, "size": 64},
    "luna16": {"n": 1, "shape": (16, 32, 32)},
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_same_seed_same_bytes_other_seed_differs(name, tmp_path):
    writer, kwargs = WRITERS[name], SMALL[name]
    first = _files(writer(tmp_path / "a", seed=3, **kwargs))
    second = _files(writer(tmp_path / "b", seed=3, **kwargs))
    other = _files(writer(tmp_path / "c", seed=4, **kwargs))
    assert first == second
    data = {k: v for k, v in first.items() if not k.startswith(".")}
    assert data and data != {k: v for k, v in other.items() if not k.startswith(".")}
    marker = json.loads(first[MARKER])
    assert marker["writer"] == name and marker["version"] == demo_data.DEMO_VERSION
    assert marker["params"]["seed"] == 3 and marker["files"] == len(data)


def test_a_sample_does_not_depend_on_how_many_are_written(tmp_path):
    two = _files(write_dsb2018(tmp_path / "two", n=2))
    three = _files(write_dsb2018(tmp_path / "three", n=3))
    assert {k: v for k, v in two.items() if not k.startswith(".")}.items() <= three.items()


def test_rewriting_replaces_old_entries(tmp_path):
    write_dsb2018(tmp_path, n=3)
    write_dsb2018(tmp_path, n=2)
    assert len(list((tmp_path / "stage1_train").iterdir())) == 2
    assert not list(tmp_path.glob(".demo-tmp-*"))


# ---------------------------------------------------------------------------------- ensure_demo_dataset
def test_ensure_is_idempotent_and_redoes_after_parameter_change(tmp_path):
    out = tmp_path / "dsb"
    assert ensure_demo_dataset("dsb2018", out, n=2) == out
    before = _mtimes(out)
    assert ensure_demo_dataset("dsb2018", out, n=2) == out
    assert _mtimes(out) == before
    ensure_demo_dataset("dsb2018", out, n=3)
    assert len(list((out / "stage1_train").iterdir())) == 3
    assert json.loads((out / MARKER).read_text())["params"] == {"n": 3, "seed": 0}


def test_ensure_redoes_when_the_marker_is_missing(tmp_path):
    out = ensure_demo_dataset("isbi2012", tmp_path, pages=2, size=64)
    old = 1_000_000_000
    for path in out.rglob("*.tif"):
        os.utime(path, ns=(old, old))
    (out / MARKER).unlink()
    ensure_demo_dataset("isbi2012", out, pages=2, size=64)
    assert (out / MARKER).is_file()
    assert all(path.stat().st_mtime_ns != old for path in out.rglob("*.tif"))


def test_ensure_redoes_an_interrupted_write(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = demo_data._save_png

    def failing_save(array, path):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated interruption")
        real_save(array, path)

    ensure_demo_dataset("dsb2018", tmp_path, n=2, seed=1)  # an older complete copy with other parameters
    monkeypatch.setattr(demo_data, "_save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset("dsb2018", tmp_path, n=2)
    assert not (tmp_path / MARKER).exists()
    monkeypatch.setattr(demo_data, "_save_png", real_save)
    ensure_demo_dataset("dsb2018", tmp_path, n=2)
    assert json.loads((tmp_path / MARKER).read_text())["params"] == {"n": 2, "seed": 0}
    assert not list(tmp_path.glob(".demo-tmp-*"))
    expected = _files(write_dsb2018(tmp_path.parent / "fresh", n=2))
    assert _files(tmp_path).keys() - {demo_data.OWNER} >= expected.keys() - {demo_data.OWNER}


def test_concurrent_callers_write_once(tmp_path, monkeypatch):
    calls = []
    real = WRITERS["dsb2018"]

    @functools.wraps(real)  # ensure_demo_dataset reads the parameters from the signature
    def counting(out, **kwargs):
        calls.append(threading.get_ident())
        return real(out, **kwargs)

    monkeypatch.setitem(WRITERS, "dsb2018", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_demo_dataset("dsb2018", tmp_path, n=2))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [tmp_path] * 3
    assert len(calls) == 1
    assert len(list((tmp_path / "stage1_train").iterdir())) == 2


def test_foreign_data_is_never_replaced(tmp_path):
    user_file = tmp_path / "stage1_train" / "mine" / "images" / "mine.png"
    user_file.parent.mkdir(parents=True)
    user_file.write_bytes(b"not ours")
    with pytest.raises(DataError, match="stage1_train"):
        ensure_demo_dataset("dsb2018", tmp_path, n=1)
    assert user_file.read_bytes() == b"not ours"


def test_bad_arguments_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="isic2018"):
        ensure_demo_dataset("isic", tmp_path)
    with pytest.raises(ConfigError, match="n must be an integer >= 1"):
        write_dsb2018(tmp_path, n=0)
    with pytest.raises(ConfigError, match="takes only"):
        ensure_demo_dataset("isbi2012", tmp_path, n=3)
    with pytest.raises(ConfigError, match="shape"):
        write_luna16(tmp_path, shape=(8, 32))
    with pytest.raises(ConfigError, match="sizes"):
        write_isic2018(tmp_path, sizes=((10, 10),))
    assert not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_and_reports(tmp_path):
    out = tmp_path / "dsb"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "common.demo_data", "dsb2018", "--out", str(out), "--n", "3"]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "stage1_train/" in run.stdout and "3 folders" in run.stdout
    assert len(list((out / "stage1_train").iterdir())) == 3
    before = _mtimes(out)
    again = subprocess.run(command + ["--if-missing"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing written" in again.stdout
    assert _mtimes(out) == before


def test_cli_rejects_bad_count(tmp_path, capsys):
    assert main(["isbi2012", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "pages must be an integer >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- learnable
def test_isic_lesions_separable_by_colour_but_not_trivially(defaults):
    out = defaults["isic2018"]
    pixels, targets = [], []
    for image_path in sorted((out / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[::2]:
        mask_path = out / "ISIC2018_Task1_Training_GroundTruth" / f"{image_path.stem}_segmentation.png"
        pixels.append(np.asarray(Image.open(image_path), np.float32).reshape(-1, 3)[::31] / 255)
        targets.append(np.asarray(Image.open(mask_path)).reshape(-1)[::31] == 255)
    x, y = np.concatenate(pixels), np.concatenate(targets)
    features = np.c_[x, np.ones(len(x))]
    w = np.zeros(4)
    for _ in range(300):  # plain gradient descent on the logistic loss
        p = 1 / (1 + np.exp(-features @ w))
        w -= 5.0 * features.T @ (p - y) / len(y)
    assert _dice(features @ w > 0, y) > 0.5
    best_single_channel = max(_dice(x[:, c] < t, y) for c in range(3) for t in np.linspace(0, 1, 51))
    assert best_single_channel < 0.95


def test_isbi_membranes_darker_but_noisy(defaults):
    volume = tifffile.imread(defaults["isbi2012"] / "train-volume.tif")[:10]
    membrane = tifffile.imread(defaults["isbi2012"] / "train-labels.tif")[:10] == 0
    scores = [_dice(volume < t, membrane) for t in range(60, 200, 5)]
    assert 0.5 < max(scores) < 0.95


def test_dsb_and_luna_foreground_stand_out(defaults):
    dice = []
    for folder in sorted((defaults["dsb2018"] / "stage1_train").iterdir()):
        grey = np.asarray(Image.open(folder / "images" / f"{folder.name}.png"), np.float32)[..., :3].mean(
            axis=2
        )
        nuclei = sum(np.asarray(Image.open(p)) == 255 for p in (folder / "masks").iterdir())
        dice.append(_dice(np.abs(grey - np.median(grey)) > 30, nuclei > 0))
    assert np.mean(dice) > 0.5
    ct_path = sorted((defaults["luna16"] / "lung_ct_image").glob("*.mhd"))[0]
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path)))
    labels = sitk.GetArrayFromImage(
        sitk.ReadImage(str(defaults["luna16"] / "seg-lungs-LUNA16" / ct_path.name))
    )
    body_rows = ct > -500
    inside = (
        np.maximum.accumulate(body_rows, axis=2)
        & np.maximum.accumulate(body_rows[..., ::-1], axis=2)[..., ::-1]
    )
    assert _dice(inside & (ct < -500), np.isin(labels, (3, 4, 5))) > 0.5
