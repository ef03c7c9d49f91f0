"""The ModelZoo shell library (common/scripts/modelzoo.sh) driven through a toy case's test script."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from common.summary import parse_summary
from common.testing import child_env

TOY = Path(__file__).resolve().parent / "toy"
SCRIPT = TOY / "test" / "train_full_8p.sh"
OUTPUT = TOY / "test" / "output"
ORDER = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
         "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]  # fmt: skip


def run_script(*args: str, cwd: Path = TOY, rank_size: int = 1, **env: str) -> subprocess.CompletedProcess:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    full_env = child_env(RANK_SIZE=str(rank_size), **env)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(autouse=True)
def _clean_output():
    yield
    shutil.rmtree(OUTPUT, ignore_errors=True)


def test_one_rank_writes_the_summary_from_the_test_folder_with_spaced_flags(tmp_path):
    proc = run_script("--data_path", str(tmp_path), "--lr", "0.02", cwd=TOY / "test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Final Performance images/sec" in proc.stdout
    summary = parse_summary(OUTPUT / "0" / "Toy_bs4_1p_acc.log")
    assert list(summary) == ORDER
    assert (
        summary["RankSize"] == "1"
        and summary["CaseName"] == "Toy_bs4_1p_acc"
        and float(summary["ActualFPS"]) > 0
    )
    assert float(summary["TrainingTime"]) == pytest.approx(4 * 1000 / float(summary["ActualFPS"]), rel=1e-2)
    losses = (OUTPUT / "0" / "train_Toy_bs4_1p_acc_loss.txt").read_text().split()
    assert len(losses) == 12 and summary["ActualLoss"] == f"{float(losses[-1]):.4f}"
    log = (OUTPUT / "0" / "train_0.log").read_text()
    assert '"lr": 0.02' in log  # the pass-through flag reached Python, and the config was printed


def test_two_ranks_write_one_log_per_rank_and_a_2p_summary(tmp_path):
    proc = run_script(f"--data_path={tmp_path}", rank_size=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (OUTPUT / "0" / "train_0.log").exists() and (OUTPUT / "1" / "train_1.log").exists()
    summary = parse_summary(OUTPUT / "0" / "Toy_bs4_2p_acc.log")
    assert summary["RankSize"] == "2" and list(summary) == ORDER


def test_a_dying_rank_stops_the_job_nonzero_and_leaves_no_process(tmp_path):
    start = time.monotonic()
    proc = run_script(f"--data_path={tmp_path}", "--die_rank=1", "--dist_timeout=60", rank_size=2)
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    # This run's processes only (its --data_path is in their command lines): other runs of the toy may be alive.
    leftover = subprocess.run(["pgrep", "-f", f"--data_path={tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_unknown_flag_is_rejected_by_python_and_the_script_fails(tmp_path):
    proc = run_script(f"--data_path={tmp_path}", "--no_such_flag=1")
    assert proc.returncode != 0
    assert "unrecognized arguments: --no_such_flag=1" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data_path=/nonexistent/data"], "does not exist"),
        (["--data_path"], "needs a value"),
        (["--batch_size=0"], "--batch_size must be a positive integer"),
        (["--epochs=-3"], "--epochs must be a positive integer"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_script_flags_fail_before_training(tmp_path, args, message):
    proc = run_script(*args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (OUTPUT / "0" / "train_0.log").exists()


def test_perf_mode_has_no_accuracy_line(tmp_path):
    proc = run_script(f"--data_path={tmp_path}", TOY_MODE="perf")
    assert proc.returncode == 0, proc.stderr
    summary = parse_summary(OUTPUT / "0" / "Toy_bs4_1p_perf.log")
    assert "TrainAccuracy" not in summary and "ActualFPS" in summary
