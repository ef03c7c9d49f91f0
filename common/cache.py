"""A decoded-sample cache on disk, shared by every DataLoader worker and every rank.

Why: decoding a 3000x2000 ISIC JPEG and resizing it costs about 50 ms of CPU; reading the same sample
from a uint8 memory map costs microseconds. So each split is decoded once, at its training size, into
one `.npy` file, and every later epoch, worker, rank and run reads rows of that file.

Memory: a memory map is backed by the OS page cache, which every process mapping the same file shares.
Eight ranks with eight workers each read one physical copy. A Python list of decoded arrays, by
contrast, is copied into each worker: fork shares pages copy-on-write, but merely reading Python
objects writes their reference counts, so the copies grow until each worker holds the whole list
("copy-on-read"). Keep the memmap, or a `LazyMemmap`, in the Dataset and copy single rows out of it.

Files, per cache `name` in `cache_dir`:
    <name>.npy   a plain .npy of shape (items, *item_shape); `np.load(path, mmap_mode="r")` opens it
    <name>.json  fingerprint, shape, dtype, item count and keys; written LAST, so a build that died
                 part way leaves no valid header and the next run rebuilds
    <name>.lock  fcntl.flock target: one process builds, the others wait and then open the same file
The fingerprint covers the keys, every source file's path, size and mtime_ns, the item shape and dtype,
the caller's `params` (resize size, interpolation, ...) and `CACHE_VERSION`, so changing any of them
rebuilds the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from common.errors import DataError

try:  # fcntl is POSIX-only; elsewhere a single process is assumed to build the cache
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CACHE_VERSION = "decoded-array-cache/1"
CACHE_DIR_ENV = "MODELZOO_CACHE_DIR"

log = logging.getLogger(__name__)


def _fingerprint(
    keys: Sequence[str], sources: Sequence[Sequence[Path]], item_shape: tuple, dtype: np.dtype, params: dict
) -> str:
    digest = hashlib.sha256()
    header = {
        "version": CACHE_VERSION,
        "item_shape": list(item_shape),
        "dtype": dtype.str,
        "params": params,
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for key, files in zip(keys, sources):
        digest.update(f"\x00key\x00{key}".encode())
        for path in files:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise DataError(
                    path, f"source of cache item {key!r} cannot be read ({exc.strerror})"
                ) from exc
            digest.update(f"\x00{os.path.abspath(path)}\x00{st.st_size}\x00{st.st_mtime_ns}".encode())
    return digest.hexdigest()


class DecodedArrayCache:
    """One split's decoded items in `<cache_dir>/<name>.npy`, rebuilt only when its inputs change.

    Args:
        cache_dir: folder for the cache files (see `default_cache_dir`).
        name: file stem, e.g. "isic_train_256x256"; letters, digits, "-", "_" and ".". Give each
            variant (split, size) its own name: two caches sharing a name rebuild each other.
        keys: one id per item, in row order (row i of the array is keys[i]).
        sources: for each item, the files it is decoded from (image and mask paths); their size and
            mtime enter the fingerprint.
        item_shape: exact shape of every item, e.g. (256, 256, 3).
        dtype: element type of the cache (uint8 by default).
        params: everything else that changes the decoded result (size, interpolation, channel order...);
            JSON-serialisable.

    Example::

        cache = DecodedArrayCache(default_cache_dir(root), "train_img_256", ids, [[p] for p in paths],
                                  (256, 256, 3), params={"size": 256, "resample": "bilinear"})
        images = cache.get_or_build(lambda i: resize(read_image(paths[i]), 256))   # read-only memmap
        sample = np.array(images[i])                                               # copy one row
    """

    def __init__(
        self,
        cache_dir: str | Path,
        name: str,
        keys: Sequence[str],
        sources: Sequence[Sequence[str | Path]],
        item_shape: tuple[int, ...],
        dtype: Any = np.uint8,
        params: dict | None = None,
    ):
        if not name or any(not (c.isalnum() or c in "-_.") for c in name) or name.startswith("."):
            raise ValueError(f"cache name {name!r}: use letters, digits, '-', '_' and '.' (not leading)")
        if len(keys) != len(sources):
            raise ValueError(
                f"{len(keys)} keys but {len(sources)} source lists; give one source list per key"
            )
        self.cache_dir = Path(cache_dir)
        self.name = name
        self.keys = [str(k) for k in keys]
        self.sources = [[Path(p) for p in files] for files in sources]
        self.item_shape = tuple(int(d) for d in item_shape)
        self.dtype = np.dtype(dtype)
        self.params = dict(params or {})
        self.array_path = self.cache_dir / f"{name}.npy"
        self.meta_path = self.cache_dir / f"{name}.json"
        self.lock_path = self.cache_dir / f"{name}.lock"
        self._fingerprint: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.keys), *self.item_shape)

    @property
    def fingerprint(self) -> str:
        """sha256 over keys, source stats, item shape, dtype, params and CACHE_VERSION (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(
                self.keys, self.sources, self.item_shape, self.dtype, self.params
            )
        return self._fingerprint

    def open(self) -> np.ndarray | None:
        """The cached array as a read-only memmap if the files on disk match this cache, else None."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint:
            return None
        try:
            array = np.load(self.array_path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if array.shape != self.shape or array.dtype != self.dtype:
            return None
        return array

    def is_valid(self) -> bool:
        return self.open() is not None

    def get_or_build(self, build_item: Callable[[int], np.ndarray], workers: int | None = None) -> np.ndarray:
        """Open the cache, building it first if it is missing or stale; returns a read-only memmap.

        `build_item(i)` decodes item i (keys[i]) and must return an array of exactly `item_shape`
        whose dtype casts to the cache dtype within its kind (bool/uint8 -> uint8 yes, float -> uint8
        no). It runs in a thread pool of `workers` threads (default min(8, cpu count)): decoding is
        C code that releases the GIL. Safe to call from many processes at once: one builds under a
        file lock, the others wait and open the result.
        """
        array = self.open()
        if array is not None:
            return array
        with self._locked():
            array = self.open()  # another process may have built it while we waited
            if array is None:
                self._build(build_item, workers)
                array = self.open()
        if array is None:  # pragma: no cover - only if the files were removed under us
            raise RuntimeError(f"cache {self.array_path} was built but cannot be reopened")
        return array

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        with open(self.lock_path, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process to build cache %s", self.array_path)
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _check_item(self, index: int, item: Any) -> np.ndarray:
        item = np.asarray(item)
        if item.shape != self.item_shape:
            raise DataError(
                self.sources[index][0] if self.sources[index] else None,
                f"cache item {self.keys[index]!r} has shape {item.shape}; cache {self.name!r} expects "
                f"{self.item_shape}",
            )
        if not np.can_cast(item.dtype, self.dtype, casting="same_kind"):
            raise TypeError(
                f"cache item {self.keys[index]!r} has dtype {item.dtype}, which does not cast to the "
                f"cache dtype {self.dtype} without changing kind; convert it in build_item"
            )
        return item

    def _write_items(self, tmp: Path, build_item: Callable[[int], np.ndarray], workers: int | None) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=self.shape)

        def fill(index: int) -> None:
            out[index] = self._check_item(index, build_item(index))

        pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
        try:
            for _ in pool.map(fill, range(len(self.keys))):
                pass
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # at the first failure, stop decoding the rest
        out.flush()

    def _build(self, build_item: Callable[[int], np.ndarray], workers: int | None) -> None:
        # Called with the lock held: no other process is writing, so leftovers of a crash can go.
        self.meta_path.unlink(missing_ok=True)
        for stale in self.cache_dir.glob(f".{self.name}.npy.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = self.cache_dir / f".{self.name}.npy.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        log.info(
            "building cache %s: %d items of %s %s",
            self.array_path,
            len(self.keys),
            self.item_shape,
            self.dtype,
        )
        try:
            self._write_items(tmp, build_item, workers)
            os.replace(tmp, self.array_path)
            meta = {
                "version": CACHE_VERSION,
                "fingerprint": self.fingerprint,
                "shape": list(self.shape),
                "dtype": self.dtype.str,
                "count": len(self.keys),
                "params": self.params,
                "keys": self.keys,
            }
            meta_tmp = self.cache_dir / f".{self.name}.json.tmp-{os.getpid()}"
            meta_tmp.write_text(json.dumps(meta, default=str))
            os.replace(meta_tmp, self.meta_path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("built cache %s in %.1f s", self.array_path, time.perf_counter() - start)


class LazyMemmap:
    """A read-only .npy memmap that pickles as its path and maps the file on first access.

    Put this in a Dataset instead of the memmap itself: a memmap pickles as a full in-memory copy,
    which is what DataLoader does to the Dataset under the "spawn" start method (macOS, Windows,
    multiprocessing_context="spawn"). Rows come back as read-only views; copy before editing in place.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.array[index]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._array = None


def _is_writable_dir(path: Path) -> bool:
    """Whether we may create files in `path` (creating it if needed).

    A folder with no write permission bit for anyone (e.g. a read-only data share) counts as
    read-only even for root, who could write there anyway.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
            return False
        probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def default_cache_dir(data_root: str | Path) -> Path:
    """Where to keep caches for a dataset at `data_root`.

    Order: `$MODELZOO_CACHE_DIR/<hash of data_root>` if that variable is set; else `<data_root>/.cache`
    if the data folder is writable; else `$XDG_CACHE_HOME` (default ~/.cache)
    `/medseg_modelzoo/<hash of data_root>`. The hash keeps two datasets apart.
    """
    root = Path(os.path.abspath(data_root))
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override) / tag
    if root.is_dir() and os.stat(root).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        local = root / ".cache"
        if _is_writable_dir(local):
            return local
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medseg_modelzoo" / tag
