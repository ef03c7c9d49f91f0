"""The folder's test/*.sh on a small demo dataset: R2U_Net and R2AttU_Net 1p throughput runs, then the
whole R2AttU_Net pipeline on two real ranks (train, test, predict, export). Sizes are tiny: the recurrent
networks run every convolution four times (t=3)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.demo_data import write_isic2018
from common.summary import parse_summary
from common.testing import child_env

FOLDER = Path(__file__).resolve().parents[1]
OUTPUT = FOLDER / "test" / "output"
PERF_ORDER = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
              "ActualLoss", "E2ETrainingTime"]  # fmt: skip
TINY = ["--image_size=32", "--epochs=1", "--workers=0", "--warmup_steps=1"]


def run(command: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=FOLDER, env=child_env(MODELZOO_CACHE_DIR=str(cache), **env),
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def script(name: str, *args: str, cache: Path, rank_size: int = 1) -> None:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    proc = run(["bash", f"test/{name}", *args], cache, RANK_SIZE=str(rank_size))
    log = OUTPUT / "0" / "train_0.log"
    assert proc.returncode == 0, proc.stdout + proc.stderr + (log.read_text()[-3000:] if log.exists() else "")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Ten pairs in the official layout: 7 / 1 / 2 images after the seeded split."""
    return write_isic2018(tmp_path_factory.mktemp("data") / "isic2018", n=10, sizes=((64, 48), (80, 60)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def _clean_output():
    yield
    shutil.rmtree(OUTPUT, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["R2U_Net", "R2AttU_Net"])
def test_performance_1p_writes_a_valid_summary(model_type, demo, cache):
    script("train_performance_1p.sh", f"--data_path={demo}", "--batch_size=2", f"--model_type={model_type}",
           *TINY, cache=cache)  # fmt: skip
    summary = parse_summary(OUTPUT / "0" / "R2U_Net_bs2_1p_perf.log")
    assert list(summary) == PERF_ORDER and 0 < float(summary["ActualFPS"]) < float("inf")
    details = json.loads((OUTPUT / "0" / "summary.json").read_text())
    assert details["config"]["model_type"] == model_type and details["config"]["t"] == 3
    assert 0 <= details["test"]["dice"] <= 1 and details["test"]["images"] == 2
    assert len((OUTPUT / "0" / "train_R2U_Net_bs2_1p_perf_loss.txt").read_text().split()) == 3


@pytest.mark.slow
def test_r2attu_net_pipeline_on_two_ranks_then_test_predict_export(demo, cache, tmp_path):
    models = tmp_path / "models"
    script("train_full_8p.sh", f"--data_path={demo}", "--batch_size=4", f"--model_path={models}",
           f"--result_path={tmp_path / 'result'}", "--warmup_steps=0", *TINY[:3], cache=cache, rank_size=2)  # fmt: skip
    summary = parse_summary(OUTPUT / "0" / "R2U_Net_bs4_2p_acc.log")
    details = json.loads((OUTPUT / "0" / "summary.json").read_text())
    assert (
        summary["RankSize"] == "2" and details["world_size"] == 2 and (OUTPUT / "1" / "train_1.log").exists()
    )
    assert details["config"]["model_type"] == "R2AttU_Net" and details["config"]["lr"] == 0.0008
    assert float(summary["TrainAccuracy"]) == pytest.approx(details["best_validation"]["acc"], abs=1e-4)
    final_test = [
        x for x in (OUTPUT / "0" / "train_0.log").read_text().splitlines() if x.startswith("[Test]")
    ][-1]

    common = ["--image_size", "32", "--model_path", str(models)]
    # --amp=auto as the scripts pass it on a CPU: the test follows the precision the training run chose
    proc = run([sys.executable, "main.py", "--mode", "test", "--data_path", str(demo), "--workers", "0",
                "--amp=auto", "--result_path", str(tmp_path / "tested"), *common], cache)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # One process scoring the checkpoint agrees with what the two ranks reported for it.
    assert [x for x in proc.stdout.splitlines() if x.startswith("[Test]")][-1] == final_test
    proc = run([sys.executable, "predict.py", "--input", str(demo / "ISIC2018_Task1-2_Training_Input"),
                "--output", str(tmp_path / "pred"), "--save_prob", *common], cache)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "pred").glob("*_prob.png"))) == 10
    proc = run([sys.executable, "pthtar2onx.py", "--output", str(tmp_path / "r2attu.onnx"), *common], cache)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime agrees with PyTorch" in proc.stdout


def test_pthtar2onx_py_runs_pthtar2onnx_py_with_the_same_help_and_errors(cache):
    """The original's name and the ModelZoo name are one program: the same help, word for word, and the
    same one-line error and exit status for a user's mistake."""
    helps = [run([sys.executable, name, "--help"], cache) for name in ("pthtar2onx.py", "pthtar2onnx.py")]
    assert [p.returncode for p in helps] == [0, 0], helps[0].stderr + helps[1].stderr
    assert helps[0].stdout == helps[1].stdout
    assert "usage: pthtar2onnx.py" in helps[1].stdout and "--pth_path" in helps[1].stdout
    errors = [
        run([sys.executable, name, "--image_size", "40"], cache)
        for name in ("pthtar2onx.py", "pthtar2onnx.py")
    ]
    assert [p.returncode for p in errors] == [2, 2]
    assert errors[0].stderr == errors[1].stderr and errors[1].stderr.startswith("[Error] --image_size")


def test_the_default_network_is_r2attu_net_with_t3():
    from main import DEFAULTS

    from common.isic.solver import build_network

    assert DEFAULTS == {"model_type": "R2AttU_Net", "t": 3}
    model = build_network(**DEFAULTS)
    assert len(model.state_dict()) == 258 and sum(p.numel() for p in model.parameters()) == 39_442_925
    assert model.RRCNN1.RCNN[0].t == 3


def test_requirements_install_the_tested_stack():
    lines = (FOLDER / "1.8_requirements.txt").read_text().splitlines()
    assert "-r ../requirements.txt" in lines and any(line.startswith("onnxruntime") for line in lines)
    assert "2.14.1" in (FOLDER / "README.md").read_text()
