"""Hardening of the ISIC family: bad data, bad flags, bad checkpoints and killed runs, tried
against the REAL entry points of AttU_Net/ and R2U_Net/ (dataset.py, main.py train / --mode test,
predict.py, pthtar2onx.py, run_scripts/run_AttU_Net.py, test/*.sh).

Entry points run in this process through runpy (as `python <script>` would, `run_main` included), so a
case costs milliseconds; only the SIGKILL cases start processes. Every bad input must end with a
non-zero exit and one message naming the file and the problem, before any training step, with nothing
half-written. Images are 40x32 (a few tiny ones smaller).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import os
import runpy
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import load_checkpoint
from common.demo_data import write_isic2018
from common.isic import prepare as P
from common.isic.dataset import cache_size_for, open_split_cache
from common.isic.solver import build_network
from common.testing import garble, truncate

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("AttU_Net", "R2U_Net")
VALID_MODELS = ("U_Net", "R2U_Net", "AttU_Net", "R2AttU_Net")
SIZE = 32  # --image_size of every run here
CACHE = cache_size_for(SIZE)
TINY = ["--image_size", str(SIZE), "--workers", "0", "--warmup_steps", "0"]


def _load_main(folder: str):
    """The folder's main.py as a module (its DEFAULTS), without running it."""
    spec = importlib.util.spec_from_file_location(f"_hardening_main_{folder}", REPO / folder / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / folder))
    return module


MAINS = {folder: _load_main(folder) for folder in FOLDERS}


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELZOO_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("MODELZOO_OUTPUT_DIR", "MODELZOO_CASE_NAME", "MODELZOO_NETWORK", "MODELZOO_MODE",
                 "MODELZOO_BATCH_SIZE", "MODELZOO_RANK_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    # One thread: the machine (CI: 2 cores) runs other suites beside this one, and the tiny steps here gain
    # nothing from a second thread that then spins waiting for a core.
    torch.set_num_threads(1)
    yield
    _restore(deterministic, threads)


def _restore(deterministic: bool, threads: int) -> None:
    """Undo --deterministic (it is process-wide) and the thread count; the setter is only called when the
    value changed, since it imports torch._inductor (seconds)."""
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Ten 40x32 pairs in the official layout: 7 / 1 / 2 after the seeded split."""
    return write_isic2018(tmp_path_factory.mktemp("isic") / "isic2018", n=10, sizes=((40, 32),))


@pytest.fixture
def data(demo, tmp_path) -> Path:
    """A private copy of the demo dataset to break."""
    return Path(shutil.copytree(demo, tmp_path / "isic2018"))


def entry(monkeypatch, folder: str, script: str, *argv: str) -> int:
    """Run `python <folder>/<script> argv...` in this process; returns the exit status."""
    path = REPO / folder / script
    monkeypatch.setitem(sys.modules, "main", MAINS[folder])  # predict.py / pthtar2onx.py: `from main import`
    monkeypatch.syspath_prepend(str(REPO / folder))
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def failure(capsys, *fragments: str) -> str:
    """The one error message printed to stderr: `[Error] ...` (ours) or `... error: ...` (argparse)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("[Error] ") or ": error: " in line]
    assert len(lines) == 1, err
    message = err[err.index(lines[0]) :]
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{message!r} lacks {missing}"
    return message


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--model_path", str(out / "models"), "--result_path", str(out / "result"),
            "--batch_size", "2", *TINY, *extra]  # fmt: skip


def nothing_written(out: Path) -> None:
    written = [str(p) for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, written


def stem(index: int) -> str:
    return f"ISIC_{index:07d}"


def image_path(data: Path, index: int) -> Path:
    return data / P.IMAGE_DIR / f"{stem(index)}.jpg"


def mask_path(data: Path, index: int) -> Path:
    return data / P.GT_DIR / f"{stem(index)}{P.GT_SUFFIX}.png"


# ----------------------------------------------------------------------------------------------- data paths


def _layout(kind: str, tmp: Path, demo: Path) -> Path:
    if kind == "missing":
        return tmp / "nowhere"
    if kind == "empty":
        (tmp / "empty").mkdir()
        return tmp / "empty"
    if kind == "a_file":
        (tmp / "file.txt").write_text("not a folder")
        return tmp / "file.txt"
    if kind == "wrong_layout":
        (tmp / "wrong" / "images").mkdir(parents=True)
        shutil.copy(image_path(demo, 0), tmp / "wrong" / "images")
        return tmp / "wrong"
    if kind == "images_without_gt_folder":
        shutil.copytree(demo / P.IMAGE_DIR, tmp / "half" / P.IMAGE_DIR)
        return tmp / "half"
    if kind == "incomplete_split_layout":
        for name in ("train", "train_GT", "valid"):
            (tmp / "split" / name).mkdir(parents=True)
        return tmp / "split"
    raise AssertionError(kind)


LAYOUTS = {
    "missing": "--data_path does not exist",
    "empty": "--data_path is an empty folder",
    "a_file": "--data_path is not a directory",
    "wrong_layout": "is neither ISIC 2018 Task 1 as distributed nor a prepared split layout (it holds images)",
    "images_without_gt_folder": f"the {P.GT_DIR} folder (or {P.GT_DIR}.zip) is missing",
    "incomplete_split_layout": "incomplete split layout: valid_GT, test, test_GT missing",
}


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("kind", list(LAYOUTS))
@pytest.mark.parametrize("script", ["dataset.py", "main.py"])
def test_bad_data_paths_show_the_expected_tree(folder, kind, script, demo, tmp_path, monkeypatch, capsys):
    path = _layout(kind, tmp_path, demo)
    out = tmp_path / "out"
    if script == "dataset.py":
        argv = ["--data_path", str(path), "--output_path", str(out / "prepared")]
    else:
        argv = train_args(path, out)
    assert entry(monkeypatch, folder, script, *argv) != 0
    message = failure(capsys, str(path), LAYOUTS[kind], "Expected layout:", f"{P.GT_DIR}/ISIC_0000000")
    assert "train/ train_GT/ valid/ valid_GT/ test/ test_GT/" in message
    nothing_written(out)


# ----------------------------------------------------------------------------------------------- pairing


def _unpair(kind: str, data: Path) -> tuple[Path, str]:
    if kind == "image_without_mask":
        mask_path(data, 3).unlink()
        return image_path(data, 3), "image has no mask"
    if kind == "mask_without_image":
        image_path(data, 4).unlink()
        return mask_path(data, 4), "mask has no image"
    if kind == "duplicate_upper_case_extension":
        shutil.copy(image_path(data, 1), data / P.IMAGE_DIR / f"{stem(1)}.JPG")
        return data / P.IMAGE_DIR / f"{stem(1)}.JPG", f"duplicate image id '{stem(1)}'"
    if kind == "duplicate_png_and_jpg":
        Image.open(image_path(data, 2)).save(data / P.IMAGE_DIR / f"{stem(2)}.png")
        return image_path(data, 2), f"duplicate image id '{stem(2)}' (also {stem(2)}.png)"
    if kind == "duplicate_mask":
        shutil.copy(mask_path(data, 5), data / P.GT_DIR / f"{stem(5)}{P.GT_SUFFIX}.PNG")
        return data / P.GT_DIR / f"{stem(5)}{P.GT_SUFFIX}.PNG", f"duplicate mask id '{stem(5)}'"
    raise AssertionError(kind)


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize(
    "kind",
    ["image_without_mask", "mask_without_image", "duplicate_upper_case_extension", "duplicate_png_and_jpg",
     "duplicate_mask"],
)  # fmt: skip
@pytest.mark.parametrize("script", ["dataset.py", "main.py"])
def test_unpaired_and_duplicate_ids_are_named(folder, kind, script, data, tmp_path, monkeypatch, capsys):
    bad, problem = _unpair(kind, data)
    out = tmp_path / "out"
    if script == "dataset.py":
        argv = ["--data_path", str(data), "--output_path", str(out / "prepared")]
    else:
        argv = train_args(data, out)
    assert entry(monkeypatch, folder, script, *argv) != 0
    failure(capsys, f"{bad}: {problem}", f"<id>{P.GT_SUFFIX}.png")
    nothing_written(out)


def test_a_prepared_layout_with_a_duplicate_is_refused_too(demo, tmp_path, monkeypatch, capsys):
    prepared = tmp_path / "prepared"
    assert (
        entry(monkeypatch, "R2U_Net", "dataset.py", "--data_path", str(demo), "--output_path", str(prepared))
        == 0
    )
    capsys.readouterr()
    first = sorted((prepared / "train").iterdir())[0]
    shutil.copy(first, first.with_suffix(".JPG"))
    assert entry(monkeypatch, "R2U_Net", "main.py", *train_args(prepared, tmp_path / "out")) != 0
    failure(capsys, f"{first.with_suffix('.JPG')}: duplicate image id '{first.stem}'")
    nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------------------------- damaged files


def _damage(kind: str, data: Path) -> tuple[Path, str]:
    if kind == "jpeg_truncated_in_header":
        return truncate(image_path(data, 1), 0.3), "truncated or damaged"
    if kind == "jpeg_truncated_in_pixels":
        return truncate(image_path(data, 1), 0.9), "truncated"
    if kind == "jpeg_garbled":
        return garble(image_path(data, 1), offset=20, length=400), "header is damaged"
    if kind == "jpeg_empty_file":
        image_path(data, 1).write_bytes(b"")
        return image_path(data, 1), "header is damaged"
    if kind == "png_mask_truncated":
        return truncate(mask_path(data, 2), 0.6), "truncated"
    if kind == "png_mask_garbled":
        return garble(mask_path(data, 2), offset=0, length=16), "header is damaged"
    if kind == "mask_size_differs":
        Image.new("L", (20, 16)).save(mask_path(data, 6))
        return mask_path(data, 6), f"size (16, 20) differs from image {stem(6)}.jpg (32, 40)"
    if kind == "mask_labels_3_4_5":  # LUNA16-style label values where a binary mask is expected
        labels = np.zeros((32, 40), np.uint8)
        labels[4:12, 4:12], labels[14:20, 14:30], labels[22:30, 2:9] = 3, 4, 5
        Image.fromarray(labels).save(mask_path(data, 7))
        return mask_path(data, 7), "mask values {0, 3, 4, 5} are neither 0/1 nor 0/255"
    raise AssertionError(kind)


DAMAGES = ["jpeg_truncated_in_header", "jpeg_truncated_in_pixels", "jpeg_garbled", "jpeg_empty_file",
           "png_mask_truncated", "png_mask_garbled", "mask_size_differs", "mask_labels_3_4_5"]  # fmt: skip


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_files_are_named_before_training(folder, kind, data, tmp_path, monkeypatch, capsys):
    bad, problem = _damage(kind, data)
    out = tmp_path / "out"
    assert entry(monkeypatch, folder, "main.py", *train_args(data, out)) != 0
    message = failure(capsys, str(bad), problem)
    assert "Epoch [" not in capsys.readouterr().out + message  # no training step ran
    assert not (out / "models").exists() or not any((out / "models").rglob("*.pth.tar"))
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("kind", ["jpeg_truncated_in_header", "jpeg_garbled", "mask_size_differs"])
def test_dataset_py_checks_every_file_before_writing_the_split(
    folder, kind, data, tmp_path, monkeypatch, capsys
):
    bad, problem = _damage(kind, data)
    # A second bad file: one run must list both.
    mask_path(data, 9).write_bytes(b"not a png")
    out = tmp_path / "prepared"
    assert entry(monkeypatch, folder, "dataset.py", "--data_path", str(data), "--output_path", str(out)) != 0
    failure(capsys, f"{bad}: ", problem, f"{mask_path(data, 9)}: cannot be read as a mask", "2 problem(s)")
    assert not out.exists()


@pytest.mark.parametrize("folder", FOLDERS)
def test_dataset_py_skip_bad_samples_leaves_them_out_and_lists_them(
    folder, data, tmp_path, monkeypatch, capsys
):
    bad, _ = _damage("jpeg_truncated_in_header", data)
    mask_path(data, 9).write_bytes(b"not a png")
    out = tmp_path / "prepared"
    argv = ["--data_path", str(data), "--output_path", str(out), "--train_ratio", "0.6", "--valid_ratio", "0.2",
            "--skip_bad_samples"]  # fmt: skip
    assert entry(monkeypatch, folder, "dataset.py", *argv) == 0
    printed = capsys.readouterr().out
    assert f"2 bad sample(s) left out (2 problem(s)); listed in {out / 'skipped_samples.txt'}" in printed
    listed = sorted(line.split("\t")[1] for line in (out / "skipped_samples.txt").read_text().splitlines())
    assert listed == sorted([str(bad), str(mask_path(data, 9))])
    kept = sorted(p.stem for split in P.SPLITS for p in (out / split).iterdir())
    assert kept == sorted(stem(i) for i in range(10) if i not in (1, 9))


def test_damaged_zip_members_are_named_by_their_place_in_the_zip(data, tmp_path, monkeypatch, capsys):
    truncate(image_path(data, 1), 0.3)
    zips = tmp_path / "zips"
    zips.mkdir()
    for side in (P.IMAGE_DIR, P.GT_DIR):
        with zipfile.ZipFile(zips / f"{side}.zip", "w") as archive:
            for path in sorted((data / side).iterdir()):
                archive.write(path, f"{side}/{path.name}")
    out = tmp_path / "prepared"
    assert (
        entry(monkeypatch, "AttU_Net", "dataset.py", "--data_path", str(zips), "--output_path", str(out)) != 0
    )
    failure(capsys, f"{zips / P.IMAGE_DIR}.zip/{P.IMAGE_DIR}/{stem(1)}.jpg: cannot be read as an image")
    assert not out.exists()


@pytest.mark.parametrize(
    "case",
    [
        "TIFF: ISIC images are JPEG (PNG accepted); a .tif in the image folder is not an ISIC image",
        "MetaImage (.mhd/.raw) and NIfTI: ISIC is 2-D; volumes belong to VNet/",
        "3-D mask geometry (spacing/origin/direction): no 3-D data in ISIC",
        "NaN/inf voxels in a CT: JPEG/PNG hold integers; NaN masks are refused by common.imageio (its tests)",
    ],
)
def test_cases_that_do_not_apply_to_isic(case):
    pytest.skip(case)


# ----------------------------------------------------------------------------------------------- handled inputs


def _expected_row(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A cache row computed here with PIL: bilinear RGB; the mask area-resampled then >= half."""
    image = np.asarray(Image.fromarray(rgb, "RGB").resize((CACHE, CACHE), Image.Resampling.BILINEAR))
    resized = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize(
        (CACHE, CACHE), Image.Resampling.BILINEAR
    )
    return np.concatenate([image, ((np.asarray(resized) >= 128) * 255).astype(np.uint8)[..., None]], axis=2)


def _rows(data: Path) -> dict[str, np.ndarray]:
    root = P.resolve_data_path(data, log=lambda _: None)
    rows = {}
    for split in P.SPLITS:
        cache = open_split_cache(root, split, CACHE, log=lambda _: None)
        rows.update(zip(cache.ids, np.load(cache.array_path)))
    return rows


@pytest.mark.parametrize("folder", FOLDERS)
def test_documented_conversions_grey_rgba_16bit_and_non_binary_masks(
    folder, data, tmp_path, monkeypatch, capsys
):
    """Handled as documented (README Troubleshooting, common.imageio.read_image/read_mask):
    grey JPEG -> grey replicated; RGBA PNG -> alpha dropped; 16-bit PNG -> value * 255 / 65535; masks
    0/1, palette 0/1, 16-bit 0/65535, RGB 0/255 and JPEG-like noise (values near 0 and 255) -> the
    same binary mask; an image smaller than the network input is resized like any other."""
    rng = np.random.default_rng(1)
    originals = {i: np.asarray(Image.open(image_path(data, i)).convert("RGB")) for i in range(10)}
    truth = {i: np.asarray(Image.open(mask_path(data, i))) >= 128 for i in range(10)}
    expected: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    grey = originals[0][..., 1]
    Image.fromarray(grey, "L").save(image_path(data, 0), quality=95)
    decoded = np.asarray(Image.open(image_path(data, 0)))
    expected[0] = (np.repeat(decoded[..., None], 3, axis=2), truth[0])

    image_path(data, 1).unlink()
    rgba = np.concatenate([originals[1], rng.integers(0, 256, (32, 40, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(data / P.IMAGE_DIR / f"{stem(1)}.png")
    expected[1] = (originals[1], truth[1])

    image_path(data, 2).unlink()
    Image.fromarray(grey.astype(np.uint16) * 257).save(data / P.IMAGE_DIR / f"{stem(2)}.png")
    assert Image.open(data / P.IMAGE_DIR / f"{stem(2)}.png").mode.startswith("I")
    expected[2] = (np.repeat(grey[..., None], 3, axis=2), truth[2])

    Image.fromarray(truth[3].astype(np.uint8), "L").save(mask_path(data, 3))  # 0/1
    palette = Image.frombytes("P", (40, 32), truth[4].astype(np.uint8).tobytes())
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(mask_path(data, 4))  # palette indices 0/1 (ISIC 2017 style)
    Image.fromarray(truth[5].astype(np.uint16) * 65535).save(mask_path(data, 5))  # 16-bit 0/65535
    Image.fromarray(np.repeat(truth[6][..., None] * np.uint8(255), 3, axis=2), "RGB").save(mask_path(data, 6))
    noisy = np.where(truth[7], 255 - rng.integers(0, 40, truth[7].shape), rng.integers(0, 40, truth[7].shape))
    Image.fromarray(noisy.astype(np.uint8), "L").save(mask_path(data, 7))  # JPEG-compressed-like values
    for i in (3, 4, 5, 6, 7):
        expected[i] = (originals[i], truth[i])

    small = np.asarray(Image.fromarray(originals[8]).resize((12, 9)))
    small_mask = np.zeros((9, 12), bool)
    small_mask[2:7, 3:9] = True
    Image.fromarray(small).save(image_path(data, 8), quality=100)
    Image.fromarray(small_mask.astype(np.uint8) * 255).save(mask_path(data, 8))
    expected[8] = (np.asarray(Image.open(image_path(data, 8)).convert("RGB")), small_mask)

    assert entry(monkeypatch, folder, "main.py", *train_args(data, tmp_path / "out", "--dry_run")) == 0
    assert "Dry run: data and flags checked" in capsys.readouterr().out
    rows = _rows(data)
    for i, (rgb, mask) in expected.items():
        want = _expected_row(rgb, mask)
        assert np.array_equal(rows[stem(i)][..., 3], want[..., 3]), f"mask of {stem(i)}"
        assert np.abs(rows[stem(i)][..., :3].astype(int) - want[..., :3]).max() <= 1, f"image of {stem(i)}"


# ----------------------------------------------------------------------------------------------- flags


MAIN_FLAGS = {
    "batch_size_0": (["--batch_size", "0"], "--batch_size", "must be a positive integer, got 0"),
    "negative_lr": (["--lr", "-0.1"], "--lr", "must be a positive number, got -0.1"),
    "unknown_model_type": (["--model_type", "UNet3D"], "--model_type", "invalid choice: 'UNet3D'"),
    "opt_level_O7": (["--opt-level", "O7"], "--opt-level", "invalid choice: 'O7'"),
    "image_size_40": (["--image_size", "40"], "--image_size must be a positive multiple of 16", "got 40"),
    "augmentation_prob_2": (["--augmentation_prob", "2"], "--augmentation_prob", "must lie in [0, 1]"),
    "epochs_0": (["--num_epochs", "0"], "--num_epochs", "must be a positive integer"),
    "grey_input_channels": (["--img_ch", "1"], "--img_ch must be 3"),
    "two_output_channels": (["--output_ch", "2"], "--output_ch must be 1"),
    "beta1_1": (["--beta1", "1"], "--beta1", "must lie in [0, 1), got 1"),
}


@pytest.mark.parametrize("flag", list(MAIN_FLAGS))
@pytest.mark.parametrize(
    "folder,script",
    [("AttU_Net", "main.py"), ("R2U_Net", "main.py"), ("AttU_Net", "run_scripts/run_AttU_Net.py")],
)
def test_nonsense_training_flags_state_the_rule(folder, script, flag, demo, tmp_path, monkeypatch, capsys):
    argv, *fragments = MAIN_FLAGS[flag]
    assert entry(monkeypatch, folder, script, *train_args(demo, tmp_path / "out"), *argv) == 2
    message = failure(capsys, *fragments)
    if flag == "unknown_model_type":
        assert all(name in message for name in VALID_MODELS)
    nothing_written(tmp_path / "out")


@pytest.mark.parametrize("folder", FOLDERS)
def test_batchnorm_and_batch_versus_split_rules(folder, demo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = train_args(demo, out)
    argv[argv.index("--image_size") + 1] = "16"
    assert entry(monkeypatch, folder, "main.py", *argv, "--batch_size", "1") == 2
    failure(capsys, "--image_size 16 with 1 image(s) per rank leaves BatchNorm one value per channel")
    assert entry(monkeypatch, folder, "main.py", *train_args(demo, out), "--batch_size", "8") == 2
    failure(capsys, "the training split has 7 samples", "fewer than one batch of 8")
    assert not any((out / "models").rglob("*.pth.tar")) if (out / "models").exists() else True


TOOL_FLAGS = {
    "batch_size_0": (["--batch_size", "0"], "--batch_size", "must be a positive integer, got 0"),
    "unknown_model_type": (["--model_type", "VNet"], "--model_type", "invalid choice: 'VNet'"),
    "image_size_40": (["--image_size", "40"], "--image_size must be a positive multiple of 16"),
    "t_0": (["--t", "0"], "--t", "must be a positive integer, got 0"),
    "no_weights": ([], "no weights at", "model_best.pth.tar", "--pth_path"),
}


@pytest.mark.parametrize("flag", list(TOOL_FLAGS))
@pytest.mark.parametrize("script", ["predict.py", "pthtar2onx.py"])
@pytest.mark.parametrize("folder", FOLDERS)
def test_nonsense_predict_and_export_flags(folder, script, flag, demo, tmp_path, monkeypatch, capsys):
    argv, *fragments = TOOL_FLAGS[flag]
    io_flags = ["--input", str(demo / P.IMAGE_DIR), "--output", str(tmp_path / "pred")]
    if script == "pthtar2onx.py":
        io_flags = ["--output", str(tmp_path / "pred" / "m.onnx")]
    assert entry(monkeypatch, folder, script, *io_flags, "--model_path", str(tmp_path / "models"), *argv) != 0
    message = failure(capsys, *fragments)
    if flag == "unknown_model_type":
        assert all(name in message for name in VALID_MODELS)
    nothing_written(tmp_path / "pred")


def test_threshold_and_split_ratio_rules(demo, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")  # never read: the flag is refused first
    argv = [
        "--input",
        str(demo / P.IMAGE_DIR),
        "--output",
        str(tmp_path / "pred"),
        "--pth_path",
        str(weights),
    ]
    assert entry(monkeypatch, "AttU_Net", "predict.py", *argv, "--threshold", "1.5") != 0
    failure(capsys, "--threshold is a probability and must lie in (0, 1), got 1.5")
    out = tmp_path / "prepared"
    assert entry(monkeypatch, "R2U_Net", "dataset.py", "--data_path", str(demo), "--output_path", str(out),
                 "--train_ratio", "0") != 0  # fmt: skip
    failure(capsys, "split ratios must be three numbers >= 0", "train > 0")
    assert entry(monkeypatch, "R2U_Net", "dataset.py", "--data_path", str(demo), "--output_path", str(out),
                 "--file_op", "move") == 2  # fmt: skip
    failure(capsys, "--file_op", "invalid choice: 'move'")
    assert not out.exists()


@pytest.mark.parametrize("folder", FOLDERS)
def test_predict_and_export_inputs_are_checked_before_anything_is_written(folder, data, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(1)}, weights)  # readable; its keys would be checked only after the inputs
    pred = tmp_path / "pred"
    common = ["--output", str(pred), "--pth_path", str(weights), "--image_size", str(SIZE)]
    assert entry(monkeypatch, folder, "predict.py", "--input", str(tmp_path / "none"), *common) != 0
    failure(capsys, f"{tmp_path / 'none'}: no such file or folder")
    truncate(image_path(data, 3), 0.3)
    Image.new("L", (10, 10)).save(mask_path(data, 4))
    argv = ["--input", str(data / P.IMAGE_DIR), "--gt_dir", str(data / P.GT_DIR), *common]
    assert entry(monkeypatch, folder, "predict.py", *argv) != 0
    failure(capsys, "2 problem(s) in the input", f"{image_path(data, 3)}: cannot be read as an image",
            f"{mask_path(data, 4)}: size (10, 10) differs from image {stem(4)}.jpg (32, 40)")  # fmt: skip
    nothing_written(pred)
    (tmp_path / "a_folder.onnx").mkdir()
    argv = [
        "--output",
        str(tmp_path / "a_folder.onnx"),
        "--pth_path",
        str(weights),
        "--image_size",
        str(SIZE),
    ]
    assert entry(monkeypatch, folder, "pthtar2onx.py", *argv) != 0
    failure(capsys, "a_folder.onnx is a folder; give the ONNX file's name")


def test_a_split_file_of_other_data_is_refused(demo, tmp_path, monkeypatch, capsys):
    split = tmp_path / "split.json"
    split.write_text('{"splits": {"train": ["ISIC_9999999"], "valid": [], "test": []}}')
    out = tmp_path / "prepared"
    argv = ["--data_path", str(demo), "--output_path", str(out), "--split_file", str(split)]
    assert entry(monkeypatch, "AttU_Net", "dataset.py", *argv) != 0
    failure(capsys, f"{split}: 1 id(s) of the split file are not in", "ISIC_9999999")
    assert entry(monkeypatch, "AttU_Net", "dataset.py", *argv[:-1], str(tmp_path / "nope.json")) != 0
    failure(capsys, f"{tmp_path / 'nope.json'}: split file not found")
    assert not out.exists()


def _fake_python(tmp_path: Path, devices: int) -> Path:
    """A PYTHON for the shell library that reports `devices` accelerators and runs nothing else."""
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$2" = common.device_count ]; then echo {devices}; exit 0; fi\n'
                    'echo "fake python: would run $*"; exit 0\n')  # fmt: skip
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("folder", FOLDERS)
def test_8p_on_a_node_with_fewer_devices_and_a_zero_batch_in_the_scripts(folder, demo, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELZOO_", "RANK", "WORLD_SIZE"))}
    env.update(PYTHON=str(_fake_python(tmp_path, 2)), RANK_SIZE="8", MODELZOO_CACHE_DIR=str(tmp_path / "c"))
    run = lambda *args: subprocess.run(  # noqa: E731
        ["bash", "test/train_full_8p.sh", f"--data_path={demo}", *args], cwd=REPO / folder, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    proc = run()
    assert proc.returncode != 0
    assert "RANK_SIZE=8 ranks asked for on a node with 2 accelerator(s)" in proc.stdout + proc.stderr
    assert "would run" not in proc.stdout  # nothing was launched
    proc = run("--batch_size=0")
    assert (
        proc.returncode != 0
        and "--batch_size must be a positive integer, got '0'" in proc.stdout + proc.stderr
    )
    assert "would run" not in proc.stdout


# ----------------------------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Per folder default model: truncated, garbled, foreign keys, output_ch=2 shapes, pickled payload."""
    out = tmp_path_factory.mktemp("ckpt")
    files: dict[str, Path] = {}
    for folder in FOLDERS:
        model_type = MAINS[folder].DEFAULTS["model_type"]
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in build_network(model_type, output_ch=2).state_dict().items()}
        # Expanded zeros keep the file tiny while every tensor has the shape a 2-class head gives.
        state = {k: torch.zeros(()).expand(shape) for k, shape in shapes.items()}
        files[f"{folder}/other_shape"] = out / f"{folder}_2class.pth"
        torch.save({"epoch": 1, "optimizer": {}, "state_dict": state}, files[f"{folder}/other_shape"])
    files["other_model"] = out / "vnet.pth"
    vnet = {"down_tr32.conv1.weight": torch.zeros(16, 1, 5, 5, 5)}
    torch.save({"epoch": 1, "optimizer": {}, "state_dict": vnet}, files["other_model"])
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "optimizer": {}, "state_dict": {"w": torch.ones(3)}}, buffer)
    files["truncated"] = out / "truncated.pth"
    files["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["garbled"] = out / "garbled.pth"
    files["garbled"].write_bytes(b"\x00" * 64 + buffer.getvalue()[64:])
    files["pickled_payload"] = out / "payload.pth"
    torch.save({"epoch": 1, "optimizer": {}, "state_dict": {"w": torch.ones(3)},
                "extra": _Payload(out / "PWNED")}, files["pickled_payload"])  # fmt: skip
    return files


CHECKPOINT_PROBLEMS = {
    "truncated": ["is corrupted or truncated"],
    "garbled": ["is corrupted or truncated"],
    "pickled_payload": ["refusing to load", "could run code"],
    "other_model": ["does not fit", "missing keys", "unexpected keys (down_tr32.conv1.weight)"],
    "other_shape": ["does not fit", "shape mismatches",
                    "Conv_1x1.weight: checkpoint (2, 64, 1, 1) vs model (1, 64, 1, 1)"],
}  # fmt: skip
CHECKPOINT_ENTRIES = [
    "main.py --resume",
    "main.py --pth_path",
    "main.py --mode test",
    "predict.py",
    "pthtar2onx.py",
]


@pytest.mark.parametrize("entry_point", CHECKPOINT_ENTRIES)
@pytest.mark.parametrize("kind", list(CHECKPOINT_PROBLEMS))
@pytest.mark.parametrize("folder", FOLDERS)
def test_bad_checkpoints_are_refused_by_every_entry_point(
    folder, kind, entry_point, bad_checkpoints, demo, tmp_path, monkeypatch, capsys
):
    ckpt = bad_checkpoints[f"{folder}/{kind}" if kind == "other_shape" else kind]
    if kind == "other_shape" and entry_point == "main.py --pth_path":
        state = torch.load(ckpt, weights_only=True)["state_dict"]  # plain weights initialise, not resume
        ckpt = tmp_path / "plain.pth"
        torch.save(state, ckpt)
    out = tmp_path / "out"
    script, _, flag = entry_point.partition(" ")
    if script == "main.py":
        argv = train_args(demo, out)
        argv += ["--resume", str(ckpt)] if flag == "--resume" else ["--pth_path", str(ckpt)]
        argv += ["--mode", "test"] if flag == "--mode test" else []
    elif script == "predict.py":
        argv = ["--input", str(demo / P.IMAGE_DIR), "--output", str(out / "pred"), "--pth_path", str(ckpt),
                "--image_size", str(SIZE)]  # fmt: skip
    else:
        argv = ["--output", str(out / "m.onnx"), "--pth_path", str(ckpt), "--image_size", str(SIZE)]
    assert entry(monkeypatch, folder, script, *argv) != 0
    failure(capsys, str(ckpt), *CHECKPOINT_PROBLEMS[kind])
    assert "Epoch [" not in capsys.readouterr().out
    assert not (bad_checkpoints["pickled_payload"].parent / "PWNED").exists()  # nothing executed
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in written if p.suffix in (".tar", ".onnx", ".png", ".json", ".csv")], written


def test_weights_only_resume_is_explained(bad_checkpoints, demo, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(2)}, plain)
    assert (
        entry(monkeypatch, "AttU_Net", "main.py", *train_args(demo, tmp_path / "out"), "--resume", str(plain))
        != 0
    )
    failure(capsys, f"{plain} holds weights only, not a training state", "--pth_path")
    assert entry(monkeypatch, "AttU_Net", "main.py", *train_args(demo, tmp_path / "out"), "--resume",
                 str(tmp_path / "none.pth")) != 0  # fmt: skip
    failure(capsys, f"checkpoint {tmp_path / 'none.pth'} does not exist (--resume: no such checkpoint file)")
    nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------------- faults in training


# 16 px (BatchNorm still sees 3 values at the 1x1 bottleneck), 3 images a step, 2 steps an epoch; validation
# (and so a model_best write of ~400 MB) only after the last epoch.
FAULT_FLAGS = ["--device", "cpu", "--model_type", "AttU_Net", "--image_size", "16", "--batch_size", "3",
               "--num_epochs", "2", "--seed", "7", "--deterministic", "--log_interval", "1",
               "--num_epochs_decay", "1", "--workers", "0", "--warmup_steps", "0", "--val_step", "2"]  # fmt: skip


def _fault_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--model_path", str(out / "models"), "--result_path", str(out / "result"),
            *FAULT_FLAGS, *extra]  # fmt: skip


def _digest(path: Path) -> tuple[int, int, int]:
    """Identity of a checkpoint file: checkpoints are only ever replaced by a rename (a new inode), so an
    unchanged inode, size and mtime means the bytes were not touched (hashing 400 MB costs more)."""
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def _subprocess_env(cache: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MODELZOO_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MODELZOO_CACHE_DIR=str(cache))
    return env


@pytest.fixture(scope="module")
def faults(demo, tmp_path_factory):
    """The uninterrupted 2-epoch run (in this process), keeping a second name for its epoch-1 checkpoint."""
    import common.engine as engine

    out = tmp_path_factory.mktemp("faults")
    cache = out / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELZOO_CACHE_DIR", str(cache))
    real_save = engine.save_checkpoint

    def save_and_keep_epoch_1(state, path):
        written = real_save(state, path)
        if state["epoch"] == 1 and not (out / "epoch1.pth.tar").exists():
            os.link(written, out / "epoch1.pth.tar")  # later saves replace the name, not this file
        return written

    mp.setattr(engine, "save_checkpoint", save_and_keep_epoch_1)
    try:
        with _one_thread():
            assert (
                MAINS["AttU_Net"].main(_fault_args(demo, out / "whole"), defaults=MAINS["AttU_Net"].DEFAULTS)
                == 0
            )
    finally:
        mp.undo()
    assert load_checkpoint(out / "epoch1.pth.tar")["epoch"] == 1
    return {"whole": out / "whole" / "models" / "AttU_Net", "epoch1": out / "epoch1.pth.tar", "cache": cache}


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread, as the subprocesses (OMP_NUM_THREADS=1): identical kernels, identical sums."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _restore(deterministic, threads)


def _final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


DIE_WRITING = """
import io, os, runpy, signal, sys, torch
real = torch.save
def save(obj, f, *a, **k):
    buf = io.BytesIO(); real(obj, buf, *a, **k); data = buf.getvalue()
    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)  # half of the checkpoint is on disk
torch.save = save
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_resume_gives_the_same_weights(
    faults, demo, tmp_path, monkeypatch
):
    """Killed mid-epoch (AttU_Net/main.py), then killed mid-checkpoint-write (R2U_Net/main.py): each time
    the epoch-1 checkpoint is intact, and the next --resume ends with exactly the uninterrupted weights."""
    latest = _resume_copy(faults, tmp_path)
    before = _digest(latest)
    argv = _fault_args(demo, tmp_path / "run", "--resume", str(latest))
    # The killed runs need no --deterministic (their results are never compared; it costs an import of
    # torch._inductor per process); the resume that finishes uses it.
    killed_argv = [a for a in argv if a != "--deterministic"]
    env = _subprocess_env(faults["cache"])
    proc = subprocess.Popen([sys.executable, "main.py", *killed_argv], cwd=REPO / "AttU_Net", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Epoch [2/2], Step:[1/2]"):
            proc.send_signal(signal.SIGKILL)  # mid-epoch: one of epoch 2's two steps done
            break
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert _digest(latest) == before

    proc = subprocess.run([sys.executable, "-c", DIE_WRITING, *killed_argv], cwd=REPO / "R2U_Net", env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Epoch [2/2], Step:[2/2]" in proc.stdout  # it did reach the save
    assert _digest(latest) == before  # untouched: the half-written file was a temporary one
    assert list(latest.parent.glob(".*.tmp")), "the interrupted write left its temporary file"

    # The next resume removes the leftover and ends with exactly the weights of the uninterrupted run.
    monkeypatch.setenv("MODELZOO_CACHE_DIR", str(faults["cache"]))
    with _one_thread():
        assert MAINS["R2U_Net"].main(argv, defaults=MAINS["R2U_Net"].DEFAULTS) == 0
    assert not list(latest.parent.glob(".*.tmp"))
    state = load_checkpoint(latest)
    whole, resumed = _final_weights(faults["whole"] / "checkpoint.pth.tar"), state["state_dict"]
    assert state["epoch"] == 2 and whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def _resume_copy(faults, tmp_path: Path) -> Path:
    """A run folder holding (a hard link to) the epoch-1 checkpoint of the killed run."""
    models = tmp_path / "run" / "models" / "AttU_Net"
    models.mkdir(parents=True)
    os.link(faults["epoch1"], models / "checkpoint.pth.tar")
    return models / "checkpoint.pth.tar"


def test_no_space_left_keeps_the_previous_checkpoint_and_stops_clearly(
    faults, demo, tmp_path, monkeypatch, capsys
):
    """Through AttU_Net/main.py (R2U_Net/main.py runs the same common/isic/solver.py)."""
    latest = _resume_copy(faults, tmp_path)
    before = _digest(latest)
    monkeypatch.setenv("MODELZOO_CACHE_DIR", str(faults["cache"]))

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    argv = _fault_args(demo, tmp_path / "run", "--resume", str(latest))
    assert entry(monkeypatch, "AttU_Net", "main.py", *argv) != 0
    failure(capsys, f"could not write checkpoint {latest}: no space left on device",
            f"the previous checkpoint {latest} is intact")  # fmt: skip
    assert _digest(latest) == before and load_checkpoint(latest)["epoch"] == 1
    assert not list(latest.parent.glob(".*.tmp"))


def test_a_nan_loss_is_skipped_and_counted_and_a_persistent_one_stops_the_run(
    demo, tmp_path, monkeypatch, capsys
):
    """Through R2U_Net/main.py (AttU_Net/main.py runs the same common/isic/solver.py)."""
    import common.isic.solver as solver

    real = solver.build_loss
    calls = {"train": 0}

    def poisoned(name):
        loss_fn = real(name)

        def loss(logits, target):
            value = loss_fn(logits, target)
            if not torch.is_grad_enabled():  # validation losses stay finite
                return value
            calls["train"] += 1
            # Epoch 1: step 1 NaN (skipped and counted), step 2 fine. Epoch 2: every step NaN -> diverged.
            return value * float("nan") if calls["train"] in (1, 3, 4) else value

        return loss

    monkeypatch.setattr(solver, "build_loss", poisoned)
    argv = _fault_args(demo, tmp_path / "run", "--max_skipped_steps", "2")
    assert entry(monkeypatch, "R2U_Net", "main.py", *argv) != 0
    failure(capsys, "2 optimizer steps in a row had non-finite gradients", "The last good checkpoint is kept")
    state = load_checkpoint(tmp_path / "run" / "models" / "AttU_Net" / "checkpoint.pth.tar")
    assert state["epoch"] == 1  # epoch 1 (one NaN step skipped) was saved; epoch 2 never was
    assert [row["skipped_steps"] for row in state["history"]] == [1]
    assert state["amp"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
