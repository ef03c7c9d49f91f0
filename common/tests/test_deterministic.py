"""--deterministic: which kernels may only warn, and the cuBLAS workspace it needs on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from common.device import DeviceInfo, make_deterministic
from common.errors import ConfigError


@pytest.fixture
def recorded(monkeypatch):
    """torch.use_deterministic_algorithms recorded instead of applied; cuDNN flags restored afterwards."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: calls.append((mode, kw)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    yield calls
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("kind,warn_only", [("cuda", True), ("npu", True), ("cpu", False)])
def test_accelerators_warn_on_kernels_without_a_deterministic_version(recorded, kind, warn_only):
    make_deterministic(DeviceInfo(kind=kind, index=0, name=kind, backend="x", torch_device="cpu"))
    assert recorded == [(True, {"warn_only": warn_only})]
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_cuda_gets_a_deterministic_cublas_workspace(recorded, monkeypatch):
    cuda = DeviceInfo(kind="cuda", index=0, name="gpu", backend="nccl", torch_device="cpu")
    make_deterministic(cuda)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    make_deterministic(cuda)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG"):
        make_deterministic(cuda)
