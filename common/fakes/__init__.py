"""Faithful stand-ins for the accelerator packages, for tests on a machine without them: test tools,
never imported by production code.

* `installed_torch_npu(...)`: the fake `torch_npu` (Ascend/pytorch) under its real name, with `torch.npu`.
* `installed_apex(flavour)`: the fake `apex.amp`, Ascend's or NVIDIA's.
* `common.fakes.collectives.collective_checks(backend, device)`: HCCL/NCCL's argument checks around
  torch.distributed's collectives, for 2-rank gloo tests.
* `convolutions_accumulating_in_float32()`: half-precision convolutions computed in float32 and rounded back,
  so whole training runs in a half type run at float32 speed on CPUs without bf16 hardware.
* `common/fakes/site/` (a folder for PYTHONPATH, not a package): its sitecustomize.py installs all of the
  above, and an "hccl" backend over gloo, in every process started with `MODELZOO_FAKE_NPU=<devices>`,
  so the real test/*.sh scripts run as on an Ascend node (common/tests/test_scripts_on_fake_npu.py).

Each context manager puts the fake into sys.modules under the real package's name and takes it out again
on exit (so `import torch_npu` fails again afterwards, as it does on this machine). Each module's
docstring names the real source file it models.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from types import ModuleType

import torch

from .torch_npu._chip import CHIP, Chip, overflow_in_backward, raise_overflow

__all__ = [
    "CHIP",
    "Chip",
    "convolutions_accumulating_in_float32",
    "installed_apex",
    "installed_torch_npu",
    "overflow_in_backward",
    "raise_overflow",
]


def _modules(package: str, real_name: str) -> dict[str, ModuleType]:
    """The fake package and all its submodules, keyed by the names the real package gives them."""
    root = importlib.import_module(f"{__name__}.{package}")
    found = {real_name: root}
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{root.__name__}."):
        found[real_name + info.name[len(root.__name__) :]] = importlib.import_module(info.name)
    return found


@contextlib.contextmanager
def _in_sys_modules(modules: dict[str, ModuleType], torch_attr: tuple[str, ModuleType] | None = None):
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    if torch_attr is not None:
        attr, module = torch_attr
        if hasattr(torch, attr):
            raise RuntimeError(f"torch.{attr} already exists: a real or another fake package is loaded")
        setattr(torch, attr, module)
    try:
        yield
    finally:
        if torch_attr is not None:
            delattr(torch, torch_attr[0])
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


@contextlib.contextmanager
def installed_torch_npu(
    *,
    support_inf_nan: bool = False,
    device_count: int = 1,
    tensor_device: str | torch.device = "cpu",
    name: str = "Ascend910A",
) -> Iterator[Chip]:
    """`import torch_npu` and `torch.npu` work inside; yields the freshly booted chip.

    support_inf_nan False (the default) models the Atlas training series: an overflow saturates and
    raises the float-status flag. Tensors of the fake NPU live on `tensor_device`.
    """
    CHIP.configure(
        support_inf_nan=support_inf_nan, device_count=device_count, tensor_device=tensor_device, name=name
    )
    modules = _modules("torch_npu", "torch_npu")
    modules["torch.npu"] = modules["torch_npu.npu"]
    with _in_sys_modules(modules, ("npu", modules["torch_npu.npu"])):
        yield CHIP


@contextlib.contextmanager
def installed_apex(
    flavour: str = "ascend", *, half_dtype: torch.dtype = torch.float16
) -> Iterator[ModuleType]:
    """`from apex import amp` works inside; yields the fake `apex.amp`. Ascend's needs `installed_torch_npu`.

    `half_dtype` is what O2/O3 cast models to instead of float16, for whole training runs on a CPU that
    stands in for the device: CPU float16 convolutions are emulated, about 100x slower than bfloat16 ones,
    while the casts, fp32 master weights and loss scaling apex adds around them are the same.
    """
    if flavour not in ("ascend", "nvidia"):
        raise ValueError(f"flavour must be 'ascend' or 'nvidia', got {flavour!r}")
    if half_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"half_dtype must be torch.float16 or torch.bfloat16, got {half_dtype}")
    modules = _modules("apex", "apex")
    modules["apex.amp._amp_state"].reset(flavour, half_dtype)
    with _in_sys_modules(modules):
        yield modules["apex.amp"]


_CONVOLUTIONS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


@contextlib.contextmanager
def convolutions_accumulating_in_float32() -> Iterator[None]:
    """Inside, `torch.nn.functional`'s convolutions with float16/bfloat16 inputs (outside autocast) compute in
    float32 and round the result to the input's dtype; gradients reach the half-precision weights in their
    own dtype.

    This is what a device's matrix unit does with half inputs (products accumulated in float32, the output
    rounded once), and on a CPU without bf16 hardware it is the difference between float32 speed and
    emulated half kernels: bfloat16 3-D convolutions run about 40x slower than float32 ones on an AVX2-only
    CPU, float16 ones slower still. nn.Conv*d look `F.conv*d` up at each call, so modules pick it up.
    """
    functional = torch.nn.functional
    originals = {name: getattr(functional, name) for name in _CONVOLUTIONS}

    def accumulating(convolution):
        def convolve(input, weight, bias=None, *args, **kwargs):  # noqa: A002 - torch's own parameter name
            # Imported here: the fake-NPU site module installs this before common.device may be imported.
            from common.amp import autocast_enabled

            half = input.dtype in (torch.float16, torch.bfloat16)
            if not half or autocast_enabled(input.device.type):
                return convolution(input, weight, bias, *args, **kwargs)
            bias32 = None if bias is None else bias.float()
            return convolution(input.float(), weight.float(), bias32, *args, **kwargs).to(input.dtype)

        convolve.__doc__ = convolution.__doc__
        return convolve

    for name, convolution in originals.items():
        setattr(functional, name, accumulating(convolution))
    try:
        yield
    finally:
        for name, convolution in originals.items():
            setattr(functional, name, convolution)
