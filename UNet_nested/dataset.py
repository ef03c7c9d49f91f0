"""DSB 2018 nuclei (Caicedo et al., Nature Methods 2019) for UNet / UNet++: files, split, cache, augmentation.

Layout read (the one `preprocess_dsb2018.py` writes, as in 4uiiurz1/pytorch-nested-unet)::

    <root>/images/<id><img_ext>
    <root>/masks/0/<id><mask_ext>        (masks/<id><mask_ext> is accepted too)

Pipeline: every image and mask is decoded once, at the training size, into a `DecodedArrayCache` (uint8
memory maps shared by workers and ranks). Training samples are augmented as the reference's albumentations
pipeline (RandomRotate90, Flip, OneOf(HueSaturationValue, RandomBrightness, RandomContrast), Resize), with
our own ops and a generator seeded by (seed, epoch, index). Images are ImageNet-normalised ONCE (the
reference divided by 255 a second time, references.md 3.4) and masks are exactly 0/1 (the reference kept
interpolated soft masks).

The split is sklearn's `train_test_split(ids, test_size=0.2, random_state=41)` reproduced on SORTED ids,
so it no longer depends on the order in which the file system lists the folder.

Bad samples (an image without a mask, an unreadable or mis-sized file) are refused, all named in one error;
with `skip_bad=True` (`--skip_bad_samples`) `list_samples` and `check_samples` leave them out and return
them, before the split, so the split is drawn from the samples that are used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch

from common import augment
from common.cache import DecodedArrayCache, LazyMemmap, default_cache_dir
from common.datacheck import SKIP_HINT, BadSample, check_pairs, drop_bad, pair_samples, require_dir
from common.errors import ConfigError, DataError
from common.imageio import read_image, read_mask
from common.loader import SeededDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# For one-channel input: the mean of the three ImageNet statistics.
GREY_MEAN = (0.449,)
GREY_STD = (0.226,)
SPLIT_TEST_SIZE = 0.2
SPLIT_RANDOM_STATE = 41

EXPECTED_TREE = """\
<data_path>/
    images/<id>.png          RGB(A) or grey images
    masks/0/<id>.png         binary masks (0/255 or 0/1), same size as the image
(or the Kaggle download: <data_path>/stage1_train/<id>/images/<id>.png + masks/*.png,
 which train.py prepares with preprocess_dsb2018.py)"""


# ----------------------------------------------------------------------------------------------- files


def _strip(name: str, ext: str) -> str | None:
    return name[: -len(ext)] if name.lower().endswith(ext.lower()) and len(name) > len(ext) else None


def mask_dir(root: str | Path) -> Path:
    """`masks/0` (the reference's one-class layout) when present, else `masks`."""
    root = Path(root)
    return root / "masks" / "0" if (root / "masks" / "0").is_dir() else root / "masks"


def find_samples(
    root: str | Path, img_ext: str = ".png", mask_ext: str = ".png"
) -> list[tuple[str, Path, Path]]:
    """[(id, image, mask)] sorted by id; one DataError lists every unpaired or duplicate file."""
    return list_samples(root, img_ext, mask_ext, skip_bad=False, hint=None)[0]


def list_samples(
    root: str | Path,
    img_ext: str = ".png",
    mask_ext: str = ".png",
    *,
    skip_bad: bool,
    hint: str | None = SKIP_HINT,
) -> tuple[list[tuple[str, Path, Path]], list[BadSample]]:
    """([(id, image, mask)] sorted by id, samples left out): an image without a mask, a mask without an
    image or an id two files share is refused (one DataError lists them all) or, with `skip_bad`, left out."""
    root = Path(root)
    images_dir = require_dir(root / "images", "images", EXPECTED_TREE)
    masks_dir = require_dir(mask_dir(root), "masks", EXPECTED_TREE)

    def listed(folder: Path, ext: str) -> list[Path]:
        return sorted(
            p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _strip(p.name, ext)
        )

    images, masks = listed(images_dir, img_ext), listed(masks_dir, mask_ext)
    if not images:
        raise DataError(images_dir, f"no '*{img_ext}' files (set --img_ext to the images' extension)")
    if not masks:
        raise DataError(masks_dir, f"no '*{mask_ext}' files (set --mask_ext to the masks' extension)")
    return pair_samples(
        images,
        masks,
        image_id=lambda p: _strip(p.name, img_ext) or p.name,
        mask_id=lambda p: _strip(p.name, mask_ext) or p.name,
        skip_bad=skip_bad,
        hint=hint,
    )


def split_ids(
    ids: Sequence[str], test_size: float = SPLIT_TEST_SIZE, random_state: int = SPLIT_RANDOM_STATE
) -> tuple[list[str], list[str]]:
    """(train, val) as sklearn's `train_test_split(sorted(ids), test_size, random_state)` returns them.

    sklearn's ShuffleSplit takes n_test = ceil(test_size * n), draws one permutation from
    `np.random.RandomState(random_state)` and gives its first n_test positions to the test side. Sorting
    first makes the split independent of the order the ids were listed in.
    """
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"--val_split must lie strictly between 0 and 1, got {test_size}")
    ordered = sorted(ids)
    n = len(ordered)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    if n_train < 1 or n_test < 1:
        raise ConfigError(
            f"{n} sample(s) cannot be split {1 - test_size:.0%}/{test_size:.0%} into two non-empty parts; "
            "add data (at least 2 images) or change --val_split"
        )
    permutation = np.random.RandomState(random_state).permutation(n)
    val = [ordered[i] for i in permutation[:n_test]]
    train = [ordered[i] for i in permutation[n_test:]]
    return train, val


# ----------------------------------------------------------------------------------------------- resizing


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking); unchanged when the size already fits."""
    if image.shape[:2] == (height, width):
        return image
    return augment.resize(image, None, height, width)[0]


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a binary mask and keep it binary: a pixel is foreground when at least half of it was.

    The mask is resampled as a float coverage map (bilinear, antialiased when shrinking) and thresholded at
    0.5, which keeps thin nuclei and smooth edges better than nearest neighbour and never produces the soft
    values the reference trained on.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.shape == (height, width):
        return mask
    coverage = augment.resize(mask.astype(np.float32), None, height, width)[0]
    return coverage >= 0.5


def decode_image(path: str | Path, channels: int) -> np.ndarray:
    """uint8 (H, W, channels): RGB (alpha dropped, grey replicated) or grey (luma)."""
    if channels == 3:
        return read_image(path, "RGB")
    return read_image(path, "L")[:, :, None]


# ----------------------------------------------------------------------------------------------- cache


def _caches(
    samples: Sequence[tuple[str, Path, Path]],
    height: int,
    width: int,
    channels: int,
    cache_dir: str | Path | None,
) -> tuple[DecodedArrayCache, DecodedArrayCache]:
    if channels not in (1, 3):
        raise ConfigError(f"--input_channels must be 1 (grey) or 3 (RGB), got {channels}")
    root = Path(samples[0][1]).parent.parent
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root)
    ids = [s[0] for s in samples]
    tag = f"{height}x{width}"
    image_cache = DecodedArrayCache(
        cache_dir, f"nested_unet_images_{tag}_c{channels}", ids, [[s[1]] for s in samples],
        (height, width, channels), params={"size": [height, width], "channels": channels, "resize": "bilinear-aa"},
    )  # fmt: skip
    mask_cache = DecodedArrayCache(
        cache_dir, f"nested_unet_masks_{tag}", ids, [[s[2]] for s in samples],
        (height, width), params={"size": [height, width], "resize": "coverage>=0.5"},
    )  # fmt: skip
    return image_cache, mask_cache


def check_samples(
    samples: Sequence[tuple[str, Path, Path]],
    height: int,
    width: int,
    channels: int,
    cache_dir: str | Path | None = None,
    log=print,
    *,
    skip_bad: bool,
) -> tuple[list[tuple[str, Path, Path]], list[BadSample]]:
    """(samples whose image and mask decode and agree in size, samples left out).

    Without `skip_bad` one DataError lists every bad file. Nothing is decoded when the cache of exactly
    these files is valid (it could only have been built from good ones). Pass the samples kept to
    `cached_arrays(..., checked=True)`.
    """
    image_cache, mask_cache = _caches(samples, height, width, channels, cache_dir)
    if image_cache.is_valid() and mask_cache.is_valid():
        return list(samples), []
    log(f"Checking {len(samples)} image/mask pairs")
    bad = check_pairs(samples, read_image, read_mask, skip_bad=skip_bad, hint=SKIP_HINT)
    return drop_bad(samples, bad), bad


def cached_arrays(
    samples: Sequence[tuple[str, Path, Path]],
    height: int,
    width: int,
    channels: int,
    cache_dir: str | Path | None = None,
    log=print,
    checked: bool = False,
) -> tuple[LazyMemmap, LazyMemmap]:
    """Images (N, H, W, C) and masks (N, H, W) in 0/1, decoded once at the training size.

    The data tree is checked (every unreadable file and size mismatch in one DataError) only when a
    cache has to be built: a valid cache was built from exactly these files (sizes and mtimes).
    `checked`: `check_samples` has just checked these samples; they are not decoded twice.
    """
    image_cache, mask_cache = _caches(samples, height, width, channels, cache_dir)
    if not (image_cache.is_valid() and mask_cache.is_valid()):
        what = "Caching" if checked else "Checking and caching"
        log(f"{what} {len(samples)} image/mask pairs at {height}x{width} in {image_cache.cache_dir}")
        if not checked:
            check_pairs(samples, read_image, read_mask, hint=SKIP_HINT)
    images = image_cache.get_or_build(
        lambda i: resize_image(decode_image(samples[i][1], channels), height, width)
    )
    masks = mask_cache.get_or_build(lambda i: resize_mask(read_mask(samples[i][2]), height, width))
    del images, masks  # the datasets map the files lazily (cheap to pickle into workers)
    return LazyMemmap(image_cache.array_path), LazyMemmap(mask_cache.array_path)


# ----------------------------------------------------------------------------------------------- augmentation


def random_brightness(image: np.ndarray, rng: np.random.Generator, limit: float = 0.2) -> np.ndarray:
    """albumentations RandomBrightness (by max): add U(-limit, limit) * 255, clip, truncate to uint8."""
    beta = rng.uniform(-limit, limit)
    lut = np.clip(np.arange(256, dtype=np.float32) + np.float32(beta * 255), 0, 255).astype(np.uint8)
    return lut[image]


def random_contrast(image: np.ndarray, rng: np.random.Generator, limit: float = 0.2) -> np.ndarray:
    """albumentations RandomContrast: multiply by U(1 - limit, 1 + limit), clip, truncate to uint8."""
    alpha = rng.uniform(1 - limit, 1 + limit)
    lut = np.clip(np.arange(256, dtype=np.float32) * np.float32(alpha), 0, 255).astype(np.uint8)
    return lut[image]


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's training transform on uint8 arrays (image (H, W, C), mask (H, W)).

    RandomRotate90 (p 0.5, k in 0..3), Flip (p 0.5: vertical, horizontal or both), then exactly one of
    HueSaturationValue(20, 30, 20), RandomBrightness(0.2), RandomContrast(0.2), then resize to
    (height, width) (only needed after a quarter turn of a non-square input).
    """
    if rng.random() < 0.5:
        image, mask = augment.rot90(image, mask, int(rng.integers(4)))
    if rng.random() < 0.5:
        code = int(rng.integers(-1, 2))  # cv2 flip codes: 0 vertical, 1 horizontal, -1 both
        if code in (0, -1):
            image, mask = augment.vflip(image, mask)
        if code in (1, -1):
            image, mask = augment.hflip(image, mask)
    choice = int(rng.integers(3))
    if choice == 0:
        image = augment.hue_saturation_value(image, rng, 20, 30, 20)
    elif choice == 1:
        image = random_brightness(image, rng)
    else:
        image = random_contrast(image, rng)
    if image.shape[:2] != (height, width):
        image, mask = augment.resize(image, mask, height, width)
    return image, mask


class NucleiDataset(SeededDataset):
    """Rows of the cached arrays as (image (C, H, W) float32 normalised, mask (1, H, W) float32 in {0, 1}).

    Keys from the training sampler, (epoch, index), augment with a generator seeded by (seed, epoch, index);
    plain integer keys (evaluation) return the sample unchanged. `repeats` > 1 lists the rows that many
    times (a split smaller than one batch still fills the batch; each copy is augmented differently).
    """

    def __init__(
        self,
        images: LazyMemmap,
        masks: LazyMemmap,
        rows: Sequence[int],
        ids: Sequence[str],
        *,
        seed: int = 0,
        repeats: int = 1,
    ):
        if len(rows) != len(ids):
            raise ValueError("rows and ids must have the same length")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.images, self.masks = images, masks
        self.rows, self.ids = [int(r) for r in rows], list(ids)
        self.seed, self.repeats = seed, repeats
        shape = images.shape
        self.height, self.width, self.channels = int(shape[1]), int(shape[2]), int(shape[3])
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (GREY_MEAN, GREY_STD)

    def __len__(self) -> int:
        return len(self.rows) * self.repeats

    def load(self, index: int, rng: np.random.Generator | None):
        row = self.rows[index % len(self.rows)]
        image, mask = np.asarray(self.images[row]), np.asarray(self.masks[row])
        if rng is not None:
            image, mask = augment_pair(image, mask, rng, self.height, self.width)
        return augment.to_tensor_image(image, self.mean, self.std), augment.to_tensor_mask(mask)


def repeats_for(samples: int, per_rank_batch: int, world_size: int) -> int:
    """How often a training split must be listed so that every rank gets at least one full batch."""
    repeats = 1
    while (samples * repeats) // world_size < per_rank_batch:
        repeats += 1
    return repeats


def normalise_for_network(image: np.ndarray, height: int, width: int, channels: int) -> torch.Tensor:
    """A decoded uint8 image as the network sees it in validation: resized, normalised once, (C, H, W)."""
    image = resize_image(image, height, width)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return augment.to_tensor_image(image, mean, std)
