"""Device selection, mixed precision, checkpoints and the summary writer."""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint as ckpt
from common.amp import MixedPrecision, parse_loss_scale
from common.cli import add_common_args
from common.device import DeviceInfo, resolve_index, select_device
from common.distributed import modelzoo_env_to_torchrun
from common.errors import CheckpointError, ConfigError, TrainingDiverged
from common.loader import ShardedSampler, per_rank_batch
from common.summary import RunSummary, SummaryTarget, parse_summary, write_summary

CPU = DeviceInfo(kind="cpu", index=0, name="cpu", backend="gloo")


# ---- device -------------------------------------------------------------------------------------------
def test_auto_selects_cpu_here_and_reports_versions():
    info = select_device("auto")
    assert info.kind == "cpu" and info.backend == "gloo" and info.device == torch.device("cpu")
    assert info.versions["torch"] == torch.__version__
    assert "cpu" in info.describe()


def test_unknown_and_unavailable_devices_are_clear_errors():
    with pytest.raises(ConfigError, match="not one of"):
        select_device("tpu")
    with pytest.raises(ConfigError, match="torch_npu"):
        select_device("npu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            select_device("gpu")


def test_device_index_precedence(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ASCEND_DEVICE_ID", raising=False)
    assert resolve_index(None) == 0
    monkeypatch.setenv("ASCEND_DEVICE_ID", "3")
    assert resolve_index(None) == 3
    assert resolve_index(5) == 5
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_index(5) == 2


def test_modelzoo_variables_become_torchrun_variables(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # Set, then removed: monkeypatch then restores the absence, so the variables the call under test
        # writes do not leak into later tests (a leaked WORLD_SIZE=8 makes them wait for 7 peers).
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RANK_SIZE", "8")
    monkeypatch.setenv("RANK_ID", "5")
    modelzoo_env_to_torchrun()
    assert (os.environ["WORLD_SIZE"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("8", "5", "5")
    assert os.environ["MASTER_ADDR"] and os.environ["MASTER_PORT"]


# ---- flags --------------------------------------------------------------------------------------------
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser.parse_args(list(argv))


def test_both_modelzoo_spellings_are_accepted():
    a = _parse("--opt-level", "O1", "--loss-scale", "128", "--device_id", "2")
    b = _parse("--apex_level=O1", "--loss_scale=128", "--npu_idx=2")
    assert (
        (a.opt_level, a.loss_scale, a.device_id)
        == (b.opt_level, b.loss_scale, b.device_id)
        == ("O1", "128", 2)
    )
    assert _parse("--use_apex").use_apex == 1 and _parse("--amp").amp and not _parse("--amp", "--no-amp").amp


def test_bad_opt_level_is_rejected_with_the_valid_choices(capsys):
    with pytest.raises(SystemExit):
        _parse("--opt-level", "O7")
    assert "O0" in capsys.readouterr().err


# ---- mixed precision ----------------------------------------------------------------------------------
def test_loss_scale_parsing():
    assert parse_loss_scale("dynamic") == "dynamic" and parse_loss_scale("128") == 128.0
    for bad in ("-1", "zero"):
        with pytest.raises(ConfigError):
            parse_loss_scale(bad)


def test_cpu_amp_is_bf16_autocast_and_o0_is_fp32():
    amp = MixedPrecision(CPU, enabled=True, opt_level="O2")
    assert amp.enabled and amp.dtype == torch.bfloat16 and amp.amp_type == "O2 bf16"
    with amp.autocast():
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not MixedPrecision(CPU, enabled=True, opt_level="O0").enabled
    assert not MixedPrecision(CPU, enabled=False).enabled
    with pytest.raises(ConfigError):
        MixedPrecision(CPU, enabled=True, dtype="fp16")
    with pytest.raises(ConfigError, match="O0"):
        MixedPrecision(CPU, enabled=True, opt_level="O7")


def _one_step(amp: MixedPrecision, scale_input: float = 1.0) -> tuple[bool, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    before = model.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amp.autocast():
        loss = model(torch.ones(2, 3) * scale_input).sum()
    amp.backward(loss, opt)
    return amp.step(opt), before, model.weight.detach()


def test_finite_step_is_applied_and_nan_step_is_skipped_and_counted():
    amp = MixedPrecision(CPU, enabled=False)
    applied, before, after = _one_step(amp)
    assert applied and not torch.equal(before, after)
    applied, before, after = _one_step(amp, scale_input=float("nan"))
    assert not applied and torch.equal(before, after)
    assert amp.skipped_steps == 1 and amp.consecutive_skips == 1
    _one_step(amp)
    assert amp.consecutive_skips == 0 and amp.skipped_steps == 1


def test_persistent_nan_stops_training_with_a_clear_message():
    amp = MixedPrecision(CPU, enabled=False, max_consecutive_skips=3)
    _one_step(amp, float("nan"))
    _one_step(amp, float("nan"))
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        _one_step(amp, float("inf"))


def test_static_loss_scale_unscales_gradients_exactly():
    from common.amp import _StaticScaler

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3)
    scaler = _StaticScaler(128.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(x).sum()).backward()
    assert scaler.step(opt)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x).sum().backward()
    ref_opt.step()
    torch.testing.assert_close(model.weight, reference.weight)
    assert scaler.state_dict() == {"scale": 128.0}


def test_bf16_autocast_loss_matches_fp32_within_tolerance():
    from common.losses import build_loss

    torch.manual_seed(0)
    net = nn.Conv2d(3, 1, 3, padding=1)
    x, y = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    loss_fn = build_loss("BCEDiceLoss")
    fp32 = loss_fn(net(x), y)
    with MixedPrecision(CPU, enabled=True).autocast():
        bf16 = loss_fn(net(x), y)
    assert bf16.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 2e-2


# ---- checkpoints --------------------------------------------------------------------------------------
def test_atomic_save_and_weights_only_load(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    model = nn.Linear(3, 2)
    ckpt.save_checkpoint({"state_dict": model.state_dict(), "epoch": 3, "history": [{"a": 1.0}]}, path)
    state = ckpt.load_checkpoint(path)
    assert state["epoch"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth.tar"
    ckpt.save_checkpoint({"epoch": 1}, path)
    original = path.read_bytes()

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device.*intact"):
        ckpt.save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == original and not list(tmp_path.glob(".*.tmp"))


def test_link_checkpoint_keeps_its_version_when_the_source_is_saved_again(tmp_path):
    latest, best = tmp_path / "checkpoint.pth.tar", tmp_path / "model_best.pth.tar"
    ckpt.save_checkpoint({"epoch": 1}, latest)
    ckpt.link_checkpoint(latest, best)
    ckpt.save_checkpoint({"epoch": 2}, latest)
    assert ckpt.load_checkpoint(best)["epoch"] == 1 and ckpt.load_checkpoint(latest)["epoch"] == 2
    ckpt.link_checkpoint(latest, best)  # replaces the older best
    assert ckpt.load_checkpoint(best)["epoch"] == 2 and not list(tmp_path.glob(".*.tmp"))


def test_link_checkpoint_copies_where_hard_links_fail_and_keeps_the_old_file_on_error(tmp_path, monkeypatch):
    latest, best = tmp_path / "checkpoint.pth.tar", tmp_path / "model_best.pth.tar"
    ckpt.save_checkpoint({"epoch": 1}, latest)
    ckpt.save_checkpoint({"epoch": 0}, best)

    def no_links(*_a, **_k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    ckpt.link_checkpoint(latest, best)
    assert ckpt.load_checkpoint(best)["epoch"] == 1 and best.stat().st_ino != latest.stat().st_ino
    original = best.read_bytes()
    ckpt.save_checkpoint({"epoch": 2}, latest)

    def full_disk(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.shutil, "copyfileobj", full_disk)
    with pytest.raises(CheckpointError, match="model_best.pth.tar: no space left on device.*intact"):
        ckpt.link_checkpoint(latest, best)
    assert best.read_bytes() == original and not list(tmp_path.glob(".*.tmp"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


def test_pickled_code_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        torch.save({"state_dict": {}, "x": _Payload()}, handle, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "pwned_by_checkpoint").exists()


def test_corrupt_and_missing_checkpoints_are_named(tmp_path):
    path = tmp_path / "broken.pth.tar"
    ckpt.save_checkpoint({"state_dict": nn.Linear(50, 50).state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="broken.pth.tar is corrupted or truncated"):
        ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")


def test_load_weights_handles_prefixes_and_names_mismatches():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    wrapped = ckpt.add_module_prefix(model.state_dict())
    assert all(k.startswith("module.") for k in wrapped)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    ckpt.load_weights(fresh, {"state_dict": wrapped})
    assert torch.equal(fresh[0].weight, model[0].weight)
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.ReLU())
    with pytest.raises(
        CheckpointError, match=r"shape mismatches \(1.weight: checkpoint \(1, 4\) vs model \(2, 4\)"
    ):
        ckpt.load_weights(other, model.state_dict())
    bigger = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(1, 1))
    with pytest.raises(CheckpointError, match=r"2 missing keys \(2.weight, 2.bias\)"):
        ckpt.load_weights(bigger, model.state_dict())


def test_a_checkpoint_that_does_not_fit_names_the_command_or_model_that_wrote_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    bigger = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(1, 1))
    command = "train.py --arch=NestedUNet --deep_supervision=True"
    state = {"state_dict": model.state_dict(), "arch": "NestedUNet", "config": {"command": command}}
    with pytest.raises(CheckpointError, match=f"It was written by `{command}`: load it with the same"):
        ckpt.load_weights(bigger, state, name="best.pth.tar")
    with pytest.raises(
        CheckpointError,
        match=r"another --img_ch/--output_ch/--num_classes setting\? It holds a NestedUNet\.$",
    ):
        ckpt.load_weights(bigger, {"state_dict": model.state_dict(), "arch": "NestedUNet"})
    with pytest.raises(CheckpointError, match=r"--num_classes setting\?$"):
        ckpt.load_weights(bigger, model.state_dict())


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---- loaders ------------------------------------------------------------------------------------------
def test_sharded_sampler_covers_every_index_once():
    shards = [list(ShardedSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert per_rank_batch(128, 8) == 16
    with pytest.raises(ConfigError, match="not divisible"):
        per_rank_batch(10, 4)
    with pytest.raises(ConfigError, match="at least 1"):
        per_rank_batch(0, 1)


# ---- summary ------------------------------------------------------------------------------------------
def test_summary_has_the_modelzoo_lines_in_order(tmp_path):
    target = SummaryTarget(tmp_path, "AttU_Net", "AttU_Net_bs16_1p_acc", 16, 1, "acc", start_time=0.0)
    write_summary(
        target, RunSummary(fps=200.0, train_accuracy=0.95, actual_loss=0.25, step_losses=[0.5, 0.25])
    )
    lines = parse_summary(tmp_path / "AttU_Net_bs16_1p_acc.log")
    assert list(lines) == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS",
                           "TrainingTime", "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]  # fmt: skip
    assert lines["TrainingTime"] == "80.00"  # 16 images * 1000 / 200 img/s, in milliseconds
    assert lines["ActualLoss"] == "0.2500" and lines["TrainAccuracy"] == "0.9500"
    assert (tmp_path / "train_AttU_Net_bs16_1p_acc_loss.txt").read_text().split() == ["0.500000", "0.250000"]
    assert "Final Performance images/sec : 200.000" in (tmp_path / "final_result.txt").read_text()


def test_summary_notes_end_the_final_result_block_and_skipped_samples_are_counted(tmp_path, capsys):
    target = SummaryTarget(tmp_path, "VNet", "VNet_bs2_1p_acc", 2, 1, "acc", start_time=0.0)
    note = "--skip_bad_samples: 2 bad sample(s) left out (3 problem(s)); listed in /run/skipped_samples.txt"
    write_summary(
        target, RunSummary(fps=5.0, train_accuracy=0.5, actual_loss=0.1, notes=[note], skipped_samples=2)
    )
    block = (tmp_path / "final_result.txt").read_text().splitlines()
    assert block[-1] == f"Note: {note}" and block[-2].startswith("E2E Training Duration sec")
    assert f"Note: {note}" in capsys.readouterr().out  # the block the shell prints
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_samples"] == 2 and summary["notes"] == [note]
    assert "Note" not in (tmp_path / "VNet_bs2_1p_acc.log").read_text()  # Key = Value lines only
    write_summary(target, RunSummary(fps=5.0, train_accuracy=0.5, actual_loss=0.1))
    assert "Note:" not in (tmp_path / "final_result.txt").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_samples"] == 0


def test_perf_and_eval_summaries_drop_their_lines(tmp_path):
    perf = SummaryTarget(tmp_path, "N", "N_bs4_8p_perf", 4, 8, "perf", start_time=0.0)
    write_summary(perf, RunSummary(fps=10.0, actual_loss=1.0))
    assert "TrainAccuracy" not in parse_summary(tmp_path / "N_bs4_8p_perf.log")
    ev = SummaryTarget(tmp_path, "N", "N_bs4_8p_eval", 4, 8, "eval", start_time=0.0)
    write_summary(ev, RunSummary(train_accuracy=83.9, actual_loss=0.3, extra_lines={"ErrorRate": "0.43%"}))
    lines = parse_summary(tmp_path / "N_bs4_8p_eval.log")
    assert "ActualFPS" not in lines and "TrainingTime" not in lines and lines["ErrorRate"] == "0.43%"


def test_summary_target_reads_the_script_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELZOO_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("MODELZOO_CASE_NAME", "X_bs8_2p_fp32_acc")
    monkeypatch.setenv("MODELZOO_BATCH_SIZE", "8")
    monkeypatch.setenv("MODELZOO_RANK_SIZE", "2")
    target = SummaryTarget.from_env(Path("elsewhere"), "X", 1, 1)
    assert (target.output_dir, target.case_name, target.batch_size, target.rank_size) == (
        tmp_path,
        "X_bs8_2p_fp32_acc",
        8,
        2,
    )
