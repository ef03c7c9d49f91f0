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
`hd95_mean` is the mean over the images where it is finite; `hd95_excluded` counts the images left out
(exactly one of prediction and target empty: the distance is infinite). Print both.

State: `SegmentationMetrics` keeps one int64 vector on the device (counts, and sums of per-image values
in fixed point, 2**-32 units), so that `update` never synchronises with the host, no float64 touches the
device (slow or missing on NPU; HCCL cannot all-reduce it) and an all-reduce over ranks is exact: 1 and N
ranks give bit-identical sums. Per-image scores on the device are float32 (relative error 6e-8); `compute`
works in float64 on the host. `update` itself only counts each image's overlaps (a few ops, each a kernel
launch on a device); the scores of the images seen since the state was last read are computed together
when it is read (`compute`, `state_tensor`, `reduce`): the same integer sums, once per log interval.
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


def above_threshold(output: torch.Tensor | Sequence[torch.Tensor], threshold: float = 0.5) -> torch.Tensor:
    """The prediction sigmoid(foreground logit) > threshold (bool, (N, *spatial)), of any output that
    `foreground_logit` accepts, compared in logit space: logit > log(threshold / (1 - threshold)).

    That is the same prediction without a sigmoid pass over every pixel (and without the sigmoid's float
    rounding, which makes logits in (0, 6e-8) count as 0.5). At threshold 0.5 a one-channel output is
    compared in its own dtype (no fp32 copy of a bf16/fp16 output).
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold is a probability and must lie in (0, 1), got {threshold}")
    cut = math.log(threshold / (1.0 - threshold))
    last = output[-1] if isinstance(output, (list, tuple)) and output else output
    if cut == 0.0 and isinstance(last, torch.Tensor) and last.ndim >= 3 and last.shape[1] == 1:
        return last[:, 0] > 0  # the sign needs no fp32 copy of a bf16/fp16 output
    return foreground_logit(output) > cut


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
    # One logical op and three sums over the pixels; the rest is arithmetic on (N,) counts.
    tp, predicted, actual = _overlaps(pred, target).unbind(1)
    fp, fn = predicted - tp, actual - tp
    tn = math.prod(pred.shape[1:]) - predicted - fn
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)


def _overlaps(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image TP, predicted and actual foreground counts (N, 3) of two bool tensors (N, *spatial)."""
    p, t = pred.flatten(1), target.flatten(1)  # (not reshape(N, -1): ambiguous for N = 0)
    return torch.stack([(p & t).sum(1), p.sum(1), t.sum(1)], dim=1)


def _check_empty(empty: str) -> None:
    if empty not in EMPTY_POLICIES:
        raise ConfigError(f"empty policy must be one of {EMPTY_POLICIES}, got {empty!r}")


def _score_rows(counts: torch.Tensor, empty: str, dtype: torch.dtype) -> torch.Tensor:
    """The scores of SCORES, one row each, as a (7, N) `dtype` tensor from (N, 4) counts TP, FP, FN, TN.

    Numerators and denominators are summed in int64 (exact at any image size) and divided in one op, so
    the cost in ops does not grow with the number of scores: each op is a kernel launch on a GPU.
    """
    _check_empty(empty)
    tp, fp, fn, tn = counts.to(torch.int64).unbind(-1)
    # acc, se, sp, pc, f1, jaccard, dice
    num = torch.stack([tp + tn, tp, tn, tp, 2 * tp, tp, 2 * tp])
    den = torch.stack([tp + fp + fn + tn, tp + fn, tn + fp, tp + fp, 2 * tp + fp + fn, tp + fp + fn,
                       2 * tp + fp + fn])  # fmt: skip
    fill = {"one": 1.0, "zero": 0.0, "nan": math.nan}[empty]
    ratio = num.to(dtype) / den.clamp_min(1).to(dtype)
    return torch.where(den > 0, ratio, torch.full((), fill, dtype=dtype, device=ratio.device))


def per_image_scores(
    counts: torch.Tensor, empty: str = "one", dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Scores (`dtype`, one per row of `counts` (N,4) = TP,FP,FN,TN); 0/0 follows the `empty` policy."""
    return dict(zip(SCORES, _score_rows(counts, empty, dtype).unbind(0)))


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


# Layout of the flat int64 state: every entry is a sum, so an all-reduce(SUM) over ranks is exact.
_N = 0
_SUM = 1  # 7 fixed-point sums of per-image scores
_CNT = _SUM + len(SCORES)  # 7 counts of non-nan per-image scores
_POOL = _CNT + len(SCORES)  # pooled TP, FP, FN, TN
_EMPTY_T = _POOL + 4
_HD_WHOLE = _EMPTY_T + 1  # sum of finite HD95 values: whole units ...
_HD_FRAC = _HD_WHOLE + 1  # ... and the fractions, in fixed point
_HD_CNT = _HD_FRAC + 1
_HD_INF = _HD_CNT + 1
_STATE_LEN = _HD_INF + 1

FIXED_POINT = 2.0**32  # units per 1.0 of the fixed-point sums; up to 2**31 images of values <= 1


def fixed_point(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (float32 is enough) as int64 counts of 2**-32; NaN counts as 0. Stays on the device.

    Scaling by a power of two is exact and a float32 in [2**-9, 1] has no bits below 2**-32, so only values
    under 0.002 are rounded, by at most 2**-33 in absolute terms.
    """
    values = values.float()
    return torch.round(torch.nan_to_num(values, nan=0.0) * FIXED_POINT).to(torch.int64)


class SegmentationMetrics:
    """Accumulates binary segmentation metrics over images; see the module docstring for definitions.

    update() takes a model output (logits, any form `foreground_logit` accepts) or, with
    from_logits=False, probabilities (N,1,*sp)/(N,*sp); the target (N,1,*sp)/(N,*sp) is binarised as
    target > 0.5. The prediction sigmoid(logit) > threshold is taken in logit space (`above_threshold`).

    `device`: where the state lives from the start (pass the runtime's device: a rank that scores no
    image still all-reduces a tensor on the process group's device); default the CPU. `update` moves the
    state to the device of the data it gets, so a batch never costs a copy.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        empty: str = "one",
        compute_hd95: bool = False,
        spacing: Sequence[float] | None = None,
        from_logits: bool = True,
        device: torch.device | str | None = None,
    ):
        _check_empty(empty)
        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"threshold is a probability and must lie in (0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.empty = empty
        self.compute_hd95 = bool(compute_hd95)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.from_logits = bool(from_logits)
        self._state = torch.zeros(_STATE_LEN, dtype=torch.int64, device=device or "cpu")
        # Per-image overlaps (TP, predicted, actual) of updates not yet in the state, with the pixel count
        # per image: scored and summed in one go when the state is read (`_fold`).
        self._pending: list[tuple[torch.Tensor, int]] = []
        self._state_is_zero = True  # known without reading it: `merge` then skips adding it

    @property
    def device(self) -> torch.device:
        return self._state.device

    def to(self, device: torch.device | str) -> SegmentationMetrics:
        """Move the state (and keep it there until data on another device arrives); returns self."""
        self._fold()
        self._state = self._state.to(device)
        return self

    def reset(self) -> None:
        self._pending = []
        self._state = torch.zeros(_STATE_LEN, dtype=torch.int64, device=self._state.device)
        self._state_is_zero = True

    def state_tensor(self) -> torch.Tensor:
        """A copy of the flat int64 state; summing the states of several objects merges them exactly."""
        self._fold()
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        if state.shape != (_STATE_LEN,):
            raise ConfigError(f"metric state must have shape ({_STATE_LEN},), got {tuple(state.shape)}")
        if state.dtype != torch.int64:
            raise ConfigError(f"metric state must be int64 (counts and fixed-point sums), got {state.dtype}")
        self._pending = []
        self._state = state.detach().to(device=self._state.device).clone()
        self._state_is_zero = False

    def merge(self, other: SegmentationMetrics) -> None:
        """Add `other`'s images to these, without scoring them again: its pending images join these (they
        are scored when this state is read) and its state, unless known to be zero, is added."""
        if other._pending and other._pending[0][0].device != self._state.device:
            self.to(other._pending[0][0].device)
        self._pending.extend(other._pending)
        if not other._state_is_zero:
            self._state = self._state + other._state.to(self._state.device)
            self._state_is_zero = False

    def reduce(self, group=None) -> None:
        """All-reduce (SUM) the state over the ranks of `group`; a no-op without torch.distributed."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self._fold()
        state = self._state
        backend = dist.get_backend(group)
        # NCCL reduces only CUDA tensors, HCCL only NPU tensors, gloo is safest on the CPU.
        if backend == "nccl" and state.device.type != "cuda":
            state = state.to(torch.device("cuda", torch.cuda.current_device()))
        elif backend == "hccl" and state.device.type != "npu":
            state = state.to(torch.device("npu", torch.npu.current_device()))
        elif backend == "gloo" and state.device.type != "cpu":
            state = state.cpu()
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        self._state = state.to(self._state.device)
        self._state_is_zero = False

    @torch.no_grad()
    def update(
        self,
        output: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor,
        spacing: Sequence[float] | Sequence[Sequence[float]] | None = None,
    ) -> None:
        """Add a batch. `spacing` (one value per spatial axis, or one such row per image) overrides the
        constructor's for HD95 (which runs on the host, and so waits for the device)."""
        if self.from_logits:
            pred, target = _align(above_threshold(output, self.threshold), target, squeeze_prob=False)
        else:
            if isinstance(output, (list, tuple)):
                output = output[-1]
            prob, target = _align(output.float(), target, squeeze_prob=True)
            pred = prob > self.threshold
        target = target.to(pred.device)
        tgt = target if target.dtype == torch.bool else target > 0.5

        if self._state.device != pred.device:
            self.to(pred.device)
        # Only the overlaps now: the scores follow from them when the state is read, in the same integer
        # sums, so a training step costs a few ops here (each a kernel launch on a device) whatever it logs.
        self._pending.append((_overlaps(pred, tgt), math.prod(pred.shape[1:])))
        if self.compute_hd95:
            self._update_hd95(pred, tgt, self.spacing if spacing is None else spacing)

    def _fold(self) -> None:
        """Score the pending images and add them to the state (on the device: nothing is read back)."""
        if not self._pending:
            return
        by_pixels: dict[int, list[torch.Tensor]] = {}
        for overlap, pixels in self._pending:
            by_pixels.setdefault(pixels, []).append(overlap)
        self._pending = []
        parts = []
        for pixels, overlaps in by_pixels.items():
            tp, predicted, actual = torch.cat(overlaps).unbind(1)
            fp, fn = predicted - tp, actual - tp
            parts.append(torch.stack([tp, fp, fn, pixels - predicted - fn], dim=1))
        counts = torch.cat(parts)
        values = _score_rows(counts, self.empty, torch.float32)  # (7, N)
        # Masked sums, never v[mask]: a shape that depends on the data would wait for the device.
        present = ~torch.isnan(values)
        self._state_is_zero = False
        self._state += torch.cat(
            [
                torch.full((1,), counts.shape[0], dtype=torch.int64, device=counts.device),
                fixed_point(values).sum(1),
                present.sum(1),
                counts.sum(0),
                ((counts[:, 0] + counts[:, 2]) == 0).sum().reshape(1),
                counts.new_zeros(_STATE_LEN - _HD_WHOLE),
            ]
        )

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
        delta = [0] * _STATE_LEN
        for i in range(n):
            d = hd95(p_np[i], t_np[i], rows[i])
            if math.isfinite(d):
                whole = math.floor(d)
                delta[_HD_WHOLE] += whole
                delta[_HD_FRAC] += round((d - whole) * FIXED_POINT)
                delta[_HD_CNT] += 1
            else:
                delta[_HD_INF] += 1
        self._state += torch.tensor(delta, dtype=torch.int64).to(self._state.device)
        self._state_is_zero = False

    def compute(self) -> dict[str, float]:
        """Named results; `_mean` = mean of per-image values, `_pooled` = from counts summed over images.

        `hd95_mean` averages the finite HD95 values; `hd95_excluded` is the number of images left out of it
        (`hd95_inf_count` is the same number under its former name).
        """
        self._fold()
        s = self._state.detach().cpu().tolist()
        out: dict[str, float] = {}
        for i, name in enumerate(SCORES):
            cnt = s[_CNT + i]
            out[f"{name}_mean"] = s[_SUM + i] / FIXED_POINT / cnt if cnt > 0 else math.nan
        pooled = per_image_scores(torch.tensor([s[_POOL : _POOL + 4]], dtype=torch.int64), self.empty)
        n = s[_N]
        for name in SCORES:
            out[f"{name}_pooled"] = pooled[name].item() if n > 0 else math.nan
        hd_cnt = s[_HD_CNT]
        hd_sum = s[_HD_WHOLE] + s[_HD_FRAC] / FIXED_POINT
        out["hd95_mean"] = hd_sum / hd_cnt if hd_cnt > 0 else math.nan
        out["hd95_excluded"] = float(s[_HD_INF])
        out["hd95_inf_count"] = float(s[_HD_INF])
        out["n_images"] = float(n)
        out["n_empty_target"] = float(s[_EMPTY_T])
        if self.empty == "nan":
            for i, name in enumerate(SCORES):
                out[f"{name}_nan_count"] = float(n - s[_CNT + i])
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
