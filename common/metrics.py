"""Binary segmentation metrics, counted per image and reduced by summation (DDP-exact).

Every score comes from the per-image confusion counts TP, FP, FN, TN of a thresholded prediction against a
binarised target:

    acc = (TP+TN)/(TP+FP+FN+TN)   se (recall) = TP/(TP+FN)   sp = TN/(TN+FP)   pc (precision) = TP/(TP+FP)
    f1 = dice = 2TP/(2TP+FP+FN)   jaccard = TP/(TP+FP+FN)

F1 computed from the counts equals Dice; both names are kept because the originals report both.

Empty policy (the value of a 0/0 ratio, e.g. Dice of an empty prediction on an empty target):
    "one"  (default) the ratio counts as 1: nothing to find and nothing found is a perfect score.
           Note that it also gives pc = 1 for an empty prediction on a non-empty target (se and dice are 0).
    "zero" the ratio counts as 0.
    "nan"  the image is left out of that score's mean; `compute()` then reports how many were left out
           (`<score>_nan_count`).

Two reductions are reported, and every name says which: `<score>_mean` is the mean over images of the
per-image score; `<score>_pooled` is the score of the counts summed over all images (one big image).

The faults of the originals this module avoids (references.md 2.6, 2.7, 3.5, 5.4, 4.5): overlaps are
counted with logical ops (never bool + bool), the threshold is applied to probabilities (never to logits),
the target is binarised at 0.5 (never against the batch max), IoU is per image (never batch-pooled and
then averaged over batches), and means divide sums of per-image values by the number of images.

HD95 is the symmetric 95th-percentile Hausdorff distance between mask surfaces, as in MONAI's default.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from common.errors import ConfigError

SCORES = ("acc", "se", "sp", "pc", "f1", "jaccard", "dice")
EMPTY_POLICIES = ("one", "zero", "nan")

ArrayLike = Union[np.ndarray, torch.Tensor]


def foreground_logit(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One binary logit map (N, *spatial) per image from a model output.

    (N,1,*sp) -> out[:,0]; (N,2,*sp) -> out[:,1] - out[:,0], whose sigmoid is the softmax probability of
    class 1 (the same holds for log-softmax outputs), so 2-class models share the binary metrics.
    A list/tuple (deep supervision) is reduced to its last element, the full-resolution head.
    """
    if isinstance(output, (list, tuple)):
        if not output:
            raise ConfigError("foreground_logit: got an empty list of outputs")
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.ndim < 3 or output.shape[1] not in (1, 2):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(
            f"foreground_logit: expected a model output of shape (N, 1, *spatial) (binary logits) or "
            f"(N, 2, *spatial) (two-class logits), got {shape}; a map without a channel dimension is "
            f"ambiguous, add it with .unsqueeze(1)"
        )
    # fp32 before the subtraction: two close bf16/fp16 logits would lose the difference.
    out = output.float()
    return out[:, 0] if out.shape[1] == 1 else out[:, 1] - out[:, 0]


def confusion_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image TP, FP, FN, TN as an int64 tensor of shape (N, 4) from two bool tensors (N, *spatial)."""
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise ConfigError(
            f"confusion_counts: pred and target must be bool, got {pred.dtype} and {target.dtype}"
        )
    if pred.shape != target.shape:
        raise ConfigError(
            f"confusion_counts: shapes differ, pred {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    p = pred.reshape(pred.shape[0], -1)
    t = target.reshape(target.shape[0], -1)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = p.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)


def _check_empty(empty: str) -> None:
    if empty not in EMPTY_POLICIES:
        raise ConfigError(f"empty policy must be one of {EMPTY_POLICIES}, got {empty!r}")


def per_image_scores(counts: torch.Tensor, empty: str = "one") -> dict[str, torch.Tensor]:
    """Scores (float64, one per row of `counts` (N,4) = TP,FP,FN,TN); 0/0 follows the `empty` policy."""
    _check_empty(empty)
    fill = {"one": 1.0, "zero": 0.0, "nan": math.nan}[empty]
    c = counts.to(torch.float64)
    tp, fp, fn, tn = c.unbind(-1)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return torch.where(den > 0, num / safe, torch.full_like(num, fill))

    dice = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "acc": ratio(tp + tn, tp + fp + fn + tn),
        "se": ratio(tp, tp + fn),
        "sp": ratio(tn, tn + fp),
        "pc": ratio(tp, tp + fp),
        "f1": dice.clone(),
        "jaccard": ratio(tp, tp + fp + fn),
        "dice": dice,
    }


def _surface(mask: np.ndarray) -> np.ndarray:
    # Boundary voxels: foreground with a face-neighbour outside the mask (or outside the array).
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: ArrayLike, target: ArrayLike, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of two binary masks (2-D or 3-D).

    HD95 = max(P95{d(a, S_target) : a in S_pred}, P95{d(b, S_pred) : b in S_target}), where S is the set of
    surface voxels (foreground voxels with a face-neighbour in the background or on the array border), d
    is the Euclidean distance in the units of `spacing` (one value per array axis, default 1) and P95 is
    numpy's percentile with its default linear interpolation, as MONAI's default HD95.
    Both masks empty -> 0.0; exactly one empty -> inf.
    """
    p = _to_bool_numpy(pred)
    t = _to_bool_numpy(target)
    if p.shape != t.shape:
        raise ConfigError(f"hd95: shapes differ, pred {p.shape} vs target {t.shape}")
    sampling = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sampling.shape != (p.ndim,) or not np.all(sampling > 0):
        raise ConfigError(f"hd95: spacing needs {p.ndim} positive values (one per array axis), got {spacing}")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if p_any != t_any:
        return math.inf
    # Crop to the union's bounding box plus one voxel: every surface voxel lies inside it, the margin keeps
    # the erosion identical to the full array's, and the EDT distance to the nearest surface voxel does not
    # depend on the array around it, so the values are identical at a fraction of the cost.
    coords = np.nonzero(p | t)
    box = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in coords)
    sp, st = _surface(p[box]), _surface(t[box])
    to_target = ndimage.distance_transform_edt(~st, sampling=sampling)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=sampling)[st]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


def _to_bool_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(bool, copy=False)


# Layout of the flat float64 state: every entry is a sum, so an all-reduce(SUM) over ranks is exact.
_N = 0
_SUM = 1  # 7 sums of per-image scores
_CNT = _SUM + len(SCORES)  # 7 counts of non-nan per-image scores
_POOL = _CNT + len(SCORES)  # pooled TP, FP, FN, TN
_EMPTY_T = _POOL + 4
_HD_SUM = _EMPTY_T + 1
_HD_CNT = _HD_SUM + 1
_HD_INF = _HD_CNT + 1
_STATE_LEN = _HD_INF + 1


class SegmentationMetrics:
    """Accumulates binary segmentation metrics over images; see the module docstring for definitions.

    update() takes a model output (logits, any form `foreground_logit` accepts) or, with
    from_logits=False, probabilities (N,1,*sp)/(N,*sp); the target (N,1,*sp)/(N,*sp) is binarised as
    target > 0.5. The prediction sigmoid(logit) > threshold is computed once per update.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        empty: str = "one",
        compute_hd95: bool = False,
        spacing: Sequence[float] | None = None,
        from_logits: bool = True,
    ):
        _check_empty(empty)
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold is a probability and must lie in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.empty = empty
        self.compute_hd95 = bool(compute_hd95)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.from_logits = bool(from_logits)
        self._state = torch.zeros(_STATE_LEN, dtype=torch.float64)

    def reset(self) -> None:
        self._state = torch.zeros(_STATE_LEN, dtype=torch.float64, device=self._state.device)

    def state_tensor(self) -> torch.Tensor:
        """A copy of the flat float64 state; summing the states of several objects merges them."""
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        if state.shape != (_STATE_LEN,):
            raise ConfigError(f"metric state must have shape ({_STATE_LEN},), got {tuple(state.shape)}")
        self._state = state.detach().to(device=self._state.device, dtype=torch.float64).clone()

    def reduce(self, group=None) -> None:
        """All-reduce (SUM) the state over the ranks of `group`; a no-op without torch.distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        state = self._state
        backend = dist.get_backend(group)
        # NCCL only reduces CUDA tensors and gloo is safest on CPU; a rank that saw no batch keeps its
        # state on the CPU, so move it to where the backend wants it.
        if backend == "nccl" and state.device.type != "cuda":
            state = state.to(torch.device("cuda", torch.cuda.current_device()))
        elif backend == "gloo" and state.device.type != "cpu":
            state = state.cpu()
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        self._state = state.to(self._state.device)

    @torch.no_grad()
    def update(
        self,
        output: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Add a batch. `spacing` (one value per spatial axis, or one such row per image) overrides the
        constructor's for HD95."""
        if self.from_logits:
            prob = torch.sigmoid(foreground_logit(output))
        else:
            if isinstance(output, (list, tuple)):
                output = output[-1]
            prob = output.float()
        prob, target = _align(prob, target, squeeze_prob=not self.from_logits)
        pred = prob > self.threshold
        target = target.to(prob.device)
        tgt = target if target.dtype == torch.bool else target > 0.5

        device = pred.device if pred.device.type != "mps" else torch.device("cpu")  # MPS has no float64
        if self._state.device != device:
            self._state = self._state.to(device)
        counts = confusion_counts(pred, tgt).to(device)
        scores = per_image_scores(counts, self.empty)
        s = self._state
        s[_N] += counts.shape[0]
        for i, name in enumerate(SCORES):
            v = scores[name]
            ok = ~torch.isnan(v)
            s[_SUM + i] += v[ok].sum()
            s[_CNT + i] += ok.sum()
        s[_POOL : _POOL + 4] += counts.sum(0).to(torch.float64)
        s[_EMPTY_T] += ((counts[:, 0] + counts[:, 2]) == 0).sum()
        if self.compute_hd95:
            self._update_hd95(pred, tgt, self.spacing if spacing is None else spacing)

    def _update_hd95(self, pred: torch.Tensor, tgt: torch.Tensor, spacing) -> None:
        n, ndim = pred.shape[0], pred.ndim - 1
        if spacing is None:
            rows = np.ones((n, ndim))
        else:
            rows = np.asarray(spacing, dtype=np.float64)
            if rows.ndim == 1:
                rows = np.broadcast_to(rows, (n, rows.shape[0]))
            if rows.shape != (n, ndim):
                raise ConfigError(
                    f"spacing must hold {ndim} values (one per spatial axis) or {n} rows of them, "
                    f"got shape {rows.shape}"
                )
        p_np, t_np = pred.cpu().numpy(), tgt.cpu().numpy()
        total, finite, inf = 0.0, 0, 0
        for i in range(n):
            d = hd95(p_np[i], t_np[i], rows[i])
            if math.isfinite(d):
                total += d
                finite += 1
            else:
                inf += 1
        self._state[_HD_SUM] += total
        self._state[_HD_CNT] += finite
        self._state[_HD_INF] += inf

    def compute(self) -> dict[str, float]:
        """Named results; `_mean` = mean of per-image values, `_pooled` = from counts summed over images."""
        s = self._state.detach().cpu().double()
        out: dict[str, float] = {}
        for i, name in enumerate(SCORES):
            cnt = s[_CNT + i].item()
            out[f"{name}_mean"] = s[_SUM + i].item() / cnt if cnt > 0 else math.nan
        pooled = per_image_scores(s[_POOL : _POOL + 4].reshape(1, 4), self.empty)
        n = s[_N].item()
        for name in SCORES:
            out[f"{name}_pooled"] = pooled[name].item() if n > 0 else math.nan
        hd_cnt = s[_HD_CNT].item()
        out["hd95_mean"] = s[_HD_SUM].item() / hd_cnt if hd_cnt > 0 else math.nan
        out["hd95_inf_count"] = s[_HD_INF].item()
        out["n_images"] = n
        out["n_empty_target"] = s[_EMPTY_T].item()
        if self.empty == "nan":
            for i, name in enumerate(SCORES):
                out[f"{name}_nan_count"] = n - s[_CNT + i].item()
        return out


def _align(prob: torch.Tensor, target: torch.Tensor, squeeze_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a (N,*sp) or (N,1,*sp) probability map and target to one (N,*sp) shape."""
    if squeeze_prob and prob.ndim >= 3 and prob.shape[1] == 1 and prob.ndim >= target.ndim:
        prob = prob[:, 0]
    if target.ndim == prob.ndim + 1 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != prob.shape:
        raise ConfigError(
            f"target shape {tuple(target.shape)} does not fit the prediction {tuple(prob.shape)}; "
            f"expected (N, *spatial) or (N, 1, *spatial) with the same N and spatial size"
        )
    return prob, target
