"""Recomputed BatchNorm statistics: equal to PyTorch's update_bn, consistent over ranks, kept in checkpoints,
and without effect on training itself."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from common import precise_bn
from common.amp import MixedPrecision
from common.checkpoint import load_checkpoint
from common.cli import RunOptions, Runtime, setup_runtime
from common.device import DeviceInfo
from common.distributed import DistContext
from common.engine import TrainingRun, to_device
from common.errors import ConfigError
from common.fakes.collectives import collective_checks
from common.summary import SummaryTarget
from common.testing import run_ranks
from common.trainer import Hooks, LoopConfig, fit, prepare


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "RANK_SIZE", "RANK_ID"):
        monkeypatch.delenv(key, raising=False)


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1),
    )  # fmt: skip


def _batches(n: int, batch: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # Each batch from another distribution: the heterogeneous small batches where the running average drifts.
    return [(torch.randn(batch, 1, 8, 8, generator=gen) * (1 + i) + i, (torch.rand(batch, 1, 8, 8, generator=gen) > 0.5).float())
            for i in range(n)]  # fmt: skip


def _runtime() -> Runtime:
    return setup_runtime(RunOptions(seed=0, log_interval=1, warmup_steps=0))


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in precise_bn.batchnorm_layers(model) for t in (m.running_mean, m.running_var)]


def test_the_recomputed_statistics_equal_pytorch_update_bn():
    batches = _batches(5)
    ours, theirs = _net(), _net()
    used = precise_bn.recompute_bn_statistics(ours, batches, _runtime(), batches=99, prepare_batch=to_device)
    torch.optim.swa_utils.update_bn(((x for x, _ in batches)), theirs)
    assert used == 5
    for a, b in zip(_stats(ours), _stats(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_only_the_first_batches_count_and_modes_and_momentum_come_back():
    model = _net(dropout=0.5)
    model.train()
    model[3].eval()  # a mode the pass must restore as it was, not as a blanket train()
    seen = []
    model[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    precise_bn.recompute_bn_statistics(model, _batches(6), _runtime(), batches=2, prepare_batch=to_device)
    assert seen == [False, False]  # dropout stays off during the pass: statistics of evaluation inputs
    reference = _net()
    torch.optim.swa_utils.update_bn(((x for x, _ in _batches(2))), reference)
    for a, b in zip(_stats(model), _stats(reference)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True, True, True]
    assert all(layer.momentum == 0.1 for layer in precise_bn.batchnorm_layers(model))


def test_the_ragged_last_batch_of_a_loader_is_left_out():
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.cat([x for x, _ in _batches(3, batch=2)])[:5]  # 5 images: batches of 2, 2 and 1
    loader = DataLoader(TensorDataset(images, images), batch_size=2)
    model, reference = _net(), _net()
    used = precise_bn.recompute_bn_statistics(model, loader, _runtime(), batches=10, prepare_batch=to_device)
    torch.optim.swa_utils.update_bn((images[i : i + 2] for i in (0, 2)), reference)
    assert used == 2
    for a, b in zip(_stats(model), _stats(reference)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_network_without_batchnorm_is_left_alone():
    model = nn.Conv2d(1, 1, 3)
    assert (
        precise_bn.recompute_bn_statistics(model, _batches(2), _runtime(), batches=5, prepare_batch=to_device)
        == 0
    )


def test_the_switch_turns_on_below_a_per_device_batch_of_eight():
    assert precise_bn.batches_per_rank("auto", 200, 1) == 200
    assert precise_bn.batches_per_rank("auto", 200, 7) == 200
    assert precise_bn.batches_per_rank("auto", 200, 8) == 0
    assert precise_bn.batches_per_rank("on", 50, 64) == 50
    assert precise_bn.batches_per_rank("off", 50, 1) == 0
    assert precise_bn.batches_per_rank("compare", 50, 64) == 50
    with pytest.raises(ConfigError, match="--precise_bn must be one of"):
        precise_bn.batches_per_rank("yes", 50, 1)


# ------------------------------------------------------------------------------------------- in the loop
class _Scored(Hooks):
    """Validation on fixed images in evaluation mode: the score depends on the running statistics."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def validate(self, epoch):
        self.model.eval()
        with torch.no_grad():
            out = self.model(_batches(1, batch=2, seed=9)[0][0])
        self.model.train()
        self.seen.append(_stats(self.model))
        return {"score": float(out.mean()), "loss": float(out.abs().mean())}


def _fit(tmp_path: Path, loop: LoopConfig, name: str):
    runtime = _runtime()
    model, optimizer = prepare(_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.05), runtime)
    target = SummaryTarget(tmp_path, "Toy", "Toy_bs2_1p_acc", 2, 1, "acc", time.time())
    run = TrainingRun(runtime, tmp_path / name, model=model, optimizer=optimizer, selection_key="score",
                      target=target)  # fmt: skip
    hooks = _Scored(model)
    fit(run, loop, train_loader=_batches(4), loss_fn=nn.functional.binary_cross_entropy_with_logits,
        hooks=hooks, bn_loader=_batches(3, seed=5))  # fmt: skip
    return run, model, hooks


def test_training_is_the_same_with_and_without_it_and_the_checkpoint_keeps_what_validation_used(tmp_path):
    off_run, off, off_hooks = _fit(tmp_path, LoopConfig(epochs=3), "off")
    on_run, on, on_hooks = _fit(tmp_path, LoopConfig(epochs=3, precise_bn_batches=3), "on")
    # BatchNorm trains on batch statistics: the weights are bit-identical, only the statistics differ.
    for (name, a), b in zip(off.state_dict().items(), on.state_dict().values()):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(a, b), name
    assert not torch.allclose(off_hooks.seen[-1][0], on_hooks.seen[-1][0])
    # What the last validation used is what the last checkpoint holds (predict and export read it).
    state = load_checkpoint(on_run.latest_path)["state_dict"]
    saved = [state[k] for k in state if k.endswith(("running_mean", "running_var"))]
    for a, b in zip(on_hooks.seen[-1], saved):
        assert torch.equal(a, b)
    # And it is the recomputation over the BN batches with the final weights.
    fresh = _net()
    fresh.load_state_dict(state)
    torch.optim.swa_utils.update_bn((x for x, _ in _batches(3, seed=5)), fresh)
    for a, b in zip(_stats(fresh), saved):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compare_scores_both_and_keeps_the_running_averages(tmp_path):
    off_run, off, _ = _fit(tmp_path, LoopConfig(epochs=2), "off")
    on_run, _, _ = _fit(tmp_path, LoopConfig(epochs=2, precise_bn_batches=3), "on")
    both_run, both, _ = _fit(
        tmp_path, LoopConfig(epochs=2, precise_bn_batches=3, precise_bn_compare=True), "both"
    )
    for a, b in zip(off.state_dict().values(), both.state_dict().values()):
        assert torch.equal(a, b)  # the kept statistics are the running averages: as if it were off
    for off_row, on_row, row in zip(off_run.history, on_run.history, both_run.history):
        assert row["score"] == off_row["score"]
        assert row["precise_bn_score"] == on_row["score"]
        assert row["precise_bn_val_loss"] == on_row["val_loss"]


def test_fit_refuses_the_switch_without_batches_to_recompute_on(tmp_path):
    runtime = _runtime()
    model, optimizer = prepare(_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.05), runtime)
    target = SummaryTarget(tmp_path, "Toy", "Toy_bs2_1p_acc", 2, 1, "acc", time.time())
    run = TrainingRun(
        runtime, tmp_path, model=model, optimizer=optimizer, selection_key="score", target=target
    )
    with pytest.raises(ValueError, match="no bn_loader"):
        fit(run, LoopConfig(epochs=1, precise_bn_batches=2), train_loader=_batches(1), loss_fn=nn.MSELoss())


# ------------------------------------------------------------------------------------ over two ranks
def _rank(rank: int, world: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # HCCL's checks: every collective tensor on the group's device, no float64 reduction.
        with collective_checks("hccl", "cpu"):
            device = DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo", torch_device="cpu")
            ctx = DistContext(rank=rank, world_size=world, backend="hccl", device=device.device)
            runtime = Runtime(device=device, dist=ctx, amp=MixedPrecision(device),
                              options=RunOptions(log_interval=1, warmup_steps=0), flags={})  # fmt: skip
            batches = _batches(6)
            # Rank 0 holds three batches, rank 1 four: both use three, the shorter shard's count.
            shard = batches[0:6:2] if rank == 0 else batches[1:6:2] + [batches[0]]
            model = _net()
            used = precise_bn.recompute_bn_statistics(
                model, shard, runtime, batches=10, prepare_batch=to_device
            )
            queue.put((rank, {"used": used, "stats": [t.tolist() for t in _stats(model)]}))
    except BaseException as exc:  # noqa: BLE001 - report instead of leaving the peer waiting
        queue.put((rank, {"error": repr(exc)}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_statistics_one_process_computes_over_both_shards():
    results = run_ranks(_rank, 2, timeout=180)
    assert "error" not in results[0] and "error" not in results[1], results
    single = _net()
    torch.optim.swa_utils.update_bn((x for x, _ in _batches(6)), single)
    assert results[0]["used"] == results[1]["used"] == 3
    for a, b, c in zip(results[0]["stats"], results[1]["stats"], _stats(single)):
        assert a == b  # every rank holds the same statistics
        torch.testing.assert_close(torch.tensor(a), c, rtol=1e-5, atol=1e-5)


class _Keys(torch.utils.data.Dataset):
    """A SeededDataset-like set that returns the key it was given (a tuple would mean augmentation)."""

    def __len__(self) -> int:
        return 11

    def __getitem__(self, key):
        assert not isinstance(key, tuple), "statistics batches must not be augmented"
        return torch.tensor(key)


def test_statistics_batches_are_shuffled_full_unaugmented_and_equal_in_number_on_every_rank():
    from common.loader import build_statistics_loader

    def batches(rank: int, world: int, seed: int = 0, workers: int | None = 0) -> list[list[int]]:
        ctx = DistContext(rank=rank, world_size=world, backend="gloo")
        return [b.tolist() for b in build_statistics_loader(_Keys(), 2, ctx, seed=seed, workers=workers)]

    one = batches(0, 1)
    assert len(one) == 5 and all(len(b) == 2 for b in one)  # 11 images: five full batches of two
    assert sorted(i for b in one for i in b) != [i for b in one for i in b]  # not in file order
    assert batches(0, 1) == one and batches(0, 1, seed=1) != one  # fixed by the seed
    assert batches(0, 1, workers=None) == one  # workers chosen as for the other loaders
    ranks = [batches(r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 5 per rank: two full batches each
    seen = [i for shard in ranks for b in shard for i in b]
    assert len(seen) == len(set(seen)) == 8
