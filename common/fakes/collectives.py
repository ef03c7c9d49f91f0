"""HCCL/NCCL argument checks around torch.distributed's collectives, for 2-rank gloo tests: test tool,
never imported by production code.

gloo takes any CPU tensor of any dtype, so a gloo test passes code that the accelerator backends refuse.
`collective_checks(backend, device)` wraps `torch.distributed.all_reduce`, `reduce`, `reduce_scatter`,
`broadcast` and `all_gather` with the checks the real process groups make before they run, raising the
same exception type (RuntimeError, from TORCH_CHECK):

* every tensor must be on the group's device (`device`, standing in for the NPU or GPU the group was
  bound to): Ascend/pytorch torch_npu/csrc/distributed/ProcessGroupHCCL.cpp `check_npu_single_tensor`
  ("Tensors must be NPU and dense"), pytorch/pytorch ProcessGroupNCCL.cpp ("Tensors must be CUDA and
  dense"); a tensor on another device index runs on the wrong device, refused here as well.
* HCCL reductions take int8/16/32/64, float16/32 and bfloat16 only: ProcessGroupHCCL.cpp
  `checkSupportedDataType` ("HCCL allreduce: Unsupported data type at::kDouble"; float64 only on Ascend950)
  and the CANN HCCL reference for HcclAllReduce (Atlas training/A2/A3: no fp64). Broadcast and all-gather
  move bytes and take every dtype, as the comment above `checkSupportedDataType` says.

`calls` records (op, dtype, device) of every checked call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter")
_WRAPPED = ("all_reduce", "reduce", "reduce_scatter", "broadcast", "all_gather")
_HCCL_REDUCE_DTYPES = (
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.float32,
    torch.bfloat16,
)
_DTYPE_NAMES = {
    torch.float64: "at::kDouble",
    torch.uint8: "at::kByte/at::kBool",
    torch.bool: "at::kByte/at::kBool",
}


@dataclass
class CollectiveChecks:
    backend: str
    device: torch.device
    calls: list[tuple[str, torch.dtype, torch.device]] = field(default_factory=list)

    def check(self, op: str, tensor: torch.Tensor) -> None:
        self.calls.append((op, tensor.dtype, tensor.device))
        kind = "NPU" if self.backend == "hccl" else "CUDA"
        if tensor.device.type != self.device.type or tensor.is_sparse:
            raise RuntimeError(f"Tensors must be {kind} and dense (got a tensor on {tensor.device})")
        if self.device.index is not None and tensor.device.index not in (None, self.device.index):
            raise RuntimeError(
                f"Tensors must be on the communicator's {kind} device {self.device} (got {tensor.device})"
            )
        if self.backend == "hccl" and op in _REDUCTIONS and tensor.dtype not in _HCCL_REDUCE_DTYPES:
            name = _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
            raise RuntimeError(f"HCCL {op.replace('_', '')}: Unsupported data type {name}")


def _tensors(op: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    if op == "all_gather":  # all_gather(tensor_list, tensor)
        outputs = kwargs.get("tensor_list", args[0] if args else [])
        inputs = kwargs.get("tensor", args[1] if len(args) > 1 else None)
        return [*outputs, inputs]
    if op == "reduce_scatter":  # reduce_scatter(output, input_list)
        output = kwargs.get("output", args[0] if args else None)
        inputs = kwargs.get("input_list", args[1] if len(args) > 1 else [])
        return [output, *inputs]
    return [kwargs.get("tensor", args[0] if args else None)]


@contextlib.contextmanager
def collective_checks(backend: str = "hccl", device: str | torch.device = "cpu"):
    """Check every collective of this process as `backend` ("hccl" or "nccl") bound to `device` would."""
    if backend not in ("hccl", "nccl"):
        raise ValueError(f"backend must be 'hccl' or 'nccl', got {backend!r}")
    checks = CollectiveChecks(backend, torch.device(device))
    originals = {op: getattr(dist, op) for op in _WRAPPED}

    def wrap(op: str):
        real = originals[op]

        def checked(*args, **kwargs):
            for tensor in _tensors(op, args, kwargs):
                if tensor is not None:
                    checks.check(op, tensor)
            return real(*args, **kwargs)

        checked.__name__ = op
        return checked

    for op in _WRAPPED:
        setattr(dist, op, wrap(op))
    try:
        yield checks
    finally:
        for op, real in originals.items():
            setattr(dist, op, real)
