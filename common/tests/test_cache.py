"""common.cache: build once, reopen without rebuilding, rebuild on any input change, one builder at a time."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common.cache import CACHE_DIR_ENV, DecodedArrayCache, LazyMemmap, default_cache_dir
from common.errors import DataError

ITEM = (4, 5, 3)


def _sources(folder: Path, n: int = 6) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.raw"
        path.write_bytes(bytes([i]) * (10 + i))
        paths.append(path)
    return paths


def _item(i: int) -> np.ndarray:
    return np.full(ITEM, i * 7 % 256, dtype=np.uint8) + np.arange(3, dtype=np.uint8)


class Counter:
    """A build_item that counts its calls (thread-safe: the cache calls it from a pool)."""

    def __init__(self):
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, i: int) -> np.ndarray:
        with self._lock:
            self.calls += 1
        return _item(i)


def _cache(tmp_path: Path, paths: list[Path], params: dict | None = None, **kw) -> DecodedArrayCache:
    keys = [p.stem for p in paths]
    return DecodedArrayCache(
        tmp_path / "cache", "train_4x5", keys, [[p] for p in paths], ITEM, params=params or {"size": 4}, **kw
    )


def test_build_then_reopen_without_rebuilding(tmp_path):
    paths = _sources(tmp_path / "data")
    build = Counter()
    first = _cache(tmp_path, paths).get_or_build(build, workers=3)
    assert build.calls == len(paths)
    assert isinstance(first, np.memmap) and not first.flags.writeable
    assert first.shape == (len(paths), *ITEM) and first.dtype == np.uint8
    assert all(np.array_equal(first[i], _item(i)) for i in range(len(paths)))

    again = Counter()
    cache = _cache(tmp_path, paths)  # a new run: fresh object, same inputs
    assert cache.is_valid()
    second = cache.get_or_build(again)
    assert again.calls == 0 and np.array_equal(second, first)
    assert np.array_equal(np.load(cache.array_path, mmap_mode="r"), first)  # a plain .npy

    meta = json.loads(cache.meta_path.read_text())
    assert meta["count"] == len(paths) and meta["shape"] == [len(paths), *ITEM]
    assert meta["keys"] == [p.stem for p in paths] and meta["fingerprint"] == cache.fingerprint


def test_rebuild_after_source_mtime_or_size_change(tmp_path):
    paths = _sources(tmp_path / "data")
    _cache(tmp_path, paths).get_or_build(Counter())

    stat = paths[2].stat()
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    build = Counter()
    _cache(tmp_path, paths).get_or_build(build)
    assert build.calls == len(paths)

    paths[4].write_bytes(paths[4].read_bytes() + b"more")
    stat4 = paths[4].stat()
    assert _cache(tmp_path, paths).is_valid() is False
    build = Counter()
    _cache(tmp_path, paths).get_or_build(build)
    assert build.calls == len(paths) and paths[4].stat() == stat4


def test_rebuild_after_params_keys_or_shape_change(tmp_path):
    paths = _sources(tmp_path / "data")
    _cache(tmp_path, paths, params={"size": 4, "resample": "bilinear"}).get_or_build(Counter())
    assert _cache(tmp_path, paths, params={"size": 4, "resample": "bilinear"}).is_valid()
    assert not _cache(tmp_path, paths, params={"size": 4, "resample": "nearest"}).is_valid()
    assert not _cache(tmp_path, paths[::-1], params={"size": 4, "resample": "bilinear"}).is_valid()
    build = Counter()
    _cache(tmp_path, paths, params={"size": 8, "resample": "bilinear"}).get_or_build(build)
    assert build.calls == len(paths)


def test_wrong_item_shape_names_the_key_and_leaves_no_valid_cache(tmp_path):
    paths = _sources(tmp_path / "data")
    cache = _cache(tmp_path, paths)

    def bad(i):
        return np.zeros((4, 6, 3), np.uint8) if i == 3 else _item(i)

    with pytest.raises(DataError, match="'img_3' has shape \\(4, 6, 3\\)") as info:
        cache.get_or_build(bad, workers=2)
    assert info.value.path == paths[3]
    assert not cache.meta_path.exists() and not cache.is_valid()
    assert not list(cache.cache_dir.glob(".*tmp*"))  # the half-built temp file was removed
    build = Counter()
    assert np.array_equal(_cache(tmp_path, paths).get_or_build(build)[3], _item(3))
    assert build.calls == len(paths)


def test_dtype_that_changes_kind_is_refused(tmp_path):
    paths = _sources(tmp_path / "data", 2)
    with pytest.raises(TypeError, match="img_0"):
        _cache(tmp_path, paths).get_or_build(lambda i: np.zeros(ITEM, np.float32))
    bools = _cache(tmp_path, paths).get_or_build(lambda i: np.ones(ITEM, bool))
    assert bools.dtype == np.uint8 and bools.min() == 1


def test_missing_source_is_a_data_error(tmp_path):
    paths = _sources(tmp_path / "data", 3)
    paths[1].unlink()
    with pytest.raises(DataError, match="img_1"):
        _cache(tmp_path, paths).get_or_build(Counter())


def test_crash_leftovers_do_not_count_as_valid(tmp_path):
    paths = _sources(tmp_path / "data")
    cache = _cache(tmp_path, paths)
    cache.get_or_build(Counter())
    # A crash mid-build: the old header was already removed, a temp file and a stale .npy remain.
    cache.meta_path.unlink()
    stale = cache.cache_dir / f".{cache.name}.npy.tmp-99999-deadbeef"
    stale.write_bytes(b"half written")
    assert not _cache(tmp_path, paths).is_valid()
    build = Counter()
    rebuilt = _cache(tmp_path, paths).get_or_build(build)
    assert build.calls == len(paths) and not stale.exists()
    assert np.array_equal(rebuilt[5], _item(5))

    # A header whose array file is damaged is not trusted either.
    cache.array_path.write_bytes(b"\x93NUMPY garbage")
    build = Counter()
    _cache(tmp_path, paths).get_or_build(build)
    assert build.calls == len(paths)


def test_crash_in_build_item_then_clean_rebuild(tmp_path):
    paths = _sources(tmp_path / "data")

    def dies(i):
        if i == 4:
            raise RuntimeError("decoder crashed")
        return _item(i)

    with pytest.raises(RuntimeError, match="decoder crashed"):
        _cache(tmp_path, paths).get_or_build(dies, workers=1)
    assert not _cache(tmp_path, paths).is_valid()
    build = Counter()
    _cache(tmp_path, paths).get_or_build(build)
    assert build.calls == len(paths)


def test_empty_split(tmp_path):
    arr = DecodedArrayCache(tmp_path / "c", "empty", [], [], ITEM).get_or_build(Counter())
    assert arr.shape == (0, *ITEM)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name"):
        DecodedArrayCache(tmp_path, "../escape", [], [], ITEM)
    with pytest.raises(ValueError, match="source"):
        DecodedArrayCache(tmp_path, "ok", ["a"], [], ITEM)


# ----------------------------------------------------------------------------------------------- two processes


def _build_in_process(cache_dir: str, sources: list[str], log_path: str, barrier, out_path: str) -> None:
    """Spawned child: wait for the sibling, then race for the cache; log every build_item call."""

    def build(i: int) -> np.ndarray:
        with open(log_path, "a") as log:
            log.write(f"{os.getpid()} {i}\n")
        time.sleep(0.03)  # keep the build long enough for the sibling to arrive at the lock
        return _item(i)

    cache = DecodedArrayCache(
        cache_dir, "shared", [Path(s).stem for s in sources], [[s] for s in sources], ITEM, params={"size": 4}
    )
    barrier.wait(timeout=60)
    array = cache.get_or_build(build, workers=2)
    np.save(out_path, np.asarray(array))


def test_two_processes_build_once_and_read_identical_arrays(tmp_path):
    paths = [str(p) for p in _sources(tmp_path / "data", 8)]
    log_path = tmp_path / "builds.log"
    log_path.touch()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(
            target=_build_in_process,
            args=(str(tmp_path / "cache"), paths, str(log_path), barrier, str(tmp_path / f"out{k}.npy")),
        )
        for k in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]

    calls = log_path.read_text().split("\n")[:-1]
    builders = {line.split()[0] for line in calls}
    assert len(calls) == len(paths) and len(builders) == 1, calls
    a, b = np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy")
    assert np.array_equal(a, b) and np.array_equal(a[7], _item(7))


# ----------------------------------------------------------------------------------------------- helpers


def test_lazy_memmap_pickles_as_path(tmp_path):
    data = np.arange(100_000, dtype=np.uint8).reshape(100, 1000)
    np.save(tmp_path / "big.npy", data)
    lazy = LazyMemmap(tmp_path / "big.npy")
    assert len(lazy) == 100 and lazy.shape == (100, 1000) and lazy.dtype == np.uint8
    blob = pickle.dumps(lazy)
    assert len(blob) < 1000  # a memmap itself would pickle its 100 kB of data
    clone = pickle.loads(blob)
    assert np.array_equal(clone[42], data[42]) and not clone[42].flags.writeable


def test_default_cache_dir_choices(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    writable = tmp_path / "data_rw"
    writable.mkdir()
    assert default_cache_dir(writable) == writable / ".cache"

    readonly = tmp_path / "data_ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        fallback = default_cache_dir(readonly)
    finally:
        readonly.chmod(0o755)
    assert fallback.parent == tmp_path / "xdg" / "medseg_modelzoo" and len(fallback.name) == 16
    assert not (readonly / ".cache").exists()
    assert default_cache_dir(tmp_path / "other_ro") != fallback  # one folder per dataset

    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "override"))
    assert default_cache_dir(writable).parent == tmp_path / "override"
