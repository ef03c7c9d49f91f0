"""The accelerator fakes of common/fakes enforce the contracts of the packages they stand for, and fail
where the real ones fail (each case names the behaviour of the real source it checks)."""

from __future__ import annotations

import importlib
import socket
import sys

import pytest
import torch

from common.fakes import installed_apex, installed_torch_npu, overflow_in_backward, raise_overflow
from common.fakes.collectives import collective_checks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    port = _free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, world, port, queue)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return results


# ---------------------------------------------------------------- torch_npu: installation and devices
def test_torch_npu_is_importable_only_while_installed():
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    with installed_torch_npu(device_count=2, name="Ascend910B") as chip:
        torch_npu = importlib.import_module("torch_npu")
        assert torch.npu is torch_npu.npu and sys.modules["torch.npu"] is torch_npu.npu
        assert torch.npu.is_available() and torch.npu.device_count() == 2
        torch.npu.set_device(1)
        assert torch.npu.current_device() == 1 == chip.current
        assert torch.npu.get_device_name(0) == "Ascend910B"
        with pytest.raises(AssertionError, match="Invalid device id"):
            torch.npu.get_device_name(2)
        with pytest.raises(RuntimeError, match="invalid device id"):
            torch.npu.set_device(2)
        torch.npu.synchronize()
        assert chip.synchronize_calls == 1
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    with pytest.raises(ImportError):
        importlib.import_module("torch_npu")


def test_set_rng_state_all_with_more_states_than_devices_raises_index_error():
    with installed_torch_npu(device_count=2):
        states = torch.npu.get_rng_state_all()
        assert len(states) == 2
        with pytest.raises(IndexError):
            torch.npu.set_rng_state_all(states + states)


# ---------------------------------------------------------------- torch_npu: the float-status flag
def test_saturation_mode_overflow_leaves_finite_gradients_and_raises_the_flag():
    with installed_torch_npu(support_inf_nan=False) as chip:
        import torch_npu

        assert not torch_npu.npu.utils.is_support_inf_nan()
        w = torch.ones(3, requires_grad=True)
        overflow_in_backward(w * 2).sum().backward()
        assert torch.isfinite(w.grad).all() and chip.overflow
        assert torch.npu.get_npu_overflow_flag()
        assert torch_npu.npu_get_float_status(torch.zeros(8))[0] != 0
        torch.npu.clear_npu_overflow_flag()
        assert not torch.npu.get_npu_overflow_flag()
        raise_overflow()
        assert torch_npu.npu.utils.npu_check_overflow(w.grad)  # reads the flag, not the values ...
        assert not chip.overflow  # ... and clears it after a hit


def test_inf_nan_mode_overflow_is_inf_and_the_flag_api_refuses():
    with installed_torch_npu(support_inf_nan=True) as chip:
        import torch_npu

        w = torch.ones(3, requires_grad=True)
        overflow_in_backward(w).sum().backward()
        assert torch.isinf(w.grad).all() and not chip.overflow
        with pytest.raises(RuntimeError, match="npu_check_overflow"):
            torch_npu.npu.utils.get_npu_overflow_flag()
        with pytest.warns(UserWarning, match="useless"):
            torch_npu.npu.utils.clear_npu_overflow_flag()
        assert torch_npu.npu.utils.npu_check_overflow(w.grad)


# ---------------------------------------------------------------- torch_npu: GradScaler
def _scaled_step(scaler, weight: torch.Tensor, optimizer, overflow: bool) -> None:
    optimizer.zero_grad()
    out = weight * 3.0
    if overflow:
        out = overflow_in_backward(out)
    scaler.scale(out.sum()).backward()
    scaler.step(optimizer)
    scaler.update()


def test_grad_scaler_skips_a_flagged_step_with_finite_gradients_and_halves_the_scale():
    with installed_torch_npu(support_inf_nan=False):
        from torch_npu.npu.amp import GradScaler

        assert torch.npu.amp.GradScaler is GradScaler
        weight = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.SGD([weight], lr=0.1)
        scaler = GradScaler(init_scale=8.0)
        _scaled_step(scaler, weight, optimizer, overflow=True)
        assert torch.isfinite(weight.grad).all()
        assert torch.equal(weight.detach(), torch.ones(4)) and scaler.get_scale() == 4.0
        _scaled_step(scaler, weight, optimizer, overflow=False)
        torch.testing.assert_close(weight.detach(), torch.full((4,), 0.7))
        assert scaler.get_scale() == 4.0 and scaler.state_dict()["dynamic"] is True


def test_grad_scaler_clears_a_stale_flag_when_it_scales():
    with installed_torch_npu(support_inf_nan=False):
        from torch_npu.npu.amp import GradScaler

        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scaler = GradScaler(init_scale=2.0)
        raise_overflow()  # an overflow in the forward, before scale(): not this backward's
        _scaled_step(scaler, weight, optimizer, overflow=False)
        assert torch.equal(weight.detach(), torch.full((2,), -2.0))


def test_grad_scaler_refuses_tensors_off_the_npu():
    with installed_torch_npu(tensor_device="meta"):
        from torch_npu.npu.amp import GradScaler

        with pytest.raises(ValueError, match="npu"):
            GradScaler().scale(torch.ones(()))


def _scaler_rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with installed_torch_npu(support_inf_nan=False), collective_checks("hccl", "cpu") as checks:
            from torch_npu.npu.amp import GradScaler

            weight = torch.nn.Parameter(torch.ones(2))
            optimizer = torch.optim.SGD([weight], lr=0.5)
            scaler = GradScaler(init_scale=4.0)
            _scaled_step(scaler, weight, optimizer, overflow=rank == 0)  # only rank 0 overflows
            first = (weight.detach().tolist(), scaler.get_scale())
            _scaled_step(scaler, weight, optimizer, overflow=False)
            second = (weight.detach().tolist(), scaler.get_scale())
            refusals = []
            for bad in (torch.ones(2, dtype=torch.float64), torch.ones(2, device="meta")):
                try:
                    dist.all_reduce(bad)
                except RuntimeError as exc:
                    refusals.append(str(exc))
            wide = torch.full((2,), float(rank), dtype=torch.float64)
            dist.broadcast(wide, src=1)  # HCCL broadcasts any dtype
            ops = sorted({(op, str(dtype)) for op, dtype, _ in checks.calls})
        queue.put(
            (
                rank,
                {"first": first, "second": second, "refusals": refusals, "wide": wide.tolist(), "ops": ops},
            )
        )
    finally:
        dist.destroy_process_group()


def test_grad_scaler_and_hccl_checks_over_two_gloo_ranks():
    results = _spawn(_scaler_rank)
    for rank in (0, 1):
        got = results[rank]
        # torch_npu's _sync_dist_overflow_count: rank 1's gradients were fine, it skips with rank 0.
        assert got["first"] == ([1.0, 1.0], 2.0)
        assert got["second"] == ([-0.5, -0.5], 2.0)
        assert "Unsupported data type at::kDouble" in got["refusals"][0]
        assert "Tensors must be NPU and dense" in got["refusals"][1]
        assert got["wide"] == [1.0, 1.0]
        assert ("all_reduce", "torch.float32") in got["ops"]


# ---------------------------------------------------------------- apex
def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_o2_replaces_zero_grad_by_a_function_without_arguments():
    with installed_torch_npu(), installed_apex("ascend") as amp:
        model, optimizer = amp.initialize(*_model_and_optimizer(), opt_level="O2", combine_grad=True)
        with pytest.raises(TypeError, match="set_to_none"):
            optimizer.zero_grad(set_to_none=True)
        optimizer.zero_grad()
        assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32
        assert model(torch.randn(2, 3)).dtype == torch.float32  # outputs cast back, as apex's patch_forward
        assert model.state_dict()["0.weight"].dtype == torch.float32
        with pytest.raises(RuntimeError, match="only be passed through amp.initialize once"):
            amp.initialize(_model_and_optimizer()[0], optimizer, opt_level="O2")


def test_o1_keeps_zero_grad_on_nvidia_but_not_with_ascends_combine_grad():
    with installed_torch_npu(), installed_apex("ascend") as amp:
        _, optimizer = amp.initialize(*_model_and_optimizer(), opt_level="O1", combine_grad=True)
        with pytest.raises(TypeError):
            optimizer.zero_grad(set_to_none=True)
    with installed_apex("nvidia") as amp:
        model, optimizer = _model_and_optimizer()
        with pytest.raises(TypeError, match="unexpected keyword argument 'combine_grad'"):
            amp.initialize(model, optimizer, opt_level="O1", combine_grad=True)


def test_apex_refuses_what_the_real_one_refuses():
    with installed_apex("nvidia") as amp:
        with pytest.raises(RuntimeError, match="not been initialized"):
            with amp.scale_loss(torch.ones(()), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1)):
                pass
        with pytest.raises(RuntimeError, match="expected a cuda tensor"):
            amp.initialize(*_model_and_optimizer(), opt_level="O2")
        with pytest.raises(RuntimeError, match="Unexpected optimization level"):
            amp.initialize(*_model_and_optimizer(), opt_level="O5")
    with installed_torch_npu(), installed_apex("ascend") as amp:
        with pytest.raises(RuntimeError, match="combine_grad=True .* should only be set"):
            amp.initialize(*_model_and_optimizer(), opt_level="O3", combine_grad=True)
    with installed_apex("ascend") as amp:  # without torch_npu: Ascend's scaler allocates NPU buffers
        with pytest.raises(AttributeError, match="npu"):
            amp.initialize(*_model_and_optimizer(), opt_level="O2")


def test_scale_loss_overflow_skips_the_next_step_once_and_halves_the_scale():
    with installed_torch_npu(support_inf_nan=False), installed_apex("ascend") as amp:
        model, optimizer = amp.initialize(*_model_and_optimizer(), opt_level="O2", max_loss_scale=128.0)
        scaler = amp._amp_state.loss_scalers[0]
        assert scaler.dynamic and scaler.loss_scale() == 128.0
        x = torch.randn(4, 3)
        optimizer.zero_grad()
        with amp.scale_loss(overflow_in_backward(model(x)).sum(), optimizer) as scaled:
            scaled.backward()
        assert scaler._has_overflow and scaler.loss_scale() == 64.0
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()  # the patched skip_step
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        optimizer.zero_grad()
        with amp.scale_loss(model(x).sum(), optimizer) as scaled:
            scaled.backward()
        assert not scaler._has_overflow
        optimizer.step()  # the real step again
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        saved = amp.state_dict()
        assert saved == {"loss_scaler0": {"loss_scale": 64.0, "unskipped": 1}}
        scaler._loss_scale = 1.0
        amp.load_state_dict(saved)
        assert scaler.loss_scale() == 64.0
        with pytest.raises(RuntimeError, match="Unexpected key"):
            amp.load_state_dict({"scaler": {}})


# ---------------------------------------------------------------- collectives
def test_collective_checks_refuse_before_the_collective_runs():
    import torch.distributed as dist

    original = dist.all_reduce
    with collective_checks("nccl", "cuda:0") as checks:
        with pytest.raises(RuntimeError, match="Tensors must be CUDA and dense"):
            dist.all_reduce(torch.ones(2))  # raised before gloo/NCCL is reached: no group needed
        with pytest.raises(RuntimeError, match="CUDA and dense"):
            dist.all_gather([torch.ones(1)], torch.ones(1))
        assert [op for op, _, _ in checks.calls] == ["all_reduce", "all_gather"]
    assert dist.all_reduce is original
    with pytest.raises(ValueError, match="hccl"):
        with collective_checks("mpi"):
            pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_convolutions_accumulate_in_float32_and_keep_their_dtypes_until_the_context_ends(dtype):
    from common.fakes import convolutions_accumulating_in_float32

    torch.manual_seed(0)
    conv, up = (
        torch.nn.Conv3d(2, 3, 3, padding=1).to(dtype),
        torch.nn.ConvTranspose2d(2, 2, 2, stride=2).to(dtype),
    )
    x, x2 = torch.randn(1, 2, 4, 6, 6, dtype=dtype), torch.randn(1, 2, 3, 3, dtype=dtype)
    original = torch.nn.functional.conv3d
    with convolutions_accumulating_in_float32():
        assert torch.nn.functional.conv3d is not original
        out, out2 = conv(x), up(x2)
        (out.float().sum() + out2.float().sum()).backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps its own kernels
            assert conv.float()(x.float()).dtype == torch.bfloat16
    assert torch.nn.functional.conv3d is original
    conv = conv.to(dtype)
    expected = torch.nn.functional.conv3d(x.float(), conv.weight.float(), conv.bias.float(), padding=1).to(
        dtype
    )
    assert out.dtype == out2.dtype == dtype and torch.equal(out, expected)
    assert up.weight.grad.dtype == dtype and up.weight.grad.abs().sum() > 0
