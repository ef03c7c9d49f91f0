"""Fake of `apex/amp/handle.py` (scale_loss).

On entry: the loss times the current scale (and, Ascend, the float-status flag cleared for a dynamic
scale). On exit: the optimizer's post-backward unscales the gradients (into the fp32 masters with O2) and
checks for overflow; after an overflow `update_scale()` halves the scale and the NEXT `optimizer.step()`
is replaced, once, by a skip (`patch_step` / `skip_step` in the real file), which restores the real step.
"""

from __future__ import annotations

import contextlib

import torch

from ._amp_state import _amp_state
from .scaler import LossScaler


@contextlib.contextmanager
def scale_loss(
    loss, optimizers, loss_id: int = 0, model=None, delay_unscale=False, delay_overflow_check=False
):
    amp_state = _amp_state
    if not hasattr(amp_state, "opt_properties"):
        raise RuntimeError(
            "Invoked 'with amp.scale_loss`, but internal Amp state has not been initialized.  "
            "model, optimizer = amp.initialize(model, optimizer, opt_level=...) must be called "
            "before `with amp.scale_loss`."
        )
    if not amp_state.opt_properties.enabled:
        yield loss
        return
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    loss_scaler = amp_state.loss_scalers[loss_id]
    loss_scale = loss_scaler.loss_scale()
    if not delay_unscale:
        for optimizer in optimizers:
            if not optimizer._amp_stash.params_have_scaled_gradients:
                optimizer._prepare_amp_backward()
    if _amp_state.flavour == "ascend" and loss_scaler.dynamic:
        LossScaler.clear_npu_overflow_flag()

    yield loss.float() * loss_scale

    if delay_unscale:
        for optimizer in optimizers:
            optimizer._amp_stash.params_have_scaled_gradients = True
        return
    loss_scaler.clear_overflow_state()
    for optimizer in optimizers:
        optimizer._post_amp_backward(loss_scaler)
        optimizer._amp_stash.params_have_scaled_gradients = False
    should_skip = False if delay_overflow_check else loss_scaler.update_scale()
    if not should_skip:
        return
    for optimizer in optimizers:
        if optimizer._amp_stash.already_patched:
            continue

        def patch_step(opt):
            opt_step = opt.step

            def skip_step(closure=None):
                if closure is not None:
                    raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
                for param in getattr(opt._amp_stash, "all_fp32_from_fp16_params", []):
                    param.grad = None
                opt.step = opt_step
                opt._amp_stash.already_patched = False

            return skip_step

        optimizer.step = patch_step(optimizer)
        optimizer._amp_stash.already_patched = True
