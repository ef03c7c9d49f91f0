"""V-Net's data: LUNA16 (as distributed or normalised) and the Medical Segmentation Decathlon layout.

`resolve_data(path, ...)` recognises three trees and returns the cases to read:

    <path>/lung_ct_image/ + seg-lungs-LUNA16/            LUNA16 as distributed: normalised first
                                                        (normalize_dataset.ensure_normalized), then read
    <path>/normalized_lung_ct/ + normalized_lung_mask/   LUNA16 normalised (ours, or the ModelZoo script's
                                                        int16 HU output, which is scaled at load time)
    <path>/imagesTr/*.nii.gz + labelsTr/*.nii.gz         Medical Segmentation Decathlon (Simpson et al. 2019)

Training samples are patches (`PatchDataset`): random crops of the patch size (a multiple of 16), a
third of them centred on a foreground voxel, from each volume padded to at least the patch size;
an epoch draws `samples_per_volume` patches per volume (default: as many as tile the volume, which for
LUNA16 128x160x160 and 64x80x80 patches is the reference's 2x2x2 split into 8 sub-volumes).
Validation reads whole volumes (`VolumeDataset`), scored by sliding-window inference: empty regions are
not dropped (the reference dropped empty sub-volumes from its test set, inflating its score).
MSD volumes keep their spacing; MRI is standardised per volume, CT clipped and scaled as LUNA16.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from intensity import LUNA_LUNG_LABELS, LabelMap, normalize_ct, normalize_intensity
from normalize_dataset import (
    CT_DIR,
    MASK_DIR,
    OUT_CT_DIR,
    OUT_MASK_DIR,
    Settings,
    ensure_normalized,
    read_marker,
    volume_files,
)

from common.datacheck import check_pairs, pair_by_stem
from common.errors import ConfigError, DataError
from common.imageio import check_finite, read_volume
from common.loader import SeededDataset

MSD_IMAGES, MSD_LABELS = "imagesTr", "labelsTr"
DIVISOR = 16

EXPECTED_TREES = f"""\
one of
  LUNA16 as distributed:  <data>/{CT_DIR}/<uid>.mhd          + <data>/{MASK_DIR}/<uid>.mhd
  LUNA16 normalised:      <data>/{OUT_CT_DIR}/<uid>.mhd     + <data>/{OUT_MASK_DIR}/<uid>.mhd
  Decathlon (MSD):        <data>/{MSD_IMAGES}/<case>.nii.gz           + <data>/{MSD_LABELS}/<case>.nii.gz
"""


@dataclass
class DataSpec:
    """What to read: the cases (id, image, mask) and how to turn them into network input and target."""

    kind: str  # "luna16" or "msd"
    root: Path  # the folder the cases are read from
    cases: list[tuple[str, Path, Path]]
    intensity: str  # "ct", "zscore" or "normalized" (already scaled by normalize_dataset.py)
    label_map: LabelMap
    info: dict = field(default_factory=dict)  # normalization.json or MSD dataset.json

    @property
    def ids(self) -> list[str]:
        return [case_id for case_id, _, _ in self.cases]


def detect_layout(path: Path) -> str:
    """ "luna16-raw", "luna16" or "msd"; DataError with the expected trees otherwise."""
    if not path.exists():
        raise DataError(path, f"data folder not found.\nExpected {EXPECTED_TREES}")
    if not path.is_dir():
        raise DataError(path, f"is a file, not a data folder.\nExpected {EXPECTED_TREES}")
    if (path / MSD_IMAGES).is_dir() and (path / MSD_LABELS).is_dir():
        return "msd"
    if (path / OUT_CT_DIR).is_dir() and (path / OUT_MASK_DIR).is_dir():
        return "luna16"
    if (path / CT_DIR).is_dir() and (path / MASK_DIR).is_dir():
        return "luna16-raw"
    found = sorted(p.name + "/" for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    raise DataError(
        path,
        f"not a dataset V-Net reads (sub-folders: {', '.join(found) or 'none'}).\nExpected {EXPECTED_TREES}",
    )


def _pairs(image_dir: Path, mask_dir: Path) -> list[tuple[str, Path, Path]]:
    images, masks = volume_files(image_dir), volume_files(mask_dir)
    if not images:
        raise DataError(image_dir, f"no volumes (.nii.gz, .mhd, ...) found.\nExpected {EXPECTED_TREES}")
    return pair_by_stem(images, masks)


def resolve_data(
    path: str | Path,
    *,
    dataset: str = "auto",
    label_map: str | None = None,
    intensity: str = "auto",
    settings: Settings | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
) -> DataSpec:
    """Recognise the tree at `path`, normalise LUNA16 when needed (reused next time) and list its cases.

    `label_map` defaults to "3,4" for LUNA16 (applied during normalisation) and "gt0" for MSD;
    `intensity` "auto" means: LUNA16 and MSD CT (dataset.json modality) -> "ct", other MSD -> "zscore".
    """
    path = Path(path)
    layout = detect_layout(path)
    if dataset != "auto" and not layout.startswith(dataset):
        raise ConfigError(f"--dataset {dataset} but {path} holds a {layout} tree.\nExpected {EXPECTED_TREES}")
    if layout == "msd":
        info = {}
        if (path / "dataset.json").is_file():
            try:
                info = json.loads((path / "dataset.json").read_text())
            except ValueError as exc:
                raise DataError(path / "dataset.json", f"not valid JSON ({exc})") from None
        modality = " ".join(str(v) for v in (info.get("modality") or {}).values()).upper()
        mode = intensity if intensity != "auto" else ("ct" if "CT" in modality.split() else "zscore")
        lm = LabelMap.parse(label_map or "gt0")
        return DataSpec("msd", path, _pairs(path / MSD_IMAGES, path / MSD_LABELS), mode, lm, info)
    if layout == "luna16-raw":
        settings = settings or Settings(lung_labels=label_map or LUNA_LUNG_LABELS)
        path = ensure_normalized(path, settings, workers=workers, log=log)
    marker = read_marker(path) or {}
    if settings is not None and marker and marker["settings"] != settings.as_dict():
        log(
            f"note: {path} was normalised with {marker['settings']}; using it as it is "
            "(point --data at the LUNA16 tree as distributed to normalise with other settings)"
        )
    cases = _pairs(path / OUT_CT_DIR, path / OUT_MASK_DIR)
    if marker:
        listed = set(marker["cases"])
        cases = [case for case in cases if case[0] in listed]
    mode = "normalized" if intensity == "auto" else intensity
    return DataSpec("luna16", path, cases, mode, LabelMap.parse("gt0"), marker)


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes DT_FLOAT32, DT_FLOAT64


def nifti_non_finite(path: str | Path, chunk: int = 1 << 24) -> tuple[int, int, int] | None:
    """(voxels, NaN, infinite) counted in the raw data of a float NIfTI-1/-2 file; None for other files.

    ITK's NIfTI reader (nifticlib) replaces non-finite floats by 0, so `read_volume` cannot show them;
    counted from the file itself, a NaN in a .nii.gz is refused like one in a MetaImage.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as fh:
        header = fh.read(540)
        for endian in "<>":
            if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
                (datatype,) = struct.unpack(endian + "h", header[70:72])
                dims = struct.unpack(endian + "8h", header[40:56])
                offset = int(struct.unpack(endian + "f", header[108:112])[0])
                break
            if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
                (datatype,) = struct.unpack(endian + "h", header[12:14])
                dims = struct.unpack(endian + "8q", header[16:80])
                offset = int(struct.unpack(endian + "q", header[168:176])[0])
                break
        else:
            return None
        if datatype not in _NIFTI_FLOATS or not 1 <= dims[0] <= 7:
            return None
        dtype = np.dtype(endian + _NIFTI_FLOATS[datatype])
        voxels = math.prod(int(d) for d in dims[1 : dims[0] + 1])
        fh.seek(offset)
        nan = inf = 0
        left = voxels * dtype.itemsize
        while left > 0:
            data = fh.read(min(left, chunk - chunk % dtype.itemsize))
            if not data:
                break  # a short file: read_volume's own check names it
            values = np.frombuffer(data[: len(data) - len(data) % dtype.itemsize], dtype=dtype)
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
            left -= len(data)
    return voxels, nan, inf


def read_finite(path: str | Path):
    """`read_volume` plus a DataError when float voxels are NaN or infinite (a NaN CT would turn the loss NaN
    mid-training), also in NIfTI files, whose reader hides them."""
    volume = read_volume(path)
    check_finite(volume.array, path)
    counts = nifti_non_finite(path)
    if counts is not None and (counts[1] or counts[2]):
        voxels, nan, inf = counts
        raise DataError(path, f"{nan + inf} of {voxels} voxels are not finite ({nan} NaN, {inf} infinite)")
    return volume


def validate_cases(spec: DataSpec, workers: int | None = None) -> None:
    """Read every image and mask once; one DataError lists each unreadable file, non-finite volume and
    geometry mismatch."""
    check_pairs(spec.cases, read_finite, read_finite, check_size=True, workers=workers)


def split_cases(
    ids: Sequence[str],
    val_fraction: float = 0.15,
    test_fraction: float = 0.0,
    seed: int = 0,
    split_file: str | Path | None = None,
) -> dict[str, list[str]]:
    """Train / val / test ids. Validation (model selection) and test (held out) never overlap.

    From `split_file` (JSON {"train": [...], "val": [...], "test": [...]}) when given; otherwise a fixed
    shuffle of the sorted ids (seeded by `seed`, not by the training seed, so a new training seed keeps
    the split) and ceil(fraction x n) ids for validation, then for test.
    """
    ids = sorted(ids)
    if split_file:
        try:
            split = json.loads(Path(split_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--split_file {split_file}: cannot read a JSON split ({exc})") from None
        split = {k: [str(i) for i in split.get(k, [])] for k in ("train", "val", "test")}
        unknown = sorted(set(sum(split.values(), [])) - set(ids))
        if unknown:
            raise ConfigError(f"--split_file {split_file} names cases not in the data: {unknown[:10]}")
        if set(split["val"]) & set(split["train"]) or set(split["test"]) & set(split["train"] + split["val"]):
            raise ConfigError(f"--split_file {split_file}: train, val and test must not share cases")
    else:
        for name, value in (("--val_fraction", val_fraction), ("--test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {value}")
        order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        n_val = math.ceil(val_fraction * len(ids)) if val_fraction > 0 else 0
        n_test = math.ceil(test_fraction * len(ids)) if test_fraction > 0 else 0
        split = {
            "val": sorted(order[:n_val]),
            "test": sorted(order[n_val : n_val + n_test]),
            "train": sorted(order[n_val + n_test :]),
        }
    if not split["train"]:
        raise ConfigError(
            f"no training cases left: {len(ids)} case(s), split {[len(v) for v in split.values()]}"
        )
    if not split["val"]:
        raise ConfigError(
            f"no validation cases: {len(ids)} case(s); raise --val_fraction (model selection needs a validation split)"
        )
    return split


class CaseReader:
    """Loads case i as (image float32 (D, H, W), target uint8 0/1 (D, H, W), spacing z y x).

    Keeps recently read cases in memory up to `cache_bytes` per process (least recently used first out):
    the whole of a small dataset such as MSD Hippocampus, a few volumes of LUNA16.
    """

    def __init__(self, spec: DataSpec, cache_bytes: int = 1 << 30):
        self.spec = spec
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, tuple]] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return len(self.spec.cases)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        _, image_path, mask_path = self.spec.cases[index]
        image = read_volume(image_path)
        mask = read_volume(mask_path)
        if image.array.shape != mask.array.shape:
            raise DataError(mask_path, f"shape {mask.array.shape} differs from image {image.array.shape}")
        check_finite(image.array, image_path)
        if self.spec.intensity == "normalized":
            # A float tree comes from normalize_dataset.py; an integer one (the ModelZoo script's) is HU.
            array = image.array if image.array.dtype.kind == "f" else normalize_ct(image.array)
            array = np.asarray(array, dtype=np.float32)
        else:
            array = normalize_intensity(image.array, self.spec.intensity)
        labels = mask.array
        if labels.dtype.kind == "f":
            check_finite(labels, mask_path)
        target = self.spec.label_map(labels).astype(np.uint8)
        return np.ascontiguousarray(array), target, tuple(image.spacing)

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        item = self._read(index)
        size = item[0].nbytes + item[1].nbytes
        if size <= self.cache_bytes:
            while self._cached + size > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= old[0].nbytes + old[1].nbytes
            self._cache[index] = item
            self._cached += size
        return item

    def __getstate__(self) -> dict:
        # DataLoader workers start with an empty cache (and nothing large is pickled under spawn).
        return {"spec": self.spec, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"], state["cache_bytes"])


def parse_size(text: str | Sequence[int], name: str = "--patch_size") -> tuple[int, int, int]:
    """ "64x80x80" / "64,80,80" / "64" (cubic) -> (64, 80, 80)."""
    if isinstance(text, (tuple, list)):
        values = [int(v) for v in text]
    else:
        parts = str(text).lower().replace(",", "x").split("x")
        try:
            values = [int(p) for p in parts if p.strip()]
        except ValueError:
            raise ConfigError(f"{name} must look like 64x80x80 (Z x Y x X), got {text!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or min(values) < 1:
        raise ConfigError(f"{name} must be three positive integers Z x Y x X, got {text!r}")
    return tuple(values)


def check_patch_size(patch: Sequence[int], name: str = "--patch_size") -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch)
    if any(p % DIVISOR for p in patch):
        padded = "x".join(str(max(DIVISOR, -(-p // DIVISOR) * DIVISOR)) for p in patch)
        raise ConfigError(
            f"{name} {'x'.join(map(str, patch))}: V-Net needs multiples of {DIVISOR} on every axis; use {padded}"
        )
    return patch


def pad_to(image: np.ndarray, target: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad both arrays symmetrically to at least `size` (image with its minimum, target with 0)."""
    pads = [(max(0, s - n) // 2, max(0, s - n) - max(0, s - n) // 2) for n, s in zip(image.shape, size)]
    if not any(a or b for a, b in pads):
        return image, target
    fill = float(image.min()) if image.size else 0.0
    return np.pad(image, pads, constant_values=fill), np.pad(target, pads, constant_values=0)


def tiles_per_volume(shape: Sequence[int], patch: Sequence[int]) -> int:
    """How many patches tile a volume (after padding to the patch): the reference's sub-volume count."""
    return int(np.prod([max(1, math.ceil(s / p)) for s, p in zip(shape, patch)]))


class PatchDataset(SeededDataset):
    """Training patches: `samples_per_volume` per case and epoch.

    With a generator (training) a patch is a random crop, centred on a random foreground voxel with
    probability `foreground_prob`, optionally mirrored along random axes (`flip`). Without one it is
    the (index mod tiles)-th tile of a fixed grid, so evaluation of patches is deterministic.
    """

    def __init__(
        self,
        reader: CaseReader,
        case_indices: Sequence[int],
        patch_size: Sequence[int],
        samples_per_volume: int = 1,
        foreground_prob: float = 1 / 3,
        flip: bool = False,
        seed: int = 0,
    ):
        if samples_per_volume < 1:
            raise ConfigError(f"--samples_per_volume must be at least 1, got {samples_per_volume}")
        if not 0.0 <= foreground_prob <= 1.0:
            raise ConfigError(f"--foreground_prob must lie in [0, 1], got {foreground_prob}")
        self.reader = reader
        self.case_indices = list(case_indices)
        self.patch = check_patch_size(patch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.foreground_prob = float(foreground_prob)
        self.flip = bool(flip)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.case_indices) * self.samples_per_volume

    def _start(
        self, shape: tuple, target: np.ndarray, index: int, rng: np.random.Generator | None
    ) -> list[int]:
        room = [s - p for s, p in zip(shape, self.patch)]
        if rng is None:
            grid = [sorted({min(i * p, r) for i in range(max(1, math.ceil(s / p)))}) for s, p, r in
                    zip(shape, self.patch, room)]  # fmt: skip
            tile = np.unravel_index(index % int(np.prod([len(g) for g in grid])), [len(g) for g in grid])
            return [g[t] for g, t in zip(grid, tile)]
        if self.foreground_prob > 0 and rng.random() < self.foreground_prob:
            voxels = np.flatnonzero(target)
            if voxels.size:
                centre = np.unravel_index(int(voxels[rng.integers(voxels.size)]), shape)
                return [int(np.clip(c - p // 2, 0, r)) for c, p, r in zip(centre, self.patch, room)]
        return [int(rng.integers(0, r + 1)) for r in room]

    def load(self, index: int, rng: np.random.Generator | None):
        case = self.case_indices[index // self.samples_per_volume]
        image, target, _ = self.reader(case)
        image, target = pad_to(image, target, self.patch)
        start = self._start(image.shape, target, index % self.samples_per_volume, rng)
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch))
        image, target = image[box], target[box]
        if rng is not None and self.flip:
            axes = tuple(a for a in range(3) if rng.random() < 0.5)
            if axes:
                image, target = np.flip(image, axes), np.flip(target, axes)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))[None],
        )


class VolumeDataset(SeededDataset):
    """Whole volumes for validation and prediction: (image (1, D, H, W), target (1, D, H, W)), never augmented."""

    def __init__(self, reader: CaseReader, case_indices: Sequence[int]):
        self.reader = reader
        self.case_indices = list(case_indices)

    def __len__(self) -> int:
        return len(self.case_indices)

    def load(self, index: int, rng: np.random.Generator | None):
        image, target, _ = self.reader(self.case_indices[index])
        return (
            torch.from_numpy(np.array(image, dtype=np.float32))[None],
            torch.from_numpy(target.astype(np.float32))[None],
        )
