"""Count the ATen ops that make the host wait for an accelerator, while the code runs on the CPU.

`SyncCounter` (re-exported by common.testing) is a TorchDispatchMode: every ATen op that the code under
test dispatches passes through it, and the ones that force a host-device synchronisation on CUDA or NPU
are counted by name. The ops still run (on the CPU here); the counter only looks at them, so a test on a
machine without an accelerator can prove that a training step never stalls the device queue.

Which ops synchronise, from pytorch/pytorch:

* A scalar read back to the host: `aten._local_scalar_dense` (what `.item()`, `bool(t)`, `float(t)`,
  `int(t)` and f-string formatting dispatch) copies with `c10::cuda::memcpy_and_sync`
  (c10/cuda/CUDAFunctions.h), which ends in `cudaStreamSynchronize`; its ATen tag is
  `data_dependent_output` (aten/src/ATen/native/tags.yaml). `aten.equal` (aten/src/ATen/native/cuda/
  Equal.cpp: `eq(...).all().item()`) and `aten.allclose` (`isclose(...).all().item()`) return a host
  bool the same way.
* An output whose size depends on the data (tag `dynamic_output_shape`; fake tensors refuse them as
  data-dependent, torch/_subclasses/fake_impls.py): `nonzero`, `masked_select`, `_unique`, `_unique2`,
  `unique_dim`, `unique_consecutive`, `bincount`, `repeat_interleave` without `output_size`, and
  indexing with a bool/uint8 mask (`index.Tensor`, `index_put_`), which expands the mask with
  `nonzero()` (aten/src/ATen/native/IndexingUtils.h `expandTensors`). A masked write of a single CPU
  value (`t[mask] = 0.0`) is the exception: `canDispatchToMaskedFill`
  (aten/src/ATen/native/TensorAdvancedIndexingUtils.h) turns it into `masked_fill_`, which does not wait.
* A copy between the host and a device without `non_blocking=True` (`.cpu()`, `.to("cuda")`,
  `copy_`): aten/src/ATen/native/cuda/Copy.cu calls `memcpy_and_sync` for both directions.

Not counted: `aten._assert_async` launches a one-thread kernel that asserts on the device
(aten/src/ATen/native/cuda/TensorCompare.cu) and returns at once; `nonzero_static` has a fixed size.
`torch.cuda.set_sync_debug_mode("warn")` flags the same places on a real GPU (it hooks
`memcpy_and_sync` and `stream_synchronize`).

What the CPU cannot show, and how it is covered: on a CPU tensor `.tolist()`, `.numpy()` and `.cpu()`
read host memory without dispatching any ATen op, so a companion TorchFunctionMode counts those calls
(as `Tensor.tolist`, `Tensor.numpy`, `Tensor.cpu`); on an accelerator tensor they dispatch a copy that
the dispatch mode counts instead. Composite ops that branch on the device type are seen as the CPU
runs them: `F.one_hot` reads the class range with `.item()` on the CPU only, so it is counted here
although it does not wait on CUDA.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that wait for the device whatever their arguments (by overload packet, e.g. "aten.nonzero").
ALWAYS_SYNC = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.item",
        "aten.equal",
        "aten.allclose",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.unique_dim_consecutive",
        "aten.bincount",
    }
)
# Ops that wait only for some arguments; `_sync_reason` decides.
SOMETIMES_SYNC = frozenset(
    {
        "aten.index",
        "aten.index_put",
        "aten.index_put_",
        "aten._index_put_impl_",
        "aten.repeat_interleave",
        "aten._to_copy",
        "aten.copy_",
    }
)

_MASK_DTYPES = (torch.bool, torch.uint8)
_OWN_FILES = (str(Path(__file__).resolve()), str(Path(torch.__file__).resolve().parent) + os.sep)


def _is_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in _MASK_DTYPES


def _masked_fill_fast_path(self: torch.Tensor, indices: list, value: Any, accumulate: bool) -> bool:
    """Whether ATen's `canDispatchToMaskedFill` turns this index_put_ into a masked_fill_ (no wait)."""
    if accumulate or not isinstance(value, torch.Tensor):
        return False
    if value.numel() != 1 or value.device.type != "cpu":
        return False
    given = [i for i in indices if i is not None]
    return len(given) == 1 and _is_mask(given[0]) and given[0].device == self.device


def _crosses_host(source: torch.device, target: torch.device) -> bool:
    """A copy between the host and an accelerator (meta tensors hold no data, so nothing moves)."""
    kinds = {source.type, target.type}
    return "cpu" in kinds and len(kinds) == 2 and "meta" not in kinds


def _sync_reason(name: str, overload: str, args: tuple, kwargs: dict) -> bool:
    """Whether an op of SOMETIMES_SYNC (`name`, e.g. "aten.index", and `overload`, e.g. "Tensor") waits for
    the device with these arguments."""
    if name == "aten.index":
        return any(_is_mask(i) for i in args[1])
    if name in ("aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        self, indices, value = args[:3]
        accumulate = bool(args[3]) if len(args) > 3 else bool(kwargs.get("accumulate", False))
        if not any(_is_mask(i) for i in indices):
            return False
        return not _masked_fill_fast_path(self, indices, value, accumulate)
    if name == "aten.repeat_interleave":
        # The repeats-only overload (the others decompose into it) sizes its output by summing repeats.
        return overload == "Tensor" and kwargs.get("output_size") is None
    if name == "aten._to_copy":
        target = kwargs.get("device")
        if target is None or kwargs.get("non_blocking", False):
            return False
        return _crosses_host(args[0].device, torch.device(target))
    if name == "aten.copy_":
        non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        return not non_blocking and _crosses_host(args[1].device, args[0].device)
    return False


def _caller() -> str:
    """`file:line` of the innermost frame outside torch and this module: where the sync was asked for."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(_OWN_FILES):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class _HostReads(TorchFunctionMode):
    """The `.tolist()` / `.numpy()` / `.cpu()` calls on CPU tensors, which dispatch no ATen op."""

    _METHODS = {
        torch.Tensor.tolist: "Tensor.tolist",
        torch.Tensor.numpy: "Tensor.numpy",
        torch.Tensor.cpu: "Tensor.cpu",
    }

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self._METHODS.get(func)
        if name is not None and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            self.counter._record(name)
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchDispatchMode):
    """Counts host-device synchronisations by op name while active.

    `total` is the number of synchronising ops, `by_op` maps an op name ("aten._local_scalar_dense",
    "aten.nonzero", "Tensor.tolist", ...) to its count, `sites` lists (op name, "file:line" of the calling
    code) in order, and `ops` counts every ATen op dispatched (synchronising or not). Covers forward
    and backward: autograd runs the backward ops under the same mode.

    Example:
        >>> with SyncCounter() as syncs:
        ...     loss = model(x).sum(); loss.backward(); loss.item()
        >>> syncs.total, syncs.by_op
        (1, {'aten._local_scalar_dense': 1})
    """

    def __init__(self) -> None:
        super().__init__()
        self._counts: Counter[str] = Counter()
        self.sites: list[tuple[str, str]] = []
        self.ops = 0
        self._host_reads = _HostReads(self)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    @property
    def by_op(self) -> dict[str, int]:
        return dict(self._counts)

    def _record(self, name: str) -> None:
        self._counts[name] += 1
        self.sites.append((name, _caller()))

    def __enter__(self) -> SyncCounter:
        self._host_reads.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._host_reads.__exit__(None, None, None)
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._host_reads.__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        name = f"{func.namespace}.{func._opname}"
        if name in ALWAYS_SYNC or (
            name in SOMETIMES_SYNC and _sync_reason(name, func._overloadname, args, kwargs)
        ):
            self._record(name)
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        where = "; ".join(f"{name} at {site}" for name, site in self.sites[:10])
        return f"SyncCounter(total={self.total}, by_op={self.by_op}{', ' + where if where else ''})"
