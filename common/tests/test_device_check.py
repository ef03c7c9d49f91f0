"""ci/device_check.py: the dry run plans every case and refuses what could not run; the budget holds."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.testing import child_env

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("R2U_Net", "AttU_Net", "UNet_nested", "UNet_mindspore", "VNet")
TRAINING_CASES = ("bf16", "fp16", "deterministic", "kill_resume", "8p")


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "ci" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def dry_run(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "plan.json"
    proc = subprocess.run(
        ["bash", "ci/device_check.sh", "--dry-run", f"--json={report}", *flags],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, json.loads(report.read_text())


def test_dry_run_plans_every_folder_and_case_and_the_bench_sweep(tmp_path):
    proc, report = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = {(c["folder"], c["name"]): c for c in report["cases"]}
    assert set(cases) == {*itertools.product(FOLDERS, TRAINING_CASES), ("common", "bench_sweep")}
    for case in report["cases"]:
        assert case["status"] == "planned"
        assert {"command", "exit_code", "seconds", "fps", "accuracy"} <= set(case)
    for folder in FOLDERS:
        assert "--amp-dtype=bf16" in cases[folder, "bf16"]["command"]
        assert "--amp-dtype=fp16" in cases[folder, "fp16"]["command"]
        assert "--deterministic" in cases[folder, "deterministic"]["command"]
        assert "--resume=" in cases[folder, "kill_resume"]["resume_command"]
        assert "RANK_SIZE=2 bash test/train_performance_8p.sh" in cases[folder, "8p"]["command"]
    assert "python -m common.bench --sweep" in cases["common", "bench_sweep"]["command"]
    assert report["seconds"] < 60


def test_dry_run_fails_on_a_flag_no_entry_point_knows(tmp_path):
    proc, report = dry_run(tmp_path, "--extra_args=--amp-dtipe=bf16")
    assert proc.returncode != 0
    assert "UNet_mindspore/train.py" in proc.stderr and "--amp-dtipe=bf16" in proc.stderr
    status = {(c["folder"], c["name"]): c["status"] for c in report["cases"]}
    assert all(status[key] == "invalid" for key in itertools.product(FOLDERS, TRAINING_CASES))
    assert status["common", "bench_sweep"] == "planned"


def test_a_misspelled_step_cap_in_the_case_table_is_refused(device_check):
    (case,) = device_check.plan(["UNet_mindspore"], ["bf16"])
    assert device_check.dry_run([case]) == []
    case.argv = [("--train_stpes=12" if arg == "--train_steps=12" else arg) for arg in case.argv]
    (problem,) = device_check.dry_run([case])
    assert "UNet_mindspore:bf16" in problem and "--train_stpes=12" in problem
    assert case.result["status"] == "invalid"


def test_a_missing_test_script_is_refused(device_check):
    (case,) = device_check.plan(["VNet"], ["fp16"])
    case.argv[1] = "test/train_performance_2p.sh"
    (problem,) = device_check.dry_run([case])
    assert "VNet/test/train_performance_2p.sh does not exist" in problem


def test_the_shell_library_decides_which_flags_reach_python(device_check):
    flags = device_check.python_flags(
        ["--epochs=3", "--batch_size", "8", "--train_steps=2", "--deterministic"]
    )
    assert flags == ["--train_steps=2", "--deterministic"]


def test_cases_that_no_longer_fit_the_budget_are_not_run_and_fail(device_check, tmp_path, monkeypatch):
    monkeypatch.setattr(device_check, "count_devices", lambda: (1, "test device"))
    started = []
    monkeypatch.setattr(device_check, "run_case", lambda *args: started.append(args) or {"status": "passed"})
    report = tmp_path / "report.json"
    code = device_check.main(["--budget=5", "--folders=VNet", "--cases=bf16,8p", f"--json={report}"])
    cases = {c["name"]: c for c in json.loads(report.read_text())["cases"]}
    assert code == 1 and started == []
    assert cases["bf16"]["status"] == "not_run" and cases["8p"]["status"] == "skipped"
