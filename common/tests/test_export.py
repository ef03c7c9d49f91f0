from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import ModelZooError
from common.export import export_onnx, verify_onnx

onnx = pytest.importorskip("onnx", reason="onnx is a dev requirement (pip install -r requirements-dev.txt)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a dev requirement")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class DeepSupervised(nn.Module):
    """Returns [coarse, fine] like UNet++ with deep supervision."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.out1 = nn.Conv2d(4, 1, 1)
        self.out2 = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return [self.out1(h), self.out2(h)]


def _ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _trained_like(model):
    torch.manual_seed(0)
    # Non-trivial BatchNorm statistics, so eval mode (not train mode) must be what is exported.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_export_names_opset_and_dynamic_batch(tmp_path):
    model = _trained_like(TinyNet()).train()  # the caller's mode must survive the export
    example = torch.randn(1, 3, 16, 16)
    path = export_onnx(model, example, tmp_path / "tiny.onnx")
    assert path == tmp_path / "tiny.onnx" and path.is_file()
    assert model.training
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # no temporary left over

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["actual_input_1"]
    assert [o.name for o in graph.graph.output] == ["output1"]
    assert {op.domain: op.version for op in graph.opset_import}[""] == 11
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    x3 = torch.randn(3, 3, 16, 16)
    (got,) = _ort_run(path, x3)
    with torch.no_grad():
        expected = model.eval()(x3).numpy()
    assert got.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    diff = verify_onnx(path, model, example)
    assert 0.0 <= diff < 1e-4


def test_export_deep_supervision_selects_output(tmp_path):
    model = DeepSupervised()
    example = torch.randn(1, 1, 12, 12)
    with torch.no_grad():
        coarse, fine = model(example)

    last = export_onnx(model, example, tmp_path / "last.onnx")
    first = export_onnx(model, example, tmp_path / "first.onnx", select_output=0)
    for path, expected in ((last, fine), (first, coarse)):
        outputs = _ort_run(path, example)
        assert len(outputs) == 1
        np.testing.assert_allclose(outputs[0], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert verify_onnx(last, model, example) < 1e-4
    assert verify_onnx(first, model, example, select_output=0) < 1e-4
    with pytest.raises(ModelZooError, match="differ"):
        verify_onnx(first, model, example)  # the file holds output 0, the check compares the last


def test_verify_raises_on_different_weights(tmp_path):
    torch.manual_seed(1)
    exported = TinyNet().eval()
    other = TinyNet().eval()
    example = torch.randn(2, 3, 8, 8)
    path = export_onnx(exported, example, tmp_path / "m.onnx")
    with pytest.raises(ModelZooError) as info:
        verify_onnx(path, other, example)
    message = str(info.value)
    assert "max abs diff" in message and "atol=0.0001" in message


def test_fixed_batch_export_verifies_only_its_batch(tmp_path):
    model = TinyNet().eval()
    example = torch.randn(2, 3, 8, 8)
    path = export_onnx(model, example, tmp_path / "fixed.onnx", dynamic_batch=False)
    dim0 = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2
    assert verify_onnx(path, model, example) < 1e-4


def test_export_leaves_caller_device_and_dtype(tmp_path):
    model = TinyNet().double()
    example = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    export_onnx(model, example, tmp_path / "d.onnx")
    assert next(model.parameters()).dtype == torch.float64
    assert verify_onnx(tmp_path / "d.onnx", model.float(), example.float()) < 1e-4


def test_verify_missing_file(tmp_path):
    with pytest.raises(ModelZooError, match="no ONNX file"):
        verify_onnx(tmp_path / "absent.onnx", TinyNet(), torch.randn(1, 3, 8, 8))
