"""ONNX export with the ModelZoo conventions, and a numerical check of the exported file.

The Ascend ModelZoo export scripts (`pth2onnx.py`) use opset 11, input `actual_input_1`, output `output1`
and a dynamic batch axis; the offline-inference tools downstream expect exactly these names. The legacy
TorchScript-based exporter is used where torch still has it, because the torch.export-based one (the
default from torch 2.9) builds opset-18 graphs and converts them down to 11 only on a best-effort basis.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import ModelZooError

INPUT_NAME = "actual_input_1"
OUTPUT_NAME = "output1"
OPSET = 11


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelZooError(
            f"{module} is needed for ONNX export and checking but is not installed: "
            "pip install -r requirements-dev.txt"
        ) from exc


class _SelectOutput(nn.Module):
    """Exports one tensor from a network that returns a list/tuple (deep supervision)."""

    def __init__(self, net: nn.Module, index: int | None):
        super().__init__()
        self.net = net
        self.index = -1 if index is None else index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            out = out[self.index]
        return out


def _cpu_copy(model: nn.Module, select_output: int | None) -> nn.Module:
    """An eval-mode float32 CPU copy, unwrapped from DDP/DataParallel and torch.compile, so the caller's
    model keeps its device, dtype and mode."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    return _SelectOutput(net, select_output).eval()


def _legacy_kwargs() -> dict:
    """`dynamo=False` on torch versions whose `torch.onnx.export` has the flag (2.5 and later)."""
    params = inspect.signature(torch.onnx.export).parameters
    return {"dynamo": False} if "dynamo" in params else {}


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int = OPSET,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
    dynamic_batch: bool = True,
    select_output: int | None = None,
) -> Path:
    """Export `model` to ONNX at `path` (written atomically, then checked with `onnx.checker`).

    Args:
        model: the network; it is deep-copied to CPU float32 in eval mode, the caller's copy is untouched.
        example: a batched input, e.g. (1, C, H, W); it fixes every axis except the batch axis.
        dynamic_batch: name axis 0 "batch" on the input and the output, so any batch size runs.
        select_output: for networks returning a list/tuple (deep supervision), the index of the output to
            export; None takes the last (the full-depth prediction).
    """
    onnx = _require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = _cpu_copy(model, select_output)
    example = example.detach().to(device="cpu", dtype=torch.float32)
    dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with warnings.catch_warnings():
            # The legacy exporter announces its own deprecation on every call; that is a torch concern.
            warnings.simplefilter("ignore", DeprecationWarning)
            with torch.no_grad():
                torch.onnx.export(
                    net,
                    (example,),
                    str(tmp),
                    input_names=[input_name],
                    output_names=[output_name],
                    opset_version=opset,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                    **_legacy_kwargs(),
                )
        # Checking by path also works for models above the 2 GB protobuf limit.
        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _eager(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return net(x).detach().cpu().numpy()


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    example: torch.Tensor,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    select_output: int | None = None,
) -> float:
    """Compare onnxruntime (CPU) on `path` with the eager model; returns the largest absolute difference.

    Runs `example` and, when the file has a dynamic batch axis, a batch one larger, so a batch size baked
    into the graph (e.g. by a reshape) is caught. Raises `ModelZooError` with the numbers when any element
    is outside `atol + rtol * |eager|`.
    """
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise ModelZooError(f"{path}: no ONNX file to verify (run the export first)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    net = _cpu_copy(model, select_output)
    example = example.detach().to(device="cpu", dtype=torch.float32)
    batches = [("example batch", example)]
    if isinstance(feed.shape[0], str) or feed.shape[0] is None:
        # A different sample in the extra slot, so rows cannot be mixed up unnoticed.
        extra = torch.cat([example, example[:1].flip(-1)], dim=0)
        batches.append((f"batch of {extra.shape[0]}", extra))

    worst = 0.0
    for what, x in batches:
        expected = _eager(net, x)
        try:
            got = session.run(None, {feed.name: x.numpy()})[0]
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelZooError(f"{path}: onnxruntime failed on the {what} {tuple(x.shape)}: {exc}") from exc
        if got.shape != expected.shape:
            raise ModelZooError(
                f"{path}: ONNX output shape {got.shape} differs from the model's {expected.shape} "
                f"on the {what}"
            )
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        max_diff = float(np.nanmax(diff)) if diff.size else 0.0
        if not np.array_equal(np.isfinite(got), np.isfinite(expected)):
            raise ModelZooError(
                f"{path}: ONNX and eager outputs have NaN/inf in different places on the {what}"
            )
        bound = atol + rtol * np.abs(expected.astype(np.float64))
        bad = diff > bound
        if bad.any():
            raise ModelZooError(
                f"{path}: ONNX and eager outputs differ on the {what}: max abs diff {max_diff:.3g}, "
                f"{int(bad.sum())} of {bad.size} elements outside atol={atol:g} + rtol={rtol:g}*|eager|"
            )
        worst = max(worst, max_diff)
    return worst
