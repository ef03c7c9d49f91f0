"""Fake of `apex/amp/frontend.py`: Properties, the O0..O3 defaults, initialize, state_dict.

The two flavours differ in `initialize`'s signature: Ascend's adds `combine_grad` and
`check_combined_tensors` (and refuses combine_grad=True outside O1/O2, warn_or_err in its Properties);
NVIDIA's lists its keywords explicitly, so any other keyword is a TypeError.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ._amp_state import _amp_state, warn_or_err
from ._initialize import _initialize

OPT_LEVELS = {
    "O0": dict(cast_model_type=torch.float32, patch_torch_functions=False, keep_batchnorm_fp32=None,
               master_weights=False, loss_scale=1.0),
    "O1": dict(cast_model_type=None, patch_torch_functions=True, keep_batchnorm_fp32=None,
               master_weights=None, loss_scale="dynamic"),
    "O2": dict(cast_model_type=torch.float16, patch_torch_functions=False, keep_batchnorm_fp32=True,
               master_weights=True, loss_scale="dynamic"),
    "O3": dict(cast_model_type=torch.float16, patch_torch_functions=False, keep_batchnorm_fp32=False,
               master_weights=False, loss_scale=1.0),
}  # fmt: skip
_ASCEND_OPTIONS = ("combine_grad", "check_combined_tensors")


class Properties:
    def __init__(self) -> None:
        self.__dict__["options"] = {
            "enabled": False,
            "opt_level": None,
            "cast_model_type": None,
            "patch_torch_functions": False,
            "keep_batchnorm_fp32": None,
            "master_weights": None,
            "loss_scale": 1.0,
        }
        if _amp_state.flavour == "ascend":
            self.options.update(combine_grad=None, check_combined_tensors=None)

    def __getattr__(self, name):
        options = self.__dict__["options"]
        if name in options:
            return options[name]
        raise AttributeError(f"'Properties' object has no attribute '{name}'")

    def __setattr__(self, name, value):
        if name not in self.options:
            super().__setattr__(name, value)
        elif name == "loss_scale":
            self.options[name] = value if value == "dynamic" else float(value)
        elif name in _ASCEND_OPTIONS:
            if self.opt_level not in ("O1", "O2") and value:
                warn_or_err(
                    "Currently, combine_grad=True or check_combined_tensors=True should only be set "
                    "by selecting opt_level='O1' or opt_level='O2'."
                )
            self.options[name] = value
        else:
            self.options[name] = value


def initialize(
    models,
    optimizers=None,
    enabled=True,
    opt_level="O1",
    cast_model_type=None,
    patch_torch_functions=None,
    keep_batchnorm_fp32=None,
    master_weights=None,
    loss_scale=None,
    cast_model_outputs=None,
    num_losses=1,
    verbosity=1,
    min_loss_scale=None,
    max_loss_scale=2.0**24,
    **ascend_options,
):
    """apex.amp.initialize; `ascend_options` stands for Ascend's two extra keywords (see the module doc)."""
    for key in ascend_options:
        if _amp_state.flavour != "ascend" or key not in _ASCEND_OPTIONS:
            raise TypeError(f"initialize() got an unexpected keyword argument '{key}'")
    amp_state = _amp_state
    amp_state.opt_properties = Properties()
    amp_state.verbosity = verbosity
    if not enabled:
        return models if optimizers is None else (models, optimizers)
    if opt_level not in OPT_LEVELS:
        raise RuntimeError(
            f"Unexpected optimization level {opt_level}. Options are 'O0', 'O1', 'O2', 'O3'.  Note that in "
            "`O0`, `O1`, etc., the prefix O is the letter O, not the number zero."
        )
    properties = amp_state.opt_properties
    properties.enabled = True
    properties.opt_level = opt_level
    for key, value in OPT_LEVELS[opt_level].items():
        properties.options[key] = value
    amp_state.min_loss_scale = min_loss_scale
    amp_state.max_loss_scale = max_loss_scale
    overrides = dict(
        cast_model_type=cast_model_type,
        patch_torch_functions=patch_torch_functions,
        keep_batchnorm_fp32=keep_batchnorm_fp32,
        master_weights=master_weights,
        loss_scale=loss_scale,
        **ascend_options,
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(properties, key, value)
    return _initialize(models, optimizers, properties, num_losses, cast_model_outputs)


def state_dict(destination=None) -> OrderedDict:
    destination = OrderedDict() if destination is None else destination
    for idx, loss_scaler in enumerate(_amp_state.loss_scalers):
        destination[f"loss_scaler{idx}"] = {
            "loss_scale": loss_scaler.loss_scale(),
            "unskipped": loss_scaler._unskipped,
        }
    return destination


def load_state_dict(state_dict) -> None:
    scalers = _amp_state.loss_scalers
    unexpected = [key for key in state_dict if "loss_scaler" not in key]
    for idx, key in enumerate(k for k in state_dict if "loss_scaler" in k):
        if idx >= len(scalers):
            break
        scalers[idx]._loss_scale = state_dict[key]["loss_scale"]
        scalers[idx]._unskipped = state_dict[key]["unskipped"]
    if unexpected:
        raise RuntimeError(
            "Error(s) in loading state_dict. Unexpected key(s) in state_dict: "
            + ", ".join(f'"{k}"' for k in unexpected)
            + ". "
        )
