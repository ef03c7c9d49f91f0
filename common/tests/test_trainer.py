"""The shared runtime: start-up from checkpoints, model preparation order and the outer loop's stop rules."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from common import trainer
from common.checkpoint import save_checkpoint
from common.cli import RunOptions, Runtime, setup_runtime
from common.engine import TrainingRun
from common.errors import CheckpointError, ConfigError
from common.summary import SummaryTarget
from common.trainer import Hooks, LoopConfig, StartPoint, fit, prepare


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """These runs are single-process whatever launcher variables the environment holds."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "RANK_SIZE", "RANK_ID"):
        monkeypatch.delenv(key, raising=False)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))


def _target(folder: Path) -> SummaryTarget:
    return SummaryTarget(folder, "Toy", "Toy_bs2_1p_acc", 2, 1, "acc", time.time())


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 1, 8, 8, generator=gen), (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).float())
            for _ in range(n)]  # fmt: skip


def _runtime(**options) -> Runtime:
    return setup_runtime(RunOptions(**{"seed": 0, "log_interval": 1, "warmup_steps": 0, **options}))


def _run(tmp_path: Path, runtime: Runtime, scheduler=None) -> TrainingRun:
    model, optimizer = prepare(_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime)
    if scheduler is not None:
        scheduler = scheduler(optimizer)
    return TrainingRun(runtime, tmp_path / "run", model=model, optimizer=optimizer, scheduler=scheduler,
                       selection_key="score", target=_target(tmp_path))  # fmt: skip


class ScriptedHooks(Hooks):
    """Validation scores from a list; records which epochs validated and what on_epoch saw."""

    def __init__(self, scores=None):
        self.scores = list(scores or [])
        self.validated: list[int] = []
        self.results: list = []

    def validate(self, epoch):
        self.validated.append(epoch)
        score = self.scores[epoch] if epoch < len(self.scores) else 0.0
        return {"score": score, "loss": 1.0 - score}

    def on_epoch(self, result):
        self.results.append(result)


def _bce(out, target):
    return nn.functional.binary_cross_entropy_with_logits(out, target)


# ---- LoopConfig --------------------------------------------------------------------------------------
def test_plan_applies_the_step_cap_over_epochs():
    assert LoopConfig(epochs=3).plan(4) == [4, 4, 4]
    assert LoopConfig(epochs=3, max_steps=6).plan(4) == [4, 2]
    assert LoopConfig(epochs=3, max_steps=100).plan(4) == [4, 4, 4]
    assert LoopConfig(epochs=0, steps_per_epoch=[5, 5, 3], max_steps=7).plan(99) == [5, 2]


def test_loop_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="time basis"):
        LoopConfig(epochs=1, time_basis="gpu")
    with pytest.raises(ConfigError, match="validation interval"):
        LoopConfig(epochs=1, val_interval=-1)


def test_schedule_flags_accept_every_original_spelling():
    import argparse

    from common.cli import add_schedule_args

    parser = argparse.ArgumentParser()
    add_schedule_args(parser)
    for flags in (["--train_steps=7"], ["--max_iters=7"], ["--max_steps=7"]):
        assert parser.parse_args(flags).max_steps == 7
    for flags in (["--val_step=3"], ["--eval_interval=3"], ["--val_interval=3"]):
        assert parser.parse_args(flags).val_interval == 3
    args = parser.parse_args(["--max_time=60", "--max_time_basis=cpu"])
    assert (args.time_limit, args.time_limit_basis) == (60.0, "cpu")
    loop = LoopConfig.from_args(args, epochs=4, per_device_batch=2)
    assert (loop.time_limit, loop.time_basis, loop.epochs) == (60.0, "cpu", 4)
    assert (loop.precise_bn_batches, loop.precise_bn_compare) == (200, False)  # auto: on at a batch of 2


# ---- StartPoint -------------------------------------------------------------------------------------
def test_resume_refuses_bare_weights_and_names_the_other_flag(tmp_path):
    weights = save_checkpoint(_net().state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="holds weights only.*--pretrained"):
        StartPoint.read(resume=weights)
    start = StartPoint.read(resume=weights, weights_only_resume="init")
    assert not start.resuming and start.init_path == weights


def test_missing_checkpoint_is_named_before_any_work(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope.pth does not exist \(--pth_path"):
        StartPoint.read(init=tmp_path / "nope.pth", init_flag="--pth_path")


def test_initial_weights_flag_resumes_a_training_state_only_when_allowed(tmp_path):
    runtime = _runtime()
    run = _run(tmp_path, runtime)
    run.end_epoch(0, _fake_stats(), {"score": 0.5})
    latest = run.latest_path
    start = StartPoint.read(init=latest, init_may_resume=True)
    assert start.resuming and start.resume_path == latest
    start = StartPoint.read(init=latest)
    assert not start.resuming and start.init_path == latest


def test_start_weights_of_another_network_stop_before_anything_is_written(tmp_path):
    other = save_checkpoint(nn.Conv2d(3, 3, 1).state_dict(), tmp_path / "other.pth")
    start = StartPoint.read(init=other)
    with pytest.raises(CheckpointError):
        start.load_weights(_net())


def _fake_stats():
    from common.engine import EpochStats

    return EpochStats(loss_mean=1.0, last_loss=1.0, steps=1, images=2, skipped_steps=0, seconds=0.1,
                      data_wait_seconds=0.0, timed_images=2, timed_seconds=0.1)  # fmt: skip


# ---- prepare ----------------------------------------------------------------------------------------
def test_prepare_runs_in_one_order_apex_before_ddp_before_compile(monkeypatch):
    calls: list[str] = []
    runtime = _runtime(channels_last=True, compile=True)

    class RecordingAmp:
        def prepare(self, model, optimizer):
            calls.append("amp")
            assert next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
            assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
            return model, optimizer

    class RecordingDist:
        def wrap(self, model, device):
            calls.append("ddp")
            return nn.ModuleDict({"module": model})

    def fake_compile(model, **kwargs):
        calls.append("compile")
        assert isinstance(model, nn.ModuleDict)  # the DDP-wrapped module is compiled
        return model

    def make_optimizer(model):
        calls.append("optimizer")
        return torch.optim.SGD(model.parameters(), lr=0.1)

    monkeypatch.setattr(torch, "compile", fake_compile)
    runtime = Runtime(device=runtime.device, dist=RecordingDist(), amp=RecordingAmp(), options=runtime.options,
                      flags={})  # fmt: skip
    prepare(_net(), make_optimizer, runtime)
    assert calls == ["optimizer", "amp", "ddp", "compile"]


def test_prepare_moves_a_module_loss_with_its_buffers():
    runtime = _runtime()

    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.ones(2))

    loss = Weighted()
    moved = []
    loss.to = lambda device: moved.append(device) or loss  # type: ignore[method-assign]
    prepare(_net(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), runtime, loss_fn=loss)
    assert moved == [runtime.device.device]


def test_memory_format_follows_the_convolutions():
    assert trainer.memory_format_for(_net()) == torch.channels_last
    assert trainer.memory_format_for(nn.Conv3d(1, 1, 1)) == torch.channels_last_3d


# ---- fit --------------------------------------------------------------------------------------------
def test_fit_stops_at_the_step_cap_and_validates_the_last_epoch(tmp_path):
    runtime = _runtime()
    run = _run(tmp_path, runtime)
    hooks = ScriptedHooks([0.1, 0.2, 0.3])
    result = fit(run, LoopConfig(epochs=3, max_steps=5, val_interval=10), train_loader=_batches(3),
                 loss_fn=_bce, hooks=hooks)  # fmt: skip
    assert result.stopped_by == "max_steps" and run.global_step == 5
    assert hooks.validated == [1]  # no periodic validation at interval 10, but the last epoch is scored
    assert [r.stats.steps for r in hooks.results] == [3, 2]


def test_fit_early_stopping_counts_epochs_without_a_better_score(tmp_path):
    runtime = _runtime()
    run = _run(tmp_path, runtime)
    hooks = ScriptedHooks([0.5, 0.4, 0.3, 0.9])
    result = fit(run, LoopConfig(epochs=4, early_stopping=2), train_loader=_batches(1), loss_fn=_bce,
                 hooks=hooks)  # fmt: skip
    assert result.stopped_by == "early_stopping" and result.epochs_run == 3 and run.best_epoch == 1


def test_fit_time_limit_truncates_the_epoch_that_would_pass_it(tmp_path, monkeypatch):
    runtime = _runtime()
    run = _run(tmp_path, runtime)
    now = [0.0]
    monkeypatch.setattr(trainer.Clock, "elapsed", lambda self: now[0])

    class Clocked(ScriptedHooks):
        def on_step(self, info):
            now[0] += 1.0  # one second per logged step (log_interval 1)

    hooks = Clocked()
    result = fit(
        run, LoopConfig(epochs=5, time_limit=6.5), train_loader=_batches(4), loss_fn=_bce, hooks=hooks
    )
    # Epoch 1: 4 steps (4 s). Epoch 2: 2.5 s left at 1 s/step -> 2 steps, then the limit stops the run.
    assert [r.stats.steps for r in hooks.results] == [4, 2]
    assert result.stopped_by == "time_limit" and hooks.validated == [0, 1]


def test_fit_steps_plateau_scheduler_with_the_validation_loss_and_records_the_epoch_lr(tmp_path):
    runtime = _runtime()
    run = _run(tmp_path, runtime, lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0))
    hooks = ScriptedHooks([0.5, 0.4, 0.3])  # the loss rises after the first epoch
    fit(run, LoopConfig(epochs=3), train_loader=_batches(1), loss_fn=_bce, hooks=hooks)
    assert [round(h["lr"], 6) for h in run.history] == [0.1, 0.1, 0.01]
    assert hooks.results[1].lr_after == pytest.approx(0.01)


def test_fit_continues_a_resumed_run_at_its_epoch(tmp_path):
    runtime = _runtime()
    run = _run(tmp_path, runtime)
    fit(run, LoopConfig(epochs=2), train_loader=_batches(2), loss_fn=_bce, hooks=ScriptedHooks())
    resumed = _run(tmp_path, runtime)
    assert resumed.start(StartPoint.read(resume=run.latest_path)) == 2
    hooks = ScriptedHooks()
    result = fit(resumed, LoopConfig(epochs=3), train_loader=_batches(2), loss_fn=_bce, hooks=hooks)
    assert result.epochs_run == 1 and [r.epoch for r in hooks.results] == [2] and resumed.global_step == 6
