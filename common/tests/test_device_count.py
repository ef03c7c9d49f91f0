"""`python -m common.device_count`: 0 without importing torch where no accelerator can be, torch's count
otherwise (the shell library asks before every run)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common import device_count
from common.fakes import installed_torch_npu
from common.testing import REPO_ROOT, child_env

_NO_TORCH = (
    "import sys; from common.device_count import count, may_have_accelerators; "
    "print(may_have_accelerators(), count(), 'torch' in sys.modules)"
)


def test_a_node_without_driver_nodes_or_torch_npu_counts_zero_without_importing_torch():
    if device_count.may_have_accelerators():
        pytest.skip("this machine has an accelerator device node or torch_npu")
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=REPO_ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stdout.split()) == (0, ["False", "0", "False"]), proc.stderr
    module = subprocess.run([sys.executable, "-m", "common.device_count"], cwd=REPO_ROOT, env=child_env(),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (module.returncode, module.stdout) == (0, "0\n")


def test_a_driver_device_node_makes_torch_count(monkeypatch, tmp_path):
    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(device_count, "DEVICE_NODES", (str(tmp_path / "nvidia[0-9]*"),))
    asked = []
    monkeypatch.setattr(
        "common.device.device_count", lambda kind: asked.append(kind) or (2 if kind == "cuda" else 0)
    )
    assert device_count.may_have_accelerators() and device_count.count() == 2 and asked == ["npu", "cuda"]


def test_torch_npu_without_device_nodes_still_makes_torch_count(monkeypatch):
    monkeypatch.setattr(device_count, "DEVICE_NODES", ())
    with installed_torch_npu(device_count=3):
        assert device_count.may_have_accelerators() and device_count.count() == 3
