"""End to end on a tiny ISBI-format demo stack: the real scripts, resume, evaluation, export, fold loop.

Sizes are the smallest the network takes (188 -> 4x4 output) and the demo has 4 pages (3 train, 1 val),
so each run is one or two optimizer steps.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from common.checkpoint import load_checkpoint
from common.demo_data import write_isbi2012
from common.errors import CheckpointError, ConfigError
from common.summary import parse_summary
from common.testing import child_env, truncate, user_error

FOLDER = Path(__file__).resolve().parents[1]
OUTPUT = FOLDER / "test" / "output"
STEP_RE = re.compile(r"^step: \d+, loss is [0-9.e-]+, fps is [0-9.e+-]+$", re.M)
EPOCH_RE = re.compile(
    r"^epoch: +\d+, avg loss:\d+\.\d{4}, total cost: [0-9.]+ s, per step fps:[ 0-9.]+$", re.M
)
DICE_RE = re.compile(r"^============== Cross valid dice coeff is: \{'dice_coeff': ([0-9.]+)\}$", re.M)
TINY = ["--image_size=188", "--workers=0"]
ORDER = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
         "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]  # fmt: skip


def load_script(name: str):
    """train.py / eval.py / export.py as modules under names no other folder's scripts can clash with."""
    spec = importlib.util.spec_from_file_location(f"unet_mindspore_{name}", FOLDER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = child_env(threads=None, **env)
    proc = subprocess.run(command, cwd=FOLDER, env=clean, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_isbi2012(tmp_path_factory.mktemp("isbi_demo"), pages=4, size=64)


@pytest.fixture(scope="module")
def perf_run(demo, tmp_path_factory):
    """`bash test/train_performance_1p.sh` once; its outputs are moved out of the source tree."""
    shutil.rmtree(OUTPUT, ignore_errors=True)
    proc = run(
        ["bash", "test/train_performance_1p.sh", f"--data_path={demo}", "--batch_size=1", "--epochs=1"]
    )
    kept = tmp_path_factory.mktemp("perf_output")
    shutil.copytree(OUTPUT / "0", kept / "0")
    shutil.rmtree(OUTPUT, ignore_errors=True)
    return proc, kept / "0"


@pytest.mark.slow
def test_performance_script_logs_like_mindspore_and_writes_the_summary(perf_run):
    proc, out = perf_run
    assert "CPU-sized performance case" in proc.stdout and "Final Performance images/sec" in proc.stdout
    summary = parse_summary(out / "UNet_mindspore_bs1_1p_perf.log")
    assert list(summary)[:5] == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName"]
    assert summary["CaseName"] == "UNet_mindspore_bs1_1p_perf" and "TrainAccuracy" not in summary
    assert float(summary["ActualFPS"]) > 0  # steps 2 and 3 are timed (--warmup_steps=1)
    log = (out / "train_0.log").read_text()
    assert len(STEP_RE.findall(log)) == 3 and len(EPOCH_RE.findall(log)) == 1  # 3 training pages, batch 1
    assert DICE_RE.search(log)
    config = json.loads((out / "ckpt" / "config.json").read_text())
    assert config["loss_scale"] == "1024" and config["image_size"] == 188 and config["val_pages"] == [1]
    assert (out / "ckpt" / "ckpt_unet_medical_adam-1_3.pth").is_file()


@pytest.mark.slow
def test_eval_script_prints_the_original_line_and_writes_every_output(perf_run, demo, tmp_path):
    checkpoint = perf_run[1] / "ckpt" / "ckpt_unet_medical_adam-1_3.pth"
    had_log = (FOLDER / "eval.log").exists()
    proc = run(
        ["bash", "scripts/run_standalone_eval.sh", str(demo), str(checkpoint), f"--output_dir={tmp_path}"]
    )
    if not had_log:
        (FOLDER / "eval.log").unlink(missing_ok=True)
    match = DICE_RE.search(proc.stdout)
    assert match and 0 <= float(match.group(1)) <= 1
    assert "============== Cross valid IOU is:" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fold"] == 1 and summary["image_size"] == 188  # taken from the checkpoint
    assert float(match.group(1)) == pytest.approx(summary["metrics"]["dice_coeff"])
    (page,) = summary["per_slice"]
    assert page["page"] == "1"  # fold 1 of 4 pages validates on page 1
    for key in (
        "dice_coeff",
        "iou",
        "hard_dice_membrane",
        "hard_iou_membrane",
        "hd95_membrane",
        "hard_dice_cell",
    ):
        assert key in page
    assert page["iou"] == pytest.approx(page["dice_coeff"] / (2 - page["dice_coeff"]))
    for key in ("hard_dice_membrane_pooled", "hard_iou_membrane_pooled", "hd95_membrane"):
        assert key in summary["metrics"]
    assert (
        parse_summary(tmp_path / "UNet_mindspore_bs1_1p_eval.log")["CaseName"] == "UNet_mindspore_bs1_1p_eval"
    )
    predicted = tifffile.imread(tmp_path / "test-labels-pred.tif")
    assert predicted.shape == (4, 64, 64) and set(np.unique(predicted)) <= {0, 255}
    assert (tmp_path / "overlays" / "val_page1_overlay.png").is_file()
    assert (tmp_path / "overlays" / "test_page3_overlay.png").is_file()


@pytest.mark.slow
def test_export_matches_pytorch_in_onnxruntime(perf_run, tmp_path):
    checkpoint = perf_run[1] / "ckpt" / "ckpt_unet_medical_adam-1_3.pth"
    export = load_script("export")
    assert export.main([f"--ckpt_file={checkpoint}", f"--file_name={tmp_path / 'unet'}"]) == 0
    import onnx

    graph = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False).graph
    assert graph.input[0].name == "actual_input_1" and graph.output[0].name == "output1"
    dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [2, 4, 4]
    with pytest.raises(ConfigError, match="only ONNX"):
        export.main([f"--ckpt_file={checkpoint}", "--file_format=MINDIR"])


def test_export_py_runs_pthtar2onnx_py_with_the_same_help():
    """The MindSpore name and the ModelZoo name are one program: the same help, word for word, and
    `export.main` (what callers import) is the function of pthtar2onnx.py."""
    alias, program = (
        run([sys.executable, name, "--help"]).stdout for name in ("export.py", "pthtar2onnx.py")
    )
    assert alias == program
    assert "usage: pthtar2onnx.py" in program and "--ckpt_file" in program and "--file_format" in program
    assert load_script("export").main.__code__.co_filename == str(FOLDER / "pthtar2onnx.py")


@pytest.mark.slow
def test_distribute_script_runs_two_ranks_from_a_rank_table(demo, tmp_path):
    table = tmp_path / "hccl_2p.json"
    table.write_text(json.dumps({
        "version": "1.0", "server_count": "1", "status": "completed",
        "server_list": [{"server_id": "10.0.0.1", "host_nic_ip": "reserve", "device": [
            {"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"},
            {"device_id": "1", "device_ip": "192.168.101.101", "rank_id": "1"}]}]}))  # fmt: skip
    logs, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    proc = run(["bash", "scripts/run_distribute_train.sh", str(table), str(demo), f"--log_dir={logs}",
                "--batchsize=1", "--epochs=1", f"--ckpt_dir={ckpt}", *TINY])  # fmt: skip
    assert "2 rank(s) on 1 server(s)" in proc.stdout
    rank0, rank1 = (logs / "device0" / "log.log").read_text(), (logs / "device1" / "log.log").read_text()
    assert "ranks: 2" in rank0 and STEP_RE.search(rank0) and DICE_RE.search(rank0)
    assert not STEP_RE.search(rank1)  # only rank 0 prints the training lines
    config = json.loads((ckpt / "config.json").read_text())
    assert config["run_distribute"] is True and config["world_size"] == 2
    summary = parse_summary(ckpt / "UNet_mindspore_bs2_2p_acc.log")
    assert summary["RankSize"] == "2" and list(summary)[: len(ORDER)] == ORDER


@pytest.mark.slow
def test_full_8p_script_with_two_ranks(demo):
    shutil.rmtree(OUTPUT, ignore_errors=True)
    try:
        run(["bash", "test/train_full_8p.sh", f"--data_path={demo}", "--batch_size=2", "--epochs=1", *TINY],
            RANK_SIZE="2")  # fmt: skip
        assert (OUTPUT / "1" / "train_1.log").is_file()
        summary = parse_summary(OUTPUT / "0" / "UNet_mindspore_bs2_2p_acc.log")
        assert list(summary)[: len(ORDER)] == ORDER and 0 <= float(summary["TrainAccuracy"]) <= 1
        assert summary["CrossValidFold"] == "1"
    finally:
        shutil.rmtree(OUTPUT, ignore_errors=True)


@pytest.mark.slow
def test_resume_continues_exactly(demo, tmp_path):
    train = load_script("train")
    # 3 training pages, batch 3, 2 passes of 1 pass per epoch: 2 epochs of 1 step.
    common = [f"--data_url={demo}", "--batchsize=3", "--epochs=2", "--repeat=1", "--deterministic", "--seed=3",
              "--keep_checkpoint_max=1", *TINY]  # fmt: skip
    assert train.main([*common, f"--ckpt_dir={tmp_path / 'straight'}"]) == 0
    assert train.main([*common, f"--ckpt_dir={tmp_path / 'split'}", "--train_steps=1"]) == 0
    assert [p.name for p in (tmp_path / "split").glob("ckpt_*.pth")] == ["ckpt_unet_medical_adam-1_1.pth"]
    split = [
        *common,
        f"--ckpt_dir={tmp_path / 'split'}",
        "--resume=True",
        f"--resume_ckpt={tmp_path / 'split'}",
    ]
    assert train.main(split) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pth.tar")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pth.tar")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert [p.name for p in (tmp_path / "split").glob("ckpt_*.pth")] == ["ckpt_unet_medical_adam-2_1.pth"]
    with pytest.raises(CheckpointError, match="does not exist"):
        train.main([*common, f"--ckpt_dir={tmp_path / 'x'}", f"--resume={tmp_path / 'missing.pth'}"])


@pytest.mark.slow
def test_a_damaged_page_is_refused_by_default_and_left_out_listed_and_noted_with_skip_bad_samples(
    tmp_path, monkeypatch
):
    """The demo stack as one file per page, page 2's image cut short: training and evaluation stop with
    one error naming it; with --skip_bad_samples both use the other 4 pages, count the page in summary.json
    and say in final_result.txt where it is listed."""
    for key in [k for k in os.environ if k.startswith("MODELZOO_")]:
        monkeypatch.delenv(key)
    stack = write_isbi2012(tmp_path / "stack", pages=5, size=64)
    data = tmp_path / "slices"
    for name, folder in (("train-volume.tif", "images"), ("train-labels.tif", "labels")):
        (data / "train" / folder).mkdir(parents=True)
        for i, page in enumerate(tifffile.imread(stack / name)):
            tifffile.imwrite(data / "train" / folder / f"{i}.tif", page)
    cut = truncate(data / "train" / "images" / "2.tif", 0.5)
    train, evaluate = load_script("train"), load_script("eval")
    ckpt = tmp_path / "ckpt"
    common = [f"--data_url={data}", "--batchsize=3", "--epochs=1", "--repeat=1", f"--ckpt_dir={ckpt}", *TINY]
    user_error(lambda: train.main(common), str(cut), "--skip_bad_samples")
    assert train.main([*common, "--skip_bad_samples"]) == 0
    note = f"--skip_bad_samples: 1 bad sample(s) left out (1 problem(s)); listed in {ckpt / 'skipped_samples.txt'}"
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and summary["notes"] == [note]
    assert len(summary["config"]["train_pages"]) + len(summary["config"]["val_pages"]) == 4
    assert f"Note: {note}" in (ckpt / "final_result.txt").read_text()
    rows = [row.split("\t")[:2] for row in (ckpt / "skipped_samples.txt").read_text().splitlines()]
    assert rows == [["2", str(cut)]]

    out = tmp_path / "eval"
    flags = [f"--data_url={data}", f"--ckpt_path={ckpt / 'checkpoint.pth.tar'}", f"--output_dir={out}",
             "--predict_test=False"]  # fmt: skip
    user_error(lambda: evaluate.main(flags), str(cut), "--skip_bad_samples")
    assert evaluate.main([*flags, "--skip_bad_samples"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and len(summary["per_slice"]) == 1
    assert f"listed in {out / 'skipped_samples.txt'}" in (out / "final_result.txt").read_text()
    assert (out / "skipped_samples.txt").read_text().split("\t")[1] == str(cut)


def test_bad_settings_are_refused_with_the_rule(demo):
    train = load_script("train")
    with pytest.raises(ConfigError, match="use one of 492 or 508"):
        train.main([f"--data_url={demo}", "--image_size=500"])
    with pytest.raises(ConfigError, match="only one process was started"):
        train.main([f"--data_url={demo}", "--run_distribute", *TINY])
    with pytest.raises(SystemExit):
        train.main([f"--data_url={demo}", "--cross_valid_ind=7"])


class FakeRun:
    finished: dict = {}

    def finish(self, accuracy, extra_lines=None, details=None, notes=(), skipped_samples=0):
        FakeRun.finished = {"accuracy": accuracy, "extra": extra_lines, "details": details}


def test_all_folds_are_trained_in_turn_and_summarised(demo, tmp_path, monkeypatch, capsys):
    train = load_script("train")
    scores = {0: 0.80, 1: 0.90, 2: 0.85, 3: 0.95, 4: 0.75}
    folders = []

    def fake_fold(args, runtime, data, fold, save_dir, config, throughput):
        folders.append(save_dir)
        result = {"dice_coeff": scores[fold], "iou": 0.5, "hard_dice_membrane": scores[fold] - 0.2,
                  "hard_dice_membrane_pooled": 0.6, "hard_dice_cell": 0.9}  # fmt: skip
        return FakeRun(), {"fold": fold, **result}

    monkeypatch.setattr(train, "train_fold", fake_fold)
    assert train.main([f"--data_url={demo}", "--cross_valid_ind=all", f"--ckpt_dir={tmp_path}", *TINY]) == 0
    assert folders == [tmp_path / f"fold{k}" for k in range(5)]
    cv = json.loads((tmp_path / "cv_summary.json").read_text())
    assert cv["dice_coeff"]["mean"] == pytest.approx(0.85)
    assert cv["dice_coeff"]["std"] == pytest.approx(np.std(list(scores.values()), ddof=1))
    assert cv["dice_coeff"]["min"] == 0.75 and [f["fold"] for f in cv["folds"]] == [0, 1, 2, 3, 4]
    assert FakeRun.finished["accuracy"] == pytest.approx(0.85)
    assert FakeRun.finished["extra"]["CrossValidFold"] == "all"
    assert "5-fold cross validation: dice_coeff 0.8500 +- 0.0791" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="pass --resume=True"):
        train.main([f"--data_url={demo}", "--cross_valid_ind=all", "--resume=some.pth", *TINY])


def test_scripts_reject_a_missing_rank_table(demo):
    proc = subprocess.run(["bash", "scripts/run_distribute_train.sh", "/no/such/table.json", str(demo)],
                          cwd=FOLDER, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "rank table file '/no/such/table.json' not found" in proc.stderr
    proc = subprocess.run(["bash", "scripts/run_standalone_eval.sh", str(demo)], cwd=FOLDER,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "run_standalone_eval.sh [DATASET] [CHECKPOINT]" in proc.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
