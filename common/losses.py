"""Segmentation losses on logits, reduced in float32 whatever the input dtype.

Every loss casts its input with .float() before any reduction: under AMP the logits arrive in fp16/bf16,
and sums over 96x96 pixels (or 3-D volumes) in those formats lose most of their precision. Only elementwise
ops, sums, and the Lovasz loss's sort and cumulative sums are used, none of which autocast lowers again.

No loss reads a value back to the host (no `.item()`, no output sized by the data), so a training step
never waits for the device here; the one exception is `_class_map`, which checks class indices on the
host before cross-entropy, where a bad index would be a device-side assert.

Binary losses take logits (N,1,*sp) or (N,*sp) and a target of either shape (it is reshaped to match),
in 2-D or 3-D. `build_loss(name)` maps the names the original scripts use onto these classes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError, DataError

_SMOOTH = 1e-5  # nested-unet's Dice smoothing


def _binary_pair(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits and target of the same shape; the target may lack or carry the singleton channel."""
    if target.shape != logits.shape:
        if target.ndim == logits.ndim - 1 and logits.ndim >= 2 and logits.shape[1] == 1:
            target = target.unsqueeze(1)
        elif target.ndim == logits.ndim + 1 and target.shape[1] == 1:
            target = target.squeeze(1)
        if target.shape != logits.shape:
            raise ConfigError(
                f"a binary loss needs logits (N,1,*sp) or (N,*sp) and a target of the same size, got logits "
                f"{tuple(logits.shape)} and target {tuple(target.shape)}; two-class outputs need "
                f"CrossEntropyLoss or TwoClassDiceLoss"
            )
    return logits.float(), target.float()


def _soft_dice_per_sample(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = prob.reshape(prob.shape[0], -1)
    t = target.reshape(target.shape[0], -1)
    return (2 * (p * t).sum(1) + _SMOOTH) / (p.sum(1) + t.sum(1) + _SMOOTH)


class BCEWithLogitsLoss(nn.Module):
    """Binary cross-entropy on logits (mean over pixels), in float32."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t = _binary_pair(logits, target)
        return F.binary_cross_entropy_with_logits(x, t, pos_weight=self.pos_weight)


class SoftDiceLoss(nn.Module):
    """1 - mean over samples of (2 sum(p t) + 1e-5) / (sum p + sum t + 1e-5), p = sigmoid (nested-unet)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t = _binary_pair(logits, target)
        return 1 - _soft_dice_per_sample(torch.sigmoid(x), t).mean()


class BCEDiceLoss(nn.Module):
    """0.5 * BCE + soft Dice loss, the nested-unet (UNet++, Zhou et al. 2018) default."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t = _binary_pair(logits, target)
        bce = F.binary_cross_entropy_with_logits(x, t)
        return 0.5 * bce + 1 - _soft_dice_per_sample(torch.sigmoid(x), t).mean()


def _lovasz_jaccard_gradient(labels_sorted: torch.Tensor) -> torch.Tensor:
    """Increments of the Jaccard loss along each row's error ordering (Berman et al. 2018, Eq. 8, Alg. 1).

    `labels_sorted` is (N, P), each row's pixels sorted by decreasing error. Entry i of a row is
    Delta_J({1..i}) - Delta_J({1..i-1}), where Delta_J(M) = |M| / |positives union M| counts the first i
    pixels as mispredicted.
    """
    positives = labels_sorted.sum(1, keepdim=True)
    # Among the first i pixels: positives counted as missed and negatives counted as false alarms.
    missed = labels_sorted.cumsum(1)
    false_alarms = (1 - labels_sorted).cumsum(1)
    # Never 0/0: without positives, each of the first i >= 1 pixels is a false alarm.
    loss_at = (missed + false_alarms) / (positives + false_alarms)  # |M_i| / |positives u M_i|
    return torch.cat([loss_at[:, :1], loss_at[:, 1:] - loss_at[:, :-1]], dim=1)


def _lovasz_hinge_per_image(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Lovasz hinge of each row of (N, P) logits against binary (N, P) labels, as (N,).

    One sort of the whole batch along the pixel dimension and cumulative sums along it: the number of
    ops does not grow with N, and nothing waits for the device (no per-image loop, no host reads).
    """
    signs = 2 * labels - 1
    errors = 1 - logits * signs  # hinge margins; positive means the pixel is (nearly) wrong
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    grad = _lovasz_jaccard_gradient(labels.gather(1, order))
    # Elementwise product and sum rather than a dot product, which autocast would lower to bf16.
    return (F.relu(errors_sorted) * grad).sum(1)


class LovaszHingeLoss(nn.Module):
    """Per-image Lovasz hinge loss, the convex surrogate of the Jaccard loss (Berman, Rannen Triki and
    Blaschko, "The Lovasz-Softmax loss", CVPR 2018), averaged over images.

    The target is binarised at 0.5, since the Lovasz extension is defined on binary labels. Every pixel
    counts (no ignore label); an image without foreground is scored by its false alarms alone.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, t = _binary_pair(logits, target)
        x = x.reshape(x.shape[0], -1)
        t = (t.reshape(t.shape[0], -1) > 0.5).float()
        return _lovasz_hinge_per_image(x, t).mean()


def _class_map(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """An integer class map (N,*sp) from (N,*sp) or (N,1,*sp), checked against the number of classes."""
    n_classes = logits.shape[1]
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ConfigError(
            f"target {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: give a class map "
            f"(N,*sp) or (N,1,*sp), or one-hot/probabilities (N,C,*sp)"
        )
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise DataError(None, "a class-map target holds non-integer values; pass integer class indices")
    target = target.long()
    lo, hi = torch.aminmax(target)
    # Checked here because an out-of-range index is a device-side assert on CUDA.
    if lo.item() < 0 or hi.item() >= n_classes:
        raise DataError(
            None,
            f"target class indices span [{lo.item()}, {hi.item()}] but the model has {n_classes} classes",
        )
    return target


def _class_map_layout(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The class map (N,*sp) of a (N,*sp) or (N,1,*sp) target, checked against the logits' shape only:
    its values stay on the device (`_class_map` reads them on the host to check them)."""
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ConfigError(
            f"target {tuple(target.shape)} does not fit logits {tuple(logits.shape)}: give a class map "
            f"(N,*sp) or (N,1,*sp), or one-hot/probabilities (N,C,*sp)"
        )
    return target


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy over the channel dim of (N,C,*sp) logits, in float32.

    The target is an integer class map (N,*sp)/(N,1,*sp) or one-hot/probability maps (N,C,*sp).
    `weight` holds optional per-class weights (the weighted mean then divides by the summed weights); it is
    a buffer, so `loss.to(device)` moves it, and a loss left on the host still works with device logits.
    """

    def __init__(self, weight: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32).reshape(-1)
        self.register_buffer("weight", w)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 2 or logits.shape[1] < 2:
            raise ConfigError(
                f"CrossEntropyLoss needs logits (N,C,*sp) with C >= 2, got {tuple(logits.shape)}"
            )
        weight = self.weight
        if weight is not None:
            if weight.numel() != logits.shape[1]:
                raise ConfigError(f"{weight.numel()} class weights given for {logits.shape[1]} classes")
            if weight.device != logits.device:
                # F.cross_entropy refuses a weight on another device. The buffer takes the logits' device
                # once, so later steps copy nothing. non_blocking: a blocking host-to-device copy ends in
                # a stream synchronisation (pytorch aten/src/ATen/native/cuda/Copy.cu, copy_kernel_cuda:
                # memcpy_and_sync), the non-blocking one only queues cudaMemcpyAsync.
                weight = weight.to(logits.device, non_blocking=True)
                self.weight = weight
        x = logits.float()
        if target.shape == logits.shape and target.is_floating_point():
            return F.cross_entropy(x, target.float(), weight=weight)
        return F.cross_entropy(x, _class_map(target, logits), weight=weight)


class TwoClassDiceLoss(nn.Module):
    """Soft Dice loss of the foreground class of 2-channel logits (softmax), per sample then averaged.

    squared=True uses the V-Net denominator sum p^2 + sum t^2 (Milletari et al., "V-Net", 3DV 2016, Eq. 1);
    False uses sum p + sum t. Smoothing 1e-5 keeps empty volumes defined. The target is a class map
    (N,*sp)/(N,1,*sp) in {0,1} or one-hot (N,2,*sp).

    A class map holding any other value makes the loss and its gradients NaN instead of raising: the
    check stays on the device, since an error would need a host read every step; the training loop
    skips steps with non-finite gradients and stops after repeated ones.
    """

    def __init__(self, squared: bool = True):
        super().__init__()
        self.squared = bool(squared)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3 or logits.shape[1] != 2:
            raise ConfigError(f"TwoClassDiceLoss needs logits (N,2,*sp), got {tuple(logits.shape)}")
        p = torch.softmax(logits.float(), dim=1)[:, 1].reshape(logits.shape[0], -1)
        if target.shape == logits.shape:
            t = target[:, 1].float()
        else:
            t = _class_map_layout(target, logits).float()
        t = t.reshape(logits.shape[0], -1)
        den = (p * p).sum(1) + (t * t).sum(1) if self.squared else p.sum(1) + t.sum(1)
        dice = (2 * (p * t).sum(1) + _SMOOTH) / (den + _SMOOTH)
        if target.shape == logits.shape:
            return 1 - dice.mean()
        # A product, not torch.where on the loss: NaN must reach the gradients for the step to be skipped.
        poison = torch.where(((t == 0) | (t == 1)).all(), 1.0, float("nan"))
        return (1 - dice.mean()) * poison


class DeepSupervisionLoss(nn.Module):
    """Weighted mean of `base` over a list of outputs (UNet++ deep supervision); a tensor goes to `base`.

    Equal weights by default, as nested-unet averages its four heads.
    """

    def __init__(self, base: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.base = base
        self.weights = None if weights is None else [float(w) for w in weights]
        if self.weights is not None and (not self.weights or sum(self.weights) <= 0):
            raise ConfigError(
                f"deep-supervision weights must be non-empty with a positive sum, got {weights}"
            )

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        weights = self.weights if self.weights is not None else [1.0] * len(outputs)
        if len(weights) != len(outputs) or not outputs:
            raise ConfigError(f"{len(weights)} deep-supervision weights for {len(outputs)} outputs")
        total = sum(w * self.base(o, target) for w, o in zip(weights, outputs))
        return total / sum(weights)


_REGISTRY: dict[str, type[nn.Module]] = {
    "BCEWithLogitsLoss": BCEWithLogitsLoss,
    "SoftDiceLoss": SoftDiceLoss,
    "BCEDiceLoss": BCEDiceLoss,
    "LovaszHingeLoss": LovaszHingeLoss,
    "CrossEntropyLoss": CrossEntropyLoss,
    "TwoClassDiceLoss": TwoClassDiceLoss,
}
LOSSES = tuple(_REGISTRY)


def build_loss(name: str, **kwargs) -> nn.Module:
    """The loss called `name` (one of LOSSES, case-insensitive), built with `kwargs`."""
    by_lower = {k.lower(): v for k, v in _REGISTRY.items()}
    cls = by_lower.get(str(name).lower())
    if cls is None:
        raise ConfigError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"loss {cls.__name__} does not take {sorted(kwargs)}: {err}") from err
