"""Winograd F(4x4, 3x3) convolution, chosen per layer by timing: a CPU counterpart of cudnn.benchmark.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016). A 3x3 convolution over a
4x4 output tile costs 144 multiplications directly and 36 in the Winograd domain. The input is cut into
overlapping 6x6 tiles and transformed (B^T d B), the weights are transformed (G g G^T), the 36
transform-domain positions become 36 batched matrix products over channels, and the result is
transformed back (A^T m A). The backward pass runs in the same domain: the gradients of the weights and
of the input are again 36 batched matrix products, followed by the transposed transforms.

Why it is here: on a CPU without bf16 units (AVX2), oneDNN's direct convolution already runs at
55-90 % of the machine's GEMM peak, so the only way to make a U-Net train markedly faster in fp32 is
to do fewer multiplications. The transforms are memory-bound, so Winograd wins on the middle levels of
a U-Net (many channels, moderate resolution: 2-2.3x at 256-512 channels and 28-56 px here, forward and
backward) and loses at full resolution (few channels, large tiles of memory) and on tiny maps (the
weight transform dominates). `algo="auto"` therefore times both on each layer's real shape at first use
and keeps Winograd where it is at least 5 % faster.

The layer stays an `nn.Conv2d` with the same `weight` and `bias` Parameters, so state_dict keys,
checkpoints, optimizers and ONNX export (which traces the direct path) are unchanged. Numerics: fp32
results differ from the direct convolution by ~1e-5 relative (the transforms' rounding), far below the
noise of training; autocast regions (bf16/fp16) and non-eligible convolutions always take the direct
path, because the transforms would amplify low-precision rounding.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from common.amp import autocast_enabled

ALGOS = ("direct", "winograd", "auto")

# F(4x4, 3x3) with interpolation points 0, +-1, +-2, infinity (Lavin & Gray, section 4.2).
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)
_TILE, _OUT = 6, 4
_AREA = _TILE * _TILE

_matrices: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _transforms(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms as Kronecker products (computed in float64, then cast): input 36x36, weight
    36x9, output 16x36; one matrix product each instead of two small ones with a transpose between."""
    key = (device, dtype)
    if key not in _matrices:
        bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (_BT, _G, _AT))
        _matrices[key] = tuple(torch.kron(m, m).to(device=device, dtype=dtype) for m in (bt, g, at))
    return _matrices[key]


class _WinogradConv3x3(torch.autograd.Function):
    """Forward and backward of a 3x3, stride-1 convolution (zero padding 0 or 1) in the F(4x4, 3x3) domain.

    Written out rather than left to autograd: the backward of the tile extraction is then 36 strided
    additions instead of `unfold_backward` and its zero-filled 6x6 tile tensor, which saved 10-20 % of
    a layer's step time here. Saves the transformed input and weights (2.25x the input) for backward.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int
    ) -> torch.Tensor:
        k_in, k_weight, k_out = _transforms(x.device, x.dtype)
        n, c, h_in, w_in = x.shape
        k = weight.shape[0]
        h, w = h_in + 2 * padding - 2, w_in + 2 * padding - 2  # the output size
        tiles_h, tiles_w = -(-h // _OUT), -(-w // _OUT)
        positions = n * tiles_h * tiles_w
        # The convolution's own padding on the top/left, and on the bottom/right enough to fill the last
        # tile; the extra outputs are cropped below.
        padded = F.pad(
            x, (padding, tiles_w * _OUT + 2 - w_in - padding, padding, tiles_h * _OUT + 2 - h_in - padding)
        )
        tiles = padded.unfold(2, _TILE, _OUT).unfold(3, _TILE, _OUT)  # n c th tw 6 6, a strided view
        d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(_AREA, c * positions)
        v = (k_in @ d).view(_AREA, c, positions)
        u = (k_weight @ weight.reshape(k * c, 9).t()).view(_AREA, k, c)
        m = torch.bmm(u, v)  # 36 products of (k x c) by (c x positions)
        y = (k_out @ m.view(_AREA, k * positions)).view(_OUT, _OUT, k, n, tiles_h, tiles_w)
        y = y.permute(3, 2, 4, 0, 5, 1).reshape(n, k, tiles_h * _OUT, tiles_w * _OUT)
        if tiles_h * _OUT != h or tiles_w * _OUT != w:
            y = y[:, :, :h, :w].contiguous()
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(v, u)
        ctx.geometry = (n, c, h_in, w_in, h, w, k, tiles_h, tiles_w, padding)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        v, u = ctx.saved_tensors
        n, c, h_in, w_in, h, w, k, tiles_h, tiles_w, padding = ctx.geometry
        k_in, k_weight, k_out = _transforms(grad_y.device, grad_y.dtype)
        positions = n * tiles_h * tiles_w
        grad_bias = grad_y.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        if tiles_h * _OUT != h or tiles_w * _OUT != w:
            grad_y = F.pad(grad_y, (0, tiles_w * _OUT - w, 0, tiles_h * _OUT - h))
        grad_tiles = grad_y.reshape(n, k, tiles_h, _OUT, tiles_w, _OUT).permute(3, 5, 1, 0, 2, 4)
        grad_m = (k_out.t() @ grad_tiles.reshape(_OUT * _OUT, k * positions)).view(_AREA, k, positions)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_u = torch.bmm(grad_m, v.transpose(1, 2))
            grad_weight = (k_weight.t() @ grad_u.view(_AREA, k * c)).t().reshape(k, c, 3, 3)
        if ctx.needs_input_grad[0]:
            grad_v = torch.bmm(u.transpose(1, 2), grad_m)
            grad_d = (k_in.t() @ grad_v.view(_AREA, c * positions)).view(_TILE, _TILE, c, n, tiles_h, tiles_w)
            grad_d = grad_d.permute(0, 1, 3, 2, 4, 5)
            # Tiles overlap by 2 pixels: each of the 36 tile positions adds into a strided slice.
            grad_padded = grad_y.new_zeros(n, c, tiles_h * _OUT + 2, tiles_w * _OUT + 2)
            for row in range(_TILE):
                for col in range(_TILE):
                    rows = slice(row, row + _OUT * tiles_h, _OUT)
                    cols = slice(col, col + _OUT * tiles_w, _OUT)
                    grad_padded[:, :, rows, cols] += grad_d[row, col]
            grad_x = grad_padded[:, :, padding : padding + h_in, padding : padding + w_in]
        return grad_x, grad_weight, grad_bias, None


def winograd_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 1
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride=1, padding=padding)` for a 3x3 kernel and zero padding 0 or 1,
    computed with F(4x4, 3x3)."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(
            f"winograd_conv2d needs an NCHW input and a K x C x 3 x 3 weight with C = the input's channels, "
            f"got input {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if padding not in (0, 1):
        raise ValueError(f"winograd_conv2d supports zero padding 0 or 1, got {padding}")
    if min(x.shape[2:]) + 2 * padding < 3:
        raise ValueError(f"input {tuple(x.shape)} is smaller than the 3x3 kernel with padding {padding}")
    return _WinogradConv3x3.apply(x.contiguous(), weight, bias, padding)


def eligible(conv: nn.Module) -> bool:
    """A plain 3x3, stride 1, zero padding 0 or 1, undilated, ungrouped 2-D convolution."""
    return (
        type(conv) in (nn.Conv2d, SelectableConv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), (1, 1))
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# (in channels, out channels, height, width, padding, dtype, device type, input grad, grad mode) -> algo.
# Process-wide like cudnn.benchmark's cache: every layer of that shape shares one measurement.
_decisions: dict[tuple, str] = {}


def decisions() -> dict[tuple, str]:
    """What `auto` chose so far, keyed by (C_in, C_out, H, W, padding, dtype, device type, input grad,
    grad mode)."""
    return dict(_decisions)


def _best_seconds(fn: Callable[[], None], repeats: int) -> float:
    """The fastest of `repeats` runs after one warm-up (allocator, oneDNN primitive creation): other
    processes only ever add time, so the minimum is the least noisy estimate of a kernel's cost. Cheap
    layers get two more runs: their timings are the noisiest and the runs cost little."""
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start < 0.25:
        repeats += 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# Winograd must win by this much: its extra memory traffic costs more inside a network (other layers'
# tensors compete for the caches) than in isolation, and a tie is not worth the rounding difference.
MARGIN = 0.95


def _choose(x: torch.Tensor, weight: torch.Tensor, padding: int, repeats: int = 2) -> str:
    """The faster algorithm for this layer's shape, measured once per shape (a batch of the real size:
    that is what the steps will run) and remembered."""
    grad_mode = torch.is_grad_enabled() and weight.requires_grad
    key = (
        x.shape[1],
        weight.shape[0],
        x.shape[2],
        x.shape[3],
        padding,
        x.dtype,
        x.device.type,
        x.requires_grad,
        grad_mode,
    )
    if key in _decisions:
        return _decisions[key]
    # Detached copies: nothing enters the caller's autograd graph.
    probe_x = x.detach().requires_grad_(x.requires_grad and grad_mode)
    probe_w = weight.detach().requires_grad_(grad_mode)

    def run(conv: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def once() -> None:
            with torch.enable_grad() if grad_mode else torch.no_grad():
                out = conv(probe_x, probe_w)
                if grad_mode:
                    out.backward(torch.ones_like(out))
            probe_x.grad = probe_w.grad = None

        return once

    direct = _best_seconds(run(lambda a, b: F.conv2d(a, b, padding=padding)), repeats)
    winograd = _best_seconds(run(lambda a, b: winograd_conv2d(a, b, padding=padding)), repeats)
    _decisions[key] = "winograd" if winograd < MARGIN * direct else "direct"
    return _decisions[key]


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


class SelectableConv2d(nn.Conv2d):
    """An `nn.Conv2d` (same Parameters, same state_dict) whose 3x3 path may run as Winograd F(4x4, 3x3)."""

    algo: str = "direct"

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        algo = self.algo
        padding = self.padding[0]
        if (
            algo == "direct"
            or torch.jit.is_tracing()  # exports record the plain convolution
            or _compiling()
            or input.device.type != "cpu"
            or input.dtype not in (torch.float32, torch.float64)
            or input.dim() != 4
            or min(input.shape[2:]) + 2 * padding < 3
            or autocast_enabled("cpu")
        ):
            return super()._conv_forward(input, weight, bias)
        if algo == "auto":
            algo = _choose(input, weight, padding)
        if algo == "winograd":
            return winograd_conv2d(input, weight, bias, padding)
        return super()._conv_forward(input, weight, bias)


def apply_conv_algo(model: nn.Module, algo: str) -> int:
    """Let every eligible 3x3 convolution of `model` run `algo` ("direct", "winograd" or "auto").

    The modules are re-classed in place (same Parameters, buffers and hooks), so call it before or
    after building the optimizer alike. Returns how many convolutions are affected.
    """
    if algo not in ALGOS:
        raise ValueError(f"conv algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    count = 0
    for module in model.modules():
        if eligible(module):
            module.__class__ = SelectableConv2d
            module.algo = algo
            count += 1
    return count
