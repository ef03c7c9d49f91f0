"""ISBI 2012 data for the U-Net: reading, the 5-fold split, preprocessing and augmentation as MindSpore's.

Data (Arganda-Carreras et al., "Crowdsourcing the creation of image segmentation algorithms for
connectomics", Front. Neuroanat. 2015): 30 serial-section EM pages of 512x512 with labels where
**255 = cell interior and 0 = membrane**. After binarisation, class 1 is cell interior and class 0 is membrane.

Label policy (common.imageio.binarize_mask): 0/255 and 0/1 pages are taken as they are; other values are
thresholded at half the range (>= 128 for 8-bit) when some reach it, so JPEG-like noise around 0 and 255
survives, and each such file is reported (`IsbiData.label_notes`: its pages and how many pixels were neither
level), since the challenge's labels are exactly 0/255 and stray values also mean a damaged file. Values that
never reach the threshold (a label map {0, 1, 2}, {0, 7}) are refused. Image pages must be 8-bit grey in the
multipage TIFF (16-bit, float or colour stacks are refused: convert them); single-page files go through
common.imageio.read_image (colour -> luma, 16-bit scaled by 255/65535).

Accepted layouts of `--data_url` (both are checked before any training step; a bad page file of the
slices layout, unreadable or without its label, is refused with every other one named, or left out with
`skip_bad` / `--skip_bad_samples` and listed in `IsbiData.skipped`; the two stacks of the TIFF layout hold
every page, so a damaged stack is refused either way):

    <data_url>/train-volume.tif, train-labels.tif [, test-volume.tif]     the challenge's multipage TIFFs
    <data_url>/train/images/*.tif, train/labels/*.tif [, test/images/]   one page per file, as many mirrors
    <data_url>/images/*.tif, labels/*.tif                                 (pointing at a `train` folder)

Pipeline, as the original (src/data_loader.py of mindspore model_zoo official/cv/unet):

1. image / 127.5 - 1 and label in {0, 1}; both resized (bilinear) to the network's output size
   (388 for 572) and padded back to the input size with zeros (or, with pad_mode="reflect", by mirroring,
   the paper's extrapolation of the missing context);
2. training only: flip up/down, flip left/right (p = 0.5 each), crop a random box whose edges lie in the
   outer 30% of each side, add a brightness shift U(-0.2, 0.2) clipped to [-1, 1], resize back;
3. the label is centre-cropped to the output size, binarised at 0.5 and one-hot encoded with exactly
   `num_classes` channels (the original used mask.max() + 1 channels, one for an all-membrane crop).

The pages are decoded once into two small arrays (30 x 512 x 512 bytes each): decoding takes milliseconds,
and DataLoader workers share a numpy buffer copy-on-write, so no decoded-array cache is needed here.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.datacheck import SKIP_HINT, BadSample, check_pairs, drop_bad, pair_samples
from common.errors import ConfigError, DataError
from common.imageio import IMAGE_EXTENSIONS, binarize_mask, read_image, read_label, read_mask, read_tiff_stack
from common.loader import SeededDataset
from src.unet import output_size

TRAIN_VOLUME = "train-volume.tif"
TRAIN_LABELS = "train-labels.tif"
TEST_VOLUME = "test-volume.tif"
PAD_MODES = ("constant", "reflect")
# The original's augmentation constants: crop edges within the outer 30%, brightness shift +-0.2.
CROP_FRACTION = 0.3
BRIGHTNESS = 0.2

EXPECTED_TREE = """\
<data_url>/
|-- train-volume.tif      multipage TIFF, 30 pages of 512x512 8-bit grey (the ISBI 2012 download)
|-- train-labels.tif      multipage TIFF, same pages: 255 = cell interior, 0 = membrane
`-- test-volume.tif       (optional) the 30 test pages, for inference
or one page per file:
<data_url>/
|-- train/images/0.tif ... 29.tif
|-- train/labels/0.tif ... 29.tif
`-- test/images/0.tif ... 29.tif    (optional)"""


@dataclass
class IsbiData:
    """Decoded training pages: `images` uint8 (N, H, W), `labels` bool (N, H, W), True = cell interior."""

    images: np.ndarray
    labels: np.ndarray
    source: Path
    layout: str  # "tiff" or "slices"
    names: list[str] = field(default_factory=list)
    # One line per label file whose values were not exactly binary and were thresholded (the policy above).
    label_notes: list[str] = field(default_factory=list)
    # Page files left out under skip_bad (unreadable, mis-sized, or an image without its label).
    skipped: list[BadSample] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ------------------------------------------------------------------------------------------------ reading


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


def _page_order(stem: str) -> tuple:
    # Slices are numbered 0..29 after the page they came from: sort 2 before 10.
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _check_pages(pages: np.ndarray, path: Path, what: str) -> np.ndarray:
    if pages.ndim != 3:
        raise DataError(
            path, f"{what} pages have shape {pages.shape[1:]}; expected single-channel (H, W) grey pages"
        )
    if pages.dtype != np.uint8:
        raise DataError(
            path, f"{what} pages are {pages.dtype}; expected 8-bit pages as in the ISBI 2012 data"
        )
    return pages


def _off_level_pixels(raw: np.ndarray) -> int:
    """Pixels that are neither 0 nor the label's full level (1, 255 or 65535)."""
    top = raw.max(initial=0)
    level = 1 if top <= 1 else 255 if top <= 255 else 65535
    return int(np.count_nonzero((raw != 0) & (raw != level)))


def _label_note(path: Path, off: int, pixels: int, pages: list[str] | None = None) -> str:
    where = ""
    if pages:
        where = " in page(s) " + ", ".join(pages[:8]) + (", ..." if len(pages) > 8 else "")
    return (
        f"{path}: {off} of {pixels} label pixels{where} are neither 0 nor 255; thresholded at half the range "
        "(128 for 8-bit labels; a JPEG-compressed or damaged labels file?)"
    )


def _binarize_stack(pages: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    # The labels must be 0/255 (or 0/1); values that never reach the threshold would silently turn into one
    # class and are refused, other values are thresholded and reported.
    labels = np.stack([binarize_mask(page, f"{path} (page {i})") for i, page in enumerate(pages)])
    off = {str(i): n for i, page in enumerate(pages) if (n := _off_level_pixels(page))}
    return labels, ([_label_note(path, sum(off.values()), pages.size, list(off))] if off else [])


def _read_label_slice(path: Path) -> tuple[np.ndarray, int]:
    """A label slice as bool (H, W) under the policy above, and its count of off-level pixels."""
    try:
        raw = read_label(path)
    except DataError:  # colour labels: read_mask's channel maximum
        return read_mask(path), 0
    if raw.ndim == 3:
        raw = raw[:, :, 0]
    return binarize_mask(raw, path), _off_level_pixels(raw)


def slice_folders(root: Path) -> tuple[Path, Path] | None:
    """(images, labels) folders of the one-page-per-file layout under `root`, or None."""
    for base in (root / "train", root):
        if (base / "images").is_dir() and (base / "labels").is_dir():
            return base / "images", base / "labels"
    return None


def _load_slices(root: Path, images_dir: Path, labels_dir: Path, skip_bad: bool = False) -> IsbiData:
    images, labels = _image_files(images_dir), _image_files(labels_dir)
    if not images:
        raise DataError(images_dir, f"no image files ({', '.join(IMAGE_EXTENSIONS)}).\n{EXPECTED_TREE}")
    pairs, skipped = pair_samples(images, labels, skip_bad=skip_bad)
    skipped += check_pairs(pairs, lambda p: read_image(p, "L"), read_mask, skip_bad=skip_bad, hint=SKIP_HINT)
    pairs = drop_bad(pairs, skipped)
    pairs.sort(key=lambda pair: _page_order(pair[0]))
    image_pages = [read_image(img, "L") for _, img, _ in pairs]
    label_pages, notes = [], []
    for _, _, lbl in pairs:
        page, off = _read_label_slice(lbl)
        label_pages.append(page)
        if off:
            notes.append(_label_note(lbl, off, page.size))
    shapes = {page.shape for page in image_pages}
    if len(shapes) != 1:
        raise DataError(images_dir, f"pages differ in size: {sorted(shapes)}; all pages must share one size")
    return IsbiData(
        images=np.stack(image_pages),
        labels=np.stack(label_pages),
        source=root,
        layout="slices",
        names=[key for key, _, _ in pairs],
        label_notes=notes,
        skipped=skipped,
    )


def _load_tiffs(root: Path) -> IsbiData:
    volume, labels_path = root / TRAIN_VOLUME, root / TRAIN_LABELS
    if not labels_path.exists():
        raise DataError(
            labels_path, f"file not found: the labels belong beside {TRAIN_VOLUME}.\n{EXPECTED_TREE}"
        )
    images = _check_pages(read_tiff_stack(volume), volume, "image")
    raw_labels = read_tiff_stack(labels_path)
    if raw_labels.ndim != 3:
        raise DataError(labels_path, f"label pages have shape {raw_labels.shape[1:]}; expected (H, W) pages")
    if raw_labels.shape != images.shape:
        raise DataError(
            labels_path,
            f"{raw_labels.shape[0]} pages of {raw_labels.shape[1]}x{raw_labels.shape[2]}, but {TRAIN_VOLUME} "
            f"has {images.shape[0]} pages of {images.shape[1]}x{images.shape[2]}; they must match page for page",
        )
    labels, notes = _binarize_stack(raw_labels, labels_path)
    return IsbiData(
        images=images,
        labels=labels,
        source=root,
        layout="tiff",
        names=[str(i) for i in range(images.shape[0])],
        label_notes=notes,
    )


def load_train_data(data_url: str | Path, *, skip_bad: bool = False) -> IsbiData:
    """Decode and check the training pages of either layout; every problem raises one DataError, except
    bad page files of the slices layout with `skip_bad`: those are left out (the result's `skipped`)."""
    root = Path(data_url)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(root, f"--data_url {what}.\n{EXPECTED_TREE}")
    if (root / TRAIN_VOLUME).exists():
        data = _load_tiffs(root)
    else:
        folders = slice_folders(root)
        if folders is None:
            raise DataError(
                root, f"holds neither {TRAIN_VOLUME} nor train/images + train/labels.\n{EXPECTED_TREE}"
            )
        data = _load_slices(root, *folders, skip_bad=skip_bad)
    if len(data) < 3:
        raise DataError(root, f"{len(data)} training page(s); the 5-fold split needs at least 3")
    return data


def find_test_volume(data_url: str | Path) -> Path | None:
    """test-volume.tif, or a folder of test slices (test/images), beside the training data; else None."""
    root = Path(data_url)
    for candidate in (root / TEST_VOLUME, root / "test" / "images", root.parent / "test" / "images"):
        if candidate.is_file() or (candidate.is_dir() and _image_files(candidate)):
            return candidate
    return None


def load_test_pages(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Pages (N, H, W) uint8 and their names from a multipage TIFF or a folder of single-page images."""
    path = Path(path)
    if path.is_dir():
        files = sorted(_image_files(path), key=lambda p: _page_order(p.stem))
        if not files:
            raise DataError(path, "no image files to predict")
        pages = [read_image(p, "L") for p in files]
        if len({p.shape for p in pages}) != 1:
            raise DataError(path, "pages differ in size; all pages must share one size")
        return np.stack(pages), [p.stem for p in files]
    pages = _check_pages(read_tiff_stack(path), path, "image")
    return pages, [str(i) for i in range(pages.shape[0])]


# ------------------------------------------------------------------------------------------------ split


def get_val_train_indices(length: int, fold: int | None, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """The original's split: shuffle 0..length-1 with numpy's legacy generator seeded 0, rotate the order
    right by fold * round((1 - ratio) * length), take the first round(ratio * length) for training.

    For the 30 ISBI pages, fold 1 (the default) validates on pages {4, 6, 7, 9, 18, 19}; the five folds
    partition the pages. A local RandomState replaces the original's global np.random.seed(0), which also
    reset every later draw of the augmentation.
    """
    if not 0 < ratio <= 1:
        raise ConfigError(f"the train/total ratio must lie in (0, 1], got {ratio}")
    indices = np.arange(length)
    np.random.RandomState(0).shuffle(indices)
    if fold is None:
        return indices, np.arange(0)
    order = deque(indices.tolist())
    order.rotate(fold * round((1.0 - ratio) * length))
    rotated = np.array(order, dtype=np.int64)
    n_train = round(ratio * len(rotated))
    return rotated[:n_train], rotated[n_train:]


# ------------------------------------------------------------------------------------------------ transforms


def resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float (H, W) array with half-pixel centres and no antialiasing (as OpenCV's
    INTER_LINEAR, which MindSpore's Resize follows)."""
    if array.shape == (height, width):
        return np.array(array, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return out[0, 0].numpy()


def pad_to(array: np.ndarray, size: int, pad_mode: str) -> np.ndarray:
    """Pad a centred (h, w) array to size x size: zeros ('constant') or mirrored borders ('reflect')."""
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"--pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    top, left = (size - array.shape[0]) // 2, (size - array.shape[1]) // 2
    widths = ((top, size - array.shape[0] - top), (left, size - array.shape[1] - left))
    if pad_mode == "constant":
        return np.pad(array, widths, mode="constant", constant_values=0.0)
    return np.pad(array, widths, mode="reflect")


def preprocess(
    image: np.ndarray, label: np.ndarray | None, image_size: int, pad_mode: str = "constant"
) -> tuple[np.ndarray, np.ndarray | None]:
    """A page (uint8 image, bool label) as network input: x / 127.5 - 1 and label in {0, 1}, both resized
    to the output size (image_size - 184) and padded to image_size x image_size (float32)."""
    out = output_size(image_size)
    x = pad_to(resize(image.astype(np.float32) / 127.5 - 1.0, out, out), image_size, pad_mode)
    if label is None:
        return x, None
    y = pad_to(resize(label.astype(np.float32), out, out), image_size, pad_mode)
    return x, y


def train_data_augmentation(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The original's augmentation on a padded (S, S) pair; returns new (S, S) float32 arrays.

    Flip up/down then left/right (p = 0.5 each; the original's names for the two are swapped), crop the box
    [top, bottom) x [left, right) with left = int(u * 0.3 * S), right = int((1 - u * 0.3) * S) (top and
    bottom alike, four independent u ~ U(0, 1)), add U(-0.2, 0.2) to the image and clip it to [-1, 1],
    and resize both back to S x S (bilinear).
    """
    size = image.shape[0]
    if rng.random() > 0.5:
        image, mask = image[::-1], mask[::-1]
    if rng.random() > 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    left = int(rng.uniform() * CROP_FRACTION * size)
    right = int((1 - rng.uniform() * CROP_FRACTION) * size)
    top = int(rng.uniform() * CROP_FRACTION * size)
    bottom = int((1 - rng.uniform() * CROP_FRACTION) * size)
    image, mask = image[top:bottom, left:right], mask[top:bottom, left:right]
    image = np.clip(image + np.float32(rng.uniform(-BRIGHTNESS, BRIGHTNESS)), -1.0, 1.0)
    return resize(image, size, size), resize(mask, size, size)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    top, left = (array.shape[-2] - size) // 2, (array.shape[-1] - size) // 2
    return array[..., top : top + size, left : left + size]


def to_one_hot(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) mask in [0, 1] -> (num_classes, H, W) float32 one-hot of (mask > 0.5); the width never
    depends on the content."""
    classes = (mask > 0.5).astype(np.int64)
    return np.eye(num_classes, dtype=np.float32)[classes].transpose(2, 0, 1).copy()


# ------------------------------------------------------------------------------------------------ dataset


class IsbiDataset(SeededDataset):
    """Pages of one split, each yielding (image (1, S, S) float32, one-hot target (C, S-184, S-184)).

    `repeat` > 1 lists every page that many times per epoch (the original repeats the 24 training pages
    400 times); each repetition draws its own augmentation.
    """

    def __init__(
        self,
        data: IsbiData,
        pages: np.ndarray | list[int],
        image_size: int,
        num_classes: int = 2,
        augment: bool = False,
        repeat: int = 1,
        pad_mode: str = "constant",
        seed: int = 0,
    ):
        if repeat < 1:
            raise ConfigError(f"repeat must be a positive integer, got {repeat}")
        if num_classes < 2:
            raise ConfigError(
                f"num_classes must be at least 2 (membrane and cell interior), got {num_classes}"
            )
        self.pages = [int(p) for p in pages]
        self.names = [data.names[p] if data.names else str(p) for p in self.pages]
        self.image_size = image_size
        self.out_size = output_size(image_size)
        self.num_classes = num_classes
        self.augment = augment
        self.repeat = repeat
        self.pad_mode = pad_mode
        self.seed = seed
        size = (len(self.pages), image_size, image_size)
        self.images = np.empty(size, np.float32)
        self.masks = np.empty(size, np.float32)
        for i, page in enumerate(self.pages):
            self.images[i], self.masks[i] = preprocess(
                data.images[page], data.labels[page], image_size, pad_mode
            )

    def __len__(self) -> int:
        return len(self.pages) * self.repeat

    def load(self, index: int, rng: np.random.Generator | None):
        i = index % len(self.pages)
        image, mask = self.images[i], self.masks[i]
        if self.augment and rng is not None:
            image, mask = train_data_augmentation(image, mask, rng)
        target = to_one_hot(center_crop(mask, self.out_size), self.num_classes)
        return torch.from_numpy(np.ascontiguousarray(image))[None], torch.from_numpy(target)


def create_dataset(
    data: IsbiData,
    cross_valid_ind: int,
    image_size: int,
    num_classes: int = 2,
    repeat: int = 1,
    augment: bool = True,
    pad_mode: str = "constant",
    seed: int = 0,
) -> tuple[IsbiDataset, IsbiDataset]:
    """(training set, validation set) of fold `cross_valid_ind`; validation is never augmented."""
    train_pages, val_pages = get_val_train_indices(len(data), cross_valid_ind)
    if len(val_pages) == 0:
        raise ConfigError(f"fold {cross_valid_ind} of {len(data)} pages has no validation page")
    train = IsbiDataset(data, train_pages, image_size, num_classes, augment, repeat, pad_mode, seed)
    valid = IsbiDataset(data, val_pages, image_size, num_classes, False, 1, pad_mode, seed)
    return train, valid


def steps_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Full batches one rank sees in an epoch of `samples` (DistributedSampler drops the ragged tail)."""
    return (samples // world_size) // batch_size


def schedule(pages: int, passes: int, repeat: int, world_size: int, batch_size: int) -> list[int]:
    """Steps of each checkpoint epoch: the original's total, floor(pages * passes / ranks / batch), cut into
    epochs of `repeat` passes (the last one shorter when `repeat` does not divide `passes`)."""
    total = steps_per_epoch(pages * passes, world_size, batch_size)
    per_epoch = steps_per_epoch(pages * repeat, world_size, batch_size)
    if total < 1 or per_epoch < 1:
        raise ConfigError(
            f"{pages} training pages x {repeat if per_epoch < 1 else passes} passes over {world_size} rank(s) "
            f"give less than one batch of {batch_size}; lower the batch size or raise --epochs / --repeat"
        )
    epochs = math.ceil(total / per_epoch)
    return [per_epoch] * (epochs - 1) + [total - per_epoch * (epochs - 1)]
