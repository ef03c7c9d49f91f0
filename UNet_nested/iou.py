"""The two IoUs of a DSB 2018 result: the mean over images, and the reference's batch-pooled IoU.

The per-image mean (|P n T| / |P u T| per image, an empty prediction on an empty mask scoring 1, averaged
over images) is this folder's headline: it does not depend on how images are batched.

The reference (pytorch-nested-unet, `metrics.iou_score`) pools intersection and union over a whole
validation batch, (sum |P n T| + 1e-5) / (sum |P u T| + 1e-5), and averages those batch values weighted by
batch size (its AverageMeter), over its validation loader in the split's order at batch 16. The published
0.839 / 0.842 / 0.843 and the ModelZoo's 83.91 are that number; `batch_pooled_iou` recomputes it from
per-image counts, so it is exact whatever the ranks and batch sizes the evaluation itself ran with.
"""

from __future__ import annotations

from typing import Sequence

import torch

from common.errors import ConfigError
from common.metrics import SegmentationMetrics, confusion_counts, foreground_logit

SMOOTH = 1e-5  # the reference's smoothing term
REFERENCE_BATCH = 16  # the reference's validation batch (1p; its 8p runs use 128 / 8 ranks = 16 too)


def batch_pooled_iou(intersections: Sequence[int], unions: Sequence[int], batch_size: int) -> float:
    """The reference's IoU: pooled over consecutive batches of `batch_size` images, mean weighted by size."""
    if batch_size < 1:
        raise ConfigError(f"the IoU batch size must be at least 1, got {batch_size}")
    if len(intersections) != len(unions) or not intersections:
        raise ConfigError("batch_pooled_iou needs as many intersections as unions, and at least one image")
    total = 0.0
    for start in range(0, len(intersections), batch_size):
        inter = sum(intersections[start : start + batch_size])
        union = sum(unions[start : start + batch_size])
        size = len(intersections[start : start + batch_size])
        total += size * (inter + SMOOTH) / (union + SMOOTH)
    return total / len(intersections)


def per_image_iou(intersection: int, union: int) -> float:
    return 1.0 if union == 0 else intersection / union


class DSBScores:
    """`SegmentationMetrics` plus each image's intersection and union, by its index in the split.

    Follows the metric protocol of `common.engine.evaluate` (update, state_tensor, load_state_tensor,
    compute, to, reset). The images of a split of `count` come to this rank in the order of
    `common.loader.ShardedSampler` (rank, rank + world, ...), so each update knows their indices without
    asking the device; after the all-reduce every rank holds every image's counts.
    """

    def __init__(self, count: int, rank: int = 0, world_size: int = 1, batch_size: int = REFERENCE_BATCH):
        self.segmentation = SegmentationMetrics(compute_hd95=True)
        self.count, self.rank, self.world_size, self.batch_size = count, rank, world_size, batch_size
        self.counts = torch.zeros(count, 2, dtype=torch.int64)
        self.seen = 0

    def to(self, device: torch.device | str) -> DSBScores:
        self.segmentation.to(device)
        self.counts = self.counts.to(device)
        return self

    def reset(self) -> None:
        self.segmentation.reset()
        self.counts = torch.zeros_like(self.counts)
        self.seen = 0

    @torch.no_grad()
    def update(self, output, target: torch.Tensor) -> None:
        self.segmentation.update(output, target)
        pred = foreground_logit(output) > 0  # sigmoid(logit) > 0.5
        tgt = target > 0.5
        pred = pred.reshape(pred.shape[0], -1)
        tp, fp, fn, _ = confusion_counts(pred, tgt.reshape(pred.shape)).to(self.counts.device).unbind(1)
        n = pred.shape[0]
        rows = torch.arange(self.seen, self.seen + n, device=self.counts.device) * self.world_size + self.rank
        if self.seen + n > len(range(self.rank, self.count, self.world_size)):
            raise ConfigError(f"more images scored than the split's {self.count} on this rank's shard")
        self.counts.index_copy_(0, rows, torch.stack([tp, tp + fp + fn], 1))
        self.seen += n

    def state_tensor(self) -> torch.Tensor:
        return torch.cat([self.segmentation.state_tensor(), self.counts.flatten()])

    def load_state_tensor(self, state: torch.Tensor) -> None:
        split = state.numel() - self.counts.numel()
        self.segmentation.load_state_tensor(state[:split])
        self.counts = state[split:].reshape(self.counts.shape).clone()

    def image_counts(self) -> list[tuple[int, int]]:
        return [tuple(row) for row in self.counts.cpu().tolist()]

    def compute(self) -> dict[str, float]:
        result = self.segmentation.compute()
        counts = self.image_counts()
        result["iou_batch_pooled"] = batch_pooled_iou(
            [c[0] for c in counts], [c[1] for c in counts], self.batch_size
        )
        return result
