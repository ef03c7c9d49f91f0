"""train.py end to end: the real test/*.sh scripts (1 rank and 2 ranks) on the demo data, resume, flag
checks, ONNX export checked with onnxruntime on a real image, and the demo. Tiny sizes (32x32) throughout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import demo
import numpy as np
import pthtar2onnx
import pytest
import torch
import train
from inference import image_loader
from iou import batch_pooled_iou
from PIL import Image

from common.checkpoint import load_checkpoint, load_weights
from common.demo_data import write_dsb2018
from common.errors import CheckpointError, ConfigError
from common.summary import parse_summary
from common.testing import child_env, shared_data_dir, truncate, user_error

FOLDER = Path(__file__).resolve().parents[1]
TINY = ["--input_w=32", "--input_h=32"]
ORDER = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime",
         "TrainAccuracy", "ActualLoss", "E2ETrainingTime"]  # fmt: skip
STEP_LINE = re.compile(
    r"^Epoch: \[\d+\]\[\s*\d+/\d+\]\tTime\s+[\d.]+ \(\s*[\d.]+\)\tData\s+[\d.]+ \(\s*[\d.]+\)\t"
    r"Loss [\d.]+ \([\d.]+\)\tIou [\d.]+ \([\d.]+\)$",
    re.M,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A copy of this folder beside a link to `common`: the scripts' test/output, demo_data and models
    land there, so the test run never touches a user's logs and checkpoints in the real folder."""
    root = tmp_path_factory.mktemp("repo")
    (root / "common").symlink_to(FOLDER.parent / "common", target_is_directory=True)
    copy = root / FOLDER.name
    (copy / "test").mkdir(parents=True)
    for path in [*FOLDER.glob("*.py"), *(FOLDER / "test").glob("*.sh")]:
        shutil.copy2(path, copy / path.relative_to(FOLDER))
    return copy


def run_script(folder: Path, name: str, *args: str, rank_size: int = 1) -> subprocess.CompletedProcess:
    env = child_env(RANK_SIZE=str(rank_size))
    return subprocess.run(["bash", f"test/{name}.sh", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_run(folder):
    """RANK_SIZE=2 bash test/train_full_8p.sh --epochs=1 on the demo data (global batch 8, 32x32)."""
    proc = run_script(folder, "train_full_8p", "--epochs=1", "--batch_size=8", *TINY, rank_size=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = folder / "test" / "output"
    summary = parse_summary(output / "0" / "UNet_bs8_2p_acc.log")
    details = json.loads((output / "0" / "summary.json").read_text())
    logs = [(output / str(r) / f"train_{r}.log").read_text() for r in (0, 1)]
    return folder / "models" / "demo_dsb2018_32_UNet_woDS", summary, details, logs


@pytest.mark.slow
def test_two_ranks_write_an_acc_summary_checkpoints_and_reference_log_lines(two_rank_run):
    run_dir, summary, details, logs = two_rank_run
    assert list(summary) == ORDER
    assert summary["CaseName"] == "UNet_bs8_2p_acc" and summary["RankSize"] == "2"
    assert float(summary["ActualFPS"]) > 0
    assert float(summary["TrainAccuracy"]) == pytest.approx(100 * details["iou_best"], abs=1e-4)
    assert details["iou_best"] == details["history"][-1]["jaccard_mean"]
    assert 0 <= details["data_wait_fraction"] < 1
    assert details["val_images"] == 5 and details["train_images"] == 19  # demo data: 24 images, 80/20
    for key in ("dice_best_epoch", "hd95_best_epoch"):
        assert key in details
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "config.json", "log.csv"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == "UNet" and config["world_size"] == 2 and config["batch_size"] == 8
    assert STEP_LINE.search(logs[0]), logs[0]
    assert re.search(r"^\[npu id: 0 \] \* FPS@all [\d.]+$", logs[0], re.M)
    assert re.search(r"^\[npu id: 0 \] \[AVG-IOU\] \* Iou [\d.]+$", logs[0], re.M)
    assert "Epoch:" not in logs[1]  # only rank 0 prints
    state = load_checkpoint(run_dir / "checkpoint.pth.tar")
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["state_dict"])


@pytest.mark.slow
def test_eval_script_scores_the_trained_checkpoint(folder, two_rank_run):
    run_dir, _, details, _ = two_rank_run
    # No --pth_path: the default is models/<dataset>_<arch>_woDS/model_best.pth.tar of the run above.
    proc = run_script(folder, "train_eval_8p", *TINY, rank_size=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    output = folder / "test" / "output" / "0"
    assert f"Evaluating models/{run_dir.name}/model_best.pth.tar" in (output / "train_0.log").read_text()
    summary = parse_summary(output / "UNet_bs128_2p_eval.log")
    assert list(summary) == ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "TrainAccuracy",
                             "ActualLoss", "E2ETrainingTime"]  # fmt: skip
    # The same weights on the same validation split: the training run's number.
    assert float(summary["TrainAccuracy"]) == pytest.approx(100 * details["iou_best"], abs=0.02)
    # Which images were scored, each one's counts, and the reference's batch-pooled IoU from them.
    scored = json.loads((output / "summary.json").read_text())
    assert scored["scored"]["split"] == "val" and scored["scored"]["images"] == 5
    rows = (run_dir / "eval" / "scores.csv").read_text().splitlines()
    assert (
        rows[0] == "id,intersection,union,iou"
        and [r.split(",")[0] for r in rows[1:]] == scored["scored"]["ids"]
    )
    counts = [tuple(int(v) for v in r.split(",")[1:3]) for r in rows[1:]]
    pooled = batch_pooled_iou([c[0] for c in counts], [c[1] for c in counts], 16)
    assert scored["iou_batch_pooled"] == pytest.approx(pooled, rel=1e-12)
    assert "batch-pooled as the reference computes it" in (output / "train_0.log").read_text()


@pytest.mark.slow
def test_performance_script_writes_a_perf_summary(folder):
    proc = run_script(folder, "train_performance_1p", *TINY, "--train_steps=3", "--warmup_steps=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DEMO dataset" in proc.stdout
    output = folder / "test" / "output" / "0"
    summary = parse_summary(output / "UNet_bs16_1p_perf.log")
    assert "TrainAccuracy" not in summary and summary["CaseName"] == "UNet_bs16_1p_perf"
    assert float(summary["ActualFPS"]) > 0
    losses = (output / "train_UNet_bs16_1p_perf_loss.txt").read_text().split()
    assert len(losses) == 3 and summary["ActualLoss"] == f"{float(losses[-1]):.4f}"


# ----------------------------------------------------------------------------------------------- in process


def _prepared(root: Path, n: int = 10, size: int = 32) -> Path:
    gen = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks" / "0").mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size, size), bool)
        top, left = gen.integers(0, size // 2, size=2)
        mask[top : top + 10, left : left + 8] = True
        image = np.repeat(np.where(mask, 190, 30).astype(np.uint8)[:, :, None], 3, axis=2)
        Image.fromarray(image).save(root / "images" / f"n{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / "0" / f"n{i}.png")
    return root


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_resume_continues_exactly(tmp_path, restore_determinism, monkeypatch):
    for key in [k for k in os.environ if k.startswith("MODELZOO_")]:
        monkeypatch.delenv(key)
    data = _prepared(tmp_path / "data", n=6)  # 5 training images: one batch of 4 per epoch
    common = ["--data_path", str(data), *TINY, "-b", "4", "--scheduler", "ConstantLR", "--deterministic",
              "--log_interval", "1"]  # fmt: skip
    assert train.main([*common, "--epochs", "2", "--models_dir", str(tmp_path / "a")]) == 0
    assert train.main([*common, "--epochs", "1", "--models_dir", str(tmp_path / "b")]) == 0
    name = "data_UNet_woDS"
    resume = str(tmp_path / "b" / name / "checkpoint.pth.tar")
    assert (
        train.main([*common, "--epochs", "2", "--models_dir", str(tmp_path / "b"), "--resume", resume]) == 0
    )
    a = load_checkpoint(tmp_path / "a" / name / "checkpoint.pth.tar")
    b = load_checkpoint(tmp_path / "b" / name / "checkpoint.pth.tar")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    rows = (tmp_path / "b" / name / "log.csv").read_text().splitlines()
    assert (
        rows[0] == "epoch,lr,loss,iou,val_loss,val_iou,val_dice,val_hd95,val_hd95_excluded,elapsed_s,cpu_s"
        and len(rows) == 3
    )


def test_winograd_convolutions_train_the_same_network(tmp_path, restore_determinism, monkeypatch, capsys):
    """--conv_algo winograd changes how the 3x3 convolutions are computed, not what: two epochs end
    with the weights of the direct run up to fp32 rounding, in a checkpoint with the same keys. (SGD:
    Adam would turn the rounding noise in the near-zero gradients of pre-BatchNorm biases into full
    lr-sized steps.)"""
    for key in [k for k in os.environ if k.startswith("MODELZOO_")]:
        monkeypatch.delenv(key)
    data = _prepared(tmp_path / "data", n=6)
    common = [
        "--data_path",
        str(data),
        *TINY,
        "-b",
        "4",
        "--epochs",
        "2",
        "--deterministic",
        "--optimizer",
        "SGD",
        # Statistics recomputed at full scale would compare Winograd's rounding at a larger magnitude than the
        # two-step running averages this tolerance was set for; the weights are what this test compares.
        "--precise_bn=off",
    ]
    assert train.main([*common, "--models_dir", str(tmp_path / "direct")]) == 0
    assert train.main([*common, "--models_dir", str(tmp_path / "wino"), "--conv_algo", "winograd"]) == 0
    assert "Convolutions: winograd for 18 3x3 convolutions" in capsys.readouterr().out
    name = "data_UNet_woDS"
    direct = load_checkpoint(tmp_path / "direct" / name / "checkpoint.pth.tar")["state_dict"]
    wino = load_checkpoint(tmp_path / "wino" / name / "checkpoint.pth.tar")["state_dict"]
    assert list(direct) == list(wino)
    changed = 0
    for key, value in direct.items():
        torch.testing.assert_close(wino[key], value, rtol=1e-4, atol=1e-5, msg=key)
        changed += not torch.equal(wino[key], value)
    assert changed > 0  # the other algorithm really ran


def test_damaged_samples_are_refused_by_default_and_left_out_listed_and_noted_with_skip_bad_samples(
    tmp_path, monkeypatch
):
    """A truncated image in the Kaggle demo download stops the run with one error naming it; with
    --skip_bad_samples its folder is left out of the preparation and of training, counted in summary.json
    and listed where final_result.txt says. A file damaged in the prepared folder afterwards (checked when
    the data is cached, here by --evaluate) joins the count and the list."""
    for key in [k for k in os.environ if k.startswith("MODELZOO_")]:
        monkeypatch.delenv(key)
    kaggle = write_dsb2018(tmp_path / "kaggle", n=6)
    folder = sorted(p for p in (kaggle / "stage1_train").iterdir() if p.is_dir())[2]
    bad = truncate(folder / "images" / f"{folder.name}.png", 0.5)
    models = tmp_path / "models"
    common = ["--data_path", str(kaggle), *TINY, "-b", "4", "--epochs", "1", "--models_dir", str(models),
              "--warmup_steps", "0"]  # fmt: skip
    user_error(lambda: train.main(common), str(bad), "cannot decode", "--skip_bad_samples")
    assert not models.exists()

    assert train.main([*common, "--skip_bad_samples"]) == 0
    run_dir = models / "demo_dsb2018_32_UNet_woDS"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and summary["train_images"] + summary["val_images"] == 5
    listed = run_dir / "skipped_samples.txt"
    assert [row.split("\t")[:2] for row in listed.read_text().splitlines()] == [[folder.name, str(bad)]]
    assert summary["notes"] == [
        f"--skip_bad_samples: 1 bad sample(s) left out (1 problem(s)); listed in {listed}"
    ]
    assert f"Note: {summary['notes'][0]}" in (run_dir / "final_result.txt").read_text()

    prepared = kaggle / "demo_dsb2018_32"
    mask = truncate(sorted((prepared / "masks" / "0").iterdir())[0], 0.5)
    evaluate = [*common, "--evaluate", "--resume", str(run_dir / "model_best.pth.tar")]
    user_error(lambda: train.main(evaluate), str(mask), "cannot decode", "--skip_bad_samples")
    assert train.main([*evaluate, "--skip_bad_samples"]) == 0
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["skipped_samples"] == 2 and summary["train_images"] + summary["val_images"] == 4
    listed_eval = run_dir / "eval" / "skipped_samples.txt"
    rows = sorted(row.split("\t")[1] for row in listed_eval.read_text().splitlines())
    assert rows == sorted([str(bad), str(mask)]) and len(listed.read_text().splitlines()) == 1
    final = (run_dir / "eval" / "final_result.txt").read_text()
    assert f"2 bad sample(s) left out (2 problem(s)); listed in {listed_eval}" in final


def test_auto_convolutions_are_refused_with_deterministic():
    with pytest.raises(ConfigError, match="--conv_algo auto chooses by timing"):
        train.main(["--data_path", "/nonexistent", "--conv_algo", "auto", "--deterministic"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--input_w", "100"],
            "--input_w must be a multiple of 16 (four 2x poolings), got 100; use 96 or 112",
        ),
        (["--deep_supervision"], "--deep_supervision needs --arch NestedUNet"),
        (["--arch", "UNet3"], "unknown --arch 'UNet3'; valid: UNet, NestedUNet"),
        (["--num_classes", "2"], "--num_classes must be 1"),
        (
            ["--scheduler", "MultiStepLR", "--milestones", "a,b"],
            "--milestones must be positive epoch numbers",
        ),
    ],
)
def test_bad_flags_are_refused_with_the_rule(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.main(["--data_path", "/nonexistent", *flags])


def test_evaluate_without_a_checkpoint_says_what_to_do(tmp_path):
    data = _prepared(tmp_path / "data", n=4)
    with pytest.raises(CheckpointError, match="does not exist: train first"):
        train.main(["--data_path", str(data), *TINY, "--evaluate", "--models_dir", str(tmp_path / "m")])


@pytest.fixture(scope="module")
def nested_checkpoint(tmp_path_factory):
    """UNet++ with deep supervision, 1 epoch on a tiny prepared set."""
    root = tmp_path_factory.mktemp("nested")
    data = _prepared(root / "data", n=8)
    args = ["--data_path", str(data), *TINY, "-b", "4", "--epochs", "1", "--arch", "NestedUNet",
            "--deep_supervision", "--loss", "BCEDiceLoss", "--models_dir", str(root / "models")]  # fmt: skip
    assert train.main(args) == 0
    return root / "models" / "data_NestedUNet_wDS" / "model_best.pth.tar"


def test_evaluate_scores_every_image_of_another_folder_and_lists_them(nested_checkpoint, tmp_path, capsys):
    other = _prepared(tmp_path / "held_out", n=6)
    models = tmp_path / "m"
    args = ["--data_path", str(other), *TINY, "--arch", "NestedUNet", "--deep_supervision", "--evaluate",
            "--resume", str(nested_checkpoint), "--eval_split=all", "--models_dir", str(models)]  # fmt: skip
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "on 6 images of" in out and "(every image)" in out
    details = json.loads((models / "held_out_NestedUNet_wDS" / "eval" / "summary.json").read_text())
    assert details["scored"]["ids"] == [f"n{i}" for i in range(6)] and details["scored"]["split"] == "all"
    assert details["checkpoint"] == str(nested_checkpoint)
    assert 0.0 <= details["iou_batch_pooled"] <= 1.0 and details["validation"]["n_images"] == 6


def _real_image() -> Path:
    stage1 = shared_data_dir() / "dsb2018" / "stage1_train"
    if not stage1.is_dir():
        pytest.skip(f"real-data sample {stage1} is not present (it ships with CI, not with a clone)")
    folder = sorted(p for p in stage1.iterdir() if p.is_dir())[0]
    return folder / "images" / f"{folder.name}.png"


def test_onnx_export_matches_pytorch_on_a_real_image(nested_checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    image = _real_image()
    out = tmp_path / "unetpp.onnx"
    assert (
        pthtar2onnx.main(["--resume", str(nested_checkpoint), "--image", str(image), "--output", str(out)])
        == 0
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["actual_input_1"]
    assert [o.name for o in session.get_outputs()] == ["output1"]
    # Independently: rebuild the network from the checkpoint and run both on the real image.
    state = load_checkpoint(nested_checkpoint)
    model = train.archs.NestedUNet(1, 3, deep_supervision=True)
    load_weights(model, state)
    model.eval()
    x, display = image_loader({"input_channels": 3, "input_h": 32, "input_w": 32})(image)
    assert display.shape[2] == 3 and x.shape == (3, 32, 32)
    with torch.no_grad():
        expected = model(x[None])[-1].numpy()
    got = session.run(None, {"actual_input_1": x[None].numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_demo_writes_masks_and_overlays_for_the_validation_split(nested_checkpoint, tmp_path, capsys):
    out = tmp_path / "UNet_Demo"
    assert demo.main(["--resume", str(nested_checkpoint), "--output", str(out)]) == 0
    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows) == 2  # 8 images, 80/20
    for row in rows:
        mask = np.array(Image.open(row["mask"]))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(row["overlay"]).mode == "RGB"
        assert 0.0 <= row["dice"] <= 1.0
    assert "mean Dice" in capsys.readouterr().out
    folder_out = tmp_path / "folder"
    assert demo.main(["--resume", str(nested_checkpoint), "--input", str(Path(rows[0]["image"]).parent),
                      "--output", str(folder_out)]) == 0  # fmt: skip
    assert len(list(folder_out.glob("*_mask.png"))) == 8


def test_demo_scores_every_image_of_a_dataset_folder_with_both_ious(nested_checkpoint, tmp_path, capsys):
    data = _prepared(tmp_path / "held_out", n=5)
    out = tmp_path / "scored"
    assert demo.main(["--resume", str(nested_checkpoint), "--input", str(data), "--output", str(out),
                      "--iou_batch", "2"]) == 0  # fmt: skip
    rows = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).stem for r in rows] == [f"n{i}" for i in range(5)]
    pooled = batch_pooled_iou([r["intersection"] for r in rows], [r["union"] for r in rows], 2)
    assert "5 images scored" in (printed := capsys.readouterr().out)
    assert f"{pooled:.4f} batch-pooled (batches of 2)" in printed
