"""Winograd F(4x4, 3x3): the same convolution as F.conv2d (values and gradients), the same module and
state_dict after `apply_conv_algo`, and `auto` measuring and remembering a choice per shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import winograd
from common.winograd import SelectableConv2d, apply_conv_algo, decisions, eligible, winograd_conv2d


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("shape", [(2, 5, 13, 10), (1, 3, 3, 3), (1, 2, 4, 4), (3, 4, 7, 9), (1, 1, 17, 2)])
def test_values_and_gradients_equal_the_direct_convolution(shape, padding):
    if min(shape[2:]) + 2 * padding < 3:
        pytest.skip("smaller than the kernel")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(6, shape[1], 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    expected = F.conv2d(x, w, b, padding=padding)
    got = winograd_conv2d(x, w, b, padding)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    want = torch.autograd.grad(expected, (x, w, b), grad)
    have = torch.autograd.grad(got, (x, w, b), grad)
    for a, e in zip(have, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *t: winograd_conv2d(*t, padding), (x, w, b))


def test_fp32_error_stays_near_the_direct_convolutions():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 28, 28, generator=gen)
    w = torch.randn(32, 64, 3, 3, generator=gen) * 0.05
    exact = F.conv2d(x.double(), w.double(), padding=1)
    scale = exact.abs().max()
    direct_error = (F.conv2d(x, w, padding=1).double() - exact).abs().max() / scale
    winograd_error = (winograd_conv2d(x, w).double() - exact).abs().max() / scale
    assert winograd_error < 1e-5 and winograd_error < 50 * direct_error + 1e-6


def test_only_the_gradients_asked_for_are_computed():
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    winograd_conv2d(x, w).sum().backward()
    assert x.grad is None and w.grad is not None and w.grad.shape == w.shape


def test_shapes_it_cannot_run_are_refused_with_the_rule():
    with pytest.raises(ValueError, match="K x C x 3 x 3"):
        winograd_conv2d(torch.randn(1, 2, 8, 8), torch.randn(3, 2, 5, 5))
    with pytest.raises(ValueError, match="padding 0 or 1"):
        winograd_conv2d(torch.randn(1, 2, 8, 8), torch.randn(3, 2, 3, 3), padding=2)
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        winograd_conv2d(torch.randn(1, 2, 2, 8), torch.randn(3, 2, 3, 3), padding=0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=0, bias=False)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.reflect = nn.Conv2d(8, 1, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(torch.relu(self.a(x)))
        x = self.dilated(self.grouped(self.pointwise(self.strided(x))))
        return self.reflect(x)


def test_apply_keeps_parameters_and_state_dict_and_changes_only_eligible_layers():
    torch.manual_seed(0)
    net = Net()
    params = list(net.parameters())
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 20, 20)
    before = net(x)
    assert apply_conv_algo(net, "winograd") == 2
    assert list(net.parameters()) == params and list(net.state_dict()) == keys
    assert type(net.a) is SelectableConv2d and type(net.b) is SelectableConv2d
    for name in ("strided", "pointwise", "grouped", "dilated", "reflect"):
        assert type(getattr(net, name)) is nn.Conv2d and not eligible(getattr(net, name)), name
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(net(x), before)  # it really runs the other algorithm
    apply_conv_algo(net, "direct")
    assert torch.equal(net(x), before)
    with pytest.raises(ValueError, match="direct, winograd, auto"):
        apply_conv_algo(net, "fft")


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")
def test_autocast_and_tracing_take_the_direct_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = conv(x)
    apply_conv_algo(conv, "winograd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(conv(x), expected)
    traced = torch.jit.trace(conv, x)
    assert "aten::_convolution" in str(traced.graph)


def test_auto_times_each_shape_once_and_remembers_the_choice(monkeypatch):
    monkeypatch.setattr(winograd, "_decisions", {})
    timed = []
    real = winograd._best_seconds

    def counting(fn, repeats):
        timed.append(repeats)
        return real(fn, repeats)

    monkeypatch.setattr(winograd, "_best_seconds", counting)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    apply_conv_algo(net, "auto")
    x = torch.randn(2, 3, 16, 16)
    net(x).sum().backward()
    assert len(timed) == 4  # two shapes, two algorithms each
    net(x).sum().backward()
    net(torch.randn(5, 3, 16, 16)).sum().backward()  # another batch size: the same decision
    assert len(timed) == 4
    with torch.no_grad():
        net(x)  # inference is its own question (no backward to pay for)
    assert len(timed) == 8
    chosen = decisions()
    assert len(chosen) == 4 and set(chosen.values()) <= {"direct", "winograd"}
    # The first layer's input needs no gradient, the second's does: recorded apart.
    assert {key[-2] for key in chosen} == {False, True}


def test_auto_follows_the_measurement(monkeypatch):
    monkeypatch.setattr(winograd, "_decisions", {})
    calls = iter([2.0, 1.0])  # direct timed first, then Winograd: Winograd is faster
    monkeypatch.setattr(winograd, "_best_seconds", lambda fn, repeats: next(calls))
    conv = nn.Conv2d(2, 2, 3, padding=1)
    apply_conv_algo(conv, "auto")
    conv(torch.randn(1, 2, 8, 8))
    assert list(decisions().values()) == ["winograd"]
