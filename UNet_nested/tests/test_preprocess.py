"""preprocess_dsb2018.py on real DSB 2018 folders (../shared/data/dsb2018, skipped when absent) and on
hand-made broken folders."""

from __future__ import annotations

import numpy as np
import preprocess_dsb2018 as prep
import pytest
from PIL import Image

from common.errors import ConfigError, DataError
from common.testing import shared_data

# A 320x256 (width x height) RGBA image with 70 nucleus masks, from the shared sample.
SAMPLE_ID = "00ae65c1c6631ae6f2be1a449902976e6eb8483bf6b0740d00530220832c6d3e"


def _real_folders(count: int) -> list:
    stage1 = shared_data("dsb2018", "stage1_train")
    folders = sorted(p for p in stage1.iterdir() if p.is_dir())
    return folders[:count]


def _stage1_with(tmp_path, folders, broken: bool = True):
    """A stage1_train of symlinks to real folders, plus an empty folder and one without masks."""
    stage1 = tmp_path / "kaggle" / "stage1_train"
    stage1.mkdir(parents=True)
    for folder in folders:
        (stage1 / folder.name).symlink_to(folder, target_is_directory=True)
    if broken:
        (stage1 / "empty_folder").mkdir()
        lonely = stage1 / "no_masks"
        (lonely / "images").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(lonely / "images" / "no_masks.png")
    return stage1


def _png(path) -> np.ndarray:
    return np.array(Image.open(path))


def test_real_folders_become_binary_96px_pairs_and_broken_ones_are_skipped_when_asked(tmp_path):
    folders = _real_folders(3)
    stage1 = _stage1_with(tmp_path, folders)
    assert prep.locate_stage1(tmp_path / "kaggle") == stage1
    out = tmp_path / "dsb2018_96"
    messages: list[str] = []
    report = prep.preprocess(stage1, out, 96, 96, log=messages.append, skip_bad=True)
    assert report.written == [f.name for f in folders]
    assert sorted(b.path for b in report.skipped) == [str(stage1 / "empty_folder"), str(stage1 / "no_masks")]
    assert any("no masks" in b.problem for b in report.skipped)
    assert f"--skip_bad_samples: skipped 2 folder(s), listed in {out / 'skipped_samples.txt'}" in messages[-1]
    for folder in folders:
        image = Image.open(out / "images" / f"{folder.name}.png")
        mask = Image.open(out / "masks" / "0" / f"{folder.name}.png")
        assert (image.mode, image.size) == ("RGB", (96, 96))
        assert (mask.mode, mask.size) == ("L", (96, 96))
        assert set(np.unique(np.array(mask))) <= {0, 255}
        # The foreground fraction survives the resize (independent: union of the instance masks).
        union = np.zeros(Image.open(next((folder / "images").iterdir())).size[::-1], bool)
        for path in (folder / "masks").iterdir():
            union |= _png(path) > 127
        assert abs((np.array(mask) > 0).mean() - union.mean()) < 0.02


def test_native_size_keeps_the_exact_union_and_drops_alpha(tmp_path):
    folder = shared_data("dsb2018", "stage1_train", SAMPLE_ID)
    stage1 = _stage1_with(tmp_path, [folder], broken=False)
    rgba = _png(folder / "images" / f"{SAMPLE_ID}.png")
    assert rgba.shape == (256, 320, 4)
    out = tmp_path / "native"
    prep.preprocess(stage1, out, 256, 320, log=lambda _: None)
    np.testing.assert_array_equal(_png(out / "images" / f"{SAMPLE_ID}.png"), rgba[:, :, :3])
    union = np.zeros((256, 320), bool)
    for path in (folder / "masks").iterdir():
        union |= _png(path) > 127
    np.testing.assert_array_equal(
        _png(out / "masks" / "0" / f"{SAMPLE_ID}.png"), union.astype(np.uint8) * 255
    )


def test_output_is_deterministic_and_reused(tmp_path):
    stage1 = _stage1_with(tmp_path, _real_folders(2), broken=False)
    first, second = tmp_path / "a", tmp_path / "b"
    prep.preprocess(stage1, first, 64, 48, log=lambda _: None)
    prep.preprocess(stage1, second, 64, 48, log=lambda _: None)
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == 4
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()
    assert Image.open(first / files[0]).size == (48, 64)  # (width, height)
    stamp = (first / files[0]).stat().st_mtime_ns
    again = prep.preprocess(stage1, first, 64, 48, log=lambda _: None)
    assert again.reused and (first / files[0]).stat().st_mtime_ns == stamp
    changed = prep.preprocess(stage1, first, 32, 32, log=lambda _: None)  # another size: rewritten
    assert not changed.reused and Image.open(first / files[0]).size == (32, 32)


def _synthetic_folder(stage1, name: str, mask_size=(40, 40)):
    (stage1 / name / "images").mkdir(parents=True)
    (stage1 / name / "masks").mkdir()
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(stage1 / name / "images" / f"{name}.png")
    mask = np.zeros((256, 256), np.uint8)
    mask[100 : 100 + mask_size[0], 60 : 60 + mask_size[1]] = 255
    Image.fromarray(mask, "L").save(stage1 / name / "masks" / "m1.png")
    return mask


def test_resized_mask_is_binary_with_the_expected_area(tmp_path):
    stage1 = tmp_path / "stage1_train"
    _synthetic_folder(stage1, "square")
    prep.preprocess(stage1, tmp_path / "out", 96, 96, log=lambda _: None)
    mask = _png(tmp_path / "out" / "masks" / "0" / "square.png")
    assert set(np.unique(mask)) == {0, 255}
    side = 40 * 96 / 256  # 15 pixels
    assert abs((mask > 0).sum() - side**2) <= 4 * side


def _stage1_with_bad_files(tmp_path):
    """Two good folders, then a truncated mask, a mis-sized mask and a folder without masks."""
    stage1 = tmp_path / "stage1_train"
    _synthetic_folder(stage1, "good")
    _synthetic_folder(stage1, "good2")
    _synthetic_folder(stage1, "truncated")
    truncated = stage1 / "truncated" / "masks" / "m1.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    _synthetic_folder(stage1, "small_mask")
    small = stage1 / "small_mask" / "masks" / "m2.png"
    Image.new("L", (10, 10)).save(small)
    (stage1 / "no_masks" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(stage1 / "no_masks" / "images" / "no_masks.png")
    return stage1, truncated, small


def test_bad_folders_are_refused_by_default_every_file_named_and_nothing_written(tmp_path):
    stage1, truncated, small = _stage1_with_bad_files(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        prep.preprocess(stage1, out, 32, 32, log=lambda _: None)
    message = str(info.value)
    assert "3 of 5 sample folder(s) cannot be used" in message
    for named in (truncated, small, stage1 / "no_masks"):
        assert str(named) in message
    assert "cannot decode" in message and "differs from the image" in message and "no masks" in message
    assert "--skip_bad_samples" in message
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_folders_are_skipped_and_listed_with_skip_bad(tmp_path):
    stage1, truncated, small = _stage1_with_bad_files(tmp_path)
    out = tmp_path / "out"
    report = prep.preprocess(stage1, out, 32, 32, log=lambda _: None, skip_bad=True)
    assert report.written == ["good", "good2"]
    problems = {b.path: b.problem for b in report.skipped}
    assert "cannot decode" in problems[str(truncated)]
    assert "differs from the image" in problems[str(small)]
    assert problems[str(stage1 / "no_masks")].startswith("no masks")
    assert sorted(b.id for b in report.skipped) == ["no_masks", "small_mask", "truncated"]
    listed = (out / "skipped_samples.txt").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in listed) == sorted(problems)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["good.png", "good2.png"]


def test_a_reused_preparation_that_left_folders_out_is_refused_without_skip_bad(tmp_path):
    stage1, truncated, _ = _stage1_with_bad_files(tmp_path)
    out = tmp_path / "out"
    prep.preprocess(stage1, out, 32, 32, log=lambda _: None, skip_bad=True)
    with pytest.raises(DataError, match="3 of 5 sample folder") as info:
        prep.preprocess(stage1, out, 32, 32, log=lambda _: None)
    assert str(truncated) in str(info.value)
    again = prep.preprocess(stage1, out, 32, 32, log=lambda _: None, skip_bad=True)
    assert again.reused and sorted(b.id for b in again.skipped) == ["no_masks", "small_mask", "truncated"]


def test_the_command_line_takes_skip_bad_samples(tmp_path, capsys):
    stage1, _, _ = _stage1_with_bad_files(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="cannot be used"):
        prep.main(["--data_path", str(stage1), "--output", str(out), "--input_w", "32"])
    assert (
        prep.main(["--data_path", str(stage1), "--output", str(out), "--input_w", "32", "--skip_bad_samples"])
        == 0
    )
    assert "skipped 3 folder(s)" in capsys.readouterr().out


def test_errors_name_the_folder(tmp_path, capsys):
    with pytest.raises(DataError, match="no usable sample folder"):
        (tmp_path / "stage1_train" / "x").mkdir(parents=True)
        prep.preprocess(tmp_path / "stage1_train", tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    stage1 = tmp_path / "s1" / "stage1_train"
    _synthetic_folder(stage1, "good")
    with pytest.raises(ConfigError, match="not written by preprocess_dsb2018.py"):
        prep.preprocess(stage1, foreign, 32, 32)
    assert (foreign / "keep.txt").exists()
    with pytest.raises(DataError, match="--data_path does not exist"):
        prep.main(["--data_path", str(tmp_path / "nothing_here")])
