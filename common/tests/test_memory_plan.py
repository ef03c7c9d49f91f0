"""Batches that fit: the memory projection, the micro-batch decision, and gradient accumulation that gives
the whole batch's step (1 process, 2 gloo ranks under DDP, and the overflow paths of the accelerators)."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from common import memory
from common.amp import MixedPrecision
from common.cli import RunOptions, Runtime, add_common_args, setup_runtime
from common.device import DeviceInfo
from common.engine import TrainingRun, train_step
from common.errors import ConfigError
from common.fakes import installed_apex, installed_torch_npu, overflow_in_backward
from common.losses import BCEDiceLoss
from common.summary import SummaryTarget
from common.testing import run_ranks
from common.trainer import Hooks, LoopConfig, fit, plan_batch, prepare

CPU = DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo")
NPU = DeviceInfo(kind="npu", index=0, name="Ascend910A", backend="hccl", torch_device="cpu")
MB = memory.MIB


def _plain_net(seed: int = 0) -> nn.Module:
    """No BatchNorm: the gradients of micro-batches sum to the whole batch's exactly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))


def _batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), (torch.rand(n, 1, 8, 8, generator=gen) > 0.5).float()


def _runtime(**options) -> Runtime:
    return setup_runtime(RunOptions(**{"seed": 0, "log_interval": 1, "warmup_steps": 0, **options}))


def _run(tmp_path: Path, runtime: Runtime, net: nn.Module | None = None) -> TrainingRun:
    model, optimizer = prepare(net or _bn_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime)
    target = SummaryTarget(tmp_path, "Toy", "Toy_bs8_1p_acc", 8, 1, "acc", time.time())
    return TrainingRun(runtime, tmp_path / "run", model=model, optimizer=optimizer, selection_key="score",
                       target=target)  # fmt: skip


# ---------------------------------------------------------------------------------------- the projection
def test_two_measured_points_give_the_fixed_and_per_sample_memory():
    line = memory.MemoryLine.through([(2, 500 * MB), (1, 300 * MB)])
    assert line.fixed == pytest.approx(100 * MB) and line.per_sample == pytest.approx(200 * MB)
    assert line.at(16) == pytest.approx(3300 * MB)
    # budget 1300 MB with 100 MB of extra: (1300 - 100 - 100) / 200 = 5.5 samples
    assert line.largest_fitting(1300 * MB, extra=100 * MB) == 5


def test_a_slope_lost_in_measurement_noise_is_taken_as_all_per_sample():
    line = memory.MemoryLine.through([(1, 300 * MB), (2, 280 * MB)])
    assert line.fixed == 0 and line.per_sample == pytest.approx(140 * MB)
    assert line.at(10) > 280 * MB


def test_micro_batches_are_the_fewest_whose_largest_chunk_fits():
    line = memory.MemoryLine(100 * MB, 200 * MB)
    budget = line.at(5) + 50 * MB  # room for 5 samples with 50 MB of extra
    decision = memory.decide("auto", 16, line, 50 * MB, budget)
    assert decision.largest_fitting == 5
    assert decision.micro_batches == 4 and memory.chunk_sizes(16, 4) == [4, 4, 4, 4]
    assert memory.chunk_sizes(16, 3)[0] > 5  # three chunks would not fit
    assert memory.decide("auto", 5, line, 50 * MB, budget).micro_batches == 1
    assert memory.decide("off", 16, line, 50 * MB, budget) == memory.Decision(1, 5)
    assert memory.decide(3, 16, line, 50 * MB, budget).micro_batches == 3  # a number is taken as given
    # BatchNorm that needs two samples per micro-batch: room for one sample is room for none
    small = line.at(1) + 50 * MB
    assert memory.decide("auto", 16, line, 50 * MB, small, min_micro_batch=2).micro_batches == 0
    assert memory.decide("auto", 16, line, 50 * MB, small, min_micro_batch=1).micro_batches == 16
    # a micro-batch that ran out of device memory while probing caps what fits
    assert memory.decide("auto", 16, line, 0, 10**15, fails_at=3).micro_batches == 8


def test_micro_batch_flag_takes_auto_off_or_a_count():
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    assert RunOptions.from_args(parser.parse_args([])).micro_batch == "auto"
    assert RunOptions.from_args(parser.parse_args(["--micro_batch=off"])).micro_batch == "off"
    assert RunOptions.from_args(parser.parse_args(["--micro-batch", "4"])).micro_batch == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--micro_batch=0"])
    with pytest.raises(ConfigError, match="--micro_batch must be auto, off or a positive number"):
        memory.parse_micro_batch("some")


# ------------------------------------------------------------------------------------------- the planner
class _LinearMeter:
    """Stands in for the memory meter: a step's growth is 100 MB + 200 MB per sample it ran on."""

    name = "test meter"

    def __init__(self, device):
        self.sizes: list[int] = []

    def measure(self, work) -> int:
        work()
        return int(100 * MB + 200 * MB * self.sizes[-1])

    def restart(self) -> None:
        pass

    def observed(self) -> int:
        return 0


@pytest.fixture
def linear_memory(monkeypatch):
    """Probes really run; their measured growth follows a known line, and the budget is set by the test."""
    meters: list[_LinearMeter] = []

    def meter(device):
        meters.append(_LinearMeter(device))
        return meters[-1]

    real_probe = memory.probe_step

    def probe(model, inputs, targets, loss_fn, amp):
        meters[-1].sizes.append(int(inputs.shape[0]))
        real_probe(model, inputs, targets, loss_fn, amp)

    budget = {"bytes": 0}
    monkeypatch.setattr(memory, "PeakMeter", meter)
    monkeypatch.setattr(memory, "probe_step", probe)
    monkeypatch.setattr(
        memory, "host_budget", lambda ranks, workers=0: memory.Budget(budget["bytes"], "test")
    )
    return budget, meters


def _extra(run: TrainingRun, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return memory.optimizer_extra_bytes(run.optimizer) + memory.tensor_bytes(batch)


def test_a_budget_below_the_projection_splits_the_batch_and_off_names_the_batch_that_fits(
    tmp_path, linear_memory
):
    budget, meters = linear_memory
    batch = _batch(16)
    run = _run(tmp_path, _runtime())
    budget["bytes"] = int(100 * MB + 200 * MB * 5 + _extra(run, batch))  # room for 5 samples
    plan = plan_batch(run, [batch], BCEDiceLoss())
    assert meters[-1].sizes == [1, 2]  # measured at 1 and 2, projected to 16
    assert plan.per_device_batch == 16 and plan.largest_fitting_batch == 5
    assert plan.micro_batches == 4 and plan.micro_batch_sizes == [4, 4, 4, 4]
    assert plan.projected_full_batch_mb > plan.budget_mb >= plan.projected_peak_mb
    assert run.batch_plan is plan

    off = _run(tmp_path, _runtime(micro_batch="off"))
    with pytest.raises(ConfigError, match=r"largest per-device batch that fits is 5 \(a global batch of 5"):
        plan_batch(off, [batch], BCEDiceLoss())


def test_a_batch_that_fits_trains_in_one_step(tmp_path, linear_memory):
    budget, _ = linear_memory
    batch = _batch(16)
    run = _run(tmp_path, _runtime(micro_batch="off"))
    budget["bytes"] = int(100 * MB + 200 * MB * 16 + _extra(run, batch))
    assert plan_batch(run, [batch], BCEDiceLoss()).micro_batches == 1


def test_probing_leaves_the_weights_buffers_and_gradients_as_they_were(tmp_path):
    run = _run(tmp_path, _runtime())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.model.eval()
    plan = plan_batch(run, [_batch(4)], BCEDiceLoss())
    assert sorted(plan.measured) == [1, 2] and plan.budget_mb > 0 and plan.batch_norm
    after = run.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert all(p.grad is None for p in run.model.parameters()) and not run.model.training


def test_the_host_meter_sees_a_step_that_allocates():
    meter = memory.PeakMeter(CPU)
    grown = meter.measure(lambda: torch.ones(64 * MB // 4).add_(1))
    assert grown >= 60 * MB


def test_fit_accumulates_and_the_summary_keeps_the_plan_and_the_peaks(tmp_path):
    run = _run(tmp_path, _runtime(micro_batch=2), net=_plain_net())

    class Scores(Hooks):
        def validate(self, epoch):
            return {"score": 0.5, "loss": 0.5}

    fit(run, LoopConfig(epochs=1), train_loader=[_batch(4), _batch(4, seed=2)], loss_fn=BCEDiceLoss(),
        hooks=Scores())  # fmt: skip
    run.finish(0.5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    plan = summary["batch_plan"]
    assert plan["micro_batches"] == 2 and plan["micro_batch_sizes"] == [2, 2] and plan["setting"] == "2"
    assert summary["peak_host_rss_mb"] > 50
    assert "peak_device_allocated_mb" not in summary  # a CPU run has no accelerator peak


# ------------------------------------------------------------------------------------------ accumulation
def _step(model: nn.Module, batch, micro_batches: int, amp: MixedPrecision | None = None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = amp or MixedPrecision(CPU)
    outputs, loss = train_step(model, *batch, BCEDiceLoss(), optimizer, amp, micro_batches=micro_batches)
    return (
        outputs,
        loss,
        [p.grad.clone() for p in model.parameters()],
        [p.detach().clone() for p in model.parameters()],
    )


@pytest.mark.parametrize("micro_batches", [2, 3, 4])
def test_accumulated_micro_batches_give_the_whole_batchs_gradients_and_step(micro_batches):
    batch = _batch(6)
    whole = _step(_plain_net(), batch, 1)
    split = _step(_plain_net(), batch, micro_batches)  # 3 and 4 give unequal chunks (2/2/1/1)
    assert torch.allclose(split[0], whole[0], atol=1e-6)  # the outputs of every chunk, in order
    assert split[1].item() == pytest.approx(whole[1].item(), abs=1e-6)  # the logged loss covers all chunks
    for grad_split, grad_whole in zip(split[2], whole[2]):
        assert torch.allclose(grad_split, grad_whole, atol=1e-6, rtol=0)
    for weight_split, weight_whole in zip(split[3], whole[3]):
        assert torch.allclose(weight_split, weight_whole, atol=1e-6, rtol=0)


def _overflow_in_first_chunk():
    calls = []
    base = nn.BCEWithLogitsLoss()

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == 1:
            out = overflow_in_backward(out)
        return base(out.float(), target)

    return loss_fn


@pytest.mark.parametrize(
    "settings",
    [
        dict(enabled=True, loss_scale="dynamic"),  # torch_npu's GradScaler
        dict(enabled=True, loss_scale=128.0),  # static scale: the float-status flag decides
        dict(enabled=False),  # fp32: the flag decides
        dict(enabled=True, loss_scale="dynamic", apex=True),  # Ascend apex, dynamic scale
    ],
    ids=["dynamic", "static", "fp32", "apex-dynamic"],
)
def test_an_overflow_in_an_earlier_micro_batch_skips_the_step_on_a_saturating_npu(settings):
    settings = dict(settings)
    use_apex = settings.pop("apex", False)
    with installed_torch_npu(support_inf_nan=False):
        context = (
            installed_apex("ascend", half_dtype=torch.bfloat16) if use_apex else contextlib.nullcontext()
        )
        with context:
            amp = MixedPrecision(NPU, opt_level="O1", **settings)
            assert amp.backend == ("apex" if use_apex else amp.backend)
            model = _plain_net()
            model, optimizer = amp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
            before = [p.detach().clone() for p in model.parameters()]
            applied_before = amp.skipped_steps
            train_step(model, *_batch(4), _overflow_in_first_chunk(), optimizer, amp, micro_batches=2)
            assert amp.skipped_steps == applied_before + 1
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            # the same step without the overflow is applied
            train_step(model, *_batch(4), nn.BCEWithLogitsLoss(), optimizer, amp, micro_batches=2)
            assert amp.skipped_steps == applied_before + 1
            assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -------------------------------------------------------------------------------- 2 gloo ranks under DDP
def _ddp_rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs, targets = _batch(8)
        share = slice(rank * 4, rank * 4 + 4)
        calls = {"n": 0}

        def counting_hook(state, bucket):
            calls["n"] += 1
            return allreduce_hook(state, bucket)

        result = {}
        for micro_batches in (1, 2):
            model = nn.parallel.DistributedDataParallel(_plain_net())
            model.register_comm_hook(None, counting_hook)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            calls["n"] = 0
            train_step(model, inputs[share], targets[share], BCEDiceLoss(), optimizer, MixedPrecision(CPU),
                       micro_batches=micro_batches)  # fmt: skip
            result[micro_batches] = {
                "weights": [p.detach().tolist() for p in model.module.parameters()],  # plain data crosses
                "all_reduces": calls["n"],
            }
        queue.put((rank, result))
    except BaseException as exc:  # noqa: BLE001 - report instead of leaving the peer waiting
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_accumulating_micro_batches_equal_one_process_on_the_whole_batch():
    results = run_ranks(_ddp_rank, 2, timeout=180)
    single = _step(_plain_net(), _batch(8), 1)[3]
    for rank in (0, 1):
        got = results[rank]
        assert "error" not in got, got
        # no_sync: the first micro-batch's backward all-reduces nothing, the last one as much as a plain step
        assert got[2]["all_reduces"] == got[1]["all_reduces"] > 0
        for weight, expected in zip(got[2]["weights"], single):
            assert torch.allclose(torch.tensor(weight), expected, atol=1e-6, rtol=0)
