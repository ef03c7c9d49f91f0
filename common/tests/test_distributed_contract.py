"""What the collectives of a run send: tensors on the group's device, never float64 over HCCL, and the
same verdict on an overflow on every rank (unit cases with a recording torch.distributed, and 2 gloo ranks
under the HCCL checks of common.fakes.collectives)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from common.amp import MixedPrecision
from common.cli import RunOptions, Runtime
from common.device import DeviceInfo
from common.distributed import DistContext, init_distributed
from common.engine import Throughput, evaluate, train_one_epoch
from common.errors import ConfigError
from common.fakes import installed_torch_npu, overflow_in_backward
from common.fakes.collectives import collective_checks
from common.metrics import SegmentationMetrics
from common.testing import run_ranks


def npu(torch_device: str = "cpu") -> DeviceInfo:
    return DeviceInfo(kind="npu", index=0, name="Ascend910A", backend="hccl", torch_device=torch_device)


def _runtime(device: DeviceInfo, dist_ctx) -> Runtime:
    return Runtime(
        device=device,
        dist=dist_ctx,
        amp=MixedPrecision(device),
        options=RunOptions(log_interval=1, warmup_steps=0),
        flags={},
    )


class _Stop(Exception):
    pass


class RecordingDist:
    """Stands in for DistContext: records what evaluate all-reduces (and stops after `stop_after` calls,
    before anything would need the values of a tensor without data)."""

    world_size, rank, is_main = 2, 0, True

    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[torch.device, torch.dtype]] = []
        self.stop_after = stop_after

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.calls.append((tensor.device, tensor.dtype))
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise _Stop
        return tensor


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2, 1, 8, 8, generator=gen), (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float())
        for _ in range(n)
    ]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1)
    )


# ---------------------------------------------------------------- evaluate and the training step
def test_a_rank_without_validation_batches_all_reduces_on_the_runtime_device():
    recorder = RecordingDist(stop_after=2)
    runtime = _runtime(npu("meta"), recorder)
    with pytest.raises(_Stop):  # stopped after the two all-reduces: a meta tensor has no values to report
        evaluate(_model(), [], SegmentationMetrics(), runtime, loss_fn=torch.nn.BCEWithLogitsLoss())
    assert [device.type for device, _ in recorder.calls] == ["meta", "meta"]


def test_evaluation_on_an_accelerator_all_reduces_no_float64():
    recorder = RecordingDist()
    runtime = _runtime(npu(), recorder)
    result = evaluate(
        _model(), _batches(2), SegmentationMetrics(), runtime, loss_fn=torch.nn.BCEWithLogitsLoss()
    )
    assert {dtype for _, dtype in recorder.calls} <= {torch.int64, torch.float32}
    assert result["n_images"] == 4 and result["loss"] > 0


class _Float64Watch(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                self.seen.append(getattr(func, "__name__", repr(func)))
        return out


def test_a_training_epoch_on_an_accelerator_creates_no_float64():
    runtime = _runtime(npu(), DistContext())
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with installed_torch_npu(), _Float64Watch() as watch:
        stats = train_one_epoch(
            model,
            _batches(3),
            torch.nn.BCEWithLogitsLoss(),
            optimizer,
            runtime,
            epoch=0,
            throughput=Throughput(0),
        )
    assert watch.seen == [] and stats.steps == 3 and stats.loss_mean > 0


# ---------------------------------------------------------------- DistContext, unit cases
@pytest.fixture
def fake_group(monkeypatch):
    """torch.distributed as an initialized 2-rank group whose collectives only record their tensors."""
    calls: list[tuple[str, torch.dtype, torch.device]] = []

    def record(name):
        def collective(tensor, *args, **kwargs):
            calls.append((name, tensor.dtype, tensor.device))

        return collective

    def all_gather(parts, tensor, *args, **kwargs):
        calls.append(("all_gather", tensor.dtype, tensor.device))
        for part in parts:  # both ranks hold the same values
            part.copy_(tensor)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", record("all_reduce"))
    monkeypatch.setattr(dist, "broadcast", record("broadcast"))
    monkeypatch.setattr(dist, "all_gather", all_gather)
    return calls


def test_a_tensor_off_the_group_device_is_refused_naming_both(fake_group):
    ctx = DistContext(rank=0, world_size=2, backend="gloo", device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"tensor on meta .* whose device is cpu"):
        ctx.all_reduce(torch.zeros(3, device="meta"))
    with pytest.raises(ConfigError, match=r"buffer 1\.running_mean on meta"):
        ctx.broadcast_buffers(_model().to("meta"))
    gpu = DistContext(rank=0, world_size=2, backend="nccl", device=torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="cuda:0"):
        gpu.reduce_scalars([1.0], torch.device("cpu"))
    assert fake_group == []
    ctx.all_reduce(torch.zeros(3))
    ctx.broadcast_buffers(_model())
    assert fake_group[0] == ("all_reduce", torch.float32, torch.device("cpu"))


def test_float64_over_hccl_travels_as_int64_and_stays_exact(fake_group):
    ctx = DistContext(rank=0, world_size=2, backend="hccl", device=torch.device("cpu"))
    value = torch.tensor([1.0 + 2.0**-40, -3.0], dtype=torch.float64)
    ctx.all_reduce(value)
    assert value.tolist() == [2.0 + 2.0**-39, -6.0]
    peak = torch.tensor([0.5 + 2.0**-45], dtype=torch.float64)
    ctx.all_reduce(peak, "max")
    assert peak.item() == 0.5 + 2.0**-45
    assert {dtype for _, dtype, _ in fake_group} == {torch.int64}
    assert ctx.reduce_scalars([1.0 + 2.0**-40], torch.device("cpu")) == [2.0 + 2.0**-39]


def test_init_distributed_gives_the_context_its_device(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    started = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: started.update(kwargs))
    ctx = init_distributed(DeviceInfo(kind="npu", index=1, name="x", backend="hccl", torch_device="cpu"))
    assert started["backend"] == "hccl" and ctx.device == torch.device("cpu") and ctx.rank == 1


# ---------------------------------------------------------------- two gloo ranks under HCCL's checks
def _rank(rank: int, world: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out: dict = {}
    try:
        with installed_torch_npu(support_inf_nan=False), collective_checks("hccl", "cpu"):
            device = npu()
            ctx = DistContext(rank=rank, world_size=world, backend="hccl", device=device.device)
            exact = torch.tensor([rank + 2.0**-40], dtype=torch.float64)
            out["sum64"] = ctx.all_reduce(exact).item()
            try:
                ctx.all_reduce(torch.zeros(2, device="meta"))
            except ConfigError as exc:
                out["refused"] = str(exc)
            amp = MixedPrecision(device)  # fp32: the float-status flag still decides on a saturating chip
            applied = []
            for overflow in (rank == 0, False):
                weight = torch.nn.Parameter(torch.ones(2))
                optimizer = torch.optim.SGD([weight], lr=0.1)
                amp.zero_grad(optimizer)
                loss = weight.sum() * 2.0
                if overflow:
                    loss = overflow_in_backward(loss)
                amp.backward(loss, optimizer)
                applied.append(amp.step(optimizer))
            out["applied"] = applied
            runtime = _runtime(device, ctx)
            loader = _batches(2, seed=3) if rank == 0 else []  # rank 1 holds no validation sample
            result = evaluate(
                _model(), loader, SegmentationMetrics(), runtime, loss_fn=torch.nn.BCEWithLogitsLoss()
            )
            out["val"] = {k: result[k] for k in ("n_images", "dice_mean", "loss")}
        queue.put((rank, out))
    except BaseException as exc:  # noqa: BLE001 - report instead of leaving the peer waiting
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


def test_two_hccl_checked_ranks_agree_and_send_only_what_hccl_takes():
    results = run_ranks(_rank, 2, timeout=180)
    single = evaluate(
        _model(), _batches(2, seed=3), SegmentationMetrics(), _runtime(npu(), DistContext()),
        loss_fn=torch.nn.BCEWithLogitsLoss(),
    )  # fmt: skip
    for rank in (0, 1):
        got = results[rank]
        assert "error" not in got, got
        assert got["sum64"] == 1.0 + 2.0**-39
        assert "tensor on meta" in got["refused"]
        assert got["applied"] == [False, True]  # rank 1 skips rank 0's overflow with it
        assert got["val"]["n_images"] == 4
        assert got["val"]["dice_mean"] == single["dice_mean"]
        assert got["val"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
