"""The folder's test/*.sh on a small demo dataset: U_Net and AttU_Net 1p throughput runs, two real ranks,
and the entry points (dataset.py, main.py --mode test, predict.py, pthtar2onx.py). The acc-mode summary
(TrainAccuracy) is checked by ../R2U_Net/tests through the same shared library."""

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


def script(name: str, *args: str, cache: Path, rank_size: int = 1) -> subprocess.CompletedProcess:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    proc = run(["bash", f"test/{name}", *args], cache, RANK_SIZE=str(rank_size))
    assert proc.returncode == 0, proc.stdout + proc.stderr + _log()
    return proc


def _log() -> str:
    log = OUTPUT / "0" / "train_0.log"
    return log.read_text()[-3000:] if log.exists() else ""


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


def _check_perf_summary(model_type: str) -> str:
    case = "AttU_Net_bs2_1p_perf"
    summary = parse_summary(OUTPUT / "0" / f"{case}.log")
    assert list(summary) == PERF_ORDER and summary["CaseName"] == case
    assert 0 < float(summary["ActualFPS"]) < float("inf")
    assert float(summary["TrainingTime"]) == pytest.approx(2000 / float(summary["ActualFPS"]), rel=1e-2)
    details = json.loads((OUTPUT / "0" / "summary.json").read_text())
    assert details["config"]["model_type"] == model_type and details["world_size"] == 1
    assert 0 <= details["test"]["dice"] <= 1 and details["test"]["images"] == 2
    assert details["train_accuracy"] == pytest.approx(details["best_validation"]["acc"])
    losses = (OUTPUT / "0" / f"train_{case}_loss.txt").read_text().split()
    assert len(losses) == 3 and summary["ActualLoss"] == f"{float(losses[-1]):.4f}"
    log = (OUTPUT / "0" / "train_0.log").read_text()
    assert "Epoch [1/1], Step:[3/3], Loss: " in log and "[Validation] Acc: " in log
    assert '"lr": 0.0002' in log  # the script's learning rate reached Python
    return [line for line in log.splitlines() if line.startswith("[Test]")][-1]


@pytest.mark.slow
def test_performance_1p_u_net(demo, cache):
    script("train_performance_1p.sh", f"--data_path={demo}", "--batch_size=2", "--model_type=U_Net", *TINY,
           cache=cache)  # fmt: skip
    _check_perf_summary("U_Net")


@pytest.mark.slow
def test_performance_1p_attu_net_then_test_predict_and_export_its_checkpoint(demo, cache, tmp_path):
    script("train_performance_1p.sh", f"--data_path={demo}", "--batch_size=2", *TINY, cache=cache)
    final_test = _check_perf_summary("AttU_Net")  # the folder's default model
    models = OUTPUT / "0" / "models"  # a throughput run keeps ./models clean
    assert (models / "AttU_Net" / "model_best.pth.tar").exists()

    common = ["--image_size", "32", "--model_path", str(models)]
    # --amp=auto as the scripts pass it on a CPU: the test follows the precision the training run chose
    proc = run([sys.executable, "main.py", "--mode", "test", "--data_path", str(demo), "--workers", "0",
                "--amp=auto", "--result_path", str(tmp_path / "result"), *common], cache)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("[Test]")][-1] == final_test
    proc = run([sys.executable, "predict.py", "--input", str(demo / "ISIC2018_Task1-2_Training_Input"),
                "--output", str(tmp_path / "pred"), *common], cache)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 10
    proc = run([sys.executable, "pthtar2onx.py", "--output", str(tmp_path / "attu.onnx"), *common], cache)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime agrees with PyTorch" in proc.stdout


@pytest.mark.slow
def test_two_real_ranks(demo, cache):
    script("train_performance_8p.sh", f"--data_path={demo}", "--batch_size=4", "--warmup_steps=0", *TINY[:3],
           cache=cache, rank_size=2)  # fmt: skip
    summary = parse_summary(OUTPUT / "0" / "AttU_Net_bs4_2p_perf.log")
    assert summary["RankSize"] == "2" and float(summary["ActualFPS"]) > 0
    details = json.loads((OUTPUT / "0" / "summary.json").read_text())
    assert details["world_size"] == 2 and details["config"]["world_size"] == 2
    assert (OUTPUT / "1" / "train_1.log").exists()
    assert "ranks: 2" in (OUTPUT / "0" / "train_0.log").read_text()


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


def test_dataset_py_prints_the_split(demo, cache, tmp_path):
    proc = run(
        [sys.executable, "dataset.py", "--data_path", str(demo), "--output_path", str(tmp_path / "ds")], cache
    )
    assert proc.returncode == 0, proc.stderr
    assert "image count in train path :7" in proc.stdout and "image count in valid path :1" in proc.stdout
    assert (tmp_path / "ds" / "split.json").exists() and len(list((tmp_path / "ds" / "test").iterdir())) == 2


def test_a_missing_checkpoint_and_bad_flags_are_explained(demo, tmp_path, monkeypatch, capsys):
    from main import DEFAULTS

    from common.isic.solver import main

    monkeypatch.setenv("MODELZOO_CACHE_DIR", str(tmp_path / "cache"))
    assert DEFAULTS == {"model_type": "AttU_Net"}
    args = ["--mode", "test", "--model_path", str(tmp_path), "--data_path", str(demo), "--image_size", "32"]
    assert main(args, defaults=DEFAULTS) == 2
    err = capsys.readouterr().err
    assert "no weights at" in err and "AttU_Net" in err and "--pth_path" in err
    with pytest.raises(SystemExit):
        main(["--model_type", "VNet"], defaults=DEFAULTS)
    assert "AttU_Net" in capsys.readouterr().err


def test_the_default_network_is_attu_net_with_the_references_keys():
    from main import DEFAULTS

    from common.isic.solver import build_network

    model = build_network(DEFAULTS["model_type"])
    assert len(model.state_dict()) == 240 and sum(p.numel() for p in model.parameters()) == 34_878_573
