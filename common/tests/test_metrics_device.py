"""Metric state on the device: no float64, no data-dependent shapes, the excluded HD95 images counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.metrics import SCORES, SegmentationMetrics


def test_state_starts_and_resets_on_the_given_device():
    m = SegmentationMetrics(device="meta")
    assert m.state_tensor().device.type == "meta" and m.state_tensor().dtype == torch.int64
    m.reset()
    assert m.device.type == "meta"
    on_cpu = SegmentationMetrics()
    assert on_cpu.device.type == "cpu"
    assert on_cpu.to("meta") is on_cpu and on_cpu.state_tensor().device.type == "meta"


def test_update_has_no_data_dependent_shape_and_no_float64():
    # The meta device has no data: anything that needs values on the host (boolean-mask indexing,
    # .item(), a shape that depends on the data) raises there.
    m = SegmentationMetrics(device="meta")
    logits = torch.empty(3, 1, 8, 8, device="meta")
    target = torch.empty(3, 1, 8, 8, device="meta")
    m.update(logits, target)
    m.update([logits, logits], target > 0.5)
    assert m.state_tensor().device.type == "meta" and m.state_tensor().dtype == torch.int64


def test_nan_policy_sums_skip_nan_scores_without_masking():
    fg = torch.zeros(3, 6, 6, dtype=torch.bool)
    fg[0, 1:4, 1:4] = True
    fg[1, 0, 0] = True
    pred = fg.clone()
    pred[1] = False  # image 1 missed, image 2 empty/empty (dice undefined)
    m = SegmentationMetrics(empty="nan", from_logits=False)
    m.update(pred.float(), fg)
    got = m.compute()
    assert got["dice_mean"] == pytest.approx(0.5) and got["dice_nan_count"] == 1
    assert got["pc_mean"] == pytest.approx(1.0) and got["pc_nan_count"] == 2


def test_means_are_exact_to_float32_and_merging_is_exact():
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.random((6, 9, 7)) < 0.4)
    t = torch.from_numpy(rng.random((6, 9, 7)) < 0.4)
    whole = SegmentationMetrics(from_logits=False)
    whole.update(p.float(), t)
    parts = [SegmentationMetrics(from_logits=False) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(p[2 * i : 2 * i + 2].float(), t[2 * i : 2 * i + 2])
    merged = SegmentationMetrics(from_logits=False)
    merged.load_state_tensor(sum(part.state_tensor() for part in parts))
    assert torch.equal(merged.state_tensor(), whole.state_tensor())
    tp = (p & t).sum((1, 2)).double()
    fp = (p & ~t).sum((1, 2)).double()
    fn = (~p & t).sum((1, 2)).double()
    assert whole.compute()["dice_mean"] == pytest.approx(
        (2 * tp / (2 * tp + fp + fn)).mean().item(), rel=1e-7
    )
    for name in SCORES:
        assert merged.compute()[f"{name}_mean"] == whole.compute()[f"{name}_mean"]


def test_state_tensor_of_another_dtype_is_refused():
    m = SegmentationMetrics()
    with pytest.raises(ConfigError, match="int64"):
        m.load_state_tensor(m.state_tensor().double())


def test_hd95_reports_how_many_images_it_left_out():
    fg = np.zeros((4, 12, 12), bool)
    fg[:, 3:8, 3:8] = True
    pred = fg.copy()
    pred[1] = False  # empty prediction, non-empty target: infinite distance
    target = fg.copy()
    target[2] = False  # and the other way round
    pred[3] = np.roll(fg[3], 1, axis=0)
    m = SegmentationMetrics(compute_hd95=True, from_logits=False)
    m.update(torch.from_numpy(pred).float(), torch.from_numpy(target))
    got = m.compute()
    assert got["hd95_excluded"] == 2 and got["hd95_inf_count"] == 2
    assert got["hd95_mean"] == pytest.approx(0.5)  # images 0 (0.0) and 3 (1.0)
    empty = SegmentationMetrics(compute_hd95=True).compute()
    assert math.isnan(empty["hd95_mean"]) and empty["hd95_excluded"] == 0
