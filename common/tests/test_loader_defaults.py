"""Loader defaults chosen from the device and the cores each rank can use."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from common.distributed import DistContext
from common.loader import auto_workers, build_loader


def test_workers_follow_the_cores_per_rank_and_the_device():
    assert auto_workers(accelerator=True, ranks_on_node=8, cores=96) == 8  # capped
    assert auto_workers(accelerator=True, ranks_on_node=8, cores=32) == 3  # 4 cores per rank, one computes
    assert auto_workers(accelerator=True, ranks_on_node=8, cores=8) == 1  # at least one feeds the device
    assert auto_workers(accelerator=False, ranks_on_node=1, cores=2) == 1  # CPU training keeps its cores
    assert auto_workers(accelerator=False, ranks_on_node=2, cores=2) == 0
    assert auto_workers(accelerator=False, ranks_on_node=1, cores=64) == 2


def test_loader_pins_memory_only_for_an_accelerator_group():
    data = TensorDataset(torch.zeros(4, 1))
    cpu = build_loader(data, 2, DistContext(device=torch.device("cpu")), train=False, workers=0)
    assert not cpu.pin_memory
    # A loader is built without touching the device, so an accelerator group can be described on a CPU.
    npu = build_loader(data, 2, DistContext(device=torch.device("meta")), train=False, workers=0)
    assert npu.pin_memory


def test_unset_workers_are_chosen_for_the_node(monkeypatch):
    monkeypatch.setattr("common.loader.auto_workers", lambda accelerator, ranks: 3 if ranks == 4 else -1)
    loader = build_loader(TensorDataset(torch.zeros(4, 1)), 2, DistContext(local_world_size=4), train=False)
    assert loader.num_workers == 3
