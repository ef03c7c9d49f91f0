"""Sliding-window inference over whole volumes of any size, with Gaussian blending and flip TTA.

A volume too big for one forward pass (or not a multiple of 16) is covered by overlapping windows of the
training patch size. Each window's prediction is weighted by a Gaussian centred on the window (the
window's border, where the network sees the least context, counts the least) and the weighted sum is
divided by the summed weights: the blending of nnU-Net (Isensee et al., Nat. Methods 2021) and MONAI's
`sliding_window_inference`. Windows run `batch_size` at a time on the model's device; the output and the
weight map are accumulated on `accumulate_device` (default: that device too), so memory is bounded by the
output volume plus one batch of windows. Optional test-time augmentation averages the predictions of
mirrored windows (un-mirrored before blending).

A volume smaller than the window along an axis is padded (with its own minimum by default: air in CT,
background in MRI) and the padding is cropped from the result.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ACTIVATIONS = ("softmax", "sigmoid", "none")
BLENDS = ("gaussian", "constant")


def gaussian_importance(
    patch_size: Sequence[int],
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
    min_weight: float = 1e-4,
) -> torch.Tensor:
    """Separable Gaussian weights (D, H, W), 1 at the centre, sigma = sigma_scale x size per axis.

    Clamped below at `min_weight` so a voxel seen only by window corners keeps a usable weight.
    """
    weights = None
    for n in patch_size:
        coords = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        sigma = max(sigma_scale * n, 1e-6)
        axis = torch.exp(-(coords**2) / (2 * sigma**2))
        weights = axis if weights is None else weights[..., None] * axis
    weights = weights / weights.max()
    return weights.clamp_min(min_weight).to(device=device, dtype=torch.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window start positions covering [0, size): evenly spaced, first at 0, last at size - patch,
    with neighbouring windows overlapping by at least `overlap` x patch."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    stride = (size - patch) / (count - 1)
    return sorted({int(round(i * stride)) for i in range(count)})


def flip_sets(tta: bool | str | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Spatial-axis flips to average: False -> [()]; True / "all" -> all 8 mirrorings of 3 axes;
    an explicit list of axis tuples (0 = depth, 1 = height, 2 = width) is used as given (plus ())."""
    if tta is False or tta is None or tta == "none":
        return [()]
    if tta is True or tta == "all":
        return [combo for r in range(4) for combo in itertools.combinations((0, 1, 2), r)]
    sets = [tuple(int(a) for a in axes) for axes in tta]
    for axes in sets:
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"flip axes are spatial axes 0, 1, 2; got {axes}")
    return [()] + [s for s in sets if s != ()]


def _activate(output: torch.Tensor, activation: str) -> torch.Tensor:
    output = output.float()
    if activation == "softmax":
        return torch.softmax(output, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output)
    return output


@torch.no_grad()
def sliding_window_inference(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    activation: str = "softmax",
    tta: bool | str | Sequence[Sequence[int]] = False,
    pad_value: float | str = "min",
    device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Blend `predictor` over windows of `inputs` (N, C, D, H, W); returns (N, K, D, H, W) float32.

    Args:
        predictor: maps a batch of windows (B, C, *patch_size) to (B, K, *patch_size), e.g. a model.
        overlap: fraction of the window shared with its neighbour along each axis, in [0, 1).
        batch_size: windows per forward pass.
        blend: "gaussian" (nnU-Net) or "constant" (plain average).
        activation: applied to each window's output before blending: "softmax" over channels (then the
            result is a probability map), "sigmoid", or "none" (blend raw outputs).
        tta: flip test-time augmentation, see `flip_sets`.
        pad_value: value for padding a volume smaller than the window; "min" uses each sample's minimum.
        device: where windows are computed (default: `inputs.device`).
        accumulate_device: where the output sums live (default: `device`); "cpu" bounds device memory
            to one batch of windows.
    """
    if inputs.ndim != 5:
        raise ValueError(f"inputs must be (N, C, D, H, W), got shape {tuple(inputs.shape)}")
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive integers, got {patch_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else inputs.device
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else device
    flips = flip_sets(tta)

    spatial = tuple(int(s) for s in inputs.shape[2:])
    padded_size = tuple(max(s, p) for s, p in zip(spatial, patch))
    before = [(p - s) // 2 for s, p in zip(spatial, padded_size)]
    if padded_size != spatial:
        pads: list[int] = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            extra = padded_size[axis] - spatial[axis]
            pads += [before[axis], extra - before[axis]]
        if pad_value == "min":
            fill = inputs.reshape(inputs.shape[0], -1).amin(dim=1).view(-1, 1, 1, 1, 1)
            shifted = F.pad(inputs - fill, pads, value=0.0)
            inputs = shifted + fill
        else:
            inputs = F.pad(inputs, pads, value=float(pad_value))

    weight_patch = (
        gaussian_importance(patch, sigma_scale, acc_device)
        if blend == "gaussian"
        else torch.ones(patch, device=acc_device)
    )
    starts = list(itertools.product(*(window_starts(n, p, overlap) for n, p in zip(padded_size, patch))))
    weight_sum = torch.zeros(padded_size, dtype=torch.float32, device=acc_device)
    for z, y, x in starts:
        weight_sum[z : z + patch[0], y : y + patch[1], x : x + patch[2]] += weight_patch

    output: torch.Tensor | None = None
    for n in range(inputs.shape[0]):
        for first in range(0, len(starts), batch_size):
            chunk = starts[first : first + batch_size]
            windows = torch.stack(
                [inputs[n, :, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in chunk]
            ).to(device, non_blocking=True)
            pred = None
            for axes in flips:
                dims = [a + 2 for a in axes]
                window_in = windows.flip(dims) if dims else windows
                out = _activate(predictor(window_in), activation)
                out = out.flip(dims) if dims else out
                pred = out if pred is None else pred + out
            if len(flips) > 1:
                pred = pred / len(flips)
            if output is None:
                output = torch.zeros(
                    (inputs.shape[0], pred.shape[1], *padded_size), dtype=torch.float32, device=acc_device
                )
            pred = pred.to(acc_device) * weight_patch
            for (z, y, x), window_pred in zip(chunk, pred):
                output[n, :, z : z + patch[0], y : y + patch[1], x : x + patch[2]] += window_pred
    assert output is not None
    output /= weight_sum
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    return output[(slice(None), slice(None), *crop)]
