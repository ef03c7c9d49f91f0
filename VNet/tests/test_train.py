"""train.py end to end on tiny LUNA16-format volumes: exact resume, and the real test/*.sh scripts with
one rank and two ranks writing valid ModelZoo summaries (the model is the full 45M-parameter V-Net, so the
volumes are 32^3 at 4 mm and each run takes a few steps)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataset import split_cases
from normalize_dataset import OUT_CT_DIR, Settings, normalize_tree

from common.demo_data import write_luna16
from common.summary import parse_summary
from common.testing import child_env, truncate

FOLDER = Path(__file__).resolve().parents[1]
OUTPUT = FOLDER / "test" / "output"
TINY = ["--vox_spacing=4", "--volume_size=32x32x32", "--patch_size=16x32x32", "--val_overlap=0"]
ORDER = ["Network", "RankSize", "BatchSize", "DeviceType", "CaseName", "ActualFPS", "TrainingTime"]
STEP_LINE = re.compile(
    r"^Train Epoch: \d+\.\d\d \[\d+/\d+ \(\d+%\)\] Loss: \d+\.\d{4} Error: \d+\.\d{4}% Lr: \d\.\d{4} FPS: \d+\.\d{4}\)$"
)
TEST_LINE = re.compile(
    r"^Test set: Average loss: \d+\.\d{4}, Error: \d+/\d+ \(\d+\.\d{4}%\) Dice: \d\.\d{4}$"
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    """Four demo cases as distributed, normalised once at the tiny settings (every run reuses it)."""
    root = write_luna16(tmp_path_factory.mktemp("data") / "luna16", n=4, shape=(16, 32, 32))
    normalize_tree(root, Settings(4.0, (32, 32, 32)), workers=1, log=lambda _: None)
    return root


def train(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=FOLDER, env=child_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture
def clean_output():
    shutil.rmtree(OUTPUT, ignore_errors=True)
    yield
    shutil.rmtree(OUTPUT, ignore_errors=True)


def script(name: str, *args: str, rank_size: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", f"test/{name}", *args], cwd=FOLDER, env=child_env(RANK_SIZE=str(rank_size)),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_performance_script_one_rank_then_an_exact_resume(luna, tmp_path, clean_output):
    tiny = [*TINY, "--samples_per_volume=1", "--workers=0", "--deterministic"]
    proc = script("train_performance_1p.sh", f"--data_path={luna}", "--batch_size=3", "--epochs=2", *tiny,
                  f"--save={tmp_path / 'straight'}")  # fmt: skip
    assert "Final Performance images/sec" in proc.stdout
    summary = parse_summary(OUTPUT / "0" / "VNet_bs3_1p_perf.log")
    assert list(summary)[:7] == ORDER and "TrainAccuracy" not in summary
    assert summary["CaseName"] == "VNet_bs3_1p_perf" and float(summary["ActualFPS"]) > 0
    assert summary["ErrorRate"].endswith("%")
    log = (OUTPUT / "0" / "train_0.log").read_text().splitlines()
    steps = [line for line in log if line.startswith("Train Epoch")]
    assert len(steps) == 2 and all(STEP_LINE.match(line) for line in steps)
    assert sum(bool(TEST_LINE.match(line)) for line in log) == 2

    # The same run interrupted after epoch 1 and resumed ends with the same weights (seeded per epoch).
    same = [f"--data={luna}", "--batchSz=3", "--seed=49", "--lr=1e-4", "--lr_decay=1", *tiny]
    train(*same, "--nEpochs=1", f"--save={tmp_path / 'resumed'}")
    ckpt = tmp_path / "resumed" / "vnet_checkpoint.pth.tar"
    second = train(*same, "--nEpochs=2", f"--save={tmp_path / 'resumed'}", f"--resume={ckpt}")
    assert "Resumed from" in second.stdout
    a = torch.load(tmp_path / "straight" / "vnet_checkpoint.pth.tar", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert (tmp_path / "resumed" / "test.csv").read_text().count("\n") == 2  # appended, not truncated


def test_full_8p_script_with_two_real_ranks(luna, tmp_path, clean_output):
    script("train_full_8p.sh", f"--data_path={luna}", "--epochs=1", "--batch_size=2", "--workers=0", *TINY,
           f"--save={tmp_path}", rank_size=2)  # fmt: skip
    summary = parse_summary(OUTPUT / "0" / "VNet_bs2_2p_acc.log")
    assert summary["RankSize"] == "2" and summary["CaseName"] == "VNet_bs2_2p_acc"
    assert 0.0 <= float(summary["TrainAccuracy"]) <= 1.0 and float(summary["ActualFPS"]) > 0
    assert (OUTPUT / "0" / "train_0.log").exists() and (OUTPUT / "1" / "train_1.log").exists()
    rank0 = (OUTPUT / "0" / "train_0.log").read_text()
    assert "ranks: 2" in rank0 and "Test set:" in rank0
    assert "Train Epoch" not in (OUTPUT / "1" / "train_1.log").read_text()  # rank 0 logs, rank 1 is quiet


def test_a_damaged_case_is_refused_by_default_and_left_out_on_every_rank_with_skip_bad_samples(
    tmp_path, clean_output
):
    """A truncated CT volume stops the run with one error naming it. With --skip_bad_samples on two ranks
    the case lies in rank 1's share of the checks, yet both ranks leave it out of the same split; rank 0's
    summary counts it and its final result says where it is listed."""
    root = write_luna16(tmp_path / "luna16", n=4, shape=(16, 32, 32))
    normalize_tree(root, Settings(4.0, (32, 32, 32)), workers=1, log=lambda _: None)
    split = split_cases(sorted(p.stem for p in (root / OUT_CT_DIR).glob("*.mhd")), 0.15, 0.0, 0)
    case = [*split["train"], *split["val"]][1::2][0]  # the cases rank 1 of 2 checks
    bad = truncate(root / OUT_CT_DIR / f"{case}.raw", 0.5)
    save = tmp_path / "run"
    flags = [f"--data={root}", "--nEpochs=1", "--batchSz=1", "--workers=0", *TINY, f"--save={save}"]
    proc = subprocess.run([sys.executable, "train.py", *flags], cwd=FOLDER, env=child_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("[Error] "), proc.stderr[-3000:]
    assert str(bad) in proc.stderr and "--skip_bad_samples" in proc.stderr

    script("train_full_8p.sh", f"--data_path={root}", "--epochs=1", "--batch_size=2", "--workers=0", *TINY,
           f"--save={save}", "--skip_bad_samples", rank_size=2)  # fmt: skip
    summary = json.loads((OUTPUT / "0" / "summary.json").read_text())
    kept = [*summary["split"]["train"], *summary["split"]["val"]]
    assert summary["skipped_samples"] == 1 and case not in kept and len(kept) == 3
    listed = save / "skipped_samples.txt"
    assert [row.split("\t")[:2] for row in listed.read_text().splitlines()] == [[case, str(bad)]]
    note = f"--skip_bad_samples: 1 bad sample(s) left out (1 problem(s)); listed in {listed}"
    assert summary["notes"] == [note]
    assert f"Note: {note}" in (OUTPUT / "0" / "final_result.txt").read_text()
    assert note in (OUTPUT / "0" / "train_0.log").read_text()


def test_dice_ce_is_the_sum_of_its_terms():
    from train import DiceCE

    from common.losses import CrossEntropyLoss, TwoClassDiceLoss

    logits = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    expected = TwoClassDiceLoss()(logits, target) + CrossEntropyLoss()(logits, target)
    torch.testing.assert_close(DiceCE()(logits, target), expected)
