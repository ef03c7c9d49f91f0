"""The two IoUs: the reference's batch-pooled IoU recomputed from per-image counts, over any sharding."""

from __future__ import annotations

import pytest
import torch
from iou import DSBScores, batch_pooled_iou

from common.errors import ConfigError


def _reference_epoch_iou(logits: torch.Tensor, masks: torch.Tensor, batch: int) -> float:
    """pytorch-nested-unet's validation: iou_score per batch (sigmoid > 0.5, target > 0.5, pooled over the
    batch, smoothed by 1e-5), averaged with an AverageMeter weighted by the batch's size."""
    total, count = 0.0, 0
    for start in range(0, logits.shape[0], batch):
        out = torch.sigmoid(logits[start : start + batch]).numpy() > 0.5
        tgt = masks[start : start + batch].numpy() > 0.5
        iou = ((out & tgt).sum() + 1e-5) / ((out | tgt).sum() + 1e-5)
        total += float(iou) * out.shape[0]
        count += out.shape[0]
    return total / count


def _data(n: int = 37, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = (torch.rand(n, 1, 12, 12, generator=gen) > 0.6).float()
    logits = torch.randn(n, 1, 12, 12, generator=gen) + 2.0 * (masks - 0.5)
    masks[3] = 0  # an empty mask, and an empty prediction on it: 1 per image, smoothed when pooled
    logits[3] = -5.0
    return logits, masks


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_batch_pooled_iou_is_the_reference_epoch_iou_over_any_sharding(world):
    logits, masks = _data()
    shards = []
    for rank in range(world):
        scores = DSBScores(len(logits), rank, world, batch_size=16)
        rows = list(range(rank, len(logits), world))
        for start in range(0, len(rows), 5):  # any evaluation batch size
            chunk = rows[start : start + 5]
            scores.update(logits[chunk], masks[chunk])
        shards.append(scores.state_tensor())
    merged = DSBScores(len(logits), 0, world, batch_size=16)
    merged.load_state_tensor(torch.stack(shards).sum(0))  # what the all-reduce does
    result = merged.compute()
    assert result["iou_batch_pooled"] == pytest.approx(_reference_epoch_iou(logits, masks, 16), rel=1e-9)
    single = DSBScores(len(logits))
    single.update(logits, masks)
    assert result["jaccard_mean"] == single.compute()["jaccard_mean"]
    assert merged.image_counts()[3] == (0, 0)


def test_the_pooled_iou_depends_on_the_batch_and_the_per_image_mean_does_not():
    logits, masks = _data(seed=1)
    scores = [DSBScores(len(logits), batch_size=b) for b in (1, 16)]
    for s in scores:
        s.update(logits, masks)
    one, sixteen = (s.compute() for s in scores)
    assert one["jaccard_mean"] == sixteen["jaccard_mean"]
    assert one["iou_batch_pooled"] != pytest.approx(sixteen["iou_batch_pooled"], abs=1e-4)
    # At batch 1 the pooled IoU is the per-image mean (up to the smoothing of empty images)
    assert one["iou_batch_pooled"] == pytest.approx(one["jaccard_mean"], abs=1e-6)


def test_more_images_than_the_shard_holds_are_refused():
    logits, masks = _data(n=4)
    scores = DSBScores(3)
    with pytest.raises(ConfigError, match="more images scored"):
        scores.update(logits, masks)
    with pytest.raises(ConfigError, match="at least 1"):
        batch_pooled_iou([1], [2], 0)
