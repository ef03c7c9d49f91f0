"""DataLoaders that shard across ranks, seed their workers and never drop or repeat a validation sample."""

from __future__ import annotations

import os
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from common.distributed import DistContext
from common.errors import ConfigError


class SeededDataset(Dataset):
    """A dataset whose augmentation draws from a generator seeded by (seed, epoch, index).

    The training sampler hands out `(epoch, index)` keys, so a sample's augmentation depends on neither
    the worker that loads it, nor the number of workers or ranks, nor whether the run was resumed: an
    interrupted run continues with exactly the batches it would have seen. Subclasses implement
    `load(index, rng)`; `rng` is None when the sample should not be augmented (evaluation).
    """

    seed: int = 0

    def load(self, index: int, rng: np.random.Generator | None):
        raise NotImplementedError

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
            return self.load(index, np.random.default_rng([self.seed, epoch, index]))
        return self.load(key, None)


class EpochKeyedSampler(DistributedSampler):
    """DistributedSampler that yields `(epoch, index)` keys for a `SeededDataset`."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


class ShardedSampler(Sampler[int]):
    """Indices rank, rank + world, ... : every sample on exactly one rank, none padded or repeated.

    DistributedSampler pads the last shard with repeats so all ranks get the same count; summed metric
    counts would then count those images twice. Sums all-reduced over these shards equal one process's.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """numpy and random in each worker follow the torch seed the DataLoader gave it (augmentation)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The ModelZoo scripts give the global batch; each rank takes its share."""
    if global_batch < 1:
        raise ConfigError(f"batch size must be at least 1, got {global_batch}")
    if global_batch % world_size:
        raise ConfigError(f"global batch size {global_batch} is not divisible by {world_size} ranks")
    return global_batch // world_size


def auto_workers(accelerator: bool, ranks_on_node: int, cores: int | None = None) -> int:
    """Loader processes per rank when `--workers` is not given, from the cores each rank can use.

    With an accelerator the host's cores only feed it: all but one per rank load (at most 8, beyond which
    start-up and memory grow faster than throughput). On a CPU the training threads need the cores: one
    loader process per two cores, at most 2, so decoding overlaps the step without starving it.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = max(1, cores // max(1, ranks_on_node))
    if accelerator:
        return max(1, min(8, per_rank - 1))
    return min(2, per_rank // 2)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    ctx: DistContext,
    *,
    train: bool,
    workers: int | None = None,
    seed: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """A loader for one rank.

    Training: DistributedSampler (seeded, reshuffled by `set_epoch`; keyed by epoch for a SeededDataset),
    full batches only. Evaluation: ShardedSampler in order. Workers persist across epochs (start-up costs
    seconds per epoch otherwise); augmentation seeds come from the keys, not from worker state.
    `workers` None: `auto_workers` for this rank's device and node. `pin_memory` None: pinned when the
    group's device is an accelerator, so the step's `non_blocking` copies really overlap (from pageable
    memory CUDA and NPU copy synchronously).
    """
    accelerator = _on_accelerator(ctx)
    if workers is None:
        workers = auto_workers(accelerator, ctx.local_world_size)
    if pin_memory is None:
        pin_memory = accelerator
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if len(dataset) == 0:
        raise ConfigError("the dataset split is empty: nothing to load")
    if train:
        sampler_class = EpochKeyedSampler if isinstance(dataset, SeededDataset) else DistributedSampler
        sampler: Sampler = sampler_class(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
        )
        drop_last = True if drop_last is None else drop_last
        if drop_last and len(sampler) < batch_size:
            raise ConfigError(
                f"the training split has {len(dataset)} samples, {len(sampler)} per rank: fewer than one batch "
                f"of {batch_size}; lower the batch size or add data"
            )
    else:
        sampler = ShardedSampler(len(dataset), ctx.rank, ctx.world_size)
        drop_last = False
    return _data_loader(dataset, batch_size, sampler, workers, pin_memory, drop_last, seed)


def build_statistics_loader(
    dataset: Dataset, batch_size: int, ctx: DistContext, *, workers: int | None = 0, seed: int = 0
) -> DataLoader:
    """Batches for recomputing BatchNorm statistics (`common.precise_bn`): composed like training batches
    (shuffled, full batches of the training size, an equal count on every rank) but of plain indices, so
    a `SeededDataset` leaves them unaugmented. The order is fixed by `seed`: every validation sees the
    same batches. `workers` None: `auto_workers`.

    Shuffled, not in file order: neighbouring ids often share a source (ISIC's ids run by contributing
    clinic, DSB's by imaging type), so in-order batches are more alike than training batches and their
    average within-batch variance underestimates the variance BatchNorm normalised by in training.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    accelerator = _on_accelerator(ctx)
    if workers is None:
        workers = auto_workers(accelerator, ctx.local_world_size)
    return _data_loader(dataset, batch_size, sampler, workers, accelerator, True, seed)


def _on_accelerator(ctx: DistContext) -> bool:
    return ctx.device is not None and torch.device(ctx.device).type != "cpu"


def _data_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    pin_memory: bool,
    drop_last: bool,
    seed: int,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
