"""Fake of NVIDIA/apex `apex/amp/_amp_state.py`: the state shared by the amp modules.

`_amp_state.flavour` ("ascend" or "nvidia") selects which apex is modelled; the installer sets it.
`_amp_state.half_dtype` is the dtype that O2/O3 cast to in place of float16 (float16 unless the installer
was told otherwise, see `common.fakes.installed_apex`): not an apex attribute.
"""

from __future__ import annotations

import torch


class AmpState:
    def __init__(self, flavour: str = "ascend", half_dtype: torch.dtype = torch.float16) -> None:
        self.flavour = flavour
        self.half_dtype = half_dtype
        self.hard_override = False
        self.allow_incoming_model_not_fp32 = False
        self.verbosity = 1
        self.loss_scalers: list = []


_amp_state = AmpState()


def reset(flavour: str, half_dtype: torch.dtype = torch.float16) -> None:
    """A fresh process with `flavour`'s apex: no initialize() yet."""
    _amp_state.__dict__.clear()
    _amp_state.__init__(flavour, half_dtype)


def half_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes apex treats as its half type: float16, and the stand-in for it when one is set."""
    return tuple(dict.fromkeys((torch.float16, _amp_state.half_dtype)))


def warn_or_err(msg: str) -> None:
    if _amp_state.hard_override:
        print("Warning:  " + msg)
    else:
        raise RuntimeError(msg)


def maybe_print(msg: str, rank0: bool = False) -> None:
    if _amp_state.verbosity > 1:
        print(msg)


def master_params(optimizer: torch.optim.Optimizer):
    for group in optimizer.param_groups:
        yield from group["params"]
