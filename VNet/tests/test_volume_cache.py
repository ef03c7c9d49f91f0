"""The memory-mapped volume cache (written once, reused, rebuilt when a source changes, safe under racing
writers) and the volume-grouped patch order (grouped, reproducible across workers, ranks and resume)."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time

import dataset
import numpy as np
import pytest
import torch
import volume_cache
from dataset import (
    CaseReader,
    PatchDataset,
    VolumeGroupedSampler,
    _foreground_voxel,
    check_cases,
    default_volume_cache_dir,
    patch_loader,
    resolve_data,
)
from intensity import normalize_ct, zscore
from normalize_dataset import OUT_CT_DIR, OUT_MASK_DIR
from volume_cache import foreground_per_slice

from common.cache import CACHE_DIR_ENV
from common.distributed import DistContext
from common.errors import ConfigError, DataError
from common.imageio import read_volume, write_volume

SHAPE = (16, 40, 36)


@pytest.fixture(autouse=True)
def _volume_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "volume_cache"))


def _lungs(rng: np.random.Generator, shape=SHAPE) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cy, cx = rng.integers(12, shape[1] - 12), rng.integers(10, shape[2] - 10)
    return (((y - cy) / 9.0) ** 2 + ((x - cx) / 7.0) ** 2 + ((z - shape[0] / 2) / 6.0) ** 2 < 1).astype(
        np.uint8
    )


def write_luna(root, n=3, hu=False, shape=SHAPE):
    """A normalised LUNA16 tree: float32 scaled CT (ours) or int16 HU (the ModelZoo script's), 0/1 masks."""
    rng = np.random.default_rng(1)
    for i in range(n):
        values = rng.normal(-600, 300, shape)
        image = values.astype(np.int16) if hu else normalize_ct(values)
        write_volume(root / OUT_CT_DIR / f"case{i}.mhd", image, spacing=(2.5, 2.5, 2.5), compress=False)
        write_volume(root / OUT_MASK_DIR / f"case{i}.mhd", _lungs(rng, shape), spacing=(2.5, 2.5, 2.5))
    return resolve_data(root, log=lambda _: None)


def write_msd(root, n=3, shape=SHAPE):
    rng = np.random.default_rng(2)
    for i in range(n):
        write_volume(root / "imagesTr" / f"c{i}.nii.gz", rng.normal(300, 80, shape).astype(np.float32))
        write_volume(root / "labelsTr" / f"c{i}.nii.gz", 2 * _lungs(rng, shape))
    return resolve_data(root, log=lambda _: None)


def _count_decodes(monkeypatch, log_path, delay=0.0):
    """Append one line to `log_path` per case decoded (in any process forked after this)."""
    decode = dataset.decode_case

    def counted(spec, index):
        with open(log_path, "a") as fh:
            fh.write(f"{os.getpid()} {index}\n")
        time.sleep(delay)
        return decode(spec, index)

    monkeypatch.setattr(dataset, "decode_case", counted)
    return lambda: len(log_path.read_text().splitlines()) if log_path.exists() else 0


@pytest.mark.parametrize("tree", ["luna_float32", "luna_int16_hu", "msd_zscore"])
def test_cached_volumes_equal_the_decoded_ones(tmp_path, tree):
    spec = {
        "luna_float32": lambda: write_luna(tmp_path),
        "luna_int16_hu": lambda: write_luna(tmp_path, hu=True),
        "msd_zscore": lambda: write_msd(tmp_path),
    }[tree]()
    cached, decoded = CaseReader(spec), CaseReader(spec, disk_cache=False)
    for index, (_, image_path, mask_path) in enumerate(spec.cases):
        image, target, spacing = cached(index)
        raw, labels = read_volume(image_path).array, read_volume(mask_path).array
        expected = (
            zscore(raw) if tree == "msd_zscore" else normalize_ct(raw) if tree == "luna_int16_hu" else raw
        )
        assert image.dtype == np.float32 and target.dtype == np.uint8 and not image.flags.writeable
        assert np.array_equal(image, expected) and np.array_equal(target, (labels > 0).astype(np.uint8))
        old = decoded(index)
        assert np.array_equal(image, old[0]) and np.array_equal(target, old[1]) and spacing == old[2]
    folder = default_volume_cache_dir(spec)
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(
        f"{case_id}.{kind}.npy" for case_id in spec.ids for kind in ("image", "mask")
    )


def test_cache_is_written_once_then_opened_without_decoding(tmp_path, monkeypatch):
    spec = write_luna(tmp_path)
    decodes = _count_decodes(monkeypatch, tmp_path / "decodes.log")
    assert check_cases(spec, skip_bad=False) == [] and decodes() == 3
    first = CaseReader(spec)(1)
    assert decodes() == 3  # the check cached every case
    meta = json.loads((default_volume_cache_dir(spec) / "case1.json").read_text())
    raw = tmp_path / OUT_CT_DIR / "case1.raw"
    assert {"path": str(raw), "size": raw.stat().st_size, "mtime_ns": raw.stat().st_mtime_ns} in meta[
        "sources"
    ]
    assert meta["image"] == {"shape": list(SHAPE), "dtype": "<f4"} and meta["mask"]["dtype"] == "|u1"

    def no_decoding(*_):
        raise AssertionError("a cached case was decoded again")

    monkeypatch.setattr(dataset, "read_finite", no_decoding)
    monkeypatch.setattr(dataset, "read_volume", no_decoding)
    again = CaseReader(spec)(1)
    assert all(np.array_equal(a, b) for a, b in zip(first[:2], again[:2])) and first[2] == again[2]
    assert check_cases(spec, skip_bad=False) == []  # a second start checks nothing again


@pytest.mark.parametrize("changed", ["header_and_data", "data_file_only"])
def test_a_changed_source_is_cached_again(tmp_path, monkeypatch, changed):
    spec = write_luna(tmp_path)
    decodes = _count_decodes(monkeypatch, tmp_path / "decodes.log")
    before = np.array(CaseReader(spec)(0)[0])
    header, raw = tmp_path / OUT_CT_DIR / "case0.mhd", tmp_path / OUT_CT_DIR / "case0.raw"
    if changed == "header_and_data":
        write_volume(header, before + 1.0, spacing=(2.5, 2.5, 2.5), compress=False)
    else:  # same size, header untouched: only the data file's mtime tells
        raw.write_bytes((before + 1.0).astype("<f4").tobytes())
    stamp = raw.stat().st_mtime_ns + 2_000_000_000
    os.utime(raw, ns=(stamp, stamp))
    after = CaseReader(spec)(0)[0]
    assert decodes() == 2 and np.allclose(after, before + 1.0)
    assert CaseReader(spec)(0)[0][0, 0, 0] == after[0, 0, 0] and decodes() == 2


@pytest.mark.parametrize("locked", [True, False])
def test_racing_builders_leave_one_valid_cache(tmp_path, monkeypatch, locked):
    spec = write_luna(tmp_path, n=1)
    expected = CaseReader(spec, disk_cache=False)(0)
    decodes = _count_decodes(monkeypatch, tmp_path / "decodes.log", delay=0.3)
    if not locked:  # without the lock both decode and write; the renames still leave whole files
        monkeypatch.setattr(volume_cache, "file_lock", lambda _: contextlib.nullcontext())
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)

    def build() -> None:
        barrier.wait()
        image, target, _ = CaseReader(spec)(0)
        os._exit(0 if np.array_equal(image, expected[0]) and np.array_equal(target, expected[1]) else 3)

    children = [context.Process(target=build) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert decodes() == 1 if locked else decodes() >= 2
    folder = default_volume_cache_dir(spec)
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name], "temporary files left behind"
    monkeypatch.setattr(dataset, "decode_case", lambda *_: pytest.fail("the raced cache was not valid"))
    image, target, _ = CaseReader(spec)(0)
    assert np.array_equal(image, expected[0]) and np.array_equal(target, expected[1])


def test_leftovers_of_a_killed_writer_are_rebuilt(tmp_path):
    spec = write_luna(tmp_path, n=1)
    expected = CaseReader(spec, disk_cache=False)(0)[0]
    CaseReader(spec)(0)
    folder = default_volume_cache_dir(spec)
    (folder / ".case0.image.npy.tmp-1-dead").write_bytes(b"half")
    image_file = folder / "case0.image.npy"
    image_file.write_bytes(image_file.read_bytes()[:1000])  # a cut file under a valid manifest
    assert np.array_equal(CaseReader(spec)(0)[0], expected)
    (folder / "case0.json").unlink()  # killed before the manifest: whatever arrays exist are not trusted
    np.save(image_file, np.zeros(SHAPE, np.float32))
    assert np.array_equal(CaseReader(spec)(0)[0], expected)
    assert not list(folder.glob(".*tmp-*"))


def test_a_cache_that_cannot_be_written_falls_back_to_decoding(tmp_path, monkeypatch, capsys):
    spec = write_luna(tmp_path)

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(volume_cache.np, "save", disk_full)
    expected = CaseReader(spec, disk_cache=False)(2)
    image, target, _ = CaseReader(spec)(2)
    assert np.array_equal(image, expected[0]) and np.array_equal(target, expected[1])
    assert "cannot write the volume cache" in capsys.readouterr().err
    assert check_cases(spec, skip_bad=False) == []
    raw = tmp_path / OUT_CT_DIR / "case1.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match="case1.raw"):
        check_cases(spec, skip_bad=False)


def test_foreground_draw_from_slice_counts_equals_a_full_scan(tmp_path):
    rng = np.random.default_rng(3)
    for density in (0.0, 0.002, 0.3):
        target = (rng.random(SHAPE) < density).astype(np.uint8)
        counts = np.cumsum(foreground_per_slice(target))
        for seed in range(20):
            fast = _foreground_voxel(target, counts, np.random.default_rng(seed))
            full = _foreground_voxel(target, None, np.random.default_rng(seed))
            assert fast == full and (full is None) == (density == 0.0)
    spec = write_luna(tmp_path)
    kwargs = dict(patch_size=(16, 16, 16), samples_per_volume=4, foreground_prob=1.0, flip=True, seed=5)
    mapped = PatchDataset(CaseReader(spec), [0, 1, 2], **kwargs)
    decoded = PatchDataset(CaseReader(spec, disk_cache=False), [0, 1, 2], **kwargs)
    assert CaseReader(spec).case(0).foreground is not None
    for key in [(0, 0), (0, 5), (2, 11)]:
        assert all(torch.equal(a, b) for a, b in zip(mapped[key], decoded[key]))
        assert mapped[key][1].sum() > 0


def test_patch_order_groups_volumes_and_shuffles_them_each_epoch(tmp_path):
    spec = write_msd(tmp_path, n=5)
    data = PatchDataset(CaseReader(spec), [0, 1, 2, 3, 4], (16, 16, 16), samples_per_volume=3)
    sampler = VolumeGroupedSampler(data)
    orders = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        cases = [data.locate(*key)[0] for key in sampler]
        runs = [cases[i : i + 3] for i in range(0, 15, 3)]
        assert all(len(set(run)) == 1 for run in runs) and sorted(run[0] for run in runs) == [0, 1, 2, 3, 4]
        assert [data.locate(*key)[1] for key in sampler] == [0, 1, 2] * 5
        orders.append([run[0] for run in runs])
    assert orders[0] != orders[1]
    shares = [VolumeGroupedSampler(data, 2, rank) for rank in (0, 1)]
    for share in shares:
        share.set_epoch(1)
    assert [key for share in shares for key in share] == list(sampler)[:14]  # 15 // 2 each, in order


def test_batches_are_identical_across_worker_counts_and_after_a_resume(tmp_path):
    spec = write_msd(tmp_path, n=4)
    check_cases(spec, skip_bad=False)

    def batches(workers: int, epochs: list[int]) -> list[list[torch.Tensor]]:
        data = PatchDataset(CaseReader(spec), [0, 1, 2, 3], (16, 16, 16), 3, flip=True, seed=7)
        loader = patch_loader(data, 4, DistContext(), workers=workers, seed=7)
        seen = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            seen = [torch.cat(batch) for batch in loader]
        return seen

    single = batches(0, [0, 1])
    assert len(single) == 3
    data = PatchDataset(CaseReader(spec), [0, 1, 2, 3], (16, 16, 16), 3)
    assert len(patch_loader(data, 3, DistContext(rank=1, world_size=2), workers=0)) == 2  # 6 patches per rank
    with pytest.raises(ConfigError, match="fewer than one batch"):
        patch_loader(data, 7, DistContext(rank=1, world_size=2), workers=0)
    for other in (batches(2, [0, 1]), batches(0, [1]), batches(2, [1])):
        assert all(torch.equal(a, b) for a, b in zip(single, other))


def test_normalisation_writes_the_cache_that_training_opens(tmp_path, monkeypatch):
    import normalize_dataset

    from common.demo_data import write_luna16

    root = write_luna16(tmp_path / "luna", n=2, shape=(16, 32, 32))
    assert normalize_dataset.main([str(root), "4", "16", "16", "16", "--workers", "1", "--no_cache"]) == 0
    spec = resolve_data(root, log=lambda _: None)
    assert not default_volume_cache_dir(spec).exists()
    assert normalize_dataset.main([str(root), "4", "16", "16", "16", "--workers", "1"]) == 0
    monkeypatch.setattr(dataset, "decode_case", lambda *_: pytest.fail("a prepared case was decoded again"))
    assert check_cases(spec, skip_bad=False) == [] and CaseReader(spec)(1)[0].shape == (16, 16, 16)
