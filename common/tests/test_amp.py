"""Mixed precision on the accelerator paths, through the fakes of apex and torch_npu (common/fakes).

An NPU here is a DeviceInfo of kind "npu" whose tensors live on the CPU (`torch_device="cpu"`).
"""

from __future__ import annotations

import pytest
import torch

from common.amp import MixedPrecision
from common.cli import RunOptions, Runtime
from common.device import DeviceInfo
from common.distributed import DistContext
from common.engine import Throughput, train_one_epoch
from common.errors import TrainingDiverged
from common.fakes import installed_apex, installed_torch_npu, overflow_in_backward, raise_overflow

NPU = DeviceInfo(kind="npu", index=0, name="Ascend910A", backend="hccl", torch_device="cpu")


def _runtime(amp: MixedPrecision) -> Runtime:
    return Runtime(
        device=amp.device,
        dist=DistContext(),
        amp=amp,
        options=RunOptions(log_interval=1, warmup_steps=0),
        flags={},
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 1, 1)
    )


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 1, 8, 8, generator=gen), (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float())
        for _ in range(n)
    ]


def test_training_steps_on_apex_npu_clear_gradients_without_set_to_none():
    with installed_torch_npu(), installed_apex("ascend"):
        amp = MixedPrecision(NPU, enabled=True, opt_level="O2", loss_scale=128.0)
        assert amp.backend == "apex"
        model = _model()
        model, optimizer = amp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        before = [p.detach().clone() for p in model.parameters()]
        stats = train_one_epoch(
            model, _batches(), torch.nn.BCEWithLogitsLoss(), optimizer, _runtime(amp), epoch=0,
            throughput=Throughput(0),
        )  # fmt: skip
        assert stats.steps == 2 and stats.skipped_steps == 0
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_zero_grad_sets_gradients_to_none_on_the_torch_paths():
    amp = MixedPrecision(DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo"))
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.sum().backward()
    amp.zero_grad(optimizer)
    assert weight.grad is None


def test_apex_on_npu_gets_combine_grad_only_where_ascends_apex_accepts_it():
    with installed_torch_npu(), installed_apex("ascend"):
        for level in ("O1", "O2", "O3"):
            amp = MixedPrecision(NPU, enabled=True, opt_level=level)
            model = _model()
            model, optimizer = amp.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
            assert getattr(optimizer, "accelerate", None) is (level != "O3")


def _one_step(amp: MixedPrecision, overflow: bool) -> tuple[bool, torch.nn.Parameter]:
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    amp.zero_grad(optimizer)
    with amp.autocast():
        out = weight * 2.0
    if overflow:
        out = overflow_in_backward(out)
    amp.backward(out.float().sum(), optimizer)
    return amp.step(optimizer), weight


@pytest.mark.parametrize(
    "settings",
    [
        dict(enabled=True, loss_scale="dynamic"),  # fp16, torch_npu's GradScaler
        dict(enabled=True, loss_scale=128.0),  # fp16, static scale
        dict(enabled=False),  # fp32
    ],
    ids=["dynamic", "static", "fp32"],
)
def test_flagged_overflow_with_finite_gradients_skips_the_step_on_a_saturating_npu(settings):
    with installed_torch_npu(support_inf_nan=False):
        amp = MixedPrecision(NPU, **settings)
        if settings["enabled"] and settings["loss_scale"] == "dynamic":
            from torch_npu.npu.amp import GradScaler

            assert isinstance(amp._scaler, GradScaler)
        applied, weight = _one_step(amp, overflow=True)
        assert torch.isfinite(weight.grad).all()  # saturated: no inf anywhere, only the flag
        assert not applied and amp.skipped_steps == 1 and torch.equal(weight.detach(), torch.ones(4))
        applied, weight = _one_step(amp, overflow=False)
        assert applied and amp.skipped_steps == 1 and amp.consecutive_skips == 0
        assert not torch.equal(weight.detach(), torch.ones(4))


@pytest.mark.parametrize(
    "settings", [dict(enabled=True, loss_scale=128.0), dict(enabled=False)], ids=["static", "fp32"]
)
def test_a_flag_raised_before_the_backward_is_not_this_steps_overflow(settings):
    with installed_torch_npu(support_inf_nan=False):
        amp = MixedPrecision(NPU, **settings)
        raise_overflow()  # e.g. an overflow in the forward or in the last step's optimizer
        applied, _ = _one_step(amp, overflow=False)
        assert applied


def test_inf_nan_npu_checks_the_values_not_the_flag():
    with installed_torch_npu(support_inf_nan=True):
        amp = MixedPrecision(NPU, enabled=True, loss_scale=128.0)
        applied, weight = _one_step(amp, overflow=True)
        assert not applied and torch.isinf(weight.grad).all()


# ------------------------------------------------------------- skipped steps decided on the device
CPU = DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo")


def _fused_step(
    amp: MixedPrecision, model: torch.nn.Linear, optimizer, bad: bool
) -> tuple[object, bool, int]:
    """One step; returns amp.step's answer, whether the parameters changed, and the syncs amp.step made."""
    from common.sync_counter import SyncCounter

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    if bad:
        x[0, 0] = float("nan")
    amp.zero_grad(optimizer)
    with amp.autocast():
        loss = model(x).float().sum()
    amp.backward(loss, optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    with SyncCounter() as syncs:
        answer = amp.step(optimizer)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return answer, changed, syncs.total


@pytest.mark.parametrize("enabled", [False, True], ids=["fp32", "bf16"])
def test_a_fused_step_skips_non_finite_gradients_on_the_device_and_never_waits_for_it(enabled):
    amp = MixedPrecision(CPU, enabled=enabled, skip_on_device=True, max_consecutive_skips=3)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)  # the CPU has the fused kernel too
    results = [_fused_step(amp, model, optimizer, bad) for bad in (False, True, True, False, True)]
    assert [changed for _, changed, _ in results] == [True, False, False, True, False]
    assert all(answer is None and syncs == 0 for answer, _, syncs in results)
    assert int(optimizer.state[model.weight]["step"]) == 2  # skipped steps leave the step count too
    assert not hasattr(optimizer, "found_inf")
    assert amp.skipped_steps == 3 and amp.consecutive_skips == 1  # read when asked for
    # The run of skips continues across reads, and reaching the limit is reported at the next read.
    _fused_step(amp, model, optimizer, True)
    _fused_step(amp, model, optimizer, True)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        amp.settle_skips()


def test_the_device_decides_only_where_the_optimizer_takes_its_verdict_and_by_default_on_cuda():
    amp = MixedPrecision(CPU, skip_on_device=True)
    model = torch.nn.Linear(4, 2)
    plain = torch.optim.Adam(model.parameters(), lr=0.1)  # multi-tensor: reads the verdict on the host
    assert _fused_step(amp, model, plain, True)[:2] == (False, False)
    assert amp.skipped_steps == 1
    assert not MixedPrecision(CPU).skip_on_device and not MixedPrecision(NPU).skip_on_device
    cuda = DeviceInfo(kind="cuda", index=0, name="H100", backend="nccl", torch_device="cpu")
    assert MixedPrecision(cuda).skip_on_device


def test_a_grad_scaler_with_a_fused_optimizer_counts_its_skips_on_the_device():
    amp = MixedPrecision(CPU, skip_on_device=True)
    amp._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)  # the CUDA fp16 path, on CPU tensors
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    results = [_fused_step(amp, model, optimizer, bad) for bad in (False, True, False)]
    assert [changed for _, changed, _ in results] == [True, False, True]
    assert all(syncs == 0 for _, _, syncs in results)
    assert amp.skipped_steps == 1 and amp.consecutive_skips == 0
    assert amp._scaler.get_scale() == 2.0**3  # the skipped step halved the scale
