"""common.datacheck: every problem in a dataset tree is reported in one DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.datacheck import (
    MAX_LISTED,
    SKIP_HINT,
    BadSample,
    check_pairs,
    drop_bad,
    file_id,
    format_problems,
    pair_by_stem,
    pair_samples,
    require_dir,
    skipped_count,
    skipped_note,
    write_skipped_list,
)
from common.errors import DataError
from common.imageio import Volume, read_image, read_mask, read_volume, write_volume

TREE = "data/\n  images/  *.png\n  masks/   *.png (same names)"


def _png(path: Path, shape=(16, 16), value=255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(shape, np.uint8)
    array[: shape[0] // 2] = value
    Image.fromarray(array).save(path)
    return path


# ----------------------------------------------------------------------------------------------- require_dir


def test_require_dir_accepts_a_folder_with_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    assert require_dir(tmp_path, "training images", TREE) == tmp_path


def test_require_dir_missing_shows_expected_tree(tmp_path):
    with pytest.raises(DataError) as info:
        require_dir(tmp_path / "train", "training images", TREE)
    message = str(info.value)
    assert "not found" in message and "train" in message and "masks/   *.png (same names)" in message
    assert info.value.path == tmp_path / "train"


def test_require_dir_not_a_directory(tmp_path):
    (tmp_path / "train").write_text("oops")
    with pytest.raises(DataError, match="not a directory") as info:
        require_dir(tmp_path / "train", "training images", TREE)
    assert "images/" in str(info.value)


def test_require_dir_empty_ignores_hidden_files(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"")
    (tmp_path / ".cache").mkdir()
    with pytest.raises(DataError, match="empty") as info:
        require_dir(tmp_path, "training images", TREE)
    assert "Expected layout" in str(info.value)


# ----------------------------------------------------------------------------------------------- pairing


def test_pair_by_stem_sorted_pairs():
    images = [Path("img/b.png"), Path("img/a.png"), Path("img/c.nii.gz")]
    masks = [Path("gt/c.nii.gz"), Path("gt/a.png"), Path("gt/b.png")]
    pairs = pair_by_stem(images, masks)
    assert [p[0] for p in pairs] == ["a", "b", "c"]
    assert pairs[2] == ("c", Path("img/c.nii.gz"), Path("gt/c.nii.gz"))


def test_pair_by_stem_custom_mask_id_isic_style():
    images = [Path("in/ISIC_0000001.jpg"), Path("in/ISIC_0000002.jpg")]
    masks = [Path("gt/ISIC_0000002_segmentation.png"), Path("gt/ISIC_0000001_segmentation.png")]
    pairs = pair_by_stem(images, masks, mask_id=lambda p: p.stem.removesuffix("_segmentation"))
    assert [(i, m.name) for i, _, m in pairs] == [
        ("ISIC_0000001", "ISIC_0000001_segmentation.png"),
        ("ISIC_0000002", "ISIC_0000002_segmentation.png"),
    ]


def test_pair_by_stem_reports_every_problem_at_once():
    images = [Path("d/img/a.png"), Path("d/img/b.png"), Path("d/img/b.jpg"), Path("d/img/lonely.png")]
    masks = [Path("d/gt/a.png"), Path("d/gt/b.png"), Path("d/gt/orphan.png"), Path("d/gt/a.tif")]
    with pytest.raises(DataError) as info:
        pair_by_stem(images, masks)
    message = str(info.value)
    assert "lonely.png: image has no mask" in message
    assert "orphan.png: mask has no image" in message
    assert "duplicate image id 'b'" in message and "b.jpg" in message
    assert "duplicate mask id 'a'" in message and "a.tif" in message
    assert "4 problem(s)" in message
    assert info.value.path == Path("d")


def test_pair_by_stem_caps_the_list():
    images = [Path(f"img/{i:03d}.png") for i in range(35)]
    with pytest.raises(DataError) as info:
        pair_by_stem(images, [])
    message = str(info.value)
    assert "000.png" in message and "019.png" in message and "020.png" not in message
    assert f"... and {35 - MAX_LISTED} more" in message


def test_format_problems_and_file_id():
    text = format_problems([(Path("a.png"), "truncated"), (None, "general")])
    assert text.splitlines() == ["  a.png: truncated", "  general"]
    assert file_id("x/case_01.nii.gz") == "case_01" and file_id("x/img.v2.png") == "img.v2"


# ----------------------------------------------------------------------------------------------- check_pairs


def test_check_pairs_passes_on_good_data(tmp_path):
    pairs = []
    for name in ("a", "b", "c"):
        img = _png(tmp_path / "img" / f"{name}.png", (16, 20))
        msk = _png(tmp_path / "gt" / f"{name}.png", (16, 20))
        pairs.append((name, img, msk))
    check_pairs(pairs, read_image, read_mask, workers=2)


def test_check_pairs_lists_every_bad_file(tmp_path):
    pairs = []
    for name in ("good", "truncated", "mismatch", "labels", "missing"):
        pairs.append(
            (
                name,
                _png(tmp_path / "img" / f"{name}.png", (16, 20)),
                _png(tmp_path / "gt" / f"{name}.png", (16, 20)),
            )
        )
    truncated = tmp_path / "img" / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 256, (16, 20), dtype=np.uint8)
    Image.fromarray(noise).save(truncated)  # incompressible, so cutting it cuts pixel data
    truncated.write_bytes(truncated.read_bytes()[:150])
    _png(tmp_path / "gt" / "mismatch.png", (16, 24))  # wrong size
    _png(tmp_path / "gt" / "labels.png", (16, 20), value=2)  # {0, 2}: not a binary mask
    (tmp_path / "gt" / "missing.png").unlink()

    with pytest.raises(DataError) as info:
        check_pairs(pairs, read_image, read_mask, workers=3)
    message = str(info.value)
    assert "4 problem(s) in 4 file(s) out of 5 pairs" in message
    assert "truncated.png: cannot decode" in message
    assert "mismatch.png: size (16, 24) differs from image mismatch.png (16, 20)" in message
    assert "labels.png: mask values" in message
    assert "missing.png: file not found" in message
    assert "good.png" not in message


def test_check_pairs_without_size_check_and_with_foreign_errors(tmp_path):
    img = _png(tmp_path / "a.png", (8, 8))
    msk = _png(tmp_path / "a_mask.png", (8, 9))
    check_pairs([("a", img, msk)], read_image, read_mask, check_size=False)

    def exploding_reader(path):
        raise RuntimeError("library bug")

    with pytest.raises(DataError, match="RuntimeError: library bug"):
        check_pairs([("a", img, msk)], exploding_reader, read_mask)


def test_check_pairs_compares_volume_geometry(tmp_path):
    array = np.zeros((4, 5, 6), np.int16)
    image = Volume(array, (2.0, 1.0, 1.0))
    write_volume(tmp_path / "ct.nii.gz", array, like=image)
    write_volume(tmp_path / "seg_ok.nii.gz", array.astype(np.uint8), like=image)
    write_volume(tmp_path / "seg_bad.nii.gz", array.astype(np.uint8), spacing=(2.5, 1.0, 1.0))
    check_pairs([("ok", tmp_path / "ct.nii.gz", tmp_path / "seg_ok.nii.gz")], read_volume, read_volume)
    with pytest.raises(DataError, match="seg_bad.nii.gz: geometry differs from image ct.nii.gz: spacing"):
        check_pairs([("bad", tmp_path / "ct.nii.gz", tmp_path / "seg_bad.nii.gz")], read_volume, read_volume)


# ----------------------------------------------------------------------------------------------- skip_bad


def test_pair_samples_refuses_every_bad_sample_with_the_hint_or_leaves_them_out():
    images = [Path(f"img/{n}.png") for n in ("a", "b", "c", "d")] + [Path("img/c.PNG")]
    masks = [Path(f"gt/{n}.png") for n in ("a", "c", "d", "e")]
    with pytest.raises(DataError) as info:
        pair_samples(images, masks, skip_bad=False)
    message = str(info.value)
    assert "3 problem(s) pairing 5 images with 4 masks" in message and message.endswith(SKIP_HINT)
    assert "img/b.png: image has no mask" in message and "gt/e.png: mask has no image" in message
    assert "duplicate image id 'c'" in message
    pairs, bad = pair_samples(images, masks, skip_bad=True)
    assert [p[0] for p in pairs] == ["a", "d"]
    assert sorted((b.id, b.problem) for b in bad) == [
        ("b", "image has no mask"), ("c", "duplicate image id 'c' (also c.PNG)"), ("e", "mask has no image")
    ]  # fmt: skip
    # pair_by_stem: the strict form, without a flag to mention.
    with pytest.raises(DataError) as info:
        pair_by_stem(images, masks)
    assert SKIP_HINT not in str(info.value)


def test_check_pairs_with_skip_bad_returns_the_bad_samples_and_refuses_them_without(tmp_path):
    pairs = [(n, _png(tmp_path / "img" / f"{n}.png"), _png(tmp_path / "gt" / f"{n}.png")) for n in "abcd"]
    (tmp_path / "img" / "b.png").write_bytes(b"not a png")
    (tmp_path / "gt" / "b.png").write_bytes(b"")
    _png(tmp_path / "gt" / "d.png", (16, 12))
    bad = check_pairs(pairs, read_image, read_mask, skip_bad=True, workers=2)
    assert sorted((b.id, Path(b.path).name) for b in bad) == [("b", "b.png"), ("b", "b.png"), ("d", "d.png")]
    assert skipped_count(bad) == 2 and [p[0] for p in drop_bad(pairs, bad)] == ["a", "c"]
    with pytest.raises(DataError) as info:
        check_pairs(pairs, read_image, read_mask, hint=SKIP_HINT, workers=2)
    message = str(info.value)
    assert "3 problem(s) in 3 file(s) out of 4 pairs" in message and message.endswith(SKIP_HINT)
    assert check_pairs(drop_bad(pairs, bad), read_image, read_mask, skip_bad=False) == []


def test_a_refusal_lists_many_bad_files_capped_with_their_count(tmp_path):
    pairs = [(f"s{i:02d}", tmp_path / f"s{i:02d}.png", tmp_path / f"m{i:02d}.png") for i in range(30)]
    with pytest.raises(DataError) as info:
        check_pairs(pairs, read_image, read_mask, hint=SKIP_HINT)
    message = str(info.value)
    assert "60 problem(s) in 60 file(s) out of 30 pairs" in message
    assert f"... and {60 - MAX_LISTED} more" in message and message.count("file not found") == MAX_LISTED


def test_skipped_list_and_note_say_how_many_and_where(tmp_path):
    bad = [BadSample("b", "/d/b.png", "cannot decode:\ntruncated"), BadSample("a", "/d/a.png", "no mask"),
           BadSample("b", "/d/b_mask.png", "file not found")]  # fmt: skip
    path = write_skipped_list(tmp_path / "run", bad)
    assert path == tmp_path / "run" / "skipped_samples.txt"
    assert path.read_text().splitlines() == [
        "a\t/d/a.png\tno mask", "b\t/d/b.png\tcannot decode: truncated", "b\t/d/b_mask.png\tfile not found"
    ]  # fmt: skip
    note = skipped_note(bad, path)
    assert note == f"--skip_bad_samples: 2 bad sample(s) left out (3 problem(s)); listed in {path}"
