"""The step monitor, the Dice metrics and the checkpoint naming of MindSpore's unet_medical.

Log lines, as the original prints them (StepLossTimeMonitor):

    step: 3, loss is 0.69189453, fps is 57.3293877244179
    epoch:   1, avg loss:0.3312, total cost: 160.123 s, per step fps:59.963

`step` counts within the epoch; `fps` is this device's images per second over the logged steps
(batch / step seconds, as MindSpore); the ModelZoo summary's ActualFPS is the global figure after warm-up.

Metrics (every name says what it is):

* `dice_coeff`: the original's score. Per image, with the softmax probabilities P and the one-hot label Y
  over ALL classes (background included): 2 sum(P Y) / (sum P^2 + sum Y^2 + 1e-6); then the mean over images.
  A soft Dice with a squared denominator; predicting "cell interior" everywhere already scores about 0.78
  on ISBI 2012, so it flatters a model. `iou` is dice / (2 - dice) per image, as the original.
* `hard_dice_membrane`: Dice of the arg-max prediction of class 0 (membrane, the structure the ISBI
  challenge scores) against the label, per image then averaged (`_pooled`: over all pixels at once);
  `hard_iou_membrane` likewise, `hd95_membrane` the 95th-percentile Hausdorff distance in output pixels.
  `hard_dice_cell` is the same for class 1 (cell interior). `hd95_membrane_excluded` counts the images
  left out of `hd95_membrane` (an empty prediction or label: the distance is infinite).

The state is int64 on the device (counts and fixed-point sums, as `common.metrics`): no float64 on an
accelerator, and sums that merge exactly over ranks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common.checkpoint import link_checkpoint
from common.engine import EpochStats, StepInfo
from common.metrics import (
    FIXED_POINT,
    SegmentationMetrics,
    confusion_counts,
    fixed_point,
    hd95,
    per_image_scores,
)

CKPT_PREFIX = "ckpt_unet_medical_adam"
_CKPT_RE = re.compile(rf"^{CKPT_PREFIX}-(\d+)_(\d+)\.pth$")
MEMBRANE, CELL = 0, 1
_SMOOTH = 1e-6  # the original's denominator guard


# ------------------------------------------------------------------------------------------------ logging


def step_line(step: int, loss: float, fps: float) -> str:
    """`step: N, loss is X, fps is Y` with the loss shown as a float32, as MindSpore prints it."""
    return f"step: {step}, loss is {str(np.float32(loss))}, fps is {float(fps)}"


def epoch_line(epoch: int, avg_loss: float, seconds: float, fps: float) -> str:
    return f"epoch: {epoch:3d}, avg loss:{avg_loss:.4f}, total cost: {seconds:.3f} s, per step fps:{fps:5.3f}"


class StepLossTimeMonitor:
    """Prints the original's step and epoch lines from the engine's `StepInfo` / `EpochStats`.

    Args:
        batch_size: images per device and step.
        world_size: ranks; the engine's fps is global and is divided back to one device.
        print_fn: where lines go (rank 0's print in train.py).
    """

    def __init__(self, batch_size: int, world_size: int = 1, print_fn: Callable[[str], None] = print):
        self.batch_size = batch_size
        self.world_size = max(1, world_size)
        self.print_fn = print_fn

    def step_end(self, info: StepInfo) -> str:
        line = step_line(info.step, info.loss, info.fps / self.world_size)
        self.print_fn(line)
        return line

    def epoch_end(self, epoch: int, stats: EpochStats) -> str:
        """`epoch` is 1-based, as MindSpore counts."""
        fps = self.batch_size * stats.steps / stats.seconds if stats.seconds > 0 else float("nan")
        line = epoch_line(epoch, stats.loss_mean, stats.seconds, fps)
        self.print_fn(line)
        return line


# ------------------------------------------------------------------------------------------------ metrics


def dice_coeff(prob: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """The original's per-image Dice over every class: (N, C, H, W) probabilities and labels -> (N,) float32
    (as MindSpore computes it; float64 is slow or missing on accelerators)."""
    p = prob.float().flatten(1)
    y = onehot.float().flatten(1)
    return 2 * (p * y).sum(1) / ((p * p).sum(1) + (y * y).sum(1) + _SMOOTH)


def _class_masks(logits: torch.Tensor, onehot: torch.Tensor, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.argmax(1) == cls, onehot.argmax(1) == cls


class UnetMetrics:
    """Accumulates `dice_coeff`, `iou` and the hard per-class scores; DDP-exact through its state tensor.

    `update` takes logits (N, C, H, W) and one-hot targets of the same shape and returns one record per
    image (for eval.py's per-slice table). `device`: where the state starts (the runtime's device, so a
    rank without images still reduces a tensor on the process group's device); it follows the data.
    """

    def __init__(self, compute_hd95: bool = False, device: torch.device | str | None = None):
        self.compute_hd95 = compute_hd95
        self.membrane = SegmentationMetrics(from_logits=False, compute_hd95=compute_hd95, device=device)
        self.cell = SegmentationMetrics(from_logits=False, device=device)
        self._soft = torch.zeros(3, dtype=torch.int64, device=device or "cpu")
        self.reset()

    def to(self, device: torch.device | str) -> UnetMetrics:
        self._soft = self._soft.to(device)
        self.membrane.to(device)
        self.cell.to(device)
        return self

    def reset(self) -> None:
        # fixed-point sum of dice, of iou, and the number of images
        self._soft = torch.zeros(3, dtype=torch.int64, device=self._soft.device)
        self.membrane.reset()
        self.cell.reset()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, onehot: torch.Tensor) -> list[dict[str, float]]:
        logits = logits.float()
        if self._soft.device != logits.device:
            self._soft = self._soft.to(logits.device)
        onehot = onehot.to(logits.device)
        dice = dice_coeff(torch.softmax(logits, dim=1), onehot)
        iou = dice / (2 - dice)
        self._soft += torch.cat(
            [
                fixed_point(dice).sum().reshape(1),
                fixed_point(iou).sum().reshape(1),
                torch.full((1,), dice.numel(), dtype=torch.int64, device=dice.device),
            ]
        )
        # The per-image records are read on the host (eval.py prints them), in float64 there.
        records = [{"dice_coeff": float(d), "iou": float(i)} for d, i in zip(dice.tolist(), iou.tolist())]
        for name, cls, metric in (("membrane", MEMBRANE, self.membrane), ("cell", CELL, self.cell)):
            pred, target = _class_masks(logits, onehot, cls)
            metric.update(pred.float(), target)
            scores = per_image_scores(confusion_counts(pred, target).cpu())
            for record, d, j in zip(records, scores["dice"].tolist(), scores["jaccard"].tolist()):
                record[f"hard_dice_{name}"] = d
                record[f"hard_iou_{name}"] = j
            if name == "membrane" and self.compute_hd95:
                p_np, t_np = pred.cpu().numpy(), target.cpu().numpy()
                for record, p, t in zip(records, p_np, t_np):
                    record["hd95_membrane"] = hd95(p, t)
        return records

    def state_tensor(self) -> torch.Tensor:
        parts = [self._soft, self.membrane.state_tensor(), self.cell.state_tensor()]
        return torch.cat([part.to(self._soft.device) for part in parts])

    def load_state_tensor(self, state: torch.Tensor) -> None:
        state = state.detach().to(device=self._soft.device, dtype=torch.int64)
        n = self.membrane.state_tensor().numel()
        self._soft = state[:3].clone()
        self.membrane.load_state_tensor(state[3 : 3 + n])
        self.cell.load_state_tensor(state[3 + n :])

    def compute(self) -> dict[str, float]:
        dice_sum, iou_sum, images = self._soft.cpu().tolist()
        out = {
            "dice_coeff": dice_sum / FIXED_POINT / images if images else math.nan,
            "iou": iou_sum / FIXED_POINT / images if images else math.nan,
        }
        membrane, cell = self.membrane.compute(), self.cell.compute()
        out.update(
            hard_dice_membrane=membrane["dice_mean"],
            hard_dice_membrane_pooled=membrane["dice_pooled"],
            hard_iou_membrane=membrane["jaccard_mean"],
            hard_iou_membrane_pooled=membrane["jaccard_pooled"],
            hard_dice_cell=cell["dice_mean"],
            hard_dice_cell_pooled=cell["dice_pooled"],
            pixel_accuracy=membrane["acc_pooled"],
            n_images=float(images),
        )
        if self.compute_hd95:
            out["hd95_membrane"] = membrane["hd95_mean"]
            out["hd95_membrane_excluded"] = membrane["hd95_excluded"]
        return out


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_name(epoch: int, step: int) -> str:
    """MindSpore's ModelCheckpoint name, <prefix>-<epoch>_<steps in that epoch>, with .pth."""
    return f"{CKPT_PREFIX}-{epoch}_{step}.pth"


def named_checkpoints(folder: str | Path) -> list[Path]:
    """The ckpt_unet_medical_adam-*.pth files in `folder`, oldest epoch first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CKPT_RE.match(path.name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found)]


def keep_named_checkpoint(
    latest: str | Path, folder: str | Path, epoch: int, step: int, keep_max: int
) -> Path:
    """Give the checkpoint just written (`latest`) its MindSpore name and keep only the newest `keep_max`.

    A hard link (common.checkpoint.link_checkpoint: no space or time; a copy where links fail).
    """
    target = link_checkpoint(latest, Path(folder) / checkpoint_name(epoch, step))
    if keep_max > 0:
        for old in named_checkpoints(folder)[:-keep_max]:
            old.unlink(missing_ok=True)
    return target
