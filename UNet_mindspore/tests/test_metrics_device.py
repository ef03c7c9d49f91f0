"""UnetMetrics on the device: int64 state from construction, float32 Dice, HD95 exclusions reported."""

from __future__ import annotations

import math

import torch
from src.utils import UnetMetrics, dice_coeff


def _membrane_missed() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.zeros(2, 2, 6, 6)
    logits[:, 1] = 5.0  # all "cell": the membrane prediction is empty
    onehot = torch.zeros(2, 2, 6, 6)
    onehot[:, 0, :2] = 1.0
    onehot[:, 1, 2:] = 1.0
    return logits, onehot


def test_state_lives_on_the_given_device_and_is_int64():
    metrics = UnetMetrics(compute_hd95=True, device="meta")
    assert metrics.state_tensor().device.type == "meta" and metrics.state_tensor().dtype == torch.int64
    metrics.reset()
    assert metrics.state_tensor().device.type == "meta"
    on_cpu = UnetMetrics()
    assert on_cpu.to("meta") is on_cpu and on_cpu.state_tensor().device.type == "meta"


def test_dice_is_float32_and_hd95_exclusions_are_reported():
    logits, onehot = _membrane_missed()
    assert dice_coeff(torch.softmax(logits, 1), onehot).dtype == torch.float32
    metrics = UnetMetrics(compute_hd95=True)
    records = metrics.update(logits, onehot)
    assert all(math.isinf(r["hd95_membrane"]) for r in records)
    result = metrics.compute()
    assert result["hd95_membrane_excluded"] == 2 and math.isnan(result["hd95_membrane"])
    assert metrics.state_tensor().dtype == torch.int64
