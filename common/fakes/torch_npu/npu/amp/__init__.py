"""Fake of Ascend/pytorch `torch_npu/npu/amp/__init__.py`: exports GradScaler."""

from __future__ import annotations

from .grad_scaler import GradScaler

__all__ = ["GradScaler"]
