"""Fake of `apex/amp/_process_optimizer.py`: what amp.initialize does to an optimizer.

With fp32 master weights (O2's default) the optimizer's fp16 parameters are swapped for fp32 master
copies, `step` copies the masters back into the model after stepping, and `zero_grad` is replaced by a
function of NO arguments (NVIDIA/apex `_process_optimizer`: `def new_zero_grad(self)`; Ascend/apex
patch/npu.patch: `new_zero_grad_with_master_weights(self)` / `new_zero_grad_accelerate_with_master_weights
(self)`), so `optimizer.zero_grad(set_to_none=True)` raises TypeError. Ascend's apex also replaces
`zero_grad` by `new_zero_grad_accelerate_no_master_weights(self)` without master weights when
combine_grad is set (O1). A second initialize of the same optimizer is a RuntimeError.
"""

from __future__ import annotations

import types

import torch

from ._amp_state import _amp_state, half_dtypes


class AmpOptimizerState:
    pass


def _chip_device() -> torch.device | None:
    if _amp_state.flavour != "ascend":
        return None
    from ...torch_npu._chip import CHIP

    return CHIP.tensor_device


def _check_param(param: torch.Tensor) -> None:
    device = _chip_device()
    on_device = param.is_cuda if device is None else param.device.type == device.type
    if not on_device or param.dtype not in (*half_dtypes(), torch.float32):
        kind = "npu" if _amp_state.flavour == "ascend" else "cuda"
        raise TypeError(
            f"Optimizer's parameters must be either torch.{kind}.FloatTensor or torch.{kind}.HalfTensor. "
            f"Received {param.type()} on {param.device}"
        )


def lazy_init_with_master_weights(self) -> None:
    stash = self._amp_stash
    stash.all_fp16_params, stash.all_fp32_from_fp16_params, stash.all_fp32_from_fp32_params = [], [], []
    for group in self.param_groups:
        for i, param in enumerate(group["params"]):
            if not param.requires_grad:
                continue
            _check_param(param)
            if param.dtype in half_dtypes():
                master = param.detach().clone().float()
                master.requires_grad = True
                group["params"][i] = master
                stash.all_fp16_params.append(param)
                stash.all_fp32_from_fp16_params.append(master)
                if param in self.state:
                    self.state[master] = self.state.pop(param)
            else:
                stash.all_fp32_from_fp32_params.append(param)
    stash.all_fp32_from_fp32_grad_stash = [None] * len(stash.all_fp32_from_fp32_params)
    for param in stash.all_fp32_from_fp16_params + stash.all_fp32_from_fp32_params:
        param.grad = None
    self.load_state_dict(self.state_dict())


def lazy_init_no_master_weights(self) -> None:
    stash = self._amp_stash
    stash.all_params = []
    for group in self.param_groups:
        for param in group["params"]:
            _check_param(param)
            stash.all_params.append(param)
    stash.all_grad_stash = [None] * len(stash.all_params)


def _amp_lazy_init(self) -> None:
    stash = self._amp_stash
    if not stash.lazy_init_called:
        self._lazy_init_maybe_master_weights()
        stash.lazy_init_called = True


def _master_params_to_model_params(self) -> None:
    stash = self._amp_stash
    for model, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
        model.data.copy_(master.data)


def prepare_backward_with_master_weights(self) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    for i, param in enumerate(stash.all_fp32_from_fp32_params):
        stash.all_fp32_from_fp32_grad_stash[i] = param.grad
        param.grad = None


def post_backward_with_master_weights(self, scaler) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    model_grads, master_grads = [], []
    for model, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
        if model.grad is None:
            continue
        if master.grad is None:
            master.grad = torch.empty_like(master)
        model_grads.append(model.grad)
        master_grads.append(master.grad)
    scaler.unscale(model_grads, master_grads, scaler.loss_scale())
    _post_backward_models_are_masters(
        scaler, stash.all_fp32_from_fp32_params, stash.all_fp32_from_fp32_grad_stash
    )


def prepare_backward_no_master_weights(self) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    for i, param in enumerate(stash.all_params):
        stash.all_grad_stash[i] = param.grad
        param.grad = None


def post_backward_no_master_weights(self, scaler) -> None:
    stash = self._amp_stash
    self._amp_lazy_init()
    _post_backward_models_are_masters(scaler, stash.all_params, stash.all_grad_stash)


def _post_backward_models_are_masters(scaler, params, stashed_grads) -> None:
    grads = []
    for i, param in enumerate(params):
        stashed = stashed_grads[i]
        if param.grad is None:
            param.grad = stashed
        elif stashed is not None:
            scaler.unscale([param.grad], [param.grad], None, models_are_masters=True)
            param.grad.add_(stashed)
        else:
            grads.append(param.grad)
        stashed_grads[i] = None
    scaler.unscale(grads, grads, None, models_are_masters=True)


def _process_optimizer(optimizer: torch.optim.Optimizer, properties) -> torch.optim.Optimizer:
    if hasattr(optimizer, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    optimizer._amp_stash = AmpOptimizerState()
    optimizer._amp_stash.lazy_init_called = False
    optimizer._amp_stash.already_patched = False
    optimizer._amp_stash.params_have_scaled_gradients = False
    combine_grad = bool(properties.options.get("combine_grad"))
    if _amp_state.flavour == "ascend":
        optimizer.accelerate = combine_grad
        if properties.opt_level == "O2" and combine_grad and properties.master_weights is not True:
            raise RuntimeError("With opt_level O2, master_weights should be True when combine_grad is True")

    if properties.master_weights:
        optimizer._lazy_init_maybe_master_weights = types.MethodType(lazy_init_with_master_weights, optimizer)
        optimizer._master_params_to_model_params = types.MethodType(_master_params_to_model_params, optimizer)
        old_step = optimizer.step

        def new_step(self, closure=None):
            if closure is not None:
                raise RuntimeError("Currently, Amp does not support closure use with optimizers.")
            retval = old_step()
            self._master_params_to_model_params()
            for param in self._amp_stash.all_fp32_from_fp16_params:
                param.grad = None
            return retval

        def new_zero_grad(self):
            stash = self._amp_stash
            self._amp_lazy_init()
            for param in stash.all_fp16_params + stash.all_fp32_from_fp32_params:
                if param.grad is not None:
                    param.grad.detach_()
                    param.grad.zero_()
            for param in stash.all_fp32_from_fp16_params:
                param.grad = None

        optimizer.step = types.MethodType(new_step, optimizer)
        optimizer.zero_grad = types.MethodType(new_zero_grad, optimizer)
        optimizer._prepare_amp_backward = types.MethodType(prepare_backward_with_master_weights, optimizer)
        optimizer._post_amp_backward = types.MethodType(post_backward_with_master_weights, optimizer)
    else:
        optimizer._lazy_init_maybe_master_weights = types.MethodType(lazy_init_no_master_weights, optimizer)
        if _amp_state.flavour == "ascend" and combine_grad:
            old_zero_grad = optimizer.zero_grad

            def new_zero_grad_accelerate_no_master_weights(self):
                self._amp_lazy_init()
                old_zero_grad()

            optimizer.zero_grad = types.MethodType(new_zero_grad_accelerate_no_master_weights, optimizer)
        optimizer._prepare_amp_backward = types.MethodType(prepare_backward_no_master_weights, optimizer)
        optimizer._post_amp_backward = types.MethodType(post_backward_no_master_weights, optimizer)
    optimizer._amp_lazy_init = types.MethodType(_amp_lazy_init, optimizer)
    return optimizer
