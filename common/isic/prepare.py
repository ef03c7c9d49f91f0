"""ISIC 2018 Task 1 as distributed (two folders or two zips) -> the reference's split layout.

Layout written (the one LeeJunHyun/Image_Segmentation's dataset.py writes and the ModelZoo ports expect):

    <out>/train/ISIC_0000000.jpg   <out>/train_GT/ISIC_0000000_segmentation.png
    <out>/valid/...                <out>/valid_GT/...
    <out>/test/...                 <out>/test_GT/...
    <out>/split.json               seed, ratios, counts and the ids of every split (written last)

The reference shuffles with an unseeded `random.shuffle`, so no two machines get the same split. Here the
sorted ids are permuted by numpy's generator seeded with `seed` and cut by int truncation as the
reference cuts them: 70/10/20 of the 2594 official images is 1815 / 259 / 520. `split.json` can be
handed back (`--split_file`) to reproduce a split exactly from another copy of the data.

`resolve_data_path` is what training calls: a prepared layout is used as it is; the dataset as
distributed is prepared once (symlinks, or members extracted from the zips) into a cache folder beside
it, under a file lock so that N ranks do not race, and reused by later runs.

Bad samples (an image without its mask, an unreadable or mis-sized file) are refused, every one named in
one error. With `skip_bad=True` (`--skip_bad_samples`) they are left out before the split, listed in
`<out>/skipped_samples.txt` and in split.json's `skipped`; `prepared_skips` reads that list back.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import shutil
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.cache import default_cache_dir
from common.datacheck import (
    SKIP_HINT,
    SKIPPED_LIST,
    BadSample,
    check_pairs,
    drop_bad,
    format_problems,
    pair_samples,
    skipped_count,
    skipped_note,
    write_skipped_list,
)
from common.errors import ConfigError, DataError
from common.filelock import file_lock

IMAGE_DIR = "ISIC2018_Task1-2_Training_Input"
GT_DIR = "ISIC2018_Task1_Training_GroundTruth"
GT_SUFFIX = "_segmentation"
SPLITS = ("train", "valid", "test")
SPLIT_FILE = "split.json"
DEFAULT_RATIOS = (0.7, 0.1, 0.2)
DEFAULT_SPLIT_SEED = 2018
FILE_OPS = ("copy", "hardlink", "symlink")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT_FORMAT = 1
SKIPPED_FILE = SKIPPED_LIST

EXPECTED_TREE = f"""\
  either ISIC 2018 Task 1 as distributed (two folders, or the two zips unopened):
    <data_path>/{IMAGE_DIR}/ISIC_0000000.jpg ...
    <data_path>/{GT_DIR}/ISIC_0000000{GT_SUFFIX}.png ...
    (or <data_path>/{IMAGE_DIR}.zip and <data_path>/{GT_DIR}.zip)
  or the split layout written by dataset.py:
    <data_path>/train/ train_GT/ valid/ valid_GT/ test/ test_GT/
"""


def mask_id(path: str | Path) -> str:
    """The image id a ground-truth file belongs to: ISIC_0000000_segmentation.png -> ISIC_0000000."""
    stem = Path(path).stem
    return stem[: -len(GT_SUFFIX)] if stem.endswith(GT_SUFFIX) else stem


def _is_image_name(name: str) -> bool:
    return (
        not name.startswith(".")
        and Path(name).suffix.lower() in IMAGE_SUFFIXES
        and not Path(name).stem.endswith(GT_SUFFIX)
    )


def _is_mask_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(f"{GT_SUFFIX}.png")


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """The dataset as distributed: an image side and a ground-truth side, each a folder or a zip."""

    root: Path
    images: Path
    masks: Path

    def describe(self) -> str:
        return f"{self.images} + {self.masks}"


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" and path.is_file()


def _has_files(folder: Path) -> bool:
    return any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())


def _side(root: Path, name: str) -> Path | None:
    folder = root / name
    if folder.is_dir():
        inner = folder / name
        # A zip unpacked into a folder of its own name nests the folder once more.
        if inner.is_dir() and not _has_files(folder):
            return inner
        return folder
    archive = root / f"{name}.zip"
    return archive if archive.is_file() else None


def find_source(path: str | Path) -> Source | None:
    """The official folders/zips at `path` (the folder holding them, or the image folder itself)."""
    path = Path(path)
    if path.is_dir() and path.name == IMAGE_DIR:
        masks = _side(path.parent, GT_DIR)
        return Source(path.parent, path, masks) if masks is not None else None
    if not path.is_dir():
        return None
    images, masks = _side(path, IMAGE_DIR), _side(path, GT_DIR)
    if images is None or masks is None:
        return None
    return Source(path, images, masks)


def _list_side(side: Path, wanted: Callable[[str], bool]) -> list[Path]:
    """Files of a folder (sorted), or members of a zip as `<zip>/<member>` paths."""
    if _is_zip(side):
        try:
            with zipfile.ZipFile(side) as archive:
                names = [
                    n
                    for n in archive.namelist()
                    if not n.endswith("/") and "__MACOSX" not in n and wanted(Path(n).name)
                ]
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(side, f"cannot be read as a zip archive ({exc})") from exc
        return sorted(side / n for n in names)
    return sorted(p for p in side.iterdir() if p.is_file() and wanted(p.name))


NAMING_HINT = (
    f"(an image <id>.jpg pairs with the mask <id>{GT_SUFFIX}.png; ids differing only in the extension, "
    "such as ISIC_1.jpg and ISIC_1.JPG or ISIC_1.png, are duplicates: keep one)"
)


def _pair(
    images: list[Path], masks: list[Path], skip_bad: bool = False
) -> tuple[list[tuple[str, Path, Path]], list[BadSample]]:
    """pair_samples with the ISIC naming rule added to its message."""
    try:
        return pair_samples(images, masks, mask_id=mask_id, skip_bad=skip_bad)
    except DataError as exc:
        raise DataError(exc.path, f"{exc.problem}\n{NAMING_HINT}") from None


def source_samples(source: Source, *, skip_bad: bool) -> tuple[list[tuple[str, Path, Path]], list[BadSample]]:
    """(every (id, image, mask) of the source, samples left out): images without masks and masks without
    images are refused in one DataError, or left out with `skip_bad`."""
    images = _list_side(source.images, _is_image_name)
    masks = _list_side(source.masks, _is_mask_name)
    if not images:
        raise DataError(source.images, f"holds no ISIC images (*.jpg).\nExpected layout:\n{EXPECTED_TREE}")
    return _pair(images, masks, skip_bad)


def source_pairs(source: Source) -> list[tuple[str, Path, Path]]:
    """Every (id, image, mask) of the source; one DataError lists images without masks and vice versa."""
    return source_samples(source, skip_bad=False)[0]


def is_prepared(path: str | Path) -> bool:
    """True when `path` holds the six split folders (train/ train_GT/ valid/ valid_GT/ test/ test_GT/)."""
    path = Path(path)
    return all((path / f"{split}{gt}").is_dir() for split in SPLITS for gt in ("", "_GT"))


# ----------------------------------------------------------------------------------------------- split


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    if len(ratios) != 3 or any(not np.isfinite(r) or r < 0 for r in ratios) or ratios[0] <= 0:
        raise ConfigError(
            f"split ratios must be three numbers >= 0 (train, valid, test) with train > 0, got {list(ratios)}"
        )
    return float(ratios[0]), float(ratios[1]), float(ratios[2])


def split_counts(n: int, ratios: Sequence[float] = DEFAULT_RATIOS) -> tuple[int, int, int]:
    """(train, valid, test) counts: int(r / sum(r) * n) for train and valid, the rest for test."""
    ratios = _check_ratios(ratios)
    total = sum(ratios)
    # The epsilon keeps 0.7 * 2594 = 1815.8 from becoming 1815.79999 -> still 1815; it only guards exact ties.
    train = int(ratios[0] / total * n + 1e-9)
    valid = int(ratios[1] / total * n + 1e-9)
    return train, valid, n - train - valid


def split_ids(
    ids: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS, seed: int = DEFAULT_SPLIT_SEED
) -> dict[str, list[str]]:
    """A seeded split of `ids` into train/valid/test; the result does not depend on the input order."""
    ordered = sorted(set(ids))
    if len(ordered) != len(ids):
        raise ConfigError("split_ids: the ids are not unique")
    train, valid, _ = split_counts(len(ordered), ratios)
    order = np.random.default_rng(seed).permutation(len(ordered))
    shuffled = [ordered[i] for i in order]
    return {
        "train": sorted(shuffled[:train]),
        "valid": sorted(shuffled[train : train + valid]),
        "test": sorted(shuffled[train + valid :]),
    }


def read_split_file(path: str | Path) -> dict:
    """A split.json written by `prepare` (its 'splits' hold the ids of train, valid and test)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(path, "split file not found") from exc
    except (OSError, ValueError) as exc:
        raise DataError(path, f"is not a readable split file ({exc})") from exc
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), list) for s in SPLITS):
        raise DataError(path, "split file has no 'splits' with train, valid and test id lists")
    return data


# ----------------------------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Header:
    """Shape from the file header only: enough for check_pairs to compare image and mask sizes."""

    shape: tuple[int, ...]


def _zip_member(path: Path) -> tuple[Path, str] | None:
    """(archive, member) when `path` is a `<zip>/<member>` path of `_list_side`, else None."""
    for parent in path.parents:
        if parent.suffix.lower() == ".zip" and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


HEADER_BYTES = 1 << 18  # JPEG/PNG headers (EXIF included) fit; the pixels are not needed here


def read_header(
    path: str | Path, what: str = "image", archives: dict[Path, zipfile.ZipFile] | None = None
) -> _Header:
    """Open `path` (a file, or a `<zip>/<member>` path) and read its size from the header alone.

    Every failure is a DataError naming `path`: missing, not an image (damaged header), unreadable.
    `archives` caches open zips between calls (the central directory is read once).
    """
    path = Path(path)
    try:
        inside = _zip_member(path)
        if inside is not None:
            archives = {} if archives is None else archives
            if inside[0] not in archives:
                archives[inside[0]] = zipfile.ZipFile(inside[0])
            with archives[inside[0]].open(inside[1]) as member:
                handle = io.BytesIO(member.read(HEADER_BYTES))
        else:
            handle = path
        with Image.open(handle) as im:
            width, height = im.size
            channels = len(im.getbands())
    except FileNotFoundError as exc:
        raise DataError(path, "file not found (a dangling link? prepare the data again)") from exc
    except UnidentifiedImageError as exc:
        raise DataError(
            path,
            f"cannot be read as {'an image' if what == 'image' else 'a mask'}: not a JPEG/PNG file, "
            "or its header is damaged (a garbled or truncated download)",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        article = "an image" if what == "image" else "a mask"
        raise DataError(path, f"cannot be read as {article}: truncated or damaged ({exc})") from exc
    return _Header((height, width, channels) if what == "image" else (height, width))


def check_layout_pairs(pairs: Sequence[tuple[str, Path, Path]], *, skip_bad: bool = False) -> list[BadSample]:
    """Every image and mask opens and each mask has its image's size; one DataError lists all problems,
    or with `skip_bad` the bad samples are returned.

    Only headers are read (thousands per second); a file truncated after its header is reported by name
    when the decoded cache is built, still before the first training step. Members of a zip are read
    one at a time (a ZipFile is not shared between threads).
    """
    zipped = any(_zip_member(p) is not None for pair in pairs[:1] for p in pair[1:])
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        return check_pairs(
            pairs,
            lambda p: read_header(p, "image", archives),
            lambda p: read_header(p, "mask", archives),
            workers=1 if zipped else None,
            skip_bad=skip_bad,
            hint=SKIP_HINT,
        )
    finally:
        for archive in archives.values():
            archive.close()


def layout_pairs(root: str | Path, split: str) -> list[tuple[str, Path, Path]]:
    """(id, image, mask) of one split of a prepared layout, paired by id."""
    return layout_samples(root, split, skip_bad=False)[0]


def layout_samples(
    root: str | Path, split: str, *, skip_bad: bool
) -> tuple[list[tuple[str, Path, Path]], list[BadSample]]:
    """(id, image, mask) of one split of a prepared layout, paired by id, and the samples left out."""
    root = Path(root)
    images = _list_side(root / split, _is_image_name)
    masks = _list_side(root / f"{split}_GT", _is_mask_name)
    if not images:
        raise DataError(
            root / split, f"the {split} split holds no images.\nExpected layout:\n{EXPECTED_TREE}"
        )
    return _pair(images, masks, skip_bad)


def prepared_skips(root: str | Path) -> list[BadSample]:
    """The samples left out when the layout at `root` was prepared (split.json's `skipped`); [] if none."""
    try:
        record = read_split_file(Path(root) / SPLIT_FILE)
    except DataError:
        return []
    rows = record.get("skipped")
    if not isinstance(rows, list):
        return []
    return [BadSample(str(r[0]), str(r[1]), str(r[2])) for r in rows if isinstance(r, list) and len(r) == 3]


def refuse_skipped(where: str | Path, skipped: Sequence[BadSample]) -> DataError:
    """The error for a prepared layout that left samples out, read without `skip_bad`."""
    return DataError(
        where,
        f"was prepared with --skip_bad_samples: {skipped_count(skipped)} bad sample(s) were left out "
        f"({len(skipped)} problem(s)):\n"
        + format_problems([(b.path, b.problem) for b in skipped])
        + f"\n{SKIP_HINT}",
    )


# ----------------------------------------------------------------------------------------------- writing


def _place(src: Path, dest: Path, file_op: str, archives: dict[Path, zipfile.ZipFile]) -> None:
    try:
        _place_file(src, dest, file_op, archives)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = "no space left on device" if getattr(exc, "errno", None) == errno.ENOSPC else str(exc)
        raise DataError(
            src, f"cannot be copied into the split layout ({reason}); nothing was written"
        ) from exc


def _place_file(src: Path, dest: Path, file_op: str, archives: dict[Path, zipfile.ZipFile]) -> None:
    for archive_path, archive in archives.items():
        if archive_path in src.parents:
            with archive.open(src.relative_to(archive_path).as_posix()) as fin, open(dest, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            return
    if file_op == "symlink":
        os.symlink(os.path.abspath(src), dest)
        return
    if file_op == "hardlink":
        try:
            os.link(src, dest)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy instead
    shutil.copyfile(src, dest)


def prepare(
    source: Source,
    out: str | Path,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = DEFAULT_SPLIT_SEED,
    file_op: str = "copy",
    split_file: str | Path | None = None,
    log: Callable[[str], None] = print,
    skip_bad: bool = False,
) -> dict:
    """Write the split layout of `source` into `out`; returns the split record (what split.json holds).

    Every source image and mask is opened first (headers: size, readable) and one DataError names every
    unpaired, duplicate, unreadable or mis-sized file before anything is written; with `skip_bad` those
    samples are left out before the split instead (the record's `skipped`, and `<out>/skipped_samples.txt`). The six split folders
    are then built in a temporary folder inside `out` and moved into place
    (replacing earlier ones, as the reference does); split.json is written last, so an interrupted
    run leaves no split.json and the next one starts over. `file_op` says how files of a source folder
    get there (zip members are always extracted).
    """
    if file_op not in FILE_OPS:
        raise ConfigError(f"--file_op must be one of {', '.join(FILE_OPS)}, got {file_op!r}")
    out = Path(out)
    pairs, skipped = source_samples(source, skip_bad=skip_bad)
    # Every source file is checked before anything is written, and problems name the source files.
    skipped += check_layout_pairs(pairs, skip_bad=skip_bad)
    pairs = drop_bad(pairs, skipped)
    left_out = {b.id for b in skipped}
    by_id = {key: (image, mask) for key, image, mask in pairs}
    if split_file:
        record = read_split_file(split_file)
        splits = {s: [i for i in record["splits"][s] if i not in left_out] for s in SPLITS}
        missing = sorted(i for s in SPLITS for i in splits[s] if i not in by_id)
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise DataError(
                split_file, f"{len(missing)} id(s) of the split file are not in {source.describe()}: {shown}"
            )
        ratios = tuple(record.get("ratios", ratios))
        seed = record.get("seed", seed)
    else:
        splits = split_ids(list(by_id), ratios, seed)
    for split in ("train", "valid"):
        if not splits[split]:
            raise ConfigError(
                f"the {split} split would be empty ({len(by_id)} images, ratios {list(ratios)}); "
                "use more images or larger ratios"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / SKIPPED_FILE).unlink(missing_ok=True)
    tmp = out / f".prepare-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    archives = {side: zipfile.ZipFile(side) for side in (source.images, source.masks) if _is_zip(side)}
    try:
        (out / SPLIT_FILE).unlink(missing_ok=True)
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
            (tmp / f"{split}_GT").mkdir()
            for key in splits[split]:
                image, mask = by_id[key]
                _place(image, tmp / split / image.name, file_op, archives)
                _place(mask, tmp / f"{split}_GT" / mask.name, file_op, archives)
        for name in (f"{s}{gt}" for s in SPLITS for gt in ("", "_GT")):
            shutil.rmtree(out / name, ignore_errors=True)
            os.replace(tmp / name, out / name)
    finally:
        for archive in archives.values():
            archive.close()
        shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "format": SPLIT_FORMAT,
        "source": source.describe(),
        "seed": seed,
        "ratios": list(ratios),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "splits": splits,
        "skipped": [list(b) for b in sorted(skipped)],
    }
    if skipped:
        log(skipped_note(skipped, write_skipped_list(out, skipped)))
    tmp_file = out / f".{SPLIT_FILE}.tmp-{os.getpid()}"
    tmp_file.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_file, out / SPLIT_FILE)
    for split in SPLITS:
        log(f"image count in {split} path :{len(splits[split])}")
    return record


def layout_error(path: str | Path, flag: str = "--data_path") -> DataError:
    """The DataError for a path that holds no usable ISIC data: what is wrong, and the expected tree."""
    path = Path(path)
    tree = f"\nExpected layout:\n{EXPECTED_TREE}"
    if not path.exists():
        return DataError(path, f"{flag} does not exist.{tree}")
    if not path.is_dir():
        return DataError(path, f"{flag} is not a directory.{tree}")
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        return DataError(path, f"{flag} is an empty folder.{tree}")
    split_dirs = [f"{s}{gt}" for s in SPLITS for gt in ("", "_GT")]
    present = [d for d in split_dirs if (path / d).is_dir()]
    if present:
        missing = [d for d in split_dirs if d not in present]
        return DataError(path, f"incomplete split layout: {', '.join(missing)} missing.{tree}")
    has_images = _side(path, IMAGE_DIR) is not None or path.name == IMAGE_DIR
    has_masks = _side(path if path.name != IMAGE_DIR else path.parent, GT_DIR) is not None
    if has_images != has_masks:
        lacking = GT_DIR if has_images else IMAGE_DIR
        return DataError(path, f"the {lacking} folder (or {lacking}.zip) is missing beside it.{tree}")
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    return DataError(
        path,
        f"is neither ISIC 2018 Task 1 as distributed nor a prepared split layout (it holds {shown}).{tree}",
    )


def _matches(out: Path, ids: set[str], seed: int, ratios: Sequence[float]) -> bool:
    try:
        record = read_split_file(out / SPLIT_FILE)
    except DataError:
        return False
    stored = {i for s in SPLITS for i in record["splits"][s]} | {b.id for b in prepared_skips(out)}
    same_ratios = [float(r) for r in record.get("ratios", [])] == [float(r) for r in ratios]
    return record.get("seed") == seed and same_ratios and stored == ids and is_prepared(out)


def _any_fixed(skipped: Sequence[BadSample], pairs: Sequence[tuple[str, Path, Path]]) -> bool:
    """True when a sample a preparation left out now has its mask and opens: prepare again."""
    by_id = {pair[0]: pair for pair in pairs}
    again = [by_id[key] for key in sorted({b.id for b in skipped}) if key in by_id]
    still_bad = {b.id for b in check_layout_pairs(again, skip_bad=True)} if again else set()
    return any(pair[0] not in still_bad for pair in again)


def prepared_dir_for(source: Source, seed: int, ratios: Sequence[float]) -> Path:
    """Where training keeps its prepared copy of `source` (beside it when writable, else a user cache)."""
    tag = "-".join(f"{r:g}" for r in ratios)
    return default_cache_dir(source.root) / f"isic2018_split_seed{seed}_{tag}"


def resolve_data_path(
    data_path: str | Path,
    *,
    seed: int = DEFAULT_SPLIT_SEED,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    log: Callable[[str], None] = print,
    skip_bad: bool = False,
) -> Path:
    """The prepared layout for `--data_path`: itself when prepared, else a prepared copy made once.

    Accepts the folder holding the two official folders or zips, the image folder itself, or a layout
    written by dataset.py. Safe to call from every rank at once. Bad samples of the source are refused, or
    left out with `skip_bad` (`prepared_skips(result)` lists them); a prepared copy that left samples out
    is refused without `skip_bad`.
    """
    path = Path(data_path).expanduser()
    if is_prepared(path):
        return path
    source = find_source(path)
    if source is None:
        raise layout_error(path, "--data_path")
    out = prepared_dir_for(source, seed, ratios)
    with file_lock(out.parent / f".{out.name}.lock"):
        pairs, unpaired = source_samples(source, skip_bad=skip_bad)
        ids = {key for key, _, _ in pairs} | {b.id for b in unpaired}
        if _matches(out, ids, seed, ratios) and not _any_fixed(skipped := prepared_skips(out), pairs):
            if skipped and not skip_bad:
                raise refuse_skipped(out, skipped)
            log(f"Using the prepared split in {out} (seed {seed}, ratios {list(ratios)})")
            if skipped:
                log(skipped_note(skipped, out / SKIPPED_FILE))
            return out
        log(f"Preparing {source.describe()} -> {out} (seed {seed}, ratios {list(ratios)})")
        prepare(source, out, ratios=ratios, seed=seed, file_op="symlink", log=log, skip_bad=skip_bad)
    return out


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Split ISIC 2018 Task 1 (the official folders or zips) into train/ valid/ test/ + _GT "
        "with a seeded split and a split list file (split.json).",
    )
    parser.add_argument("--data_path", default=None, help="folder holding the two official folders or zips")
    parser.add_argument("--origin_data_path", default=None, help=f"the {IMAGE_DIR} folder or zip")
    parser.add_argument("--origin_GT_path", default=None, help=f"the {GT_DIR} folder or zip")
    parser.add_argument("--output_path", default="./dataset", help="where train/ valid/ test/ are written")
    parser.add_argument("--train_ratio", type=float, default=DEFAULT_RATIOS[0])
    parser.add_argument("--valid_ratio", type=float, default=DEFAULT_RATIOS[1])
    parser.add_argument("--test_ratio", type=float, default=DEFAULT_RATIOS[2])
    parser.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the split")
    parser.add_argument("--split_file", default=None, help="reuse the split of this split.json")
    parser.add_argument(
        "--file_op", default="copy", choices=FILE_OPS, help="how files get into the layout (zips: extracted)"
    )
    parser.add_argument(
        "--skip_bad_samples", action="store_true",
        help=f"leave out images without a mask and unreadable or mis-sized files (listed in <output_path>/"
        f"{SKIPPED_FILE}; default: refuse, naming every such file)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_ratios((args.train_ratio, args.valid_ratio, args.test_ratio))
    if args.origin_data_path:
        images = Path(args.origin_data_path)
        masks = Path(args.origin_GT_path) if args.origin_GT_path else _side(images.parent, GT_DIR)
        if masks is None or not masks.exists():
            raise DataError(
                masks or images.parent / GT_DIR, "ground-truth folder or zip not found (--origin_GT_path)"
            )
        if not images.exists():
            raise DataError(images, "image folder or zip not found (--origin_data_path)")
        source = Source(images.parent, images, masks)
    else:
        root = Path(args.data_path or ".")
        source = find_source(root)
        if source is None:
            raise layout_error(root, "--data_path")
    ratios = _check_ratios((args.train_ratio, args.valid_ratio, args.test_ratio))
    out = Path(args.output_path)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--output_path {out} is a file; it must be a folder (new or earlier dataset.py output)"
        )
    print(f"Source: {source.describe()}\nOutput: {out.resolve()}")
    prepare(source, out, ratios=ratios, seed=args.seed, file_op=args.file_op, split_file=args.split_file,
            skip_bad=args.skip_bad_samples)  # fmt: skip
    print(f"Split list: {out / SPLIT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
