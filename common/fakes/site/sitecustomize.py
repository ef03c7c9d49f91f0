"""A whole Python process as if on an Ascend NPU node with apex, for script tests: test tool, never on
the path of a real run.

With this folder on PYTHONPATH and `MODELZOO_FAKE_NPU=<device count>` in the environment, Python's `site`
imports this module at start-up (before `__main__`), and every process of a ModelZoo script (the device
count, torchrun, each rank) sees the same node. Each piece stands for one real contract:

* `torch_npu` and `torch.npu`: the fake of `common.fakes.installed_torch_npu`, in saturation mode
  (`is_support_inf_nan()` False, as on the Atlas training series), with `device_count` NPUs.
* `apex.amp`: Ascend's apex (`initialize(..., combine_grad=True)`), `common.fakes.installed_apex("ascend")`,
  whose O2 casts models to bfloat16 where the NPU computes in float16: float16 convolutions on a CPU are
  emulated about 100x slower, and the casts, fp32 master weights and loss scaling are the same.
* convolutions: half-precision inputs computed in float32 and rounded back
  (`common.fakes.convolutions_accumulating_in_float32`), as the NPU's Cube unit accumulates half products in
  float32; CPUs without bf16 hardware would otherwise emulate bfloat16 convolutions up to 40x slower.
* `common.device.select_device`: the real one, whose NPU `DeviceInfo` then puts tensors where the fake
  NPU keeps them (the CPU); `torch.device("npu:0")` cannot hold a tensor without the real package.
* the "hccl" process-group backend: registered as torch_npu/__init__.py (Ascend/pytorch) registers it,
  through `torch.distributed.Backend.register_backend("hccl", <creator of (store, rank, size, timeout)>)`,
  here creating a gloo process group on the CPU.
* `common.fakes.collectives.collective_checks("hccl", cpu)`: the arguments ProcessGroupHCCL refuses
  (float64 reductions, tensors off the group's device) are refused before gloo runs them.

A failure to install ends the process (exit 3): a run that silently fell back to the CPU would prove
nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # importing it here would run common.device before its select_device is wrapped
    from common.device import DeviceInfo

FAKE_NPU_VARIABLE = "MODELZOO_FAKE_NPU"
_INSTALLED: list = []  # the entered context managers, kept alive for the life of the process


def _register_hccl() -> None:
    import torch.distributed as dist

    def gloo_as_hccl(store: dist.Store, rank: int, size: int, timeout) -> dist.ProcessGroupGloo:
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    # devices=["cpu"]: where the fake NPU's tensors are. gloo keeps the CPU's default-backend slot
    # (register_backend only claims a device no backend holds yet).
    dist.Backend.register_backend("hccl", gloo_as_hccl, devices=["cpu"])


def _on_fake_npu(select_device: Callable) -> Callable:
    import dataclasses

    from common.fakes import CHIP

    def select(*args, **kwargs) -> DeviceInfo:
        info = select_device(*args, **kwargs)
        if info.kind != "npu":
            return info
        return dataclasses.replace(info, torch_device=str(CHIP.tensor_device))

    select.__doc__ = select_device.__doc__
    return select


class _WrapSelectDevice(importlib.abc.MetaPathFinder):
    """Wraps `common.device.select_device` as that module is first executed, before anyone imports the
    name (importing it here instead would make `python -m common.device` run a second copy, with a warning)."""

    def find_spec(self, name: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if name != "common.device":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            module.select_device = _on_fake_npu(module.select_device)

        spec.loader.exec_module = exec_module  # this module's own loader; runpy still finds get_code
        return spec


def install(device_count: int) -> None:
    """Install every piece (see the module docstring) for the rest of the process."""
    import contextlib

    import torch

    from common.fakes import convolutions_accumulating_in_float32, installed_apex, installed_torch_npu
    from common.fakes.collectives import collective_checks

    if "common.device" in sys.modules:
        raise RuntimeError("common.device was imported before the fake NPU: select_device would stay as is")
    stack = contextlib.ExitStack()
    stack.enter_context(installed_torch_npu(support_inf_nan=False, device_count=device_count))
    stack.enter_context(installed_apex("ascend", half_dtype=torch.bfloat16))
    stack.enter_context(collective_checks("hccl", "cpu"))
    stack.enter_context(convolutions_accumulating_in_float32())
    _register_hccl()
    sys.meta_path.insert(0, _WrapSelectDevice())
    _INSTALLED.append(stack)


def _from_environment() -> None:
    value = os.environ.get(FAKE_NPU_VARIABLE, "")
    if not value:
        return
    try:
        count = int(value)
        if count < 1:
            raise ValueError(value)
        install(count)
    except Exception as exc:  # noqa: BLE001 - site would only print a line and run on without the fakes
        import traceback

        traceback.print_exc()
        print(
            f"[Error] {FAKE_NPU_VARIABLE}={value!r}: the fake NPU is not installed ({exc})", file=sys.stderr
        )
        os._exit(3)


_from_environment()
