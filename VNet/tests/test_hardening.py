"""Hardening of VNet: bad data, bad flags, hostile or damaged checkpoints and crashes, tried
against the real entry points (normalize_dataset.py, train.py, predict.py, pthtar2onnx.py).

Every bad input must end in ONE user error (a ModelZooError, or argparse's / run_main's exit 2) whose
message names the file and the problem, before any training step and before the network is built, leaving
no checkpoint or output behind. Everything runs in-process on volumes of at most 32 voxels per axis with
one torch thread, except what needs a process: the SIGKILLed trainings and the 8p shell script.
Cases already covered by the other test files are named in the README's Troubleshooting table.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import normalize_dataset
import numpy as np
import predict
import pthtar2onnx
import pytest
import torch
import train
from normalize_dataset import CT_DIR, MARKER, MASK_DIR, OUT_CT_DIR, OUT_MASK_DIR

from common.checkpoint import load_checkpoint
from common.cli import run_main
from common.demo_data import write_luna16
from common.engine import TrainingRun
from common.errors import TrainingDiverged
from common.imageio import Volume, read_volume, same_geometry, write_volume
from common.testing import (
    NaNLossAt,
    child_env,
    fake_device_python,
    garble,
    start_killed_training,
    truncate,
    user_error,
)

FOLDER = Path(__file__).resolve().parents[1]
REPO = FOLDER.parent
SHAPE = (32, 32, 32)
TINY = ["--workers", "0", "--device", "cpu", "--batchSz", "1", "--val_overlap", "0", "--log_interval", "1"]
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------- writers


def _box(shape=SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    labels[tuple(slice(s // 4, s // 4 + max(2, s // 2)) for s in shape)] = 1
    return labels


def msd_tree(root: Path, n: int = 3, shape=SHAPE) -> Path:
    """A Decathlon task: imagesTr/<case>.nii.gz (MRI-like floats) + labelsTr/<case>.nii.gz (0/1)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = _box(shape)
        image = (rng.normal(0, 1, shape) + 2 * labels).astype(np.float32)
        write_volume(root / "imagesTr" / f"c{i}.nii.gz", image)
        write_volume(root / "labelsTr" / f"c{i}.nii.gz", labels)
    return root


def normalized_tree(root: Path, n: int = 2, shape=SHAPE, spacing=(4.0, 4.0, 4.0)) -> Path:
    """LUNA16 as normalize_dataset.py writes it (float32 CT .mhd/.raw, uint8 mask), without its marker."""
    rng = np.random.default_rng(1)
    for i in range(n):
        labels = _box(shape)
        ct = (rng.normal(0, 0.2, shape) - 0.8 + 1.5 * labels).astype(np.float32)
        write_volume(root / OUT_CT_DIR / f"u{i}.mhd", ct, spacing=spacing, compress=False)
        write_volume(root / OUT_MASK_DIR / f"u{i}.mhd", labels, spacing=spacing)
    return root


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads are slower (OpenMP spinning), and the
    SIGKILLed runs use the same count, so their results are bitwise comparable. No progress.png either."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingRun, "_plot", lambda self, final: None)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MODELZOO_")]:
        monkeypatch.delenv(key)
    yield
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)


def _err(capsys):
    return lambda: capsys.readouterr().err


def _train(tmp_path: Path, *flags: str):
    return lambda: train.main([*TINY, "--save", str(tmp_path / "save"), *flags])


def _no_model(monkeypatch) -> None:
    """Bad input must be refused before the 45M-parameter network is built."""
    monkeypatch.setattr(train, "VNet", lambda *a, **k: pytest.fail("model built before the input check"))


def _nothing_saved(tmp_path: Path) -> None:
    save = tmp_path / "save"
    assert not save.exists() or not any(save.iterdir()), "files written for a run that never started"


# ----------------------------------------------------------------------------------------------- data path


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("missing", ["data folder not found", "imagesTr/<case>.nii.gz", "lung_ct_image/<uid>.mhd"]),
        ("empty", ["not a dataset V-Net reads (sub-folders: none)", "seg-lungs-LUNA16/<uid>.mhd"]),
        ("file", ["is a file, not a data folder", "normalized_lung_ct/<uid>.mhd"]),
        ("foreign", ["sub-folders: scans/", "labelsTr/<case>.nii.gz"]),
        ("no_volumes", ["no volumes (.nii.gz, .mhd, ...) found", "imagesTr/<case>.nii.gz"]),
    ],
)
def test_train_data_path_problems_show_the_expected_tree(tmp_path, capsys, monkeypatch, kind, fragments):
    path = tmp_path / "data"
    if kind == "empty":
        path.mkdir()
        (path / ".DS_Store").write_text("")
    elif kind == "file":
        path.write_text("not a folder")
    elif kind == "foreign":
        (path / "scans").mkdir(parents=True)
    elif kind == "no_volumes":
        (path / "imagesTr").mkdir(parents=True)
        (path / "labelsTr").mkdir()
        (path / "imagesTr" / "readme.txt").write_text("x")
    _no_model(monkeypatch)
    message = user_error(_train(tmp_path, "--data", str(path)), *fragments, stderr=_err(capsys))
    assert str(path) in message
    _nothing_saved(tmp_path)


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("missing", ["LUNA16 CT folder not found", "lung_ct_image/<seriesuid>.mhd"]),
        ("file", ["LUNA16 CT folder not found", "seg-lungs-LUNA16/<seriesuid>.mhd"]),
        ("no_masks", ["LUNA16 lung mask folder not found", "seg-lungs-LUNA16/<seriesuid>.mhd"]),
        ("no_cts", ["LUNA16 CT folder is empty", "lung_ct_image/<seriesuid>.mhd"]),
    ],
)
def test_normalize_data_path_problems(tmp_path, capsys, kind, fragments):
    root = tmp_path / "luna"
    if kind == "file":
        root.write_text("x")
    elif kind == "no_masks":
        write_luna16(root, n=1, shape=(16, 16, 16))
        shutil.rmtree(root / MASK_DIR)
    elif kind == "no_cts":
        (root / CT_DIR).mkdir(parents=True)
        (root / MASK_DIR).mkdir()
    assert normalize_dataset.main([str(root), "4", "16", "16", "16", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[Error] ") and all(f in err for f in fragments), err
    assert not (root / OUT_CT_DIR).exists() and not (root / MARKER).exists()


# ----------------------------------------------------------------------------------------------- files


def _break_msd(data: Path, kind: str) -> list[str]:
    """Damage a 3-case Decathlon tree; returns what the message must contain."""
    images, labels = data / "imagesTr", data / "labelsTr"
    if kind == "image_without_mask":
        (labels / "c1.nii.gz").unlink()
        return [str(images / "c1.nii.gz"), "image has no mask"]
    if kind == "mask_without_image":
        (images / "c2.nii.gz").unlink()
        return [str(labels / "c2.nii.gz"), "mask has no image"]
    if kind == "duplicate_id":
        shutil.copy(images / "c1.nii.gz", images / "c1.nii")
        return ["duplicate image id 'c1'", "c1.nii.gz"]
    if kind == "truncated_nifti":
        truncate(images / "c1.nii.gz", 0.5)
        return [str(images / "c1.nii.gz"), "truncated or corrupt gzip"]
    if kind == "garbled_nifti":
        garble(labels / "c2.nii.gz", offset=40, length=40)
        return [str(labels / "c2.nii.gz"), "corrupt gzip stream"]
    if kind == "empty_nifti":
        (images / "c0.nii.gz").write_bytes(b"")
        return [str(images / "c0.nii.gz"), "cannot read volume", "damaged"]
    if kind == "not_nifti":
        (images / "c0.nii.gz").write_bytes(gzip.compress(b"\x00" * 400))  # gzip, but no NIfTI header
        return [str(images / "c0.nii.gz"), "not a NIfTI file"]
    if kind in ("mask_size", "mask_spacing", "mask_origin", "mask_direction"):
        geometry = {"mask_spacing": {"spacing": (2.0, 1.0, 1.0)}, "mask_origin": {"origin": (5.0, 0.0, 0.0)},
                    "mask_direction": {"direction": FLIP_X}}.get(kind, {})  # fmt: skip
        shape = (16, 32, 32) if kind == "mask_size" else SHAPE
        write_volume(labels / "c1.nii.gz", _box(shape), **geometry)
        what = {"mask_size": "shape (32, 32, 32) != (16, 32, 32)", "mask_spacing": "spacing (1, 1, 1) != (2, 1, 1)",
                "mask_origin": "origin (0, 0, 0) != (5, 0, 0)", "mask_direction": "direction"}[kind]  # fmt: skip
        return [str(labels / "c1.nii.gz"), "geometry differs from image c1.nii.gz", what]
    if kind in ("nan_nifti", "inf_nifti"):  # ITK's reader would hand back 0 here: counted from the file
        image = np.zeros(SHAPE, np.float32)
        image[1, 2, 3:5] = np.nan if kind == "nan_nifti" else -np.inf
        write_volume(images / "c2.nii.gz", image)
        counts = "(2 NaN, 0 infinite)" if kind == "nan_nifti" else "(0 NaN, 2 infinite)"
        return [str(images / "c2.nii.gz"), f"2 of 32768 voxels are not finite {counts}"]
    if kind == "two_bad_files":
        truncate(images / "c0.nii.gz", 0.5)
        garble(labels / "c2.nii.gz", offset=40, length=40)
        return ["2 problem(s) in 2 file(s)", str(images / "c0.nii.gz"), str(labels / "c2.nii.gz")]
    raise AssertionError(kind)


MSD_BROKEN = ["image_without_mask", "mask_without_image", "duplicate_id", "truncated_nifti", "garbled_nifti",
              "empty_nifti", "not_nifti", "mask_size", "mask_spacing", "mask_origin", "mask_direction", "nan_nifti", "inf_nifti",
              "two_bad_files"]  # fmt: skip


@pytest.mark.parametrize("kind", MSD_BROKEN)
def test_bad_decathlon_files_are_named_before_the_model(tmp_path, capsys, monkeypatch, kind):
    data = msd_tree(tmp_path / "task")
    fragments = _break_msd(data, kind)
    _no_model(monkeypatch)
    user_error(_train(tmp_path, "--data", str(data)), *fragments, stderr=_err(capsys))
    _nothing_saved(tmp_path)


@pytest.mark.parametrize(
    ("case", "value", "fragment"),
    [("u0", np.nan, "1 of 32768 voxels are not finite (1 NaN, 0 infinite)"),
     ("u1", np.inf, "1 of 32768 voxels are not finite (0 NaN, 1 infinite)")],
)  # fmt: skip
def test_non_finite_ct_voxels_are_refused_for_training_and_validation_cases(
    tmp_path, capsys, monkeypatch, case, value, fragment
):
    """Whichever side of the split the case falls on (u0 trains, u1 validates): refused up front, not after
    an epoch of training (MetaImage here; NIfTI in test_bad_decathlon_files_are_named_before_the_model)."""
    data = normalized_tree(tmp_path / "luna")
    ct = read_volume(data / OUT_CT_DIR / f"{case}.mhd")
    ct.array[3, 4, 5] = value
    write_volume(data / OUT_CT_DIR / f"{case}.mhd", ct.array, like=ct, compress=False)
    _no_model(monkeypatch)
    user_error(_train(tmp_path, "--data", str(data), "--val_fraction", "0.5"), str(data / OUT_CT_DIR / f"{case}.mhd"),
               fragment, stderr=_err(capsys))  # fmt: skip
    _nothing_saved(tmp_path)


def _break_luna(root: Path, kind: str) -> list[str]:
    """Damage a LUNA16 tree as distributed (2 cases); returns what the message must contain."""
    cts = sorted((root / CT_DIR).glob("*.mhd"))
    masks = sorted((root / MASK_DIR).glob("*.mhd"))
    if kind == "missing_raw":
        cts[0].with_suffix(".raw").unlink()
        return [str(cts[0].with_suffix(".raw")), f"data file named by {cts[0].name}", "is missing"]
    if kind == "short_raw":
        truncate(cts[1].with_suffix(".raw"), 0.5)
        return [str(cts[1].with_suffix(".raw")), "data file is too short", "expects 8192 bytes", "holds 4096"]
    if kind == "short_zraw":
        truncate(masks[0].with_suffix(".zraw"), 0.5)
        return [str(masks[0].with_suffix(".zraw")), "compressed data is too short"]
    if kind == "ct_without_mask":
        masks[0].with_suffix(".zraw").unlink()
        masks[0].unlink()
        return [str(cts[0]), "CT has no lung mask in seg-lungs-LUNA16"]
    if kind == "mask_without_ct":
        cts[1].with_suffix(".raw").unlink()
        cts[1].unlink()
        return [str(masks[1]), "mask has no CT in lung_ct_image"]
    if kind == "duplicate_id":
        write_volume(root / CT_DIR / f"{cts[0].stem}.nii.gz", read_volume(cts[0]).array)
        return [f"duplicate image id '{cts[0].stem}'", f"{cts[0].stem}.nii.gz"]
    if kind in ("mask_spacing", "mask_origin", "mask_direction"):
        mask = read_volume(masks[1])
        geometry = {"spacing": mask.spacing, "origin": mask.origin, "direction": mask.direction}
        key = kind.removeprefix("mask_")
        geometry[key] = {"spacing": (3.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0), "direction": FLIP_X}[key]
        write_volume(masks[1], mask.array, **geometry)
        return [str(masks[1]), f"mask geometry differs from its CT {cts[1].name}", key]
    if kind == "nan_ct":
        ct = read_volume(cts[0])
        array = ct.array.astype(np.float32)
        array[1, 2, 3] = np.nan
        write_volume(cts[0], array, like=ct, compress=False)
        return [str(cts[0]), "voxels are not finite (1 NaN"]
    if kind == "non_integer_labels":
        mask = read_volume(masks[0])
        write_volume(masks[0], mask.array.astype(np.float32) + 0.5, like=mask)
        return [str(masks[0]), "mask holds non-integer values"]
    raise AssertionError(kind)


LUNA_BROKEN = ["missing_raw", "short_raw", "short_zraw", "ct_without_mask", "mask_without_ct", "duplicate_id",
               "mask_spacing", "mask_origin", "mask_direction", "nan_ct", "non_integer_labels"]  # fmt: skip


@pytest.mark.parametrize("entry", ["normalize_dataset.py", "train.py"])
@pytest.mark.parametrize("kind", LUNA_BROKEN)
def test_bad_luna16_files_are_named_and_nothing_is_marked_complete(
    tmp_path, capsys, monkeypatch, entry, kind
):
    root = write_luna16(tmp_path / "luna", n=2, shape=(16, 16, 16))
    fragments = _break_luna(root, kind)
    if entry == "train.py":
        _no_model(monkeypatch)
        call = _train(tmp_path, "--data", str(root), "--vox_spacing", "4", "--volume_size", "16x16x32",
                      "--normalize_workers", "1")  # fmt: skip
        user_error(call, *fragments, stderr=_err(capsys))
        _nothing_saved(tmp_path)
    else:
        assert normalize_dataset.main([str(root), "4", "16", "16", "32", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("[Error] ") and err.count("[Error]") == 1, err
        assert all(f in err for f in fragments), (fragments, err)
    # Good cases may be written, but the tree is never marked complete, so nothing reuses it.
    assert not list(root.rglob(MARKER)), "an incomplete normalisation was marked complete"


def test_luna16_label_policy_and_unexpected_labels(tmp_path, capsys):
    """Documented policy: lung = labels 3 and 4, the trachea (5) is background unless --lung_labels lists
    it, and labels outside {0, 3, 4, 5} are reported (a warning, the case is kept). Independent check: the
    written mask against np.isin on the source labels resampled by the same identity grid."""
    root = write_luna16(tmp_path / "luna", n=1, shape=(16, 16, 16))
    (mask_path,) = (root / MASK_DIR).glob("*.mhd")
    mask = read_volume(mask_path)
    labels = mask.array.copy()
    labels[0, 0, :4] = 7
    write_volume(mask_path, labels, like=mask)
    spacing = mask.spacing[0]  # z spacing; y/x differ, so compare lung volumes (ml), not voxels
    assert normalize_dataset.main([str(root), str(spacing), "16", "16", "16", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "labels [7] are not LUNA16 lung-mask labels (0, 3, 4, 5)" in out
    report = json.loads((root / MARKER).read_text())["reports"][0]
    assert report["labels"] == [0, 3, 4, 5, 7]
    expected_ml = float(np.isin(labels, (3, 4)).sum() * np.prod(mask.spacing) / 1000)
    assert report["lung_ml"] == pytest.approx(expected_ml, abs=0.01)


# ----------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--batchSz", "0"], ["--batchSz", "must be a positive integer, got 0"]),
        (["--batch_size", "-2"], ["--batchSz", "must be a positive integer, got -2"]),
        (["--lr", "-0.1"], ["--lr", "must be a positive number, got -0.1"]),
        (["--lr", "0"], ["--lr", "must be a positive number, got 0"]),
        (["--nEpochs", "0"], ["--nEpochs", "must be a positive integer, got 0"]),
        (["--opt-level", "O7"], ["invalid choice: 'O7'", "O0", "O3"]),
        (["--opt", "lamb"], ["--opt", "invalid choice: 'lamb'", "adam", "sgd", "rmsprop"]),
        (["--loss", "focal"], ["--loss", "invalid choice: 'focal'", "dice", "dice_ce", "nll"]),
        (["--dataset", "kits"], ["--dataset", "invalid choice: 'kits'", "luna16", "msd"]),
        (
            ["--patch_size", "20x32x32"],
            ["--patch_size 20x32x32: V-Net needs multiples of 16", "use 32x32x32"],
        ),
        (["--patch_size", "16x16x16"], ["--patch_size 16x16x16 with --batchSz 1", "BatchNorm", "16x16x32"]),
        (["--patch_size", "64xax64"], ["--patch_size must look like 64x80x80"]),
        (["--val_patch_size", "24"], ["--val_patch_size 24x24x24", "use 32x32x32"]),
        (["--val_overlap", "1"], ["--val_overlap must lie in [0, 1), got 1.0"]),
        (["--lr_milestones", "ten"], ["--lr_milestones must be comma-separated epochs"]),
        (["--workers", "-1"], ["--workers", "must be >= 0, got -1"]),
        (["--weight_decay", "-1"], ["--weight_decay", "must be >= 0"]),
        (["--label_map", "lungs"], ["--label_map 'lungs'", "'gtN'"]),
        (["--val_fraction", "1.5"], ["--val_fraction must lie in [0, 1), got 1.5"]),
        (["--resume", "{tmp}/none.pth.tar"], ["checkpoint {tmp}/none.pth.tar does not exist"]),
    ],
)
def test_train_flags_state_the_rule(tmp_path, capsys, monkeypatch, flags, fragments):
    data = msd_tree(tmp_path / "task", n=3, shape=(16, 16, 16))
    _no_model(monkeypatch)
    flags = [f.format(tmp=tmp_path) for f in flags]
    fragments = [f.format(tmp=tmp_path) for f in fragments]
    user_error(_train(tmp_path, "--data", str(data), *flags), *fragments, stderr=_err(capsys))
    _nothing_saved(tmp_path)


def test_missing_data_flag(tmp_path, capsys):
    user_error(lambda: train.main(TINY), "--data (or --data_path) is required", stderr=_err(capsys))


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["4", "16", "20", "16"], ["Z_MAX Y_MAX X_MAX must be multiples of 16", "16 20 16"]),
        (["-1"], ["vox_spacing must be a positive number of mm"]),
        (["--workers", "0"], ["--workers must be at least 1, got 0"]),
        (["--lung_labels", "lungs"], ["--label_map 'lungs'"]),
    ],
)
def test_normalize_flags_state_the_rule(tmp_path, capsys, flags, fragments):
    root = tmp_path / "luna"
    assert normalize_dataset.main([str(root), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[Error] ") and all(f in err for f in fragments), err


def test_more_ranks_than_devices_is_refused_by_the_script(tmp_path):
    """`RANK_SIZE=8 bash test/train_full_8p.sh` on a node that reports 2 devices (a fake `python -m
    common.device_count`): the shell library refuses before launching anything. (On a CPU-only node the
    documented fallback runs gloo ranks: test_train.py runs the 8p script with two.)"""
    copy = tmp_path / "repo" / FOLDER.name
    (copy / "test").mkdir(parents=True)
    (tmp_path / "repo" / "common").symlink_to(REPO / "common", target_is_directory=True)
    for path in [*FOLDER.glob("*.py"), *(FOLDER / "test").glob("*.sh")]:
        shutil.copy2(path, copy / path.relative_to(FOLDER))
    data = normalized_tree(tmp_path / "luna")
    env = child_env(threads=None, RANK_SIZE="8", PYTHON=str(fake_device_python(tmp_path, 2)))
    proc = subprocess.run(["bash", "test/train_full_8p.sh", f"--data_path={data}"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "RANK_SIZE=8 ranks asked for on a node with 2 accelerator(s)" in proc.stderr, proc.stderr
    assert not (copy / "work").exists()


@pytest.mark.parametrize(
    ("script", "args", "fragment"),
    [
        ("train.py", ["--data", "{tmp}/nowhere"], "{tmp}/nowhere: data folder not found"),
        ("train.py", ["--data", "{tmp}", "--resume", "{tmp}/c.pth"], "checkpoint {tmp}/c.pth does not exist"),
        ("normalize_dataset.py", ["{tmp}/nowhere"], "{tmp}/nowhere/lung_ct_image: LUNA16 CT folder not found"),
        ("predict.py", ["--checkpoint", "{tmp}/c.pth", "--input", "{tmp}/in.mhd", "--output", "{tmp}/o"],
         "{tmp}/in.mhd: no such file or folder"),
        ("pthtar2onnx.py", ["--checkpoint", "{tmp}/c.pth"], "checkpoint {tmp}/c.pth does not exist"),
    ],
)  # fmt: skip
def test_every_entry_point_turns_user_errors_into_one_line(
    tmp_path, capsys, monkeypatch, script, args, fragment
):
    """`python <script> ...` as a user runs it: exit status 2 and one `[Error]` line naming the file."""
    monkeypatch.setattr(sys, "argv", [script, *(a.format(tmp=tmp_path) for a in args)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(FOLDER / script), run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("[Error] " + fragment.format(tmp=tmp_path)), err
    assert err.count("[Error]") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- checkpoints

SMALL = (10, 12, 14)  # below V-Net's 16 per axis: padded (documented), never refused


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """1 epoch on a Decathlon task of 10x12x14 volumes (smaller than the network's 16 per axis: the patch
    becomes 16x16x32, the volumes are padded); SGD without momentum keeps the checkpoint at 180 MB.
    Returns (data folder, vnet_checkpoint.pth.tar)."""
    root = tmp_path_factory.mktemp("trained")
    data = msd_tree(root / "task", n=3, shape=SMALL)
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("MODELZOO_")]}
    try:
        args = [*TINY, "--data", str(data), "--save", str(root / "run"), "--nEpochs", "1", "--opt", "sgd",
                "--momentum", "0", "--val_fraction", "0.34"]  # fmt: skip
        assert train.main(args) == 0
    finally:
        os.environ.update(saved)
    return data, root / "run" / "vnet_checkpoint.pth.tar"


def test_volumes_below_the_network_minimum_are_padded_in_training_and_prediction(trained, tmp_path):
    """Training on 10x12x14 volumes worked (the fixture) with a 16x16x32 patch and a finite validation Dice;
    predict.py on an even smaller 5x6x7 volume writes a mask of exactly the input's geometry."""
    state = load_checkpoint(trained[1])
    assert state["config"]["patch_size"] == [16, 16, 32] and state["epoch"] == 1
    assert 0.0 <= state["history"][0]["dice_mean"] <= 1.0
    volume = Volume(np.random.default_rng(0).normal(0, 1, (5, 6, 7)).astype(np.float32), (2.0, 1.5, 1.0),
                    (3.0, -4.0, 5.0), FLIP_X)  # fmt: skip
    write_volume(tmp_path / "tiny.nii.gz", volume.array, like=volume)
    args = ["--checkpoint", str(trained[1]), "--input", str(tmp_path / "tiny.nii.gz"), "--output",
            str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    assert predict.main(args) == 0
    mask = read_volume(tmp_path / "out" / "tiny.nii.gz")
    assert same_geometry(mask, volume, tol=1e-6) is None and set(np.unique(mask.array)) <= {0, 1}


class _Payload:
    """Unpickling this calls Path.touch(marker): code that a checkpoint must never get to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


CHECKPOINT_KINDS = ["truncated", "garbled", "empty", "missing", "pickled_payload", "other_model", "other_shape",
                    "weights_only"]  # fmt: skip


@pytest.fixture(scope="module")
def bad_checkpoints(trained, tmp_path_factory):
    """Each kind of unusable checkpoint, written once: {kind: (path, message fragments)}."""
    folder = tmp_path_factory.mktemp("bad")
    good = trained[1]
    data = good.read_bytes()
    state = torch.load(good, weights_only=True)
    out: dict[str, tuple[Path, list[str]]] = {}
    path = folder / "truncated.pth.tar"
    path.write_bytes(data[: len(data) // 2])
    out["truncated"] = (path, [str(path), "is corrupted or truncated"])
    path = folder / "garbled.pth.tar"
    path.write_bytes(data)
    garble(path, offset=len(data) // 2, length=64)
    out["garbled"] = (path, [str(path), "is corrupted or truncated"])
    path = folder / "empty.pth.tar"
    path.write_bytes(b"")
    out["empty"] = (path, [str(path), "is corrupted"])
    out["missing"] = (folder / "missing.pth.tar", [str(folder / "missing.pth.tar"), "does not exist"])
    path = folder / "pickled_payload.pth.tar"
    torch.save({**state, "extra": _Payload(folder / "marker")}, path)
    out["pickled_payload"] = (path, [str(path), "refusing to load", "could run code"])
    path = folder / "other_model.pth.tar"  # a 2-D network's training state
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).state_dict()
    torch.save({**state, "state_dict": other}, path)
    out["other_model"] = (path, [str(path), "does not fit VNet", "missing keys (in_tr.conv1.weight",
                                 "unexpected keys (0.weight"])  # fmt: skip
    path = folder / "other_shape.pth.tar"  # a 3-class V-Net's output layer
    weights = dict(state["state_dict"])
    weights["out_tr.conv2.weight"] = torch.zeros(3, 2, 1, 1, 1)
    torch.save({**state, "state_dict": weights}, path)
    out["other_shape"] = (path, [str(path), "does not fit VNet", "1 shape mismatches",
                                 "out_tr.conv2.weight: checkpoint (3, 2, 1, 1, 1) vs model (2, 2, 1, 1, 1)"])  # fmt: skip
    path = folder / "weights_only.pth"
    torch.save(state["state_dict"], path)
    out["weights_only"] = (path, [str(path), "holds weights only", "--pretrained"])
    return folder, out


UNREADABLE = ("truncated", "garbled", "empty", "missing", "pickled_payload", "weights_only")


@pytest.mark.parametrize("entry", ["resume", "pretrained", "predict", "export"])
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_unusable_checkpoints_are_refused_with_the_reason(
    trained, bad_checkpoints, tmp_path, capsys, monkeypatch, entry, kind
):
    data, good = trained
    folder, kinds = bad_checkpoints
    path, fragments = kinds[kind]
    if kind == "weights_only" and entry != "resume":
        pytest.skip("weights only is what --pretrained, predict.py and pthtar2onnx.py take")
    if kind in UNREADABLE and entry in ("resume", "pretrained"):
        # Read first: no data check and no network for a file that cannot be used.
        monkeypatch.setattr(
            train, "resolve_data", lambda *a, **k: pytest.fail("data read before the checkpoint")
        )
        _no_model(monkeypatch)
    out = tmp_path / "out"
    before = good.stat()
    if entry in ("resume", "pretrained"):
        call = _train(tmp_path, "--data", str(data), "--val_fraction", "0.34", f"--{entry}", str(path))
    elif entry == "predict":
        write_volume(tmp_path / "in" / "a.nii.gz", np.zeros(SMALL, np.float32))
        call = lambda: predict.main(["--checkpoint", str(path), "--input", str(tmp_path / "in"),  # noqa: E731
                                     "--output", str(out), "--device", "cpu"])  # fmt: skip
    else:
        call = lambda: run_main(lambda: pthtar2onnx.main(["--checkpoint", str(path), "--output",  # noqa: E731
                                                          str(out / "m.onnx"), "--input_size", "16x16x32"]))  # fmt: skip
    user_error(call, *fragments, stderr=_err(capsys))
    assert not (folder / "marker").exists(), "the checkpoint ran code"
    assert not out.exists(), "output written from an unusable checkpoint"
    if entry in ("resume", "pretrained"):
        assert not (tmp_path / "save" / "vnet_checkpoint.pth.tar").exists()
    after = good.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_the_payload_is_real(bad_checkpoints):
    """The refused file would indeed have run code under a plain torch.load (so the test above means it)."""
    folder, kinds = bad_checkpoints
    marker = folder / "marker"
    try:
        torch.load(kinds["pickled_payload"][0], weights_only=False)
        assert marker.exists()
    finally:
        marker.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- predict


def _write_inputs(folder: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        volume = Volume(np.full(SMALL, -700 + 10 * i, np.int16), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        paths.append(folder / f"s{i}.mhd")
        write_volume(paths[-1], volume.array, like=volume)
    return paths


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("missing", ["no such file or folder"]),
        ("empty", ["the folder holds no volumes"]),
        ("not_a_volume", ["not a volume file"]),
        ("short_raw", ["1 problem(s) with 3 input volume(s); nothing was written", "s1.zraw",
                       "compressed data is too short"]),
        ("missing_raw", ["s2.zraw", "is missing"]),
        ("nan", ["s0.mhd", "1 of 1680 voxels are not finite (1 NaN"]),
        ("nan_nifti", ["s3.nii.gz", "1 of 1680 voxels are not finite (1 NaN"]),
        ("reference_missing", ["no reference mask named s1.* for s1.mhd"]),
        ("reference_geometry", ["ref/s2.mhd", "reference mask geometry differs from s2.mhd", "origin"]),
    ],
)  # fmt: skip
def test_predict_inputs_are_checked_before_anything_is_written(trained, tmp_path, capsys, kind, fragments):
    source = tmp_path / "in"
    extra: list[str] = []
    if kind == "empty":
        source.mkdir()
    elif kind == "not_a_volume":
        source.mkdir()
        source = source / "notes.txt"
        source.write_text("x")
    elif kind != "missing":
        paths = _write_inputs(source)
        if kind == "short_raw":
            truncate(paths[1].with_suffix(".zraw"), 0.5)
        elif kind == "missing_raw":
            paths[2].with_suffix(".zraw").unlink()
        elif kind in ("nan", "nan_nifti"):
            one_nan = np.where(np.arange(1680).reshape(SMALL) == 7, np.nan, 0).astype(np.float32)
            write_volume(paths[0] if kind == "nan" else source / "s3.nii.gz", one_nan)
        elif kind.startswith("reference"):
            refs = _write_inputs(tmp_path / "ref")
            if kind == "reference_missing":
                refs[1].with_suffix(".zraw").unlink()
                refs[1].unlink()
            else:
                write_volume(
                    refs[2], np.zeros(SMALL, np.uint8), spacing=(2.0, 1.0, 1.0), origin=(9.0, 0.0, 0.0)
                )
            extra = ["--reference", str(tmp_path / "ref")]
    out = tmp_path / "out"
    args = ["--checkpoint", str(trained[1]), "--input", str(source), "--output", str(out), "--device", "cpu"]
    user_error(lambda: predict.main([*args, *extra]), *fragments, stderr=_err(capsys))
    assert not out.exists(), "masks written before every input was checked"


@pytest.mark.parametrize(
    ("script", "flags", "fragments"),
    [
        ("predict", ["--threshold", "1.5"], ["--threshold must lie in (0, 1), got 1.5"]),
        ("predict", ["--overlap", "1"], ["--overlap must lie in [0, 1), got 1.0"]),
        ("predict", ["--sw_batch", "0"], ["--sw_batch", "must be a positive integer, got 0"]),
        ("predict", ["--patch_size", "20x32x32"], ["--patch_size 20x32x32", "use 32x32x32"]),
        ("predict", ["--vox_spacing", "-1"], ["--vox_spacing must be a positive number of mm"]),
        ("predict", ["--format", ".png"], ["--format", "invalid choice: '.png'"]),
        ("export", ["--input_size", "16x16x8"], ["--input_size 16x16x8", "use 16x16x16"]),
        ("export", ["--layout", "nhwc"], ["--layout", "invalid choice: 'nhwc'"]),
    ],
)
def test_predict_and_export_flags_state_the_rule(trained, tmp_path, capsys, script, flags, fragments):
    out = tmp_path / "out"
    if script == "predict":
        _write_inputs(tmp_path / "in", 1)
        args = [
            "--checkpoint",
            str(trained[1]),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(out),
            *flags,
        ]
        call = lambda: predict.main(args)  # noqa: E731
    else:
        args = ["--checkpoint", str(trained[1]), "--output", str(out / "m.onnx"), *flags]
        call = lambda: run_main(lambda: pthtar2onnx.main(args))  # noqa: E731
    user_error(call, *fragments, stderr=_err(capsys))
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- faults


def test_disk_full_keeps_the_previous_checkpoint_and_stops_clearly(trained, tmp_path, capsys, monkeypatch):
    """Epoch 2 of a resumed run cannot be saved (ENOSPC after part of the file reached the disk): the
    epoch-1 checkpoint stays byte for byte, no temporary file is left, one clear line, exit status 2."""
    data, good = trained
    save = tmp_path / "save"
    save.mkdir()
    latest = shutil.copyfile(good, save / "vnet_checkpoint.pth.tar")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    args = [*TINY, "--data", str(data), "--save", str(save), "--nEpochs", "2", "--opt", "sgd", "--momentum", "0",
            "--val_fraction", "0.34", "--resume", str(latest)]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        run_main(lambda: train.main(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("[Error]") == 1 and "Traceback" not in err
    assert f"could not write checkpoint {latest}: no space left on device" in err
    assert f"the previous checkpoint {latest} is intact" in err
    monkeypatch.undo()
    assert latest.read_bytes() == good.read_bytes()
    assert not [p.name for p in save.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


def test_nan_steps_are_skipped_and_counted_and_persistent_nan_stops_with_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """2 steps per epoch: step 1 NaN (skipped, counted, training goes on), step 2 fine, then NaN for good:
    with --max_skipped_steps 2 the run stops in epoch 2 with TrainingDiverged and keeps epoch 1's checkpoint."""
    data = msd_tree(tmp_path / "task", n=3, shape=SMALL)
    real = train.TwoClassDiceLoss
    monkeypatch.setattr(
        train, "TwoClassDiceLoss", lambda **k: NaNLossAt(real(**k), lambda n: n == 1 or n >= 3)
    )
    args = [*TINY, "--data", str(data), "--save", str(tmp_path / "save"), "--nEpochs", "2", "--opt", "sgd",
            "--momentum", "0", "--val_fraction", "0.34", "--samples_per_volume", "2", "--max_skipped_steps", "2"]  # fmt: skip
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row had non-finite gradients"):
        train.main(args)
    state = load_checkpoint(tmp_path / "save" / "vnet_checkpoint.pth.tar")
    assert state["epoch"] == 1
    assert state["history"][0]["skipped_steps"] == 1 and state["amp"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    out = capsys.readouterr().out
    assert "Loss: nan" in out and "Train Epoch: 1.00" in out and "Train Epoch: 1.50" not in out  # stopped


# One training step per epoch (1 training case, 1 patch), deterministic kernels; SGD without momentum halves
# the checkpoint (the exact resume of an optimizer's state is test_train.py's, with Adam).
KILL_ARGS = [*TINY, "--nEpochs", "2", "--opt", "sgd", "--momentum", "0", "--val_fraction", "0.5",
             "--deterministic", "--seed", "7"]  # fmt: skip


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Both killed runs start as processes; the uninterrupted reference trains here meanwhile.

    Returns the reference's final state and, per moment, (return code, output, flags, save folder)."""
    root = tmp_path_factory.mktemp("killed")
    data = msd_tree(root / "task", n=2, shape=SMALL)
    runs = {}
    for moment in ("mid_epoch", "mid_write"):
        args = [*KILL_ARGS, "--data", str(data), "--save", str(root / moment)]
        proc = start_killed_training(FOLDER, moment, "TwoClassDiceLoss", args, cwd=root)
        runs[moment] = (proc, args, root / moment)
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("MODELZOO_")]}
    try:
        assert train.main([*KILL_ARGS, "--data", str(data), "--save", str(root / "reference")]) == 0
        reference = load_checkpoint(root / "reference" / "vnet_checkpoint.pth.tar")
        results = {}
        for moment, (proc, args, save) in runs.items():
            output, _ = proc.communicate(timeout=300)
            results[moment] = (proc.returncode, output, args, save)
    finally:
        for proc, _, _ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        os.environ.update(saved)
        torch.use_deterministic_algorithms(False)
    return reference, results


@pytest.mark.parametrize("moment", ["mid_epoch", "mid_write"])
def test_sigkill_keeps_the_last_checkpoint_and_resume_reaches_the_same_weights(killed_runs, moment):
    """SIGKILL while epoch 2 trains / while its checkpoint is half written: vnet_checkpoint.pth.tar still
    loads and holds epoch 1; --resume then ends with exactly the weights of the uninterrupted run."""
    reference, results = killed_runs
    returncode, output, args, save = results[moment]
    assert returncode == -signal.SIGKILL, output[-3000:]
    latest = save / "vnet_checkpoint.pth.tar"
    assert load_checkpoint(latest)["epoch"] == 1
    leftovers = [p for p in save.iterdir() if p.name.endswith(".tmp")]
    assert bool(leftovers) == (moment == "mid_write")  # the half-written file never replaced the good one
    if moment == "mid_epoch":
        assert "Test set:" in output and "Train Epoch: 1." not in output
    try:
        assert train.main([*args, "--resume", str(latest)]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    resumed = load_checkpoint(latest)
    assert resumed["epoch"] == 2 and reference["epoch"] == 2
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    for key, value in reference["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "case",
    [
        "truncated or garbled JPEG / PNG / TIFF",
        "JPEG-compressed masks, 0/1 versus 0/255 palettes",
        "16-bit PNG, grayscale or RGBA where RGB is expected",
        "--model_type / --arch (one network)",
    ],
)
def test_two_dimensional_cases_do_not_apply(case):
    pytest.skip(
        f"{case}: V-Net reads 3-D volumes only (MetaImage, NIfTI, NRRD; any integer or float voxel type) and "
        "builds one network; Decathlon labels go through --label_map (default: every label above 0)"
    )
