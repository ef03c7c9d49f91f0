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

Each case is read, checked and normalised once, then kept as memory-mapped `.npy` files that every
DataLoader worker and rank shares (`CaseReader`, `volume_cache.py`); `check_cases` builds them. An epoch
visits the volumes in a shuffled order and draws a volume's `samples_per_volume` patches in a row
(`PatchDataset.locate`; `patch_loader` hands each rank a contiguous share of that order), so one mapped
volume serves several patches.

Bad cases (an image without its mask, an unreadable, non-finite or mis-aligned volume) are refused, every
one named in one error. With `skip_bad=True` (`--skip_bad_samples`) `resolve_data` leaves unpaired cases
out and `check_cases` returns the unreadable ones; `without_cases` drops them, `DataSpec.skipped` lists all.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import struct
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

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
from torch.utils.data import DataLoader, Sampler
from volume_cache import CaseArrays, VolumeCache

from common.cache import default_cache_dir
from common.datacheck import SKIP_HINT, BadSample, drop_bad, format_problems, pair_samples
from common.distributed import DistContext
from common.errors import ConfigError, DataError
from common.imageio import Volume, check_finite, read_volume, same_geometry
from common.loader import SeededDataset, build_loader

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
    skipped: list[BadSample] = field(default_factory=list)  # cases left out under skip_bad

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


def _pairs(
    image_dir: Path, mask_dir: Path, skip_bad: bool = False
) -> tuple[list[tuple[str, Path, Path]], list[BadSample]]:
    images, masks = volume_files(image_dir), volume_files(mask_dir)
    if not images:
        raise DataError(image_dir, f"no volumes (.nii.gz, .mhd, ...) found.\nExpected {EXPECTED_TREES}")
    return pair_samples(images, masks, skip_bad=skip_bad)


def resolve_data(
    path: str | Path,
    *,
    dataset: str = "auto",
    label_map: str | None = None,
    intensity: str = "auto",
    settings: Settings | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    skip_bad: bool = False,
) -> DataSpec:
    """Recognise the tree at `path`, normalise LUNA16 when needed (reused next time) and list its cases.

    `label_map` defaults to "3,4" for LUNA16 (applied during normalisation) and "gt0" for MSD;
    `intensity` "auto" means: LUNA16 and MSD CT (dataset.json modality) -> "ct", other MSD -> "zscore".
    An image without its mask (or a mask without its image) is refused, or with `skip_bad` left out and
    listed in the result's `skipped`.
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
        cases, skipped = _pairs(path / MSD_IMAGES, path / MSD_LABELS, skip_bad)
        return DataSpec("msd", path, cases, mode, lm, info, skipped)
    if layout == "luna16-raw":
        settings = settings or Settings(lung_labels=label_map or LUNA_LUNG_LABELS)
        path = ensure_normalized(path, settings, workers=workers, log=log)
    marker = read_marker(path) or {}
    if settings is not None and marker and marker["settings"] != settings.as_dict():
        log(
            f"note: {path} was normalised with {marker['settings']}; using it as it is "
            "(point --data at the LUNA16 tree as distributed to normalise with other settings)"
        )
    cases, skipped = _pairs(path / OUT_CT_DIR, path / OUT_MASK_DIR, skip_bad)
    if marker:
        listed = set(marker["cases"])
        cases = [case for case in cases if case[0] in listed]
        skipped = [b for b in skipped if b.id in listed]
    mode = "normalized" if intensity == "auto" else intensity
    return DataSpec("luna16", path, cases, mode, LabelMap.parse("gt0"), marker, skipped)


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


def _read_checked(path: Path) -> tuple[Volume | None, list[tuple[Path, str]]]:
    try:
        return read_finite(path), []
    except DataError as exc:
        return None, [(exc.path or path, exc.problem)]
    except Exception as exc:  # noqa: BLE001 - a reader bug or library error still names its file
        return None, [(path, f"{type(exc).__name__}: {exc}")]


def decode_case(spec: DataSpec, index: int) -> tuple[CaseArrays | None, list[tuple[Path, str]]]:
    """Read, check and normalise case `index`: (arrays, []) or (None, [(file, problem), ...]).

    Checked: both files read, no NaN or infinite voxel (NIfTI files included), image and mask on one grid
    (shape, spacing, origin, direction). The image becomes float32 network input, the mask the 0/1 target.
    """
    _, image_path, mask_path = spec.cases[index]
    image, problems = _read_checked(image_path)
    mask, mask_problems = _read_checked(mask_path)
    problems += mask_problems
    if image is None or mask is None:
        return None, problems
    diff = same_geometry(image, mask)
    if diff:
        return None, [(mask_path, f"geometry differs from image {image_path.name}: {diff}")]
    if spec.intensity == "normalized":
        # A float tree comes from normalize_dataset.py; an integer one (the ModelZoo script's) is HU.
        array = image.array if image.array.dtype.kind == "f" else normalize_ct(image.array)
        array = np.asarray(array, dtype=np.float32)
    else:
        array = normalize_intensity(image.array, spec.intensity)
    target = spec.label_map(mask.array).astype(np.uint8)
    return CaseArrays(np.ascontiguousarray(array), target, tuple(image.spacing)), []


def check_cases(
    spec: DataSpec, indices: Sequence[int] | None = None, *, skip_bad: bool, workers: int | None = None
) -> list[BadSample]:
    """Check every case (of `indices`, e.g. one rank's share) and cache it for `CaseReader`; one DataError
    lists each unreadable file, non-finite volume and geometry mismatch, or with `skip_bad` those cases are
    returned (`without_cases` drops them).

    A case cached from files that have not changed since passed these checks and is not read again.
    """
    positions = list(range(len(spec.cases))) if indices is None else [int(i) for i in indices]
    reader = CaseReader(spec, cache_bytes=0)
    # Threads: reading (SimpleITK), normalising (numpy) and writing release the GIL.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        found = list(pool.map(reader.prepare, positions))
    bad = [
        BadSample(spec.cases[i][0], str(path), problem)
        for i, problems in zip(positions, found)
        for path, problem in problems
    ]
    if bad and not skip_bad:
        raise DataError(
            spec.root,
            f"{len(bad)} problem(s) in {len({b.path for b in bad})} file(s) out of {len(positions)} pairs:\n"
            + format_problems([(b.path, b.problem) for b in bad])
            + f"\n{SKIP_HINT}",
        )
    return bad


def validate_cases(spec: DataSpec, workers: int | None = None) -> None:
    """Read every image and mask once; one DataError lists each unreadable file, non-finite volume and
    geometry mismatch."""
    check_cases(spec, skip_bad=False, workers=workers)


def without_cases(spec: DataSpec, bad: Sequence[BadSample]) -> DataSpec:
    """`spec` without the cases named in `bad`, which join its `skipped`."""
    return replace(spec, cases=drop_bad(spec.cases, bad), skipped=sorted({*spec.skipped, *bad}))


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


OPEN_CASES = 32  # memory-mapped cases a process keeps open (two file descriptors each)


class _Refused(Exception):
    """A case failed its checks while being cached (its problems are kept by the caller)."""


def cache_params(spec: DataSpec) -> dict:
    """What a cached case depends on besides its files: how images and masks become input and target."""
    return {"intensity": spec.intensity, "label_map": spec.label_map.spec}


def default_volume_cache_dir(spec: DataSpec) -> Path:
    """`common.cache.default_cache_dir(spec.root)/vnet_volumes_<intensity>_<hash of cache_params>`."""
    digest = hashlib.sha256(json.dumps(cache_params(spec), sort_keys=True).encode()).hexdigest()[:8]
    return default_cache_dir(spec.root) / f"vnet_volumes_{spec.intensity}_{digest}"


class CaseReader:
    """Loads case i as (image float32 (D, H, W), target uint8 0/1 (D, H, W), spacing z y x).

    A case is decoded and checked (`decode_case`) once, then kept as memory-mapped `.npy` files in
    `cache_dir` (one per data tree and `cache_params`; default `default_volume_cache_dir(spec)`; see
    volume_cache.py) that every worker and rank opens; the arrays returned are read-only views of the
    maps, and a process keeps the last OPEN_CASES cases mapped. Without the disk cache
    (`disk_cache=False`, or a folder that cannot be written: a note on stderr) each process decodes cases
    itself and keeps them in memory up to `cache_bytes` (least recently used first out).
    """

    def __init__(
        self,
        spec: DataSpec,
        cache_bytes: int = 1 << 30,
        cache_dir: str | Path | None = None,
        disk_cache: bool = True,
    ):
        self.spec = spec
        self.cache_bytes = int(cache_bytes)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.store: VolumeCache | None = None
        if disk_cache:
            self.store = VolumeCache(self.cache_dir or default_volume_cache_dir(spec), cache_params(spec))
        self._cache: OrderedDict[int, tuple[CaseArrays, int]] = OrderedDict()
        self._resident = 0  # bytes of decoded cases held
        self._mapped = 0  # mapped cases held

    def __len__(self) -> int:
        return len(self.spec.cases)

    def _sources(self, index: int) -> tuple[str, list[Path]]:
        case_id, image_path, mask_path = self.spec.cases[index]
        return case_id, [image_path, mask_path]

    def decode(self, index: int) -> CaseArrays:
        """Case `index` read, checked and normalised from its files; DataError naming each bad file."""
        case, problems = decode_case(self.spec, index)
        if case is None:
            if len(problems) == 1:
                raise DataError(*problems[0])
            raise DataError(None, f"{len(problems)} problems:\n" + format_problems(problems))
        return case

    def _drop_store(self, exc: OSError) -> None:
        if self.store is not None:
            print(
                f"note: cannot write the volume cache {self.store.folder} ({exc}); each process decodes "
                "the volumes it reads instead",
                file=sys.stderr,
                flush=True,
            )
        self.store = None

    def prepare(self, index: int) -> list[tuple[Path, str]]:
        """Check case `index` and cache it (nothing to read when it is cached from unchanged files);
        returns its problems as (file, problem)."""
        store = self.store
        if store is None:
            return decode_case(self.spec, index)[1]
        outcome: list[list[tuple[Path, str]]] = []

        def build() -> CaseArrays:
            case, problems = decode_case(self.spec, index)
            outcome.append(problems)
            if case is None:
                raise _Refused()
            return case

        try:
            store.get_or_build(*self._sources(index), build)
        except _Refused:
            pass
        except OSError as exc:
            self._drop_store(exc)
            if not outcome:
                return decode_case(self.spec, index)[1]
        return outcome[0] if outcome else []

    def case(self, index: int) -> CaseArrays:
        """Case `index` with its foreground counts per slice (when cached on disk)."""
        held = self._cache.get(index)
        if held is not None:
            self._cache.move_to_end(index)
            return held[0]
        item, resident = None, 0
        store = self.store
        if store is not None:
            try:
                item = store.get_or_build(*self._sources(index), lambda: self.decode(index))
            except OSError as exc:
                self._drop_store(exc)
        if item is None:
            item = self.decode(index)
            resident = item.image.nbytes + item.target.nbytes
        if resident <= self.cache_bytes:
            self._cache[index] = (item, resident)
            self._resident += resident
            self._mapped += resident == 0
            while self._resident > self.cache_bytes or self._mapped > OPEN_CASES:
                _, (_, size) = self._cache.popitem(last=False)
                self._resident -= size
                self._mapped -= size == 0
        return item

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple]:
        case = self.case(index)
        return case.image, case.target, case.spacing

    def __getstate__(self) -> dict:
        # DataLoader workers start with nothing open (and nothing large is pickled under spawn).
        return {
            "spec": self.spec,
            "cache_bytes": self.cache_bytes,
            "cache_dir": self.cache_dir,
            "disk_cache": self.store is not None,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


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


_ORDER_STREAM = 1  # spawn key of the per-epoch volume order: apart from every augmentation stream


def _foreground_voxel(
    target: np.ndarray, foreground: np.ndarray | None, rng: np.random.Generator
) -> int | None:
    """The flat index of a foreground voxel drawn uniformly, or None without foreground.

    Draws exactly as `np.flatnonzero(target)[rng.integers(count)]`; with the cumulative counts per slice
    (`CaseArrays.foreground`) only the slice holding that voxel is scanned, not the whole mask.
    """
    if foreground is None:
        voxels = np.flatnonzero(target)
        return int(voxels[rng.integers(voxels.size)]) if voxels.size else None
    total = int(foreground[-1]) if len(foreground) else 0
    if not total:
        return None
    k = int(rng.integers(total))
    z = int(np.searchsorted(foreground, k, side="right"))
    before = int(foreground[z - 1]) if z else 0
    within = np.flatnonzero(target[z])[k - before]
    return z * int(np.prod(target.shape[1:])) + int(within)


class PatchDataset(SeededDataset):
    """Training patches: `samples_per_volume` per case and epoch.

    Keyed by (epoch, position), as the training samplers hand them out, an epoch's patches come volume by
    volume (`locate`): the volumes in an order shuffled anew each epoch, each giving its
    `samples_per_volume` patches in a row, so keys read in order (`VolumeGroupedSampler`) map a volume
    once for several patches. A patch depends only on (seed, epoch, position), not on the worker, the
    number of workers or ranks, or a resume.

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
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.case_indices) * self.samples_per_volume

    def volume_order(self, epoch: int) -> np.ndarray:
        """Positions in `case_indices` in the order epoch `epoch` visits them (fixed by seed and epoch)."""
        if self._order is None or self._order[0] != epoch:
            sequence = np.random.SeedSequence([self.seed, epoch], spawn_key=(_ORDER_STREAM,))
            self._order = (epoch, np.random.default_rng(sequence).permutation(len(self.case_indices)))
        return self._order[1]

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(case index, sample number) of the epoch's `position`-th patch."""
        volume, sample = divmod(int(position), self.samples_per_volume)
        return self.case_indices[int(self.volume_order(epoch)[volume])], sample

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, position = key
            case, sample = self.locate(epoch, position)
            return self.patch_of(case, sample, np.random.default_rng([self.seed, epoch, position]))
        return self.load(key, None)

    def _start(
        self,
        shape: tuple,
        target: np.ndarray,
        index: int,
        rng: np.random.Generator | None,
        foreground: np.ndarray | None = None,
    ) -> list[int]:
        room = [s - p for s, p in zip(shape, self.patch)]
        if rng is None:
            grid = [sorted({min(i * p, r) for i in range(max(1, math.ceil(s / p)))}) for s, p, r in
                    zip(shape, self.patch, room)]  # fmt: skip
            tile = np.unravel_index(index % int(np.prod([len(g) for g in grid])), [len(g) for g in grid])
            return [g[t] for g, t in zip(grid, tile)]
        if self.foreground_prob > 0 and rng.random() < self.foreground_prob:
            voxel = _foreground_voxel(target, foreground, rng)
            if voxel is not None:
                centre = np.unravel_index(voxel, shape)
                return [int(np.clip(c - p // 2, 0, r)) for c, p, r in zip(centre, self.patch, room)]
        return [int(rng.integers(0, r + 1)) for r in room]

    def load(self, index: int, rng: np.random.Generator | None):
        """Patch `index mod samples_per_volume` of case `index // samples_per_volume` (no epoch order)."""
        spv = self.samples_per_volume
        return self.patch_of(self.case_indices[index // spv], index % spv, rng)

    def patch_of(self, case: int, sample: int, rng: np.random.Generator | None):
        """(image (1, *patch) float32, target (1, *patch) float32) of case `case` (an index of the reader)."""
        if hasattr(self.reader, "case"):
            arrays = self.reader.case(case)
        else:
            arrays = CaseArrays(*self.reader(case))
        image, target = pad_to(arrays.image, arrays.target, self.patch)
        # Padding moves every voxel, so the per-slice counts only serve an unpadded volume.
        foreground = arrays.foreground if image is arrays.image else None
        start = self._start(image.shape, target, sample, rng, foreground)
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


class VolumeGroupedSampler(Sampler):
    """(epoch, position) keys of a `PatchDataset` for one rank: positions rank x n ... rank x n + n - 1 of
    the epoch's volume-grouped order, in order, n = len(dataset) // ranks (the remainder is left out, as
    DistributedSampler's drop_last does). Consecutive keys mostly share a volume; `set_epoch` as
    DistributedSampler. The keys depend on the epoch, the rank and the number of ranks only."""

    def __init__(self, dataset: PatchDataset, num_replicas: int = 1, rank: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} of {num_replicas}: need 0 <= rank < num_replicas")
        self.num_samples = len(dataset) // num_replicas
        self.first = rank * self.num_samples
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, position) for position in range(self.first, self.first + self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


def patch_loader(
    dataset: PatchDataset,
    batch_size: int,
    ctx: DistContext,
    *,
    workers: int | None = None,
    seed: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """The training loader `common.loader.build_loader(dataset, ..., train=True)` makes (its checks, workers,
    pinning, seeds, full batches), reading the volume-grouped order of `VolumeGroupedSampler` instead of
    a shuffle of single patches. `workers` and `pin_memory` None: build_loader's defaults."""
    given = {"workers": workers, "pin_memory": pin_memory}
    base = build_loader(dataset, batch_size, ctx, train=True, seed=seed,
                        **{k: v for k, v in given.items() if v is not None})  # fmt: skip
    return DataLoader(
        dataset,
        batch_size=base.batch_size,
        sampler=VolumeGroupedSampler(dataset, ctx.world_size, ctx.rank),
        num_workers=base.num_workers,
        pin_memory=base.pin_memory,
        drop_last=True,
        worker_init_fn=base.worker_init_fn,
        generator=base.generator,
        persistent_workers=base.persistent_workers,
        prefetch_factor=base.prefetch_factor,
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
