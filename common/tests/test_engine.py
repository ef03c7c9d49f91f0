"""The shared training loop end to end, through a real entry point (common/tests/toy/train.py).

Exact resume, sharded evaluation over 2 gloo ranks, persistent-NaN handling and the checkpoint left
behind. Each case runs the toy script in fresh processes, as users run the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint

TOY = Path(__file__).resolve().parent / "toy" / "train.py"
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("MODELZOO_OUTPUT_DIR", "MODELZOO_CASE_NAME", "RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK_SIZE"):
        env.pop(key, None)
    return env


def run_toy(*args: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, str(TOY), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            str(TOY),
            *args,
        ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def weights(path: Path) -> dict:
    return load_checkpoint(path)["state_dict"]


def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path):
    common = ["--epochs=3", "--deterministic", "--workers=2"]
    run_toy(*common, f"--save={tmp_path / 'straight'}")
    crashed = run_toy(*common, f"--save={tmp_path / 'resumed'}", "--crash_after_epoch=0", check=False)
    assert crashed.returncode == 17
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pth.tar")["epoch"] == 1
    run_toy(
        *common, f"--save={tmp_path / 'resumed'}", f"--resume={tmp_path / 'resumed' / 'checkpoint.pth.tar'}"
    )
    straight, resumed = (
        weights(tmp_path / "straight" / "checkpoint.pth.tar"),
        weights(tmp_path / "resumed" / "checkpoint.pth.tar"),
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pth.tar")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pth.tar")
    assert a["step_losses"] == b["step_losses"] and len(a["history"]) == len(b["history"]) == 3
    assert (tmp_path / "straight" / "progress.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["actual_fps"] > 0


def test_two_rank_sharded_validation_equals_one_process(tmp_path):
    run_toy("--epochs=1", f"--save={tmp_path / 'run'}")
    ckpt = tmp_path / "run" / "checkpoint.pth.tar"
    run_toy(f"--evaluate={ckpt}", f"--metrics_out={tmp_path / 'one.json'}")
    run_toy(f"--evaluate={ckpt}", f"--metrics_out={tmp_path / 'two.json'}", ranks=2)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["n_images"] == two["n_images"] == 10
    for key in ("dice_mean", "jaccard_mean", "acc_mean", "dice_pooled", "se_mean", "sp_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key


def test_two_rank_training_validates_the_weights_it_saves(tmp_path):
    # Each rank's BatchNorm statistics follow its own shard; validation must use rank 0's, which are saved.
    run_toy("--epochs=1", f"--save={tmp_path / 'run'}", f"--metrics_out={tmp_path / 'train.json'}", ranks=2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_size"] == 2
    run_toy(f"--evaluate={tmp_path / 'run' / 'checkpoint.pth.tar'}", f"--metrics_out={tmp_path / 'one.json'}")
    during = json.loads((tmp_path / "train.json").read_text())
    after = json.loads((tmp_path / "one.json").read_text())
    for key in ("dice_mean", "jaccard_mean", "acc_mean"):
        assert during[key] == pytest.approx(after[key], rel=1e-9, abs=1e-12), key


def test_persistent_nan_stops_with_the_last_good_checkpoint(tmp_path):
    proc = run_toy(
        "--epochs=3", f"--save={tmp_path / 'run'}", "--nan_after_step=7", "--max_skipped_steps=3", check=False
    )
    assert proc.returncode != 0
    assert "3 optimizer steps in a row had non-finite gradients" in proc.stderr
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth.tar")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


def test_sparse_nan_steps_are_skipped_and_counted(tmp_path):
    # Fewer NaN steps in a row than the limit: training finishes and every skipped step is counted.
    proc = run_toy(
        "--epochs=2",
        f"--save={tmp_path / 'run'}",
        "--nan_after_step=6",
        "--max_skipped_steps=50",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == 6  # steps 7..12 of a 12-step run


def test_many_short_epochs_on_two_ranks_do_not_grow_host_memory(tmp_path):
    """Endurance: logging, caches, history and workers must not leak host memory over many epochs."""
    rss = tmp_path / "rss"
    run_toy(
        "--epochs=40",
        "--workers=1",
        "--log_interval=1",
        f"--save={tmp_path / 'run'}",
        f"--rss_log={rss}",
        ranks=2,
    )
    for rank in (0, 1):
        values = [int(v) for v in Path(f"{rss}.{rank}").read_text().split()]
        assert len(values) == 40
        growth_mb = (max(values[10:]) - values[10]) / 1024
        print(
            f"rank {rank}: RSS after epoch 10 {values[10] / 1024:.1f} MB, growth to epoch 40 {growth_mb:.2f} MB"
        )
        assert growth_mb < 16, f"rank {rank} grew {growth_mb:.1f} MB over 30 epochs: {values}"
