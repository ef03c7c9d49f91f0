"""Normalised volumes on disk as `.npy`, memory-mapped by every DataLoader worker and every rank.

Why: a LUNA16 case is a 13 MB float MetaImage plus a compressed mask; decoding and checking it costs tens
of milliseconds, and with 888 cases a per-worker cache of decoded volumes misses most of the time under a
shuffled patch order. The same case as two `.npy` files opened with `np.load(mmap_mode="r")` costs a few
hundred microseconds, reads only the pages a patch touches, and lives once in the OS page cache, shared by
every worker and rank of the node.

Files, per case `<id>` in the cache folder:
    <id>.image.npy   float32 (D, H, W): the network's input values, as the data reader normalised them
    <id>.mask.npy    uint8 (D, H, W): the 0/1 target
    <id>.json        manifest, written last: every source file's path, size and mtime_ns, the shape and
                     dtype of both arrays, the spacing, the foreground voxels per z slice and the reader's
                     settings (`params`); a case whose sources or settings changed is built again
    <id>.lock        flock target: one process builds a case, the others wait and open the result
The checks (readable, finite, image and mask on one grid) run when a case is built, so a case with a
manifest passed them; opening it checks only the source files' size and mtime.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.filelock import file_lock

CACHE_VERSION = "vnet-volume-cache/1"
_METAIMAGE = (".mhd", ".mha")


@dataclass(frozen=True)
class CaseArrays:
    """One case as the data reader returns it; `foreground` is None until counted."""

    image: np.ndarray  # float32 (D, H, W)
    target: np.ndarray  # uint8 0/1 (D, H, W)
    spacing: tuple[float, ...]  # z, y, x
    # Foreground voxels in slices 0..z (cumulative along axis 0): a random foreground voxel is found by
    # scanning one slice instead of the whole mask.
    foreground: np.ndarray | None = None


def foreground_per_slice(target: np.ndarray) -> np.ndarray:
    """Foreground voxels in each z slice (int64, one entry per slice of axis 0)."""
    return np.count_nonzero(np.asarray(target).reshape(len(target), -1), axis=1).astype(np.int64)


def source_files(path: str | Path) -> list[Path]:
    """`path` and, for a MetaImage header, the data file it names (a changed .raw must count as a change)."""
    path = Path(path)
    files = [path]
    if path.suffix.lower() in _METAIMAGE:
        try:
            with open(path, "rb") as fh:
                header = fh.read(1 << 16).decode("latin-1")
        except OSError:
            return files
        for line in header.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "ElementDataFile":
                name = value.strip()
                if name and name.upper() not in ("LOCAL", "LIST") and "%" not in name:
                    files.append(Path(name) if os.path.isabs(name) else path.parent / name)
                break
    return files


def source_stats(paths: Sequence[str | Path]) -> list[dict]:
    """Path, size and mtime_ns of every source file (headers and their data files); missing ones as None."""
    stats = []
    for path in [part for p in paths for part in source_files(p)]:
        try:
            st = os.stat(path)
            stats.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        except OSError:
            stats.append({"path": os.path.abspath(path), "size": None, "mtime_ns": None})
    return stats


class VolumeCache:
    """The cache folder of one data tree and reader setting (`params`: intensity mode, label map, ...).

    `open(id, sources)` maps a case whose manifest matches its sources and `params`, else returns None;
    `get_or_build(id, sources, build)` builds a missing or stale case first: `build()` decodes and checks
    it (raising to refuse it), then the arrays are written to temporary files and renamed into place, the
    manifest last, under the case's file lock, so concurrent workers and ranks decode it once and nobody
    maps a half-written file.
    """

    def __init__(self, folder: str | Path, params: dict):
        self.folder = Path(folder)
        self.params = dict(params)

    def _paths(self, case_id: str) -> tuple[Path, Path, Path]:
        return (
            self.folder / f"{case_id}.image.npy",
            self.folder / f"{case_id}.mask.npy",
            self.folder / f"{case_id}.json",
        )

    def manifest(self, case_id: str) -> dict | None:
        try:
            meta = json.loads(self._paths(case_id)[2].read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def open(self, case_id: str, sources: Sequence[str | Path]) -> CaseArrays | None:
        """The cached case, memory-mapped read-only, or None when it is missing or stale."""
        meta = self.manifest(case_id)
        if (
            meta is None
            or meta.get("version") != CACHE_VERSION
            or meta.get("params") != self.params
            or meta.get("sources") != source_stats(sources)
        ):
            return None
        image_path, mask_path, _ = self._paths(case_id)
        try:
            image = np.load(image_path, mmap_mode="r")
            target = np.load(mask_path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        for array, key in ((image, "image"), (target, "mask")):
            if list(array.shape) != meta[key]["shape"] or array.dtype.str != meta[key]["dtype"]:
                return None
        # Plain ndarray views of the maps: callers slice and copy; a read-only view cannot be edited by mistake.
        return CaseArrays(
            image.view(np.ndarray),
            target.view(np.ndarray),
            tuple(float(s) for s in meta["spacing"]),
            np.cumsum(np.asarray(meta["foreground"], dtype=np.int64)),
        )

    def get_or_build(
        self, case_id: str, sources: Sequence[str | Path], build: Callable[[], CaseArrays]
    ) -> CaseArrays:
        """Open the case, building it first when missing or stale. OSError when the folder cannot be written."""
        cached = self.open(case_id, sources)
        if cached is not None:
            return cached
        with file_lock(self.folder / f"{case_id}.lock"):
            cached = self.open(case_id, sources)  # another process may have built it while we waited
            if cached is None:
                # Stat before decoding: a source rewritten meanwhile then leaves a stale manifest, not a
                # manifest that vouches for the old values.
                stats = source_stats(sources)
                self._write(case_id, stats, build())
                cached = self.open(case_id, sources)
        if cached is None:
            raise OSError(f"{self.folder}: case {case_id} was written but does not read back")
        return cached

    def _write(self, case_id: str, stats: list[dict], case: CaseArrays) -> None:
        # Called with the case's lock held: leftovers of a writer that died may go.
        image_path, mask_path, meta_path = self._paths(case_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)
        for stale in self.folder.glob(f".{glob.escape(case_id)}.*.tmp-*"):
            stale.unlink(missing_ok=True)
        image = np.ascontiguousarray(case.image, dtype=np.float32)
        target = np.ascontiguousarray(case.target, dtype=np.uint8)
        tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        written = []
        try:
            for array, final in ((image, image_path), (target, mask_path)):
                tmp = self.folder / f".{final.name}.{tag}"
                written.append(tmp)
                with open(tmp, "wb") as fh:
                    np.save(fh, array)
                os.replace(tmp, final)
            meta = {
                "version": CACHE_VERSION,
                "id": case_id,
                "params": self.params,
                "sources": stats,
                "image": {"shape": list(image.shape), "dtype": image.dtype.str},
                "mask": {"shape": list(target.shape), "dtype": target.dtype.str},
                "spacing": [float(s) for s in case.spacing],
                "foreground": foreground_per_slice(target).tolist(),
            }
            tmp = self.folder / f".{meta_path.name}.{tag}"
            written.append(tmp)
            tmp.write_text(json.dumps(meta) + "\n")
            os.replace(tmp, meta_path)
        finally:
            for tmp in written:
                tmp.unlink(missing_ok=True)
