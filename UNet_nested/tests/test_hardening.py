"""Hardening of UNet_nested: bad data, bad flags, hostile or damaged checkpoints and crashes,
tried against the real entry points (preprocess_dsb2018.py, train.py, train.py --evaluate, demo.py,
pthtar2onnx.py).

Every bad input must end in ONE user error (a ModelZooError, or argparse's exit 2) whose message names the
file and the problem, before any training step, leaving no checkpoint, cache or output behind. Everything
runs in-process on 16x16 images (entry points run as `__main__` through runpy for the exit status) except
what needs a process: the two SIGKILLed trainings and the 8p shell script (which fails before Python starts).
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import demo
import numpy as np
import preprocess_dsb2018 as prep
import pthtar2onnx
import pytest
import torch
import train
from PIL import Image

from common.checkpoint import load_checkpoint
from common.cli import run_main
from common.engine import TrainingRun
from common.errors import TrainingDiverged
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
SIZE = 16
TINY = [f"--input_w={SIZE}", f"--input_h={SIZE}"]
ENTRY_POINTS = ("preprocess_dsb2018.py", "train.py", "demo.py", "pthtar2onnx.py")


# ----------------------------------------------------------------------------------------------- writers


def _square_mask(i: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    top, left = (3 * i) % (size // 2), (5 * i) % (size // 2)
    mask[top : top + size // 3, left : left + size // 4] = True
    return mask


def _save(array: np.ndarray, path: Path) -> None:
    """PIL picks the format from the extension (.png, .jpg, .tif)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def prepared(root: Path, n: int = 5, img_ext: str = ".png", mask_ext: str = ".png") -> Path:
    """The prepared layout (images/<id> + masks/0/<id>): a bright square on a dark background."""
    for i in range(n):
        mask = _square_mask(i)
        grey = np.where(mask, 200, 25).astype(np.uint8)
        _save(np.stack([grey, grey // 2 + 9 * i, grey], axis=2), root / "images" / f"n{i}{img_ext}")
        _save(mask.astype(np.uint8) * 255, root / "masks" / "0" / f"n{i}{mask_ext}")
    return root


def kaggle_folder(stage1: Path, name: str, image: np.ndarray | None, masks: list[np.ndarray]) -> Path:
    """stage1_train/<name>/images/<name>.png and masks/m<k>.png, as the Kaggle download has them."""
    folder = stage1 / name
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    if image is not None:
        _save(image, folder / "images" / f"{name}.png")
    for k, mask in enumerate(masks):
        _save(mask, folder / "masks" / f"m{k}.png")
    return folder


def _rgba(i: int) -> np.ndarray:
    grey = np.where(_square_mask(i), 180, 20).astype(np.uint8)
    return np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=2)


def _instances(i: int) -> list[np.ndarray]:
    """Two instance masks (0/255) whose union is `_square_mask(i)`."""
    union = _square_mask(i)
    top = union.copy()
    top[SIZE // 2 :] = False
    return [top.astype(np.uint8) * 255, (union & ~top).astype(np.uint8) * 255]


@pytest.fixture(autouse=True, scope="module")
def small_and_quiet():
    """One intra-op thread: a 16x16 UNet step takes 0.06 s of CPU on one thread and ten times that on two
    threads of a loaded 2-core machine (OpenMP spinning). And no progress.png (matplotlib, a second per
    epoch), which is not what these tests are about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingRun, "_plot", lambda self, final: None)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No test-script variables (they would send summaries elsewhere); deterministic mode reset after."""
    for key in [k for k in os.environ if k.startswith("MODELZOO_")]:
        monkeypatch.delenv(key)
    yield
    if torch.are_deterministic_algorithms_enabled():  # the first call costs seconds: only when needed
        torch.use_deterministic_algorithms(False)


def _err(capsys):
    return lambda: capsys.readouterr().err


def _nothing_written(tmp_path: Path, data: Path | None = None) -> None:
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.*")), "models written"
    if data is not None:
        assert not list(data.rglob("*.npy")), "a decoded cache was written for bad data"


def _train(tmp_path: Path, *flags: str):
    return lambda: train.main([*TINY, "--models_dir", str(tmp_path / "models"), "-b", "4", *flags])


# ----------------------------------------------------------------------------------------------- data path


@pytest.mark.parametrize("mode", ["train", "evaluate"])
@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("missing", ["--data_path does not exist", "masks/0/<id>.png"]),
        ("empty", ["--data_path is an empty folder", "images/<id>.png"]),
        ("file", ["--data_path is a file, not a folder", "images/<id>.png"]),
        ("foreign", ["holds neither a prepared dataset", "stage1_train/<id>/masks/<mask>.png"]),
        ("no_masks_dir", ["masks folder not found", "masks/0/<id>.png"]),
    ],
)
def test_train_data_path_problems_show_the_expected_tree(tmp_path, capsys, mode, kind, fragments):
    path = tmp_path / "data"
    if kind == "empty":
        path.mkdir()
        (path / ".DS_Store").write_text("")  # hidden files do not count
    elif kind == "file":
        path.write_text("not a folder")
    elif kind == "foreign":
        (path / "photos").mkdir(parents=True)
        (path / "photos" / "a.png").write_bytes(b"")
    elif kind == "no_masks_dir":
        prepared(path)
        shutil.rmtree(path / "masks")
    flags = ["--evaluate"] if mode == "evaluate" else []
    message = user_error(_train(tmp_path, "--data_path", str(path), *flags), *fragments, stderr=_err(capsys))
    assert str(path) in message
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("missing", ["--data_path does not exist", "stage1_train/<id>/images/<id>.png"]),
        ("file", ["--data_path is a file, not a folder"]),
        ("empty", ["no stage1_train folder found", "stage1_train/<id>/masks/<mask>.png"]),
        ("no_usable_folder", ["no usable sample folder", "no image (expected images/<id>.png)"]),
        ("all_broken", ["no folder could be prepared", "cannot decode"]),
    ],
)
def test_preprocess_data_path_problems(tmp_path, capsys, kind, fragments):
    path = tmp_path / "kaggle"
    if kind == "file":
        path.write_text("x")
    elif kind == "empty":
        path.mkdir()
    elif kind == "no_usable_folder":
        (path / "stage1_train" / "abc" / "masks").mkdir(parents=True)
    elif kind == "all_broken":
        folder = kaggle_folder(path / "stage1_train", "abc", _rgba(0), _instances(0))
        truncate(folder / "images" / "abc.png", 0.3)
    out = tmp_path / "out"
    message = user_error(
        lambda: prep.main(["--data_path", str(path), "--output", str(out), "--input_w", str(SIZE)]),
        *fragments,
        stderr=_err(capsys),
    )
    assert str(path) in message
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*")), "half-prepared output left behind"


# ----------------------------------------------------------------------------------------------- files


def _break(data: Path, kind: str) -> list[str]:
    """Damage a prepared dataset of 5 samples; returns what the message must contain."""
    images, masks = data / "images", data / "masks" / "0"
    if kind == "image_without_mask":
        (masks / "n1.png").unlink()
        return [str(images / "n1.png"), "image has no mask"]
    if kind == "mask_without_image":
        (images / "n2.png").unlink()
        return [str(masks / "n2.png"), "mask has no image"]
    if kind == "duplicate_id":
        shutil.copy(images / "n1.png", images / "n1.PNG")
        return ["duplicate image id 'n1'", "n1.PNG"]
    if kind == "truncated_png":
        truncate(images / "n3.png", 0.5)
        return [str(images / "n3.png"), "cannot decode: truncated"]
    if kind == "garbled_png":
        garble(masks / "n4.png", offset=40, length=40)
        return [str(masks / "n4.png"), "cannot decode"]
    if kind == "empty_png":
        (images / "n0.png").write_bytes(b"")
        return [str(images / "n0.png"), "cannot decode"]
    if kind == "mask_size":
        _save(np.zeros((SIZE // 2, SIZE // 2), np.uint8), masks / "n2.png")
        return [str(masks / "n2.png"), f"size ({SIZE // 2}, {SIZE // 2}) differs from image n2.png"]
    if kind == "label_mask":  # a label map {0, 1, 2} would silently become an empty mask
        _save(np.indices((SIZE, SIZE))[1].astype(np.uint8) % 3, masks / "n1.png")
        return [str(masks / "n1.png"), "mask values {0, 1, 2} are neither 0/1 nor 0/255"]
    if kind == "two_bad_files":  # every problem in one message
        truncate(images / "n1.png", 0.5)
        truncate(masks / "n3.png", 0.5)
        return ["2 problem(s) in 2 file(s)", str(images / "n1.png"), str(masks / "n3.png")]
    raise AssertionError(kind)


BROKEN = ["image_without_mask", "mask_without_image", "duplicate_id", "truncated_png", "garbled_png",
          "empty_png", "mask_size", "label_mask", "two_bad_files"]  # fmt: skip


@pytest.mark.parametrize("mode", ["train", "evaluate"])
@pytest.mark.parametrize("kind", BROKEN)
def test_bad_files_are_named_before_training(tmp_path, capsys, monkeypatch, mode, kind):
    data = prepared(tmp_path / "data")
    fragments = _break(data, kind)
    # Fails before the network exists: building one would be a wasted minute on a real dataset.
    monkeypatch.setattr(train, "build_model", lambda args: pytest.fail("model built before the data check"))
    flags = ["--evaluate"] if mode == "evaluate" else []
    user_error(_train(tmp_path, "--data_path", str(data), *flags), *fragments, stderr=_err(capsys))
    _nothing_written(tmp_path, data)


@pytest.mark.parametrize(
    ("ext", "flag"), [(".jpg", "--img_ext"), (".tif", "--img_ext"), (".jpg", "--mask_ext")]
)
def test_truncated_jpeg_and_tiff_are_named(tmp_path, capsys, ext, flag):
    kwargs = {"img_ext": ext} if flag == "--img_ext" else {"mask_ext": ext}
    data = prepared(tmp_path / "data", **kwargs)
    bad = (data / "images" / f"n2{ext}") if flag == "--img_ext" else (data / "masks" / "0" / f"n2{ext}")
    truncate(bad, 0.4)
    user_error(
        _train(tmp_path, "--data_path", str(data), flag, ext), str(bad), "cannot decode", stderr=_err(capsys)
    )
    _nothing_written(tmp_path, data)


def test_wrong_extension_says_which_flag_to_set(tmp_path, capsys):
    data = prepared(tmp_path / "data", img_ext=".jpg")
    user_error(
        _train(tmp_path, "--data_path", str(data)), "no '*.png' files", "--img_ext", stderr=_err(capsys)
    )


def _kaggle_with_problems(tmp_path: Path) -> tuple[Path, dict, list[Path]]:
    """stage1_train with 8 good folders (RGBA, alpha, grey, 16-bit, 0/1 masks) and 4 bad ones: no masks,
    no image, a truncated image, a mis-sized mask. Returns (stage1, expected RGB per id, bad files)."""
    stage1 = tmp_path / "kaggle" / "stage1_train"
    expected_rgb = {}
    for i in range(4):  # plain RGBA with 0/255 instance masks
        kaggle_folder(stage1, f"ok{i}", _rgba(i), _instances(i))
        expected_rgb[f"ok{i}"] = _rgba(i)[:, :, :3]
    alpha = _rgba(4)
    alpha[:, :, 3] = 7  # transparent: dropped, not composited
    kaggle_folder(stage1, "alpha", alpha, _instances(4))
    expected_rgb["alpha"] = alpha[:, :, :3]
    grey = np.where(_square_mask(5), 150, 30).astype(np.uint8)
    kaggle_folder(stage1, "grey", grey, _instances(5))
    expected_rgb["grey"] = np.repeat(grey[:, :, None], 3, axis=2)
    deep = (np.where(_square_mask(6), 40000, 3000)).astype(np.uint16)  # 16-bit: scaled by 255/65535
    kaggle_folder(stage1, "deep", deep, _instances(6))
    expected_rgb["deep"] = np.repeat(
        ((deep.astype(np.int64) + 128) // 257).astype(np.uint8)[:, :, None], 3, 2
    )
    kaggle_folder(stage1, "zero_one", _rgba(7), [m // 255 for m in _instances(7)])  # 0/1 masks
    expected_rgb["zero_one"] = _rgba(7)[:, :, :3]
    kaggle_folder(stage1, "no_masks", _rgba(0), [])
    kaggle_folder(stage1, "no_image", None, _instances(0))
    truncated = kaggle_folder(stage1, "truncated", _rgba(1), _instances(1)) / "images" / "truncated.png"
    truncate(truncated, 0.5)
    small = kaggle_folder(stage1, "small_mask", _rgba(2), [np.zeros((8, 8), np.uint8)]) / "masks" / "m0.png"
    return stage1, expected_rgb, [stage1 / "no_masks", stage1 / "no_image", truncated, small]


def test_kaggle_folders_with_problems_are_refused_every_one_named(tmp_path, capsys, trained):
    """Training refuses a download with bad sample folders by default: one error names every bad file,
    with their count and the flag that leaves them out; nothing is prepared, cached or written."""
    _, _, bad = _kaggle_with_problems(tmp_path)
    message = user_error(
        _train(tmp_path, "--data_path", str(tmp_path / "kaggle"), "--val_split", "0.25", "--evaluate",
               "--resume", str(trained[1])),
        "4 of 12 sample folder(s) cannot be used", *[str(p) for p in bad], "--skip_bad_samples",
        stderr=_err(capsys),
    )  # fmt: skip
    assert "no masks" in message and "no image" in message and "cannot decode" in message
    assert not (tmp_path / "kaggle" / f"dsb2018_{SIZE}").exists()
    _nothing_written(tmp_path, tmp_path / "kaggle")


def test_kaggle_folders_with_problems_are_skipped_counted_and_the_rest_handled(tmp_path, capsys, trained):
    """With --skip_bad_samples the preparation leaves the 4 bad folders out, says how many and where they
    are listed; training on its output counts them in summary.json. RGBA (alpha dropped), grey and
    16-bit images and 0/1 instance masks are read. Independent check: the prepared PNGs against the
    arrays written (the size is the training size, so nothing is resampled)."""
    stage1, expected_rgb, bad = _kaggle_with_problems(tmp_path)
    prepared_dir = tmp_path / "kaggle" / f"dsb2018_{SIZE}"
    assert prep.main(["--data_path", str(tmp_path / "kaggle"), "--output", str(prepared_dir),
                      "--input_w", str(SIZE), "--skip_bad_samples"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"--skip_bad_samples: skipped 4 folder(s), listed in {prepared_dir / 'skipped_samples.txt'}" in out
    listed = [line.split("\t") for line in (prepared_dir / "skipped_samples.txt").read_text().splitlines()]
    assert sorted(row[1] for row in listed) == sorted(str(p) for p in bad)

    # --evaluate (a forward pass) checks and caches the data exactly as training does.
    args = [*TINY, "--models_dir", str(tmp_path / "models"), "--data_path", str(prepared_dir),
            "--val_split", "0.25", "--evaluate", "--resume", str(trained[1])]  # fmt: skip
    assert train.main(args) == 0
    assert "WARNING: 4 sample folder(s)" in capsys.readouterr().out
    index = {"ok0": 0, "ok1": 1, "ok2": 2, "ok3": 3, "alpha": 4, "grey": 5, "deep": 6, "zero_one": 7}
    for name, rgb in expected_rgb.items():
        np.testing.assert_array_equal(
            np.array(Image.open(prepared_dir / "images" / f"{name}.png")), rgb, name
        )
        mask = np.array(Image.open(prepared_dir / "masks" / "0" / f"{name}.png"))
        np.testing.assert_array_equal(mask, _square_mask(index[name]).astype(np.uint8) * 255, name)
    summary = json.loads(
        (tmp_path / "models" / f"dsb2018_{SIZE}_UNet_woDS" / "eval" / "summary.json").read_text()
    )
    assert summary["skipped_samples"] == 4 and summary["train_images"] + summary["val_images"] == 8
    problems = dict(summary["skipped"])
    assert problems[str(stage1 / "no_masks")].startswith("no masks")
    assert problems[str(stage1 / "no_image")].startswith("no image")
    assert "cannot decode" in problems[str(bad[2])]
    assert "differs from the image's" in problems[str(bad[3])]


def test_jpeg_compressed_masks_are_binarised_as_documented(tmp_path, capsys, trained):
    """Prepared layout with JPEG-compressed masks (`--mask_ext .jpg`): foreground is value >= 128, so the
    compression noise does not move a pixel; the decoded cache holds the masks written."""
    data = prepared(tmp_path / "data", mask_ext=".jpg")
    args = [*TINY, "--models_dir", str(tmp_path / "models"), "--data_path", str(data), "--mask_ext", ".jpg",
            "--evaluate", "--resume", str(trained[1])]  # fmt: skip
    assert train.main(args) == 0
    cached = np.load(next((data / ".cache").glob("nested_unet_masks_*.npy")), mmap_mode="r")
    for i in range(5):
        np.testing.assert_array_equal(cached[i].astype(bool), _square_mask(i), f"n{i}")


# ----------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["-b", "0"], ["--batch_size", "must be a positive integer, got 0"]),
        (["--batch_size", "-4"], ["--batch_size", "must be a positive integer, got -4"]),
        (["--lr", "-0.1"], ["--lr", "must be a positive number, got -0.1"]),
        (["--lr", "0"], ["--lr", "must be a positive number, got 0"]),
        (["--epochs", "0"], ["--epochs", "must be a positive integer"]),
        (["--arch", "UNet3"], ["unknown --arch 'UNet3'", "valid: UNet, NestedUNet"]),
        (["--loss", "Dice"], ["--loss", "invalid choice: 'Dice'", "BCEDiceLoss", "LovaszHingeLoss"]),
        (["--optimizer", "RMSprop"], ["--optimizer", "invalid choice: 'RMSprop'", "Adam", "SGD"]),
        (["--opt-level", "O7"], ["invalid choice: 'O7'", "O0", "O3"]),
        (["--workers", "-1"], ["--workers", "must be >= 0"]),
        (["--input_w", "40"], ["--input_w must be a multiple of 16", "use 32 or 48"]),
        (["--input_channels", "2"], ["--input_channels must be 1 (grey) or 3 (RGB), got 2"]),
        (["--deep_supervision", "maybe"], ["expected true or false, got 'maybe'"]),
    ],
)
def test_train_flags_state_the_rule(tmp_path, capsys, flags, fragments):
    user_error(
        _train(tmp_path, "--data_path", str(tmp_path / "none"), *flags), *fragments, stderr=_err(capsys)
    )
    _nothing_written(tmp_path)


def test_val_split_is_checked_before_the_model(tmp_path, capsys, monkeypatch):
    data = prepared(tmp_path / "data")
    monkeypatch.setattr(train, "build_model", lambda args: pytest.fail("model built"))
    user_error(_train(tmp_path, "--data_path", str(data), "--val_split", "1.5"), "strictly between 0 and 1")


def test_preprocess_flags(tmp_path, capsys):
    user_error(
        lambda: prep.main(["--input_w", "0"]), "--input_w", "must be a positive integer", stderr=_err(capsys)
    )


def test_more_ranks_than_devices_is_refused_by_the_script(tmp_path):
    """`RANK_SIZE=8 bash test/train_full_8p.sh` on a node that reports 2 devices (a fake `python -m
    common.device_count`): the shell library refuses before launching anything."""
    copy = tmp_path / "repo" / FOLDER.name
    (copy / "test").mkdir(parents=True)
    (tmp_path / "repo" / "common").symlink_to(REPO / "common", target_is_directory=True)
    for path in [*FOLDER.glob("*.py"), *(FOLDER / "test").glob("*.sh")]:
        shutil.copy2(path, copy / path.relative_to(FOLDER))
    data = prepared(tmp_path / "data")
    env = child_env(threads=None, RANK_SIZE="8", PYTHON=str(fake_device_python(tmp_path, 2)))
    proc = subprocess.run(["bash", "test/train_full_8p.sh", f"--data_path={data}"], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "RANK_SIZE=8 ranks asked for on a node with 2 accelerator(s)" in proc.stderr, proc.stderr
    assert not (copy / "models").exists()


@pytest.mark.parametrize(
    ("script", "args", "fragment"),
    [
        ("train.py", ["--data_path", "{tmp}/nowhere"], "{tmp}/nowhere: --data_path does not exist"),
        (
            "train.py",
            ["--data_path", "{tmp}", "--resume", "{tmp}/c.pth"],
            "checkpoint {tmp}/c.pth does not exist",
        ),
        (
            "preprocess_dsb2018.py",
            ["--data_path", "{tmp}/nowhere"],
            "{tmp}/nowhere: --data_path does not exist",
        ),
        ("demo.py", ["--resume", "{tmp}/c.pth"], "checkpoint {tmp}/c.pth does not exist"),
        ("pthtar2onnx.py", ["--resume", "{tmp}/c.pth"], "checkpoint {tmp}/c.pth does not exist"),
    ],
)
def test_every_entry_point_turns_user_errors_into_one_line(
    tmp_path, capsys, monkeypatch, script, args, fragment
):
    """`python <script> ...` as a user runs it (the module executed as __main__): exit status 2 and one
    `[Error]` line naming the file, no traceback."""
    monkeypatch.setattr(sys, "argv", [script, *(a.format(tmp=tmp_path) for a in args)])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(FOLDER / script), run_name="__main__")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("[Error] " + fragment.format(tmp=tmp_path)), err
    assert err.count("[Error]") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """UNet, 1 epoch on 5 prepared 16x16 images: (data folder, checkpoint.pth.tar)."""
    root = tmp_path_factory.mktemp("trained")
    data = prepared(root / "data")
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("MODELZOO_")]}
    try:
        args = [*TINY, "--data_path", str(data), "--models_dir", str(root / "models"), "-b", "4", "--epochs", "1",
                "--warmup_steps", "0"]  # fmt: skip
        assert train.main(args) == 0
    finally:
        os.environ.update(saved)
    # Without Adam's moments the file is a third of the size: the copies below stay cheap.
    state = torch.load(root / "models" / "data_UNet_woDS" / "checkpoint.pth.tar", weights_only=True)
    state["optimizer"]["state"] = {}
    lean = root / "lean.pth.tar"
    torch.save(state, lean)
    return data, lean


class _Payload:
    """Unpickling this calls Path.touch(marker): code that a checkpoint must never get to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_checkpoint(kind: str, good: Path, folder: Path) -> tuple[Path, list[str], list[str]]:
    """(checkpoint, extra flags, message fragments) for one kind of unusable checkpoint."""
    path = folder / f"{kind}.pth.tar"
    flags: list[str] = []
    if kind == "truncated":
        truncate(shutil.copyfile(good, path), 0.5)
        return path, flags, [str(path), "is corrupted or truncated"]
    if kind == "garbled":
        garble(shutil.copyfile(good, path), offset=good.stat().st_size // 2, length=64)
        return path, flags, [str(path), "is corrupted or truncated"]
    if kind == "empty":
        path.write_bytes(b"")
        return path, flags, [str(path), "is corrupted or truncated"]
    if kind == "missing":
        return path, flags, [str(path), "does not exist"]
    state = torch.load(good, weights_only=True)
    if kind == "pickled_payload":
        state["extra"] = _Payload(folder / "marker")
        torch.save(state, path)
        return path, flags, [str(path), "refusing to load", "could run code"]
    if kind == "other_model":  # UNet++ weights in a UNet training state
        state["state_dict"] = train.archs.NestedUNet(1, 3).state_dict()
        torch.save(state, path)
        own = train.archs.UNet(1, 3).state_dict()
        unexpected = [k for k in state["state_dict"] if k not in own]
        return path, flags, [str(path), "does not fit UNet", f"unexpected keys ({unexpected[0]}"]
    if kind == "other_shape":  # an RGB checkpoint for a grey network
        shutil.copyfile(good, path)
        first = next(iter(state["state_dict"]))
        shape = tuple(state["state_dict"][first].shape)
        grey = (shape[0], 1, *shape[2:])
        return (
            path,
            ["--input_channels", "1"],
            [str(path), "shape mismatches", f"{first}: checkpoint {shape} vs model {grey}"],
        )
    raise AssertionError(kind)


UNREADABLE = ("truncated", "garbled", "empty", "missing", "pickled_payload")
CHECKPOINT_KINDS = [
    "truncated",
    "garbled",
    "empty",
    "missing",
    "pickled_payload",
    "other_model",
    "other_shape",
]


@pytest.mark.parametrize("entry", ["resume", "evaluate", "pretrained", "demo", "export"])
@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_unusable_checkpoints_are_refused_with_the_reason(
    trained, tmp_path, capsys, monkeypatch, entry, kind
):
    data, good = trained
    path, flags, fragments = _bad_checkpoint(kind, good, tmp_path)
    out = tmp_path / "out"
    if entry in ("resume", "evaluate", "pretrained"):
        flag = {"resume": ["--resume", str(path)], "evaluate": ["--evaluate", "--resume", str(path)],
                "pretrained": ["--pretrained", str(path)]}[entry]  # fmt: skip
        call = _train(tmp_path, "--data_path", str(data), *flags, *flag)
    elif entry == "demo":
        call = lambda: demo.main(["--resume", str(path), "--output", str(out), *flags])  # noqa: E731
    else:
        call = lambda: pthtar2onnx.main(["--resume", str(path), "--output", str(out / "m.onnx"), *flags])  # noqa: E731
    if kind == "missing" and entry == "evaluate":
        fragments = [*fragments, "train first"]
    if kind in UNREADABLE:  # read first: no data preparation, no network for a file that cannot be used
        monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("data loaded before the checkpoint"))
        monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("model built before the checkpoint"))
    user_error(call, *fragments, stderr=_err(capsys))
    assert not (tmp_path / "marker").exists(), "the checkpoint ran code"
    assert not out.exists(), "output written from an unusable checkpoint"
    _nothing_written(tmp_path)
    assert torch.load(good, weights_only=True)["epoch"] == 1  # the good checkpoint is untouched


def test_the_payload_is_real(trained, tmp_path):
    """The refused file would indeed have run code under a plain torch.load (so the test above means it)."""
    path, _, _ = _bad_checkpoint("pickled_payload", trained[1], tmp_path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").exists()


def test_resume_with_weights_only_says_to_use_pretrained(trained, tmp_path, capsys):
    data, good = trained
    weights = tmp_path / "model.pth"
    torch.save(torch.load(good, weights_only=True)["state_dict"], weights)
    user_error(_train(tmp_path, "--data_path", str(data), "--resume", str(weights)), "holds weights only",
               "--pretrained", stderr=_err(capsys))  # fmt: skip


# ----------------------------------------------------------------------------------------------- faults

# 5 images: 4 for training, one step of 4 per epoch.
FAULT_ARGS = [*TINY, "-b", "4", "--epochs", "2", "--deterministic", "--scheduler", "ConstantLR",
              "--warmup_steps", "0", "--log_interval", "1"]  # fmt: skip


def test_disk_full_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, capsys, monkeypatch, trained):
    """Epoch 2 of a resumed run cannot be saved (ENOSPC): the epoch-1 checkpoint stays, one clear line."""
    data, good = trained
    run_dir = tmp_path / "models" / "data_UNet_woDS"
    run_dir.mkdir(parents=True)
    latest = shutil.copyfile(good, run_dir / "checkpoint.pth.tar")
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"partial")  # a part of the file reached the disk before it filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = [
        *FAULT_ARGS,
        "--data_path",
        str(data),
        "--models_dir",
        str(tmp_path / "models"),
        "--resume",
        str(latest),
    ]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: train.main(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("[Error]") == 1 and "Traceback" not in err
    assert f"could not write checkpoint {latest}: no space left on device" in err
    assert f"the previous checkpoint {latest} is intact" in err
    monkeypatch.undo()
    assert latest.read_bytes() == good.read_bytes()
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"


def test_nan_steps_are_skipped_and_counted_and_persistent_nan_stops_with_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """2 steps per epoch: step 1 NaN (skipped, counted, training goes on), step 2 fine, then NaN for
    good: with --max_skipped_steps 2 the run stops in epoch 2 and keeps epoch 1's checkpoint."""
    data = prepared(tmp_path / "data")
    real_build = train.build_loss
    monkeypatch.setattr(
        train, "build_loss", lambda name: NaNLossAt(real_build(name), lambda n: n == 1 or n >= 3)
    )
    args = [*FAULT_ARGS, "--data_path", str(data), "--models_dir", str(tmp_path / "models"), "-b", "2",
            "--max_skipped_steps", "2"]  # fmt: skip
    with pytest.raises(TrainingDiverged, match="2 optimizer steps in a row had non-finite gradients"):
        train.main(args)
    state = load_checkpoint(tmp_path / "models" / "data_UNet_woDS" / "checkpoint.pth.tar")
    assert state["epoch"] == 1
    assert state["history"][0]["skipped_steps"] == 1 and state["amp"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    out = capsys.readouterr().out
    assert "Epoch [1/2]" in out and "Epoch [2/2]" not in out


def _killed_run(tmp: Path, data: Path, moment: str) -> tuple[subprocess.Popen, list[str]]:
    args = [*KILL_ARGS, "--data_path", str(data), "--models_dir", str(tmp / "models")]
    return start_killed_training(FOLDER, moment, "build_loss", args, cwd=tmp), args


# SGD with momentum: a training state with an optimizer buffer, at 2/3 of Adam's checkpoint size.
KILL_ARGS = [*FAULT_ARGS, "--optimizer", "SGD"]


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Both killed runs start as processes; the uninterrupted reference trains here meanwhile.

    Returns the reference's final state and, per moment, (process output, its flags, its models folder)."""
    root = tmp_path_factory.mktemp("killed")
    data = prepared(root / "data")
    runs = {}
    for moment in ("mid_epoch", "mid_write"):
        (root / moment).mkdir()
        runs[moment] = (*_killed_run(root / moment, data, moment), root / moment / "models")
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("MODELZOO_")]}
    try:
        args = [*KILL_ARGS, "--data_path", str(data), "--models_dir", str(root / "reference")]
        assert train.main(args) == 0
        reference = load_checkpoint(root / "reference" / "data_UNet_woDS" / "checkpoint.pth.tar")
        results = {}
        for moment, (proc, args, models) in runs.items():
            output, _ = proc.communicate(timeout=300)
            results[moment] = (proc.returncode, output, args, models)
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
    """SIGKILL while epoch 2 trains / while its checkpoint is half written: checkpoint.pth.tar still loads
    and holds epoch 1; --resume then ends with exactly the weights of the uninterrupted run."""
    reference, results = killed_runs
    returncode, output, args, models = results[moment]
    assert returncode == -signal.SIGKILL, output
    run_dir = models / "data_UNet_woDS"
    latest = run_dir / "checkpoint.pth.tar"
    assert load_checkpoint(latest)["epoch"] == 1
    leftovers = [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert bool(leftovers) == (moment == "mid_write")  # the half-written file never replaced the good one
    if moment == "mid_epoch":
        assert "Epoch [1/2]" in output and "Epoch: [2]" not in output
    assert train.main([*args, "--resume", str(latest)]) == 0
    resumed = load_checkpoint(latest)
    assert resumed["epoch"] == 2 and reference["epoch"] == 2
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------- predict, export


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("missing", ["no such file or folder"]),
        ("empty", ["the folder holds no images"]),
        ("not_an_image", ["not an image file this script reads"]),
        ("truncated", ["1 of 3 input image(s) cannot be read", "b.png: cannot decode"]),
    ],
)
def test_demo_inputs_are_checked_before_anything_is_written(trained, tmp_path, capsys, kind, fragments):
    source = tmp_path / "in"
    if kind != "missing":
        source.mkdir()
    if kind == "not_an_image":
        source = source / "notes.txt"
        source.write_text("x")
    if kind == "truncated":
        for name in ("a", "b", "c"):
            _save(_rgba(1), source / f"{name}.png")
        truncate(source / "b.png", 0.5)
    out = tmp_path / "out"
    message = user_error(
        lambda: demo.main(["--resume", str(trained[1]), "--input", str(source), "--output", str(out)]),
        *fragments,
        stderr=_err(capsys),
    )
    assert str(source) in message
    assert not out.exists(), "outputs written before the inputs were checked"


def test_demo_on_a_validation_split_that_changed_since_training(trained, tmp_path, capsys):
    """The checkpoint's data folder, with a mask replaced by one of another size after training."""
    data = shutil.copytree(trained[0], tmp_path / "data", ignore=shutil.ignore_patterns(".cache"))
    for path in (data / "masks" / "0").iterdir():
        _save(np.zeros((SIZE // 2, SIZE // 2), np.uint8), path)
    state = torch.load(trained[1], weights_only=True)
    state["config"]["data_root"] = str(data)
    ckpt = tmp_path / "moved.pth.tar"
    torch.save(state, ckpt)
    out = tmp_path / "out"
    user_error(lambda: demo.main(["--resume", str(ckpt), "--output", str(out)]), str(data / "masks" / "0"),
               "differs from image", stderr=_err(capsys))  # fmt: skip
    assert not out.exists()


def test_demo_reads_rgba_grey_16_bit_and_tiny_images(trained, tmp_path, capsys):
    """Handled as documented: alpha dropped, grey replicated, 16-bit scaled, any size resized to the
    network's input; one mask per image at the image's own size."""
    source = tmp_path / "in"
    _save(_rgba(2), source / "rgba.png")
    _save(np.full((24, 20), 90, np.uint8), source / "grey.png")
    _save(np.full((SIZE, SIZE), 30000, np.uint16), source / "deep.png")
    _save(np.full((3, 5), 200, np.uint8), source / "tiny.png")  # smaller than the network input: resized
    out = tmp_path / "out"
    assert demo.main(["--resume", str(trained[1]), "--input", str(source), "--output", str(out)]) == 0
    sizes = {p.name: Image.open(p).size for p in out.glob("*_mask.png")}
    assert sizes == {"rgba_mask.png": (SIZE, SIZE), "grey_mask.png": (20, 24), "deep_mask.png": (SIZE, SIZE),
                     "tiny_mask.png": (5, 3)}  # fmt: skip


@pytest.mark.parametrize(
    ("script", "flags", "fragments"),
    [
        ("demo", ["--batch_size", "0"], ["--batch_size", "must be a positive integer, got 0"]),
        ("demo", ["--threshold", "1.5"], ["--threshold", "must lie in [0, 1)"]),
        ("demo", ["--arch", "UNet3"], ["unknown --arch 'UNet3'", "valid: UNet, NestedUNet"]),
        ("demo", ["--input_channels", "2"], ["--input_channels", "invalid choice: 2"]),
        ("export", ["--input_w", "40"], ["--input_w must be a multiple of 16, got 40"]),
        ("export", ["--input_h", "-16"], ["--input_h", "must be a positive integer"]),
        ("export", ["--arch", "UNet3"], ["unknown --arch 'UNet3'", "valid: UNet, NestedUNet"]),
        ("export", ["--rtol", "-1"], ["--rtol", "must be >= 0"]),
    ],
)
def test_predict_and_export_flags_state_the_rule(trained, tmp_path, capsys, script, flags, fragments):
    out = tmp_path / "out"
    target = ["--output", str(out)] if script == "demo" else ["--output", str(out / "m.onnx")]
    main = demo.main if script == "demo" else pthtar2onnx.main
    user_error(lambda: main(["--resume", str(trained[1]), *target, *flags]), *fragments, stderr=_err(capsys))
    assert not out.exists()


def test_export_of_an_unreadable_image_writes_no_onnx(trained, tmp_path, capsys):
    image = tmp_path / "x.png"
    _save(_rgba(0), image)
    truncate(image, 0.5)
    out = tmp_path / "m.onnx"
    args = ["--resume", str(trained[1]), "--image", str(image), "--output", str(out)]
    user_error(lambda: pthtar2onnx.main(args), str(image), "cannot decode", stderr=_err(capsys))
    assert not out.exists()


@pytest.mark.parametrize(
    "case",
    [
        "MetaImage .mhd pointing at a missing or short .raw",
        "NIfTI truncated",
        "3-D mask geometry (spacing/origin/direction) different from the CT",
        "NaN/inf voxels in a CT",
        "a volume smaller than the network's minimum size",
    ],
)
def test_volume_cases_do_not_apply(case):
    pytest.skip(
        f"{case}: DSB 2018 is 2-D PNG (8/16-bit integer pixels, no NaN); any image size is resized to the "
        "network input, as the tiny-image demo test shows"
    )
