"""Fake `apex.amp` (see `common.fakes.apex`): initialize, scale_loss, state_dict, load_state_dict and
`_amp_state` (whose `loss_scalers[0]._has_overflow` says whether the last backward overflowed)."""

from __future__ import annotations

from ._amp_state import _amp_state, master_params
from .frontend import initialize, load_state_dict, state_dict
from .handle import scale_loss

__all__ = ["_amp_state", "initialize", "load_state_dict", "master_params", "scale_loss", "state_dict"]
