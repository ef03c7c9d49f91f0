"""Fake of Ascend/pytorch `torch_npu/npu/random.py`: one generator per device, in `default_generators`.

As the real module, `set_rng_state_all(states)` sets device i from states[i] for every entry, so a list
longer than the visible devices raises IndexError (tuple index out of range).
"""

from __future__ import annotations

import torch

from .._chip import CHIP
from .utils import _lazy_init, current_device, device_count


def _generator(device) -> torch.Generator:
    _lazy_init()
    return CHIP.generators[CHIP.index(device)]


def get_rng_state(device="npu") -> torch.Tensor:
    return _generator(device).get_state()


def set_rng_state(new_state: torch.Tensor, device="npu") -> None:
    _generator(device).set_state(new_state)


def get_rng_state_all() -> list[torch.Tensor]:
    return [get_rng_state(i) for i in range(device_count())]


def set_rng_state_all(new_states) -> None:
    for i, state in enumerate(new_states):
        set_rng_state(state, i)


def manual_seed(seed: int) -> None:
    _generator(current_device()).manual_seed(int(seed))


def manual_seed_all(seed: int) -> None:
    for generator in CHIP.generators:
        generator.manual_seed(int(seed))
