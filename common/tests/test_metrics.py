"""common.metrics against independent numpy computations and hand-built geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from common.errors import ConfigError
from common.metrics import (
    SCORES,
    SegmentationMetrics,
    above_threshold,
    confusion_counts,
    foreground_logit,
    hd95,
    per_image_scores,
)
from common.testing import run_ranks

FILL = {"one": 1.0, "zero": 0.0, "nan": math.nan}


# ---------------------------------------------------------------- independent numpy references
def ref_counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int, int]:
    tp = fp = fn = tn = 0
    for a, b in zip(p.ravel().tolist(), t.ravel().tolist()):
        if a and b:
            tp += 1
        elif a:
            fp += 1
        elif b:
            fn += 1
        else:
            tn += 1
    return tp, fp, fn, tn


def ref_scores(p: np.ndarray, t: np.ndarray, empty: str = "one") -> dict[str, float]:
    tp, fp, fn, tn = ref_counts(p, t)

    def r(a, b):
        return a / b if b else FILL[empty]

    f1 = r(2 * tp, 2 * tp + fp + fn)
    return {
        "acc": r(tp + tn, p.size),
        "se": r(tp, tp + fn),
        "sp": r(tn, tn + fp),
        "pc": r(tp, tp + fp),
        "f1": f1,
        "jaccard": r(tp, tp + fp + fn),
        "dice": f1,
    }


def ref_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face-neighbour in the background or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    surface = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            neighbour = tuple(
                slice(1 + step, padded.shape[a] - 1 + step) if a == axis else inner[a]
                for a in range(mask.ndim)
            )
            surface |= mask & ~padded[neighbour]
    return surface


def ref_hd95(p: np.ndarray, t: np.ndarray, spacing) -> float:
    """Brute force: all pairwise distances between surface voxels."""
    sp = np.argwhere(ref_surface(p)) * np.asarray(spacing)
    st = np.argwhere(ref_surface(t)) * np.asarray(spacing)
    d = cdist(sp, st)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def random_masks(seed: int, shape, p: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(shape) < p, rng.random(shape) < p


def blob(rng: np.random.Generator, shape, sigma: float = 2.0, level: float = 0.6) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, level)


def to_logits(mask: np.ndarray, scale: float = 4.0) -> torch.Tensor:
    """A (N,1,*sp) logit tensor whose sigmoid > 0.5 exactly where `mask`."""
    m = torch.as_tensor(mask)
    return (torch.where(m, scale, -scale) + 0.1 * torch.rand(m.shape)).unsqueeze(1).float()


# ---------------------------------------------------------------- counts and scores
@pytest.mark.parametrize("shape", [(3, 9, 11), (2, 5, 6, 7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_counts_match_numpy(shape, seed):
    p, t = random_masks(seed, shape)
    counts = confusion_counts(torch.from_numpy(p), torch.from_numpy(t))
    assert counts.dtype == torch.int64 and counts.shape == (shape[0], 4)
    for i in range(shape[0]):
        assert tuple(counts[i].tolist()) == ref_counts(p[i], t[i])


def test_confusion_counts_rejects_non_bool():
    with pytest.raises(ConfigError, match="bool"):
        confusion_counts(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("empty", ["one", "zero", "nan"])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_image_scores_match_numpy(empty, seed):
    p, t = random_masks(seed, (4, 8, 8), p=0.3)
    p[0] = False  # empty prediction
    t[1] = False  # empty target
    p[2] = t[2] = False  # both empty
    scores = per_image_scores(confusion_counts(torch.from_numpy(p), torch.from_numpy(t)), empty)
    for i in range(4):
        ref = ref_scores(p[i], t[i], empty)
        for name in SCORES:
            assert scores[name].dtype == torch.float64
            np.testing.assert_allclose(scores[name][i].item(), ref[name], rtol=1e-12, equal_nan=True)


def test_unknown_empty_policy():
    with pytest.raises(ConfigError, match="one"):
        SegmentationMetrics(empty="skip")


@pytest.mark.parametrize("shape", [(4, 12, 10), (3, 6, 7, 5)])
@pytest.mark.parametrize("seed", [3, 4])
def test_segmentation_metrics_against_numpy(shape, seed):
    p, t = random_masks(seed, shape, p=0.35)
    m = SegmentationMetrics()
    m.update(to_logits(p), torch.from_numpy(t).float().unsqueeze(1))
    got = m.compute()
    refs = [ref_scores(p[i], t[i]) for i in range(shape[0])]
    for name in SCORES:  # per-image scores are float32 on the device; pooled ones float64 on the host
        assert got[f"{name}_mean"] == pytest.approx(np.mean([r[name] for r in refs]), rel=1e-6)
    pooled = ref_scores(p, t)  # one big image = the counts summed over images
    for name in SCORES:
        assert got[f"{name}_pooled"] == pytest.approx(pooled[name], rel=1e-12)
    assert got["n_images"] == shape[0] and got["n_empty_target"] == 0
    assert math.isnan(got["hd95_mean"]) and got["hd95_excluded"] == 0


def test_toy_8x8_from_references():
    # references.md 2.6: TP 9, FP 7, FN 7, TN 41 on 64 pixels.
    target = np.zeros((8, 8), bool)
    target[:2] = True  # 16 foreground pixels
    pred = np.zeros((8, 8), bool)
    pred[0] = True  # 8 hits
    pred[1, 0] = True  # 9th hit
    pred[2, :7] = True  # 7 false alarms
    m = SegmentationMetrics(from_logits=False)
    m.update(torch.from_numpy(pred).float()[None, None], torch.from_numpy(target).float()[None])
    got = m.compute()
    assert got["se_mean"] == pytest.approx(0.5625)
    assert got["sp_mean"] == pytest.approx(41 / 48) and round(got["sp_mean"], 3) == 0.854
    assert got["jaccard_mean"] == pytest.approx(9 / 23) and round(got["jaccard_mean"], 3) == 0.391
    assert got["dice_mean"] == pytest.approx(0.5625)
    assert got["f1_mean"] == pytest.approx(0.5625)
    assert got["pc_mean"] == pytest.approx(0.5625)
    assert got["acc_mean"] == pytest.approx(0.78125)


# ---------------------------------------------------------------- empty policies and regressions
@pytest.mark.parametrize("empty", ["one", "zero", "nan"])
def test_empty_cases_each_policy(empty):
    fg = np.zeros((6, 6), bool)
    fg[1:4, 1:4] = True
    none = np.zeros((6, 6), bool)
    cases = {"empty/empty": (none, none), "empty pred": (none, fg), "empty target": (fg, none)}
    f = FILL[empty]
    expected = {
        "empty/empty": dict(acc=1, se=f, sp=1, pc=f, dice=f, jaccard=f),
        "empty pred": dict(acc=27 / 36, se=0, sp=1, pc=f, dice=0, jaccard=0),
        "empty target": dict(acc=27 / 36, se=f, sp=27 / 36, pc=0, dice=0, jaccard=0),
    }
    for case, (p, t) in cases.items():
        m = SegmentationMetrics(empty=empty, compute_hd95=True)
        m.update(to_logits(p[None]), torch.from_numpy(t)[None])
        got = m.compute()
        for name, value in expected[case].items():
            # "nan" leaves the image out of the mean: with one image the mean is undefined (nan).
            np.testing.assert_allclose(got[f"{name}_mean"], value, equal_nan=True, err_msg=f"{case} {name}")
        if case == "empty/empty":
            assert got["hd95_mean"] == 0.0 and got["hd95_inf_count"] == 0
        else:  # infinite distances are counted, not averaged
            assert math.isnan(got["hd95_mean"]) and got["hd95_inf_count"] == 1


def test_nan_policy_excludes_and_counts():
    fg = np.zeros((2, 6, 6), bool)
    fg[0, 1:4, 1:4] = True
    pred = fg.copy()
    m = SegmentationMetrics(empty="nan")
    m.update(to_logits(pred), torch.from_numpy(fg))  # image 0 perfect, image 1 empty/empty
    got = m.compute()
    assert got["dice_mean"] == 1.0 and got["dice_nan_count"] == 1
    assert got["acc_mean"] == 1.0 and got["acc_nan_count"] == 0
    assert got["n_empty_target"] == 1


def test_empty_target_batch_does_not_flip():
    # Regression: GT == max(GT) made every pixel foreground when a batch had no foreground.
    m = SegmentationMetrics()
    m.update(torch.full((3, 1, 8, 8), -5.0), torch.zeros(3, 1, 8, 8))
    got = m.compute()
    assert got["acc_mean"] == 1.0 and got["sp_mean"] == 1.0 and got["dice_mean"] == 1.0
    assert got["n_empty_target"] == 3 and got["acc_pooled"] == 1.0


def test_soft_target_binarised_at_half_not_batch_max():
    target = torch.tensor([[[0.0, 0.3, 0.7, 1.0]]])  # (N=1, 1, 4)
    m = SegmentationMetrics(from_logits=False)
    m.update(torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), target)
    assert m.compute()["dice_mean"] == 1.0  # 0.7 is foreground, 0.3 background


def test_per_image_mean_differs_from_pooled():
    # Regression of nested-unet's batch-pooled IoU: a large well-found object must not hide a missed one.
    t = np.zeros((2, 16, 16), bool)
    t[0, 2:14, 2:14] = True  # 144 pixels, found exactly
    t[1, 5:7, 5:7] = True  # 4 pixels, missed
    p = t.copy()
    p[1] = False
    m = SegmentationMetrics()
    m.update(to_logits(p), torch.from_numpy(t))
    got = m.compute()
    assert got["jaccard_mean"] == pytest.approx(0.5)
    assert got["jaccard_pooled"] == pytest.approx(144 / 148)
    # Per-image means do not depend on how the images are batched.
    m2 = SegmentationMetrics()
    for i in range(2):
        m2.update(to_logits(p[i : i + 1]), torch.from_numpy(t[i : i + 1]))
    assert m2.compute() == pytest.approx(got, nan_ok=True)


def test_logits_and_probabilities_agree():
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(size=(3, 1, 10, 10))).float()
    target = torch.from_numpy(rng.random((3, 10, 10)) < 0.5)
    a, b = SegmentationMetrics(threshold=0.3), SegmentationMetrics(threshold=0.3, from_logits=False)
    a.update(logits, target)
    b.update(torch.sigmoid(logits), target)
    c = SegmentationMetrics(threshold=0.3, from_logits=False)
    c.update(torch.sigmoid(logits)[:, 0], target.unsqueeze(1))  # (N,*sp) probabilities, (N,1,*sp) target
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)
    assert a.compute() == pytest.approx(c.compute(), nan_ok=True)
    # The threshold applies to probabilities, not to logits (references.md 2.7 item 2).
    p = (torch.sigmoid(logits)[:, 0] > 0.3).numpy()
    assert a.compute()["dice_mean"] == pytest.approx(
        np.mean([ref_scores(p[i], target[i].numpy())["dice"] for i in range(3)])
    )


def test_two_channel_and_deep_supervision_outputs():
    rng = np.random.default_rng(11)
    two = torch.from_numpy(rng.normal(size=(2, 2, 4, 6, 5))).float()  # 3-D, 2 classes
    target = torch.from_numpy(rng.integers(0, 2, size=(2, 4, 6, 5)))
    diff = (two[:, 1] - two[:, 0]).unsqueeze(1)
    torch.testing.assert_close(foreground_logit(two), diff[:, 0])
    torch.testing.assert_close(torch.sigmoid(foreground_logit(two)), torch.softmax(two, 1)[:, 1])
    a, b, c = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    a.update(two, target)
    b.update(diff, target)
    c.update([torch.zeros_like(diff), 5 * torch.ones_like(diff), diff], target)  # the last head counts
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)
    assert a.compute() == pytest.approx(c.compute(), nan_ok=True)
    # With two classes, prediction = argmax.
    pred = two.argmax(1).bool().numpy()
    ref = np.mean([ref_scores(pred[i], target[i].numpy().astype(bool))["jaccard"] for i in range(2)])
    assert a.compute()["jaccard_mean"] == pytest.approx(ref)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [1, 2])
def test_the_prediction_taken_in_logit_space_is_the_sigmoid_thresholded(threshold, dtype, channels):
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(scale=3.0, size=(3, channels, 9, 7))).to(dtype)
    pred = above_threshold(logits, threshold)
    expected = torch.sigmoid(foreground_logit(logits).double()) > threshold  # no float32 rounding at the cut
    assert pred.dtype == torch.bool and torch.equal(pred, expected)
    assert torch.equal(above_threshold([logits.flip(0), logits], threshold), pred)  # the last head counts
    with pytest.raises(ConfigError, match="probability"):
        above_threshold(logits, 1.0)


def test_scores_are_the_same_folded_at_each_update_or_once_at_the_end():
    rng = np.random.default_rng(8)
    batches = [(to_logits(rng.random((n, h, w)) < 0.4), torch.from_numpy(rng.random((n, 1, h, w)) < 0.5))
               for n, h, w in [(3, 12, 10), (2, 12, 10), (1, 7, 9), (4, 12, 10), (0, 5, 5)]]  # fmt: skip
    eager, deferred = SegmentationMetrics(empty="nan"), SegmentationMetrics(empty="nan")
    for logits, target in batches:
        eager.update(logits, target)
        eager.state_tensor()  # reading the state folds what is pending
        deferred.update(logits, target)
    assert torch.equal(eager.state_tensor(), deferred.state_tensor())
    p = torch.cat([above_threshold(lg).flatten(1) for lg, _ in batches[:2]]).numpy()
    t = torch.cat([tg.flatten(1) for _, tg in batches[:2]]).numpy()
    first_two = SegmentationMetrics(empty="nan")
    for logits, target in batches[:2]:
        first_two.update(logits, target)
    ref = np.nanmean([ref_scores(p[i], t[i], "nan")["dice"] for i in range(5)])
    assert first_two.compute()["dice_mean"] == pytest.approx(ref)
    # merge adds the images of another without scoring them again, pending or already in its state
    for read_first in (False, True):
        merged = SegmentationMetrics(empty="nan")
        merged.update(*batches[0])
        other = SegmentationMetrics(empty="nan")
        for logits, target in batches[1:]:
            other.update(logits, target)
        if read_first:
            other.compute()
        merged.merge(other)
        assert torch.equal(merged.state_tensor(), deferred.state_tensor())
    # reset drops what is pending
    merged.update(*batches[0])
    merged.reset()
    assert merged.compute()["n_images"] == 0


def test_an_update_dispatches_a_few_operators_and_reads_nothing_back():
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    metrics = SegmentationMetrics()
    logits, target = torch.randn(4, 1, 16, 16, dtype=torch.bfloat16), torch.rand(4, 1, 16, 16)
    metrics.update(logits, target)  # the first update may move the state
    calls.clear()
    with Ops():
        metrics.update(logits, target)
    # threshold, binarised target, one AND, three sums, one stack, and views: each a launch on a device
    assert len(calls) <= 12, calls
    assert not any(
        name.startswith(("aten._local_scalar_dense", "aten._to_copy", "aten.nonzero")) for name in calls
    )


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 3, 8, 8), (2, 1)])
def test_foreground_logit_rejects_ambiguous_shapes(shape):
    with pytest.raises(ConfigError, match="channel"):
        foreground_logit(torch.zeros(shape))


def test_target_shape_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="target shape"):
        SegmentationMetrics().update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 7))


# ---------------------------------------------------------------- distributed state
def _metrics_on(logits, target, hd=True):
    m = SegmentationMetrics(compute_hd95=hd, spacing=(1.0, 0.5))
    m.update(logits, target)
    return m


def _halves():
    rng = np.random.default_rng(5)
    t = np.stack([blob(rng, (20, 20)) for _ in range(6)])
    p = np.stack([blob(rng, (20, 20)) for _ in range(6)])
    p[1] = False  # one infinite HD95
    return to_logits(p), torch.from_numpy(t).unsqueeze(1).float()


def test_state_tensor_is_additive():
    logits, target = _halves()
    whole = _metrics_on(logits, target)
    a, b = _metrics_on(logits[:2], target[:2]), _metrics_on(logits[2:], target[2:])
    merged = SegmentationMetrics(compute_hd95=True)
    merged.load_state_tensor(a.state_tensor() + b.state_tensor())
    assert torch.equal(merged.state_tensor(), whole.state_tensor())  # integer sums: exact in any order
    assert merged.compute() == pytest.approx(whole.compute(), nan_ok=True)
    assert whole.compute()["hd95_excluded"] == 1 and whole.state_tensor().dtype == torch.int64
    whole.reduce()  # no process group: no-op
    assert whole.compute() == pytest.approx(merged.compute(), nan_ok=True)
    whole.reset()
    assert whole.compute()["n_images"] == 0 and math.isnan(whole.compute()["dice_mean"])


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, target = _halves()
        half = slice(0, 2) if rank == 0 else slice(2, None)
        m = _metrics_on(logits[half], target[half])
        m.reduce()
        queue.put((rank, m.state_tensor()))
    finally:
        dist.destroy_process_group()


def test_reduce_over_two_gloo_processes_equals_single_process():
    results = run_ranks(_ddp_worker, 2, timeout=120)
    whole = _metrics_on(*_halves()).state_tensor()
    for rank in (0, 1):
        assert torch.equal(results[rank], whole)


# ---------------------------------------------------------------- HD95
def test_hd95_identical_is_zero():
    rng = np.random.default_rng(0)
    m = blob(rng, (24, 24))
    assert hd95(m, m) == 0.0
    assert hd95(torch.from_numpy(m), torch.from_numpy(m)) == 0.0


@pytest.mark.parametrize("spacing", [None, (2.0, 0.5)])
def test_hd95_square_shifted_by_one(spacing):
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = np.roll(a, 1, axis=0)
    expected = 1.0 if spacing is None else spacing[0]
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert hd95(a, np.roll(a, 1, axis=1), spacing) == pytest.approx(1.0 if spacing is None else spacing[1])


def test_hd95_sphere_shifted_by_one():
    z, y, x = np.mgrid[:24, :24, :24]
    sphere = (z - 11.5) ** 2 + (y - 11.5) ** 2 + (x - 11.5) ** 2 <= 7.0**2
    shifted = np.roll(sphere, 1, axis=2)
    assert hd95(sphere, shifted) == pytest.approx(1.0)
    assert hd95(sphere, shifted, (1.0, 1.0, 3.0)) == pytest.approx(3.0)
    assert hd95(sphere, shifted) == pytest.approx(ref_hd95(sphere, shifted, (1, 1, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "shape,spacing", [((30, 26), (0.7, 1.9)), ((14, 16, 12), (2.5, 0.8, 1.1))], ids=["2d", "3d"]
)
def test_hd95_against_brute_force(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    p, t = blob(rng, shape, sigma=1.5), blob(rng, shape, sigma=1.5)
    assert hd95(p, t, spacing) == pytest.approx(ref_hd95(p, t, spacing), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_crop_equals_full_array(seed):
    rng = np.random.default_rng(seed)
    p = np.zeros((40, 40, 40), bool)
    t = np.zeros((40, 40, 40), bool)
    p[10:22, 8:20, 12:24] = blob(rng, (12, 12, 12), sigma=1.0, level=0.5)
    t[12:24, 9:21, 11:23] = blob(rng, (12, 12, 12), sigma=1.0, level=0.5)
    t[0:3, 0:4, 0:2] = True  # touches the array border as well
    spacing = (1.5, 1.0, 0.6)
    # The same definition evaluated on the whole array, without cropping.
    sp, st = ref_surface(p), ref_surface(t)
    d1 = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    d2 = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    full = max(np.percentile(d1, 95), np.percentile(d2, 95))
    assert hd95(p, t, spacing) == pytest.approx(full, rel=1e-12)


def test_hd95_empty_cases_and_bad_spacing():
    e = np.zeros((5, 5), bool)
    f = e.copy()
    f[2, 2] = True
    assert hd95(e, e) == 0.0
    assert hd95(e, f) == math.inf and hd95(f, e) == math.inf
    with pytest.raises(ConfigError, match="spacing"):
        hd95(f, f, (1.0, 1.0, 1.0))


def test_metrics_hd95_mean_over_finite_images():
    rng = np.random.default_rng(3)
    t = np.stack([blob(rng, (6, 18, 18)) for _ in range(3)])
    p = np.stack([blob(rng, (6, 18, 18)) for _ in range(3)])
    p[2] = False
    spacing = [(2.0, 1.0, 1.0), (1.0, 1.0, 1.0), (3.0, 1.0, 1.0)]  # one row per image
    m = SegmentationMetrics(compute_hd95=True)
    m.update(to_logits(p), torch.from_numpy(t).unsqueeze(1), spacing=spacing)
    got = m.compute()
    expected = np.mean([ref_hd95(p[i], t[i], spacing[i]) for i in range(2)])
    assert got["hd95_mean"] == pytest.approx(expected) and got["hd95_inf_count"] == 1
