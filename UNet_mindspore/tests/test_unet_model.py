"""UNetMedical against the facts of MindSpore's unet_medical (references.md section 5.1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm
from src.unet import (
    UNetMedical,
    check_input_size,
    nearest_valid_input_size,
    output_size,
    skip_crops,
    valid_input_sizes,
)

from common.testing import SyncCounter

WIDTHS = [64, 128, 256, 512, 1024]
# MindSpore Up1..Up4 crop the skip by these fixed fractions (valid for 572x572 only).
MINDSPORE_FRACTIONS = [56 / 64, 104 / 136, 200 / 280, 392 / 568]


@pytest.fixture(scope="module")
def net() -> UNetMedical:
    torch.manual_seed(0)
    return UNetMedical(n_channels=1, n_classes=2).eval()


def _hand_count(n_channels: int, n_classes: int) -> int:
    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def double(cin, cout, mid=None):
        mid = mid or cout
        return conv(cin, mid, 3) + conv(mid, cout, 3)

    total = double(n_channels, WIDTHS[0])
    total += sum(double(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))
    for cin, cout in zip(WIDTHS[:0:-1], WIDTHS[-2::-1]):
        total += conv(cin, cin // 2, 2) + double(cin, cout, cin // 2)
    return total + conv(WIDTHS[0], n_classes, 1)


def _expected_keys() -> set[str]:
    keys = {f"inc.double_conv.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for n in range(1, 5):
        keys |= {f"down{n}.maxpool_conv.1.double_conv.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        keys |= {f"up{n}.up.{p}" for p in ("weight", "bias")}
        keys |= {f"up{n}.conv.double_conv.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    return keys | {"outc.conv.weight", "outc.conv.bias"}


def _rule_valid(n: int) -> bool:
    """The output-size rule of the U-Net, written independently of the model's own arithmetic."""
    for _ in range(4):
        n -= 4
        if n <= 0 or n % 2:
            return False
        n //= 2
    bottleneck = n - 4
    # decoder sides are 2b - 4, 4b - 12, 8b - 28, 16b - 60: all positive needs b >= 4
    return bottleneck >= 4


def test_parameter_count_matches_reference_and_hand_count(net):
    total = sum(p.numel() for p in net.parameters())
    assert total == 31_030_658
    assert total == _hand_count(1, 2)
    with torch.device("meta"):  # shapes only: skips the slow truncated-normal draw
        other = UNetMedical(3, 5)
    assert sum(p.numel() for p in other.parameters()) == _hand_count(3, 5)


def test_parameter_names_follow_mindspore_cell_tree(net):
    assert set(net.state_dict()) == _expected_keys()
    assert len(net.state_dict()) == 46
    assert tuple(net.up1.up.weight.shape) == (1024, 512, 2, 2)  # (in, out, kh, kw) as Conv2dTranspose
    assert tuple(net.up1.conv.double_conv[0].weight.shape) == (512, 1024, 3, 3)  # mid = in / 2
    assert tuple(net.outc.conv.weight.shape) == (2, 64, 1, 1)


def test_572_gives_388_and_crops_equal_mindspore_fractions(net):
    records = {}

    def keep(name):
        def hook(module, args, output):
            records[name] = (args, output)

        return hook

    handles = []
    for n in range(1, 5):
        up = getattr(net, f"up{n}")
        handles += [
            up.register_forward_hook(keep(f"up{n}")),
            up.relu.register_forward_hook(keep(f"up{n}.relu")),
            up.conv.register_forward_hook(keep(f"up{n}.conv")),
        ]
    torch.manual_seed(1)
    x = torch.randn(1, 1, 572, 572)
    try:
        with torch.no_grad():
            y = net(x)
    finally:
        for h in handles:
            h.remove()
    assert y.shape == (1, 2, 388, 388)
    assert output_size(572) == 388
    assert skip_crops(572) == [(56, 64), (104, 136), (200, 280), (392, 568)]

    for n, fraction in enumerate(MINDSPORE_FRACTIONS, start=1):
        skip = records[f"up{n}"][0][1]
        upsampled = records[f"up{n}.relu"][1]
        catted = records[f"up{n}.conv"][0][0]
        size = skip.shape[-1]
        # mindspore.nn.CentralCrop: start = int((size - size * fraction) / 2), window size - 2 * start.
        start = int((size - float(np.float32(size * fraction))) / 2)
        window = size - 2 * start
        assert window == upsampled.shape[-1] == upsampled.shape[-2]
        half = upsampled.shape[1]
        assert catted.shape[1] == 2 * half
        assert torch.equal(catted[:, :half], upsampled)  # upsampled first
        assert torch.equal(catted[:, half:], skip[..., start : start + window, start : start + window])


def test_small_sizes_shapes_and_non_square(net):
    with torch.no_grad():
        assert net(torch.randn(2, 1, 188, 188)).shape == (2, 2, 4, 4)
        assert net(torch.randn(1, 1, 188, 204)).shape == (1, 2, 4, 20)


def test_output_is_shift_equivariant_so_crops_are_aligned(net):
    """Valid convs and four 2x poolings: output pixel i sees input [i, i + 184], for shifts of 16."""
    torch.manual_seed(2)
    x = torch.randn(1, 1, 204, 204)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (1, 2, 20, 20)
        for top, left in ((0, 0), (16, 0), (0, 16), (16, 16)):
            part = net(x[..., top : top + 188, left : left + 188])
            torch.testing.assert_close(part, y[..., top : top + 4, left : left + 4], rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_a_finite_gradient(net):
    torch.manual_seed(3)
    out = net(torch.randn(1, 1, 188, 188))  # no dropout or BN: eval and train mode are the same network
    target = torch.randint(0, 2, (1, 4, 4))
    torch.nn.functional.cross_entropy(out, target).backward()
    try:
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    finally:
        net.zero_grad(set_to_none=True)


def test_valid_sizes_follow_the_rule_and_run_on_meta():
    sizes = valid_input_sizes(1, 1000)
    assert sizes == [n for n in range(1, 1001) if _rule_valid(n)]
    assert sizes[:3] == [188, 204, 220] and all(n % 16 == 12 for n in sizes)
    assert valid_input_sizes(500, 520) == [508]
    with torch.device("meta"):
        meta_net = UNetMedical()
    for n in (188, 220, 572, 700):
        assert meta_net(torch.empty(1, 1, n, n, device="meta")).shape[-1] == output_size(n) == n - 184


def test_nearest_valid_input_size():
    assert nearest_valid_input_size(572) == 572
    assert nearest_valid_input_size(500) == 508  # tie between 492 and 508 goes to the larger
    assert nearest_valid_input_size(495) == 492
    assert nearest_valid_input_size(501) == 508
    assert nearest_valid_input_size(1) == 188
    assert nearest_valid_input_size(512) == 508


def test_invalid_size_messages(net):
    message = (
        "input 500x500 does not fit the valid-convolution U-Net: use one of 492 or 508 (output 308 / 324)"
    )
    with pytest.raises(ValueError) as err:
        net(torch.zeros(1, 1, 500, 500))
    assert str(err.value) == message
    with pytest.raises(
        ValueError, match=r"height 500: use one of 492 or 508 .*; width 600: use one of 588 or 604"
    ):
        check_input_size(500, 600)
    with pytest.raises(ValueError, match=r"width 190: use one of 188 or 204 \(output 4 / 20\)"):
        check_input_size(188, 190)
    with pytest.raises(ValueError, match=r"use 188 or larger \(output 4\)"):
        output_size(100)
    with pytest.raises(ValueError, match=r"expects input \(N, 1, H, W\)"):
        net(torch.zeros(1, 3, 188, 188))
    with pytest.raises(ValueError, match="n_classes must be a positive integer"):
        UNetMedical(1, 0)
    check_input_size(572, 188)  # valid: no error


def test_torch_compile_fullgraph(net):
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x = torch.randn(1, 1, 188, 188)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x))


def test_initialisation_statistics(net):
    expected_std = truncnorm(-2, 2, scale=0.06).std()  # MindSpore TruncatedNormal(0.06): cut at 2 sigma
    assert math.isclose(expected_std, 0.0528, abs_tol=5e-4)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    transposed = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convs) == 19 and len(transposed) == 4
    for m in convs + transposed:
        assert torch.count_nonzero(m.bias) == 0
    for m in convs:
        assert m.weight.abs().max() <= 0.12 + 1e-7
    big = net.down4.maxpool_conv[1].double_conv[2].weight  # 9.4M samples
    assert abs(big.std().item() - expected_std) < 5e-4
    assert abs(big.mean().item()) < 1e-3
    up = net.up1.up.weight  # 2.1M samples of N(0, 0.01), not truncated
    assert abs(up.std().item() - 0.01) < 1e-4
    assert up.abs().max() > 0.03


def _functional_forward(net: UNetMedical, x: torch.Tensor) -> torch.Tensor:
    """The U-Net written out with torch.nn.functional on `net`'s weights, each skip centre-cropped by
    offsets taken from the two shapes: the reference for the module's forward."""

    def double(block, h):
        first, second = block.double_conv[0], block.double_conv[2]
        return F.relu(F.conv2d(F.relu(F.conv2d(h, first.weight, first.bias)), second.weight, second.bias))

    skips = [double(net.inc, x)]
    for down in (net.down1, net.down2, net.down3, net.down4):
        skips.append(double(down.maxpool_conv[1], F.max_pool2d(skips[-1], 2)))
    h = skips.pop()
    for up in (net.up1, net.up2, net.up3, net.up4):
        h = F.relu(F.conv_transpose2d(h, up.up.weight, up.up.bias, stride=2))
        skip = skips.pop()
        top, left = (skip.shape[-2] - h.shape[-2]) // 2, (skip.shape[-1] - h.shape[-1]) // 2
        skip = skip[..., top : top + h.shape[-2], left : left + h.shape[-1]]
        h = double(up.conv, torch.cat((h, skip), dim=1))
    return F.conv2d(h, net.outc.conv.weight, net.outc.conv.bias)


@pytest.mark.parametrize("size", [(188, 188), (188, 204)], ids=["188x188", "188x204"])
def test_forward_and_backward_never_wait_for_the_device(net, size):
    """The crops come from Python ints (tensor shapes), so no step of the network reads a device value."""
    torch.manual_seed(4)
    x = torch.randn(2, 1, *size)
    target = torch.randint(0, 2, (2, size[0] - 184, size[1] - 184))
    try:
        with SyncCounter() as syncs:
            out = net(x)
            F.cross_entropy(out, target).backward()
        assert syncs.total == 0, syncs
        assert syncs.ops > 100  # the whole network went through the counter
        with torch.no_grad():
            torch.testing.assert_close(out, _functional_forward(net, x), rtol=1e-5, atol=1e-6)
    finally:
        net.zero_grad(set_to_none=True)
