"""Check a dataset tree before training and report every problem in one error.

A dataset with three bad files should cost the user one run to fix, not three: each check here collects
all problems first and raises a single `DataError` that lists them (capped, with "and N more").

Typical use in a model folder's data code::

    root = require_dir(args.data_path / "train", "training images", EXPECTED_TREE)
    pairs = pair_by_stem(sorted(root.glob("*.jpg")), sorted(gt.glob("*.png")),
                         mask_id=lambda p: p.stem.removesuffix("_segmentation"))
    check_pairs(pairs, read_image, read_mask)
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from common.errors import DataError
from common.imageio import Volume, same_geometry, strip_volume_ext, volume_ext

MAX_LISTED = 20


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


def pair_by_stem(
    images: Sequence[Path],
    masks: Sequence[Path],
    image_id: Callable[[Path], str] = file_id,
    mask_id: Callable[[Path], str] = file_id,
) -> list[tuple[str, Path, Path]]:
    """Pair images with masks by id; returns [(id, image, mask)] sorted by id.

    Collects images without a mask, masks without an image and ids that two files share on the same
    side, and raises one DataError listing them all. Pass `mask_id` when mask names carry a suffix,
    e.g. ISIC: ``lambda p: p.stem.removesuffix("_segmentation")``.
    """
    by_image: dict[str, list[Path]] = defaultdict(list)
    by_mask: dict[str, list[Path]] = defaultdict(list)
    for p in images:
        by_image[image_id(Path(p))].append(Path(p))
    for p in masks:
        by_mask[mask_id(Path(p))].append(Path(p))

    problems: list[tuple[Path, str]] = []
    for key in sorted(by_image):
        if len(by_image[key]) > 1:
            others = ", ".join(p.name for p in by_image[key][1:])
            problems.append((by_image[key][0], f"duplicate image id {key!r} (also {others})"))
        if key not in by_mask:
            problems.append((by_image[key][0], "image has no mask"))
    for key in sorted(by_mask):
        if len(by_mask[key]) > 1:
            others = ", ".join(p.name for p in by_mask[key][1:])
            problems.append((by_mask[key][0], f"duplicate mask id {key!r} (also {others})"))
        if key not in by_image:
            problems.append((by_mask[key][0], "mask has no image"))
    if problems:
        raise DataError(
            _common_parent([*images, *masks]),
            f"{len(problems)} problem(s) pairing {len(images)} images with {len(masks)} masks:\n"
            + format_problems(problems),
        )
    return [(key, by_image[key][0], by_mask[key][0]) for key in sorted(by_image)]


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
    pairs: Sequence[tuple[str, Path, Path]],
    read_image_fn: Callable[[Path], Any],
    read_mask_fn: Callable[[Path], Any],
    check_size: bool = True,
    workers: int | None = None,
) -> None:
    """Decode every (id, image, mask) pair and raise one DataError listing every bad file.

    Problems collected: files the readers refuse (truncated, missing, not binary...) and, with
    `check_size`, masks whose size differs from their image (for two `Volume`s, any geometry
    difference). Decoding runs in a thread pool (PIL and SimpleITK release the GIL), so thousands of
    pairs take seconds; decoded arrays are dropped at once, so memory stays flat.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda pair: _check_one(pair, read_image_fn, read_mask_fn, check_size), pairs)
        problems = [problem for found in results for problem in found]
    if problems:
        bad_files = len({str(path) for path, _ in problems})
        raise DataError(
            _common_parent([p for _, img, msk in pairs for p in (img, msk)]),
            f"{len(problems)} problem(s) in {bad_files} file(s) out of {len(pairs)} pairs:\n"
            + format_problems(problems),
        )
