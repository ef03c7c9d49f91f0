"""Process groups for 1 to N devices on one or many nodes, started by torchrun or by the ModelZoo variables.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The ModelZoo shell loops set
RANK_SIZE / RANK_ID / ASCEND_DEVICE_ID instead; `modelzoo_env_to_torchrun` translates them so that
`init_process_group(init_method="env://")` works the same for hccl, nccl and gloo.

Collectives run on every rank (validation is sharded, counts are all-reduced), so no rank waits at a
barrier that another never reaches (pytorch/pytorch#54059), and a timeout ends a job whose peer died
instead of holding the devices forever (Ascend/ModelZoo-PyTorch#5).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.device import DeviceInfo
from common.errors import ConfigError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = "29688"  # the AttU/R2U ModelZoo port


def modelzoo_env_to_torchrun() -> None:
    """Fill torchrun's variables from RANK_SIZE / RANK_ID / ASCEND_DEVICE_ID when torchrun did not run."""
    env = os.environ
    if "WORLD_SIZE" not in env and "RANK_SIZE" in env:
        env["WORLD_SIZE"] = env["RANK_SIZE"]
    if "RANK" not in env and "RANK_ID" in env:
        env["RANK"] = env["RANK_ID"]
    if "LOCAL_RANK" not in env and "RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        env["LOCAL_RANK"] = env.get("RANK_ID", env["RANK"])
    env.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    env.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)


@dataclass
class DistContext:
    """This process's place in the job. With world_size 1 every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    # The device whose tensors the group's collectives take (the CPU for gloo). NCCL and HCCL fail late,
    # and far from the cause, on a tensor elsewhere, so every collective here checks it first.
    device: torch.device | None = None
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE): they share its cores

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        """Print on rank 0 only, flushed, so logs of N ranks are not N copies."""
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def check_device(self, tensor: torch.Tensor, what: str = "tensor") -> None:
        """ConfigError unless `tensor` lives on the group's device (when the group has one)."""
        if self.device is None:
            return
        want = torch.device(self.device)
        got = tensor.device
        if got.type != want.type or (want.index is not None and got.index not in (None, want.index)):
            raise ConfigError(
                f"{what} on {got} cannot go through the {self.backend or 'process'} group, whose device is "
                f"{want}; move it there first (.to(runtime.device.device))"
            )

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce ("sum" or "max") of a tensor on the group's device.

        float64 never goes over HCCL's all-reduce, which has no float64 on Atlas training chips (CANN HCCL
        reference, HcclAllReduce data types; torch_npu's ProcessGroupHCCL.cpp checkSupportedDataType). Its
        bytes travel as int64 through an all-gather instead (HCCL moves any dtype there) and every rank
        reduces the same gathered values in float64, in rank order: exact, and equal on every rank.
        """
        if not self.initialized:
            return tensor
        if op not in ("sum", "max"):
            raise ValueError(f"all_reduce op must be 'sum' or 'max', got {op!r}")
        self.check_device(tensor)
        if self.backend == "hccl" and tensor.dtype == torch.float64:
            wire = tensor.detach().contiguous().view(torch.int64)
            parts = [torch.empty_like(wire) for _ in range(self.world_size)]
            dist.all_gather(parts, wire)
            gathered = torch.stack(parts).view(torch.float64)
            tensor.copy_(gathered.sum(0) if op == "sum" else gathered.amax(0))
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def reduce_scalars(self, values: list[float], device: torch.device, op: str = "sum") -> list[float]:
        """All-reduce a few Python numbers (one collective)."""
        if not self.initialized:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        return self.all_reduce(tensor, op).tolist()

    def wrap(self, model: torch.nn.Module, device: DeviceInfo, **ddp_kwargs) -> torch.nn.Module:
        """DistributedDataParallel when the group has more than one rank, else the model unchanged."""
        if not self.initialized:
            return model
        ddp_kwargs.setdefault("broadcast_buffers", False)
        # By where the tensors are, not by the kind: DDP refuses device_ids for a module on the CPU, which
        # is where an accelerator's DeviceInfo may point its tensors (DeviceInfo.torch_device).
        ids = None if device.device.type == "cpu" else [device.index]
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics).

        DDP runs with broadcast_buffers=False (one broadcast per forward is wasted work in training), so
        each rank's running statistics follow its own shard, while the checkpoint holds rank 0's. Before
        an evaluation every rank takes rank 0's, so N ranks score exactly the weights that are saved.
        """
        if not self.initialized:
            return
        from common.checkpoint import unwrap_model

        for name, buffer in unwrap_model(model).named_buffers():
            self.check_device(buffer, f"buffer {name}")
            dist.broadcast(buffer.data, src=0)

    def shutdown(self) -> None:
        if self.initialized:
            dist.destroy_process_group()


def init_distributed(device: DeviceInfo, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group described by the environment (no-op for a single process).

    Call after `select_device`, which made the device current: HCCL and NCCL bind to it at init.
    """
    modelzoo_env_to_torchrun()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=device.device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    # Without async error handling a NCCL collective whose peer died blocks forever, ignoring the timeout.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("HCCL_CONNECT_TIMEOUT", str(int(timeout_s)))
    kwargs = {
        "backend": device.backend,
        "init_method": "env://",
        "world_size": world_size,
        "rank": rank,
        "timeout": datetime.timedelta(seconds=timeout_s),
    }
    if device.kind == "cuda" and "device_id" in dist.init_process_group.__code__.co_varnames:
        kwargs["device_id"] = device.device
    dist.init_process_group(**kwargs)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        backend=device.backend,
        device=device.device,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
    )
