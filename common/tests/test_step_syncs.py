"""Host-device synchronisations per training iteration, counted in each folder's real performance script.

Each `test/train_performance_1p.sh` runs on its demo data with tiny shapes and a sitecustomize that counts
synchronising ops (common/tests/sync_site): between the starts of consecutive training steps, outside the
optimizer's own update and outside logging steps, a step may wait for the device at most once (the
finite-gradient check that decides whether the update is applied), and not at all where the device
decides it (CUDA with a fused optimizer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.testing import child_env

REPO = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "sync_site"
# One BatchNorm-recomputation batch: the pass runs (after the counted steps) without costing the suite.
QUIET = ["--log_interval=1000", "--workers=0", "--warmup_steps=1", "--precise_bn_batches=1"]
CASES = {
    "UNet_nested": ["--input_w=32", "--input_h=32", "--batch_size=4", "--max_steps=4"],
    "AttU_Net": ["--image_size=32", "--batch_size=2", "--epochs=1", "--max_steps=3"],
    "R2U_Net": ["--image_size=32", "--batch_size=2", "--epochs=1", "--max_steps=3"],
    "UNet_mindspore": ["--image_size=188", "--batch_size=1", "--max_steps=3", "--repeat=3"],
    "VNet": ["--vox_spacing=4", "--volume_size=32x32x32", "--patch_size=16x32x32", "--val_overlap=0",
             "--batch_size=1", "--max_steps=4", "--samples_per_volume=4"],
}  # fmt: skip
MAX_SYNCS_PER_STEP = 1
_NOT_COPIED = ("output", "demo_data", "models", "work", "result", "tests", "__pycache__", "*.pth*", "*.onnx")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Copies of the folders beside a link to `common`: the scripts' outputs land there, not in the checkout."""
    root = tmp_path_factory.mktemp("repo")
    (root / "common").symlink_to(REPO / "common", target_is_directory=True)
    for folder in CASES:
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns(*_NOT_COPIED))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("folder", list(CASES))
def test_a_training_step_waits_for_the_device_at_most_once(folder, tmp_path, repo):
    report = tmp_path / "syncs.json"
    env = child_env(
        MODELZOO_SYNC_COUNT_OUT=str(report),
        PYTHONPATH=os.pathsep.join([str(SITE), str(repo)]),
    )
    proc = subprocess.run(["bash", "test/train_performance_1p.sh", *CASES[folder], *QUIET], cwd=repo / folder,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(report.read_text())
    measured = [n for epoch in counts["epochs"] for n in epoch]
    assert measured, f"no iteration measured (each epoch needs two or more steps): {counts}"
    assert max(measured) <= MAX_SYNCS_PER_STEP, f"syncs per iteration {measured}; where: {counts['sites']}"


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["AttU_Net", "UNet_mindspore"])
def test_a_fused_step_never_waits_when_the_device_decides_its_skips(folder, tmp_path, repo):
    """As on CUDA (where the trainers' Adam is fused): the finite check and the skipped-step counts stay on
    the device, so outside logging steps nothing is read back; these folders' Adam is fused on the CPU too."""
    report = tmp_path / "syncs.json"
    env = child_env(
        MODELZOO_SYNC_COUNT_OUT=str(report),
        MODELZOO_SYNC_SKIP_ON_DEVICE="1",
        PYTHONPATH=os.pathsep.join([str(SITE), str(repo)]),
    )
    proc = subprocess.run(["bash", "test/train_performance_1p.sh", *CASES[folder], *QUIET], cwd=repo / folder,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = json.loads(report.read_text())
    measured = [n for epoch in counts["epochs"] for n in epoch]
    assert measured and max(measured) == 0, f"syncs per iteration {measured}; where: {counts['sites']}"
