"""Fake of `apex/amp/_initialize.py`: checks the models, casts them for O2/O3, patches the optimizers.

As the real one: a DDP-wrapped model is refused (RuntimeError: wrappers go on after initialize), a model
not on the device is refused (RuntimeError through warn_or_err), O2/O3 cast the model to fp16 (or to the
installer's stand-in for it, `_amp_state.half_dtype`; O2 keeps BatchNorm in fp32, `convert_network`), patch `forward` to cast floating inputs to fp16 and outputs to
fp32, and register a state-dict hook so the model's state_dict holds fp32 tensors. One LossScaler per loss.
"""

from __future__ import annotations

import functools

import torch

from ._amp_state import _amp_state, half_dtypes, warn_or_err
from ._process_optimizer import _process_optimizer
from .scaler import LossScaler


def _device_type() -> str:
    if _amp_state.flavour == "ascend":
        from ...torch_npu._chip import CHIP

        return CHIP.tensor_device.type
    return "cuda"


def check_models(models: list[torch.nn.Module]) -> None:
    for model in models:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.parallel.DataParallel)):
            raise RuntimeError(
                f"Incoming model is an instance of {type(model).__name__}. Parallel wrappers should only be "
                "applied to the model(s) AFTER \nthe model(s) have been returned from amp.initialize."
            )


def check_params_fp32(models: list[torch.nn.Module]) -> None:
    device_type = _device_type()
    for model in models:
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            if param.dtype in half_dtypes():
                warn_or_err(
                    f"Found param {name} with type {param.type()}, expected a FloatTensor.\n"
                    "When using amp.initialize, you do not need to call .half() on your model"
                )
            elif param.device.type != device_type:
                warn_or_err(
                    f"Found param {name} with type {param.type()} on {param.device}, expected a "
                    f"{device_type} tensor.\nWhen using amp.initialize, you need to provide a model with "
                    "parameters located on the device before passing it"
                )


def _to_type(dtype: torch.dtype, value):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_type(dtype, v) for v in value)
    if isinstance(value, dict):
        return {k: _to_type(dtype, v) for k, v in value.items()}
    return value


def convert_network(network: torch.nn.Module, dtype: torch.dtype) -> None:
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine:
            continue
        for param in module.parameters(recurse=False):
            if param.data.dtype.is_floating_point:
                param.data = param.data.to(dtype)
        for buf in module.buffers(recurse=False):
            if buf.data.dtype.is_floating_point:
                buf.data = buf.data.to(dtype)


def _fp32_state_dict_hook(module, state_dict, prefix, local_metadata):
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.dtype in half_dtypes():
            state_dict[key] = value.float()


def _initialize(models, optimizers, properties, num_losses: int = 1, cast_model_outputs=None):
    optimizers_was_list = isinstance(optimizers, list)
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    elif optimizers is None:
        optimizers = []
    elif not optimizers_was_list:
        raise TypeError("optimizers must be either a single optimizer or a list of optimizers.")
    models_was_list = isinstance(models, list)
    if isinstance(models, torch.nn.Module):
        models = [models]
    elif not models_was_list:
        raise TypeError("models must be either a single model or a list of models.")

    check_models(models)
    if not _amp_state.allow_incoming_model_not_fp32:
        check_params_fp32(models)

    if properties.cast_model_type:
        cast_type = properties.cast_model_type
        if cast_type == torch.float16:
            cast_type = _amp_state.half_dtype
        for model in models:
            if properties.keep_batchnorm_fp32:
                convert_network(model, cast_type)
            else:
                model.to(cast_type)
            input_caster = functools.partial(_to_type, cast_type)
            output_caster = functools.partial(_to_type, cast_model_outputs or torch.float32)

            def patch_forward(old_fwd, input_caster=input_caster, output_caster=output_caster):
                def new_fwd(*args, **kwargs):
                    return output_caster(old_fwd(*input_caster(args), **input_caster(kwargs)))

                return new_fwd

            model.forward = patch_forward(model.forward)
            for module in model.modules():
                module._register_state_dict_hook(_fp32_state_dict_hook)
        for optimizer in optimizers:
            optimizer.load_state_dict(optimizer.state_dict())

    for i, optimizer in enumerate(optimizers):
        optimizers[i] = _process_optimizer(optimizer, properties)

    _amp_state.loss_scalers = [
        LossScaler(
            properties.loss_scale,
            min_loss_scale=_amp_state.min_loss_scale,
            max_loss_scale=_amp_state.max_loss_scale,
        )
        for _ in range(num_losses)
    ]

    models_out = models if models_was_list else models[0]
    if not optimizers:
        return models_out
    return models_out, (optimizers if optimizers_was_list else optimizers[0])
