"""Check a dataset tree before training and report every problem in one error.

A dataset with three bad files should cost the user one run to fix, not three: each check here collects
all problems first and raises a single `DataError` that lists them (capped, with "and N more").

Typical use in a model folder's data code::

    root = require_dir(args.data_path / "train", "training images", EXPECTED_TREE)
    pairs = pair_by_stem(sorted(root.glob("*.jpg")), sorted(gt.glob("*.png")),
                         mask_id=lambda p: p.stem.removesuffix("_segmentation"))
    check_pairs(pairs, read_image, read_mask)

Bad samples (an unreadable image, a missing or mis-sized mask) are refused by default. With
`skip_bad=True` (the `--skip_bad_samples` flag) `pair_samples` and `check_pairs` return them as
`BadSample`s instead; `drop_bad` removes them from the pairs, `write_skipped_list` and `skipped_note`
tell the user how many were left out and where they are listed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from common.errors import DataError
from common.imageio import Volume, same_geometry, strip_volume_ext, volume_ext

MAX_LISTED = 20
SKIP_FLAG = "--skip_bad_samples"
SKIP_HINT = f"Fix or remove these files, or pass {SKIP_FLAG} to leave those samples out and use the others."
SKIPPED_LIST = "skipped_samples.txt"

Pair = tuple[str, Path, Path]


class BadSample(NamedTuple):
    """A sample that is refused, or left out under `skip_bad`: its id, the file at fault and why."""

    id: str
    path: str
    problem: str


def skipped_count(bad: Iterable[BadSample]) -> int:
    """Samples left out: a sample whose image and mask are both bad counts once."""
    return len({b.id for b in bad})


def drop_bad(pairs: Sequence[Pair], bad: Iterable[BadSample]) -> list[Pair]:
    """`pairs` without the samples named in `bad`."""
    ids = {b.id for b in bad}
    return [pair for pair in pairs if pair[0] not in ids]


def write_skipped_list(folder: str | Path, bad: Sequence[BadSample], name: str = SKIPPED_LIST) -> Path:
    """Write `<folder>/skipped_samples.txt`, one `id<TAB>file<TAB>problem` line per problem; its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    lines = [f"{b.id}\t{b.path}\t{' '.join(b.problem.split())}\n" for b in sorted(bad)]
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    tmp.write_text("".join(lines))
    os.replace(tmp, path)
    return path


def skipped_note(bad: Sequence[BadSample], listed_in: str | Path) -> str:
    """The console line (and summary note) of a run that left samples out."""
    return (
        f"{SKIP_FLAG}: {skipped_count(bad)} bad sample(s) left out ({len(bad)} problem(s)); "
        f"listed in {listed_in}"
    )


def file_id(path: str | Path) -> str:
    """Default sample id: the file name without its extension ("a.nii.gz" -> "a", "b.png" -> "b")."""
    path = Path(path)
    return strip_volume_ext(path.name) if volume_ext(path) else path.stem


def _capped(lines: Sequence[str], limit: int = MAX_LISTED) -> list[str]:
    shown = list(lines[:limit])
    if len(lines) > limit:
        shown.append(f"... and {len(lines) - limit} more")
    return shown


def format_problems(problems: Sequence[tuple[Path | str | None, str]], limit: int = MAX_LISTED) -> str:
    """One line per problem, "  <path>: <problem>", at most `limit` lines plus "... and N more"."""
    lines = [f"{path}: {problem}" if path is not None else problem for path, problem in problems]
    return "\n".join("  " + line for line in _capped(lines, limit))


def require_dir(path: str | Path, what: str, expected_tree: str) -> Path:
    """Return `path` if it is a non-empty directory, else raise DataError showing the expected layout.

    `what` names the folder for the user ("training images"); `expected_tree` is a short ASCII tree
    given by the caller. Hidden entries (".DS_Store", ".cache") do not count as content.
    """
    path = Path(path)
    hint = f"\nExpected layout:\n{expected_tree.rstrip()}"
    if not path.exists():
        raise DataError(path, f"{what} folder not found.{hint}")
    if not path.is_dir():
        raise DataError(path, f"{what} path is not a directory.{hint}")
    if not any(not entry.name.startswith(".") for entry in path.iterdir()):
        raise DataError(path, f"{what} folder is empty.{hint}")
    return path


def _common_parent(paths: Iterable[Path]) -> Path | None:
    parents = [str(Path(p).parent) for p in paths]
    if not parents:
        return None
    try:
        return Path(os.path.commonpath(parents))
    except ValueError:  # mixed absolute and relative paths
        return None


def pair_samples(
    images: Sequence[Path],
    masks: Sequence[Path],
    image_id: Callable[[Path], str] = file_id,
    mask_id: Callable[[Path], str] = file_id,
    *,
    skip_bad: bool,
    hint: str | None = SKIP_HINT,
) -> tuple[list[Pair], list[BadSample]]:
    """Pair images with masks by id: ([(id, image, mask)] sorted by id, samples left out).

    Images without a mask, masks without an image and ids that two files share on the same side are
    bad samples: without `skip_bad` one DataError lists them all (then `hint`); with it they are left
    out and returned. Pass `mask_id` when mask names carry a suffix, e.g. ISIC:
    ``lambda p: p.stem.removesuffix("_segmentation")``.
    """
    by_image: dict[str, list[Path]] = defaultdict(list)
    by_mask: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        by_image[image_id(Path(p))].append(Path(p))
    for p in masks:
        by_mask[mask_id(Path(p))].append(Path(p))

    bad: list[BadSample] = []
    for key in sorted(by_image):
        if len(by_image[key]) > 1:
            others = ", ".join(p.name for p in by_image[key][1:])
            bad.append(BadSample(key, str(by_image[key][0]), f"duplicate image id {key!r} (also {others})"))
        if key not in by_mask:
            bad.append(BadSample(key, str(by_image[key][0]), "image has no mask"))
    for key in sorted(by_mask):
        if len(by_mask[key]) > 1:
            others = ", ".join(p.name for p in by_mask[key][1:])
            bad.append(BadSample(key, str(by_mask[key][0]), f"duplicate mask id {key!r} (also {others})"))
        if key not in by_image:
            bad.append(BadSample(key, str(by_mask[key][0]), "mask has no image"))
    if bad and not skip_bad:
        raise DataError(
            _common_parent([*images, *masks]),
            f"{len(bad)} problem(s) pairing {len(images)} images with {len(masks)} masks:\n"
            + format_problems([(b.path, b.problem) for b in bad])
            + (f"\n{hint}" if hint else ""),
        )
    left_out = {b.id for b in bad}
    pairs = [(key, by_image[key][0], by_mask[key][0]) for key in sorted(by_image) if key not in left_out]
    return pairs, bad


def pair_by_stem(
    images: Sequence[Path],
    masks: Sequence[Path],
    image_id: Callable[[Path], str] = file_id,
    mask_id: Callable[[Path], str] = file_id,
) -> list[Pair]:
    """`pair_samples` that refuses every bad sample; returns [(id, image, mask)] sorted by id."""
    return pair_samples(images, masks, image_id, mask_id, skip_bad=False, hint=None)[0]


def _spatial_shape(item: Any) -> tuple[int, ...]:
    return tuple(item.array.shape) if isinstance(item, Volume) else tuple(np.shape(item))


def _check_one(
    pair: tuple[str, Path, Path],
    read_image_fn: Callable[[Path], Any],
    read_mask_fn: Callable[[Path], Any],
    check_size: bool,
) -> list[tuple[Path, str]]:
    _, image_path, mask_path = pair
    found: list[tuple[Path, str]] = []
    decoded = []
    for path, read in ((image_path, read_image_fn), (mask_path, read_mask_fn)):
        try:
            decoded.append(read(path))
        except DataError as exc:
            found.append((exc.path or path, exc.problem))
        except Exception as exc:  # a reader bug or an unexpected library error still names its file
            found.append((path, f"{type(exc).__name__}: {exc}"))
    if found or not check_size:
        return found
    image, mask = decoded
    if isinstance(image, Volume) and isinstance(mask, Volume):
        diff = same_geometry(image, mask)
        if diff:
            found.append((mask_path, f"geometry differs from image {image_path.name}: {diff}"))
        return found
    ishape, mshape = _spatial_shape(image), _spatial_shape(mask)
    # A colour image (H, W, 3) pairs with a mask (H, W): compare the mask's axes only.
    if ishape[: len(mshape)] != mshape:
        found.append(
            (mask_path, f"size {mshape} differs from image {image_path.name} {ishape[: len(mshape)]}")
        )
    return found


def check_pairs(
    pairs: Sequence[Pair],
    read_image_fn: Callable[[Path], Any],
    read_mask_fn: Callable[[Path], Any],
    check_size: bool = True,
    workers: int | None = None,
    *,
    skip_bad: bool = False,
    hint: str | None = None,
) -> list[BadSample]:
    """Decode every (id, image, mask) pair; one DataError lists every bad file, or, with `skip_bad`,
    the bad samples are returned (one entry per problem; `drop_bad` removes them from `pairs`).

    Problems collected: files the readers refuse (truncated, missing, not binary...) and, with
    `check_size`, masks whose size differs from their image (for two `Volume`s, any geometry
    difference). Decoding runs in a thread pool (PIL and SimpleITK release the GIL), so thousands of
    pairs take seconds; decoded arrays are dropped at once, so memory stays flat. `hint` ends the
    error message (the folders' data code passes `SKIP_HINT`).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda pair: _check_one(pair, read_image_fn, read_mask_fn, check_size), pairs)
        bad = [
            BadSample(pair[0], str(path), problem)
            for pair, found in zip(pairs, results)
            for path, problem in found
        ]
    if bad and not skip_bad:
        bad_files = len({b.path for b in bad})
        raise DataError(
            _common_parent([p for _, img, msk in pairs for p in (img, msk)]),
            f"{len(bad)} problem(s) in {bad_files} file(s) out of {len(pairs)} pairs:\n"
            + format_problems([(b.path, b.problem) for b in bad])
            + (f"\n{hint}" if hint else ""),
        )
    return bad
