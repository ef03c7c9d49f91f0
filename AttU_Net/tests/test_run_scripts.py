"""run_scripts/: the launcher forwards every flag and returns the child's exit code; loss.py compares
curves byte-compatibly but decides on unsigned errors; test.sh passes against the committed baseline and
fails when the learning rate is ten times larger."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FOLDER = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = FOLDER / "run_scripts"
BASELINE = RUN_SCRIPTS / "baseline_loss.csv"
LR10X = Path(__file__).resolve().parent / "data" / "lr10x_loss.csv"
sys.path.insert(0, str(RUN_SCRIPTS))

import loss  # noqa: E402
from argument import parse_options, split_launcher_flags  # noqa: E402
from run_AttU_Net import build_command, child_env  # noqa: E402

from common.isic.losscurve import read_curve, write_curve  # noqa: E402
from common.testing import child_env as subprocess_env  # noqa: E402

# ----------------------------------------------------------------------------------------------- launcher


def test_every_flag_but_the_launchers_own_is_forwarded():
    argv = ["--model_type", "AttU_Net", "--cuda_idx", "0", "--nproc_per_node", "2", "--lr=0.001",
            "--master_port=29999", "--batch_size", "4", "--deterministic", "--augmentation_prob", "0"]  # fmt: skip
    options, forwarded = parse_options(argv)
    assert options.nproc_per_node == 2 and options.master_port == 29999 and options.lr == 0.001
    assert forwarded == ["--model_type", "AttU_Net", "--cuda_idx", "0", "--lr=0.001", "--batch_size", "4",
                         "--deterministic", "--augmentation_prob", "0"]  # fmt: skip
    assert split_launcher_flags(["--nproc_per_node=3", "--t", "2"]) == ["--t", "2"]
    command = build_command(2, forwarded)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[-len(forwarded) - 1 :] == ["main.py", *forwarded]


def test_cuda_idx_picks_the_visible_device_of_a_single_process(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    env, changed = child_env(1, 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and changed["CUDA_VISIBLE_DEVICES"] == "5"
    assert child_env(1, 2)[1] == {}  # N processes take devices 0..N-1


def test_a_bad_flag_stops_before_torchrun_and_a_failing_child_sets_the_exit_code(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_options(["--no_such_flag"])
    assert stop.value.code == 2
    missing = tmp_path / "missing"
    proc = subprocess.run([sys.executable, str(RUN_SCRIPTS / "run_AttU_Net.py"), "--model_type", "U_Net",
                           "--nproc_per_node", "1", "--data_path", str(missing), "--lr", "0.003"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Executing command:" in proc.stdout and f"--data_path {missing} --lr 0.003" in proc.stdout
    assert "Command failed with exit code: 1" in proc.stdout
    assert f"{missing}: --data_path does not exist" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------- loss.py


def test_errors_are_the_originals_and_the_unsigned_ones():
    rng = np.random.default_rng(0)
    c = rng.uniform(0.2, 0.8, 50)
    s = c * (1 + rng.normal(0, 0.1, 50))
    result = loss.compare(list(s), list(c))
    assert result.mean_relative_error == pytest.approx(np.mean((s - c) / c))
    assert result.mean_absolute_error == pytest.approx(np.mean(s - c))
    assert result.unsigned_relative_error == pytest.approx(np.mean(np.abs(s - c) / c))
    assert result.unsigned_absolute_error == pytest.approx(np.mean(np.abs(s - c)))
    # Errors of opposite sign cancel in the original's signed means but not here.
    cancel = loss.compare([0.5, 1.5] * 10, [1.0, 1.0] * 10)
    assert cancel.mean_relative_error == 0 and not cancel.passed


def test_the_four_original_lines_are_byte_compatible():
    lines = loss.Comparison(100, 0.009063860641328176, -0.0006081902980804443, 0.02, 0.01).lines()
    assert lines[:4] == [
        "MeanRelativeError: 0.009063860641328176",
        "MeanAbsoluteError: -0.0006081902980804443",
        "Rule,mean_absolute_error -0.0006081902980804443",
        "pass mean_relative_error=0.009063860641328176 <= 0.05 or mean_absolute_error=-0.0006081902980804443 "
        "<= 0.0002",
    ]
    assert lines[4] == "UnsignedMeanRelativeError: 0.02"


def test_curves_that_cannot_be_compared_are_refused(tmp_path, capsys):
    base = read_curve(BASELINE)
    short = write_curve(tmp_path / "short.csv", base.config, base.losses[:90])
    assert loss.main(["--sdaa-log", str(short), "--cuda-log", str(BASELINE), "--plot", ""]) == 2
    assert "lengths differ by more than 5 steps: run 90, baseline 100" in capsys.readouterr().out
    near = write_curve(tmp_path / "near.csv", base.config, base.losses[:97])
    assert loss.main(["--sdaa-log", str(near), "--cuda-log", str(BASELINE), "--plot", ""]) == 0
    other = write_curve(tmp_path / "other.csv", {**base.config, "seed": 1}, base.losses)
    assert loss.main(["--sdaa-log", str(other), "--cuda-log", str(BASELINE), "--config_only"]) == 2
    assert "seed: 1 vs 12345" in capsys.readouterr().out


def test_ten_times_the_learning_rate_fails_the_curve_check(tmp_path, capsys):
    # lr10x_loss.csv: `bash run_scripts/test.sh --lr=0.002` on this CPU (the baseline's settings, lr x 10).
    assert loss.main(["--sdaa-log", str(LR10X), "--cuda-log", str(BASELINE), "--plot", ""]) == 2
    assert "lr: 0.002 vs 0.0002" in capsys.readouterr().out
    rc = loss.main(["--sdaa-log", str(LR10X), "--cuda-log", str(BASELINE), "--ignore_config", "lr",
                    "--plot", str(tmp_path / "loss.jpg")])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert rc == 1 and out[3].startswith("fail mean_relative_error=")
    # The original's signed rule would have passed this run: its loss is lower than the baseline's.
    run, base = read_curve(LR10X).losses, read_curve(BASELINE).losses
    assert np.mean((np.array(run) - base) / base) <= 0.05
    assert (tmp_path / "loss.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a real JPEG


# ----------------------------------------------------------------------------------------------- test.sh


def _test_sh(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RUN_SCRIPTS / "test.sh"), *args], capture_output=True, text=True,
                          env=subprocess_env(OUT=str(out)), timeout=900)  # fmt: skip


@pytest.mark.slow
def test_test_sh_passes_against_the_committed_baseline(tmp_path):
    proc = _test_sh(out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Settings match the baseline" in proc.stdout
    assert "Verdict (unsigned errors decide): pass" in proc.stdout
    assert len(read_curve(tmp_path / "result" / "AttU_Net" / "loss_curve.csv").losses) == 100


@pytest.mark.slow
def test_test_sh_fails_at_ten_times_the_learning_rate(tmp_path):
    proc = _test_sh("--lr=0.002", out=tmp_path)
    assert proc.returncode == 2
    assert "lr: 0.002 vs 0.0002" in proc.stdout
    assert not (tmp_path / "sdaa.log").exists()  # refused before training
