"""Device random generators in checkpoints: only this process's device, any number of visible devices."""

from __future__ import annotations

import torch

from common import checkpoint as ckpt
from common.fakes import installed_torch_npu


def _draw(device: int) -> torch.Tensor:
    return torch.randint(0, 2**30, (4,), generator=torch.npu.default_generators[device])


def test_rng_state_holds_only_the_current_devices_generator():
    with installed_torch_npu(device_count=4):
        torch.npu.set_device(2)
        torch.npu.manual_seed_all(5)
        _draw(2)
        state = ckpt.rng_state()
        assert isinstance(state["npu"], torch.Tensor)
        assert torch.equal(state["npu"], torch.npu.get_rng_state(2))


def test_restore_goes_into_the_current_device_whatever_the_saving_machine_had():
    with installed_torch_npu(device_count=2):
        torch.npu.manual_seed_all(1)
        torch.npu.set_device(0)
        saved = ckpt.rng_state()
        expected = _draw(0)
        untouched = torch.npu.get_rng_state(0)
        torch.npu.set_device(1)  # another rank resuming on its own device
        ckpt.set_rng_state(saved)
        assert torch.equal(_draw(1), expected)
        assert torch.equal(torch.npu.get_rng_state(0), untouched)


def test_a_checkpoint_listing_more_devices_than_are_visible_restores():
    with installed_torch_npu(device_count=8):
        torch.npu.manual_seed_all(3)
        states = torch.npu.get_rng_state_all()  # the list older checkpoints held: every visible device
        expected = _draw(1)
    legacy = {**ckpt.rng_state(), "npu": states}
    with installed_torch_npu(device_count=2):
        torch.npu.set_device(1)
        ckpt.set_rng_state(legacy)  # set_rng_state_all would raise IndexError: 8 states, 2 devices
        assert torch.equal(_draw(1), expected)


def test_without_a_device_the_cpu_generators_still_round_trip():
    torch.manual_seed(7)
    saved = ckpt.rng_state()
    first = torch.rand(3)
    ckpt.set_rng_state({**saved, "npu": torch.zeros(5, dtype=torch.uint8)})  # no NPU here: ignored
    assert torch.equal(torch.rand(3), first)
