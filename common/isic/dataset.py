"""The ISIC 2018 Task 1 Dataset: every image decoded once, then the reference's paired augmentation.

Decoding: a 3000x2000 ISIC JPEG takes ~100 ms to decode at full size. Each split is decoded once into a
`common.cache.DecodedArrayCache` of (S, S, 4) uint8 rows (RGB + mask), S = `cache_size_for(image_size)`,
about 1.25x the training size so that the augmentation's crops still have pixels to spare. JPEGs are
decoded with libjpeg's DCT scaling (PIL `draft`) straight to the smallest power-of-two reduction that
is still >= S, which makes building the cache several times faster than a full decode. Later epochs,
workers, ranks and runs read memory-mapped rows.

The square cache squashes each image's aspect ratio once; the ModelZoo ports resize every sample to
224x224 at the end anyway (the reference's variable output height breaks batches above 1).

Augmentation (training samples, with probability `--augmentation_prob`, as in the reference's
data_loader.py; its pixel amounts are given for a ~310 px wide image and scaled to S here):
rotation by a multiple of 90 degrees, rotation by an integer angle in [-10, 10], centre crop of
250..270/310 of the side, a shift crop removing 0..20/310 from each side, horizontal and vertical flips
(p = 0.5 each), and ColorJitter(brightness 0.2, contrast 0.2, hue 0.02) on the image. Image and mask get
the same geometry; the mask is resampled with nearest neighbour and stays binary. Every sample is then
resized to `--image_size` squared and the image normalised to [-1, 1] ((x / 255 - 0.5) / 0.5).

Fixed on purpose (references.md 2.5, 2.7): no random resize at evaluation, binary masks instead of
bilinear soft targets, one output size for every sample so any batch size works.

Bad samples (no mask, an unreadable or mis-sized file, a file truncated after its header) are refused,
all named in one error; with `skip_bad=True` (`--skip_bad_samples`) they are left out of the split and
returned (`ISICDataset.skipped`). A file that fails only when decoded is remembered beside the cache (with
its size and time), so later runs neither decode it again nor rebuild the cache.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from common import augment as A
from common.cache import DecodedArrayCache, LazyMemmap, default_cache_dir
from common.datacheck import SKIP_HINT, BadSample, drop_bad, format_problems, skipped_count
from common.errors import ConfigError, DataError
from common.filelock import file_lock
from common.imageio import read_image, read_mask
from common.isic.prepare import SPLITS, check_layout_pairs, layout_samples
from common.loader import SeededDataset

CACHE_SCALE = 1.25
SIZE_DIVISOR = 16
REFERENCE_WIDTH = 310.0  # the reference augments images first resized to 300..320 px wide
CACHE_VERSION = 1


def cache_size_for(image_size: int) -> int:
    """Side of the cached square: 1.25 x image_size rounded up to a multiple of 16 (224 -> 288)."""
    return int(math.ceil(image_size * CACHE_SCALE / SIZE_DIVISOR) * SIZE_DIVISOR)


def check_image_size(image_size: int) -> int:
    if image_size < SIZE_DIVISOR or image_size % SIZE_DIVISOR:
        raise ConfigError(
            f"--image_size must be a positive multiple of {SIZE_DIVISOR} (four 2x poolings), got {image_size}"
        )
    return image_size


def _resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    return np.array(Image.fromarray(image, "RGB").resize((size, size), Image.Resampling.BILINEAR))


def decode_image(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 (size, size, 3): JPEGs through libjpeg's DCT scaling, others through common.imageio."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
                im.draft("RGB", (size, size))
                im.load()
                return _resize_rgb(np.asarray(im.convert("RGB")), size)
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"cannot decode: truncated or not an image ({exc})") from exc
    return _resize_rgb(read_image(path, "RGB"), size)


def decode_mask(path: str | Path, size: int) -> np.ndarray:
    """bool (size, size): the mask policy of common.imageio, area-resampled, then >= half."""
    mask = read_mask(path).astype(np.uint8) * 255
    resized = Image.fromarray(mask, "L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 128


def decode_pair(image_path: str | Path, mask_path: str | Path, size: int) -> np.ndarray:
    """One cache row: (size, size, 4) uint8, RGB then the mask as 0/255."""
    image = decode_image(image_path, size)
    mask = decode_mask(mask_path, size)
    return np.concatenate([image, (mask.astype(np.uint8) * 255)[..., None]], axis=2)


class SplitCache(NamedTuple):
    """A split's decoded cache: its array file, the ids of its rows, and the samples left out."""

    array_path: Path
    ids: list[str]
    skipped: list[BadSample]


Pair = tuple[str, Path, Path]


def _stats(pair: Pair) -> list[list[int]]:
    out = []
    for path in pair[1:]:
        try:
            st = Path(path).stat()
            out.append([st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([-1, -1])
    return out


def _known_undecodable(record: Path, pairs: Sequence[Pair]) -> list[BadSample]:
    """Samples of `pairs` that failed to decode before and whose files have not changed since."""
    try:
        rows = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    by_id = {pair[0]: pair for pair in pairs}
    known = []
    for row in rows if isinstance(rows, list) else []:
        try:
            key, path, problem, stats = row
        except (TypeError, ValueError):
            continue
        if key in by_id and _stats(by_id[key]) == stats:
            known.append(BadSample(str(key), str(path), str(problem)))
    return known


def _remember_undecodable(record: Path, pairs: Sequence[Pair], bad: Sequence[BadSample]) -> None:
    by_id = {pair[0]: pair for pair in pairs}
    rows = [[b.id, b.path, b.problem, _stats(by_id[b.id])] for b in bad]
    tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, record)


def _refuse(where: Path, bad: Sequence[BadSample], total: int) -> DataError:
    return DataError(
        where,
        f"{skipped_count(bad)} of {total} sample(s) cannot be decoded ({len(bad)} problem(s)):\n"
        + format_problems([(b.path, b.problem) for b in bad])
        + f"\n{SKIP_HINT}",
    )


def _split_cache(cache_dir: Path, name: str, pairs: Sequence[Pair], cache_size: int) -> DecodedArrayCache:
    return DecodedArrayCache(
        cache_dir,
        name,
        [key for key, _, _ in pairs],
        [[image, mask] for _, image, mask in pairs],
        (cache_size, cache_size, 4),
        params={"size": cache_size, "decoder": "draft+bilinear", "mask": "bilinear>=128", "v": CACHE_VERSION},
    )


def _build(
    cache: DecodedArrayCache, pairs: Sequence[Pair], size: int, workers: int | None
) -> list[BadSample]:
    """Build `cache`; every pair that fails to decode is returned and the cache is then left invalid."""
    failed: list[BadSample] = []

    def row(i: int) -> np.ndarray:
        try:
            return _decode_named(pairs[i][1], pairs[i][2], size)
        except DataError as exc:
            failed.append(BadSample(pairs[i][0], str(exc.path or pairs[i][1]), exc.problem))
            return np.zeros(cache.item_shape, np.uint8)

    cache.get_or_build(row, workers)
    if failed:
        # Rows of zeros stand in for the failed samples: the cache must never be opened as valid.
        cache.meta_path.unlink(missing_ok=True)
    return sorted(failed)


def open_split_cache(
    root: str | Path,
    split: str,
    cache_size: int,
    *,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    skip_bad: bool = False,
) -> SplitCache:
    """Check one split of a prepared layout and build its decoded cache if needed.

    Bad samples are refused in one DataError naming every file, or with `skip_bad` left out (the result's
    `skipped`; its `ids` are the rows of the cache).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(root)
    pairs, skipped = layout_samples(root, split, skip_bad=skip_bad)
    skipped += check_layout_pairs(pairs, skip_bad=skip_bad)
    pairs = drop_bad(pairs, skipped)
    cache_dir, name = default_cache_dir(root), f"isic_{split}_{cache_size}"
    record = cache_dir / f"{name}.undecodable.json"
    # One process checks and builds at a time, so no rank opens a cache whose failed rows are zeros.
    with file_lock(cache_dir / f".{name}.check.lock"):
        candidates = pairs
        known = _known_undecodable(record, candidates)
        if known and not skip_bad:
            raise _refuse(root / split, known, len(candidates))
        pairs = drop_bad(candidates, known)
        cache = _split_cache(cache_dir, name, pairs, cache_size)
        if not cache.is_valid():
            log(f"Decoding the {len(pairs)} {split} images once into {cache.array_path} ...")
            failed = _build(cache, pairs, cache_size, workers)
            if failed:
                _remember_undecodable(record, candidates, [*known, *failed])
                if not skip_bad:
                    raise _refuse(root / split, failed, len(pairs))
                known += failed
                pairs = drop_bad(pairs, failed)
                cache = _split_cache(cache_dir, name, pairs, cache_size)
                again = _build(cache, pairs, cache_size, workers)
                if again:  # a file changed while it was being decoded
                    raise _refuse(root / split, again, len(pairs))
    return SplitCache(cache.array_path, [key for key, _, _ in pairs], sorted([*skipped, *known]))


def _decode_named(image_path: Path, mask_path: Path, size: int) -> np.ndarray:
    """decode_pair, with errors naming the user's file rather than the prepared layout's link to it."""
    try:
        return decode_pair(image_path, mask_path, size)
    except DataError as exc:
        if exc.path is None or not exc.path.is_symlink():
            raise
        raise DataError(exc.path.resolve(), exc.problem) from exc


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's training augmentation on a square uint8 image and its bool mask (see module doc)."""
    scale = image.shape[0] / REFERENCE_WIDTH
    image, mask = A.rot90(image, mask, int(rng.integers(4)))
    image, mask = A.rotate(image, mask, float(rng.integers(-10, 11)))
    side = max(SIZE_DIVISOR, int(round(int(rng.integers(250, 271)) * scale)))
    image, mask = A.center_crop_or_pad(image, mask, side, side)
    left, top, right, bottom = (int(round(int(v) * scale)) for v in rng.integers(0, 21, size=4))
    image, mask = A.crop(image, mask, top, left, side - top - bottom, side - left - right)
    if rng.random() < 0.5:
        image, mask = A.hflip(image, mask)
    if rng.random() < 0.5:
        image, mask = A.vflip(image, mask)
    image = A.color_jitter(image, rng, brightness=0.2, contrast=0.2, hue=0.02)
    return image, mask


def to_tensors(image: np.ndarray, mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image (3, H, W) float32 in [-1, 1]; mask (1, H, W) float32 in {0, 1}."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    if mask is None:
        return x, None
    return x, torch.from_numpy(np.ascontiguousarray(mask)).float()[None]


def preprocess(image: np.ndarray, image_size: int) -> torch.Tensor:
    """A decoded RGB image of any size -> the network input, through the same two resizes as training."""
    small = _resize_rgb(np.ascontiguousarray(image), cache_size_for(image_size))
    return to_tensors(_resize_rgb(small, image_size), None)[0]


class ISICDataset(SeededDataset):
    """One split: rows of the decoded cache, augmented (training keys) and resized to `image_size`.

    Items are (image (3, S, S) in [-1, 1], mask (1, S, S) in {0, 1}) with S = image_size.
    """

    def __init__(
        self,
        array_path: str | Path,
        ids: Sequence[str],
        image_size: int,
        augmentation_prob: float = 0.0,
        seed: int = 0,
        skipped: Sequence[BadSample] = (),
    ):
        if not 0.0 <= augmentation_prob <= 1.0:
            raise ConfigError(f"--augmentation_prob must lie in [0, 1], got {augmentation_prob}")
        self.rows = LazyMemmap(array_path)
        self.ids = list(ids)
        self.image_size = check_image_size(image_size)
        self.augmentation_prob = float(augmentation_prob)
        self.seed = int(seed)
        self.skipped = list(skipped)  # samples of the split left out under skip_bad

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int, rng: np.random.Generator | None):
        row = np.asarray(self.rows[index])
        image, mask = row[..., :3], row[..., 3] >= 128
        if rng is not None and rng.random() < self.augmentation_prob:
            image, mask = augment_pair(image, mask, rng)
        image, mask = A.resize(image, mask, self.image_size, self.image_size)
        return to_tensors(image, mask)


def build_split(
    root: str | Path,
    split: str,
    image_size: int,
    *,
    augmentation_prob: float = 0.0,
    seed: int = 0,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    skip_bad: bool = False,
) -> ISICDataset:
    """The Dataset of one split of a prepared layout (its cache built on first use); bad samples are
    refused, or with `skip_bad` left out and listed in the dataset's `skipped`."""
    cache = open_split_cache(
        root, split, cache_size_for(check_image_size(image_size)), workers=workers, log=log, skip_bad=skip_bad
    )
    return ISICDataset(cache.array_path, cache.ids, image_size, augmentation_prob, seed, cache.skipped)
