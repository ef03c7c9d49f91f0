"""The training loss of MindSpore's unet_medical: softmax cross-entropy with logits, averaged over pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError


class CrossEntropyWithLogits(nn.Module):
    """mean over every pixel of -sum_c y_c log softmax(x)_c, for logits (N, C, H, W).

    The target is either one-hot / soft labels (N, C, H, W), as the original's data pipeline produces, or
    class indices (N, H, W). Computed in float32 whatever the autocast dtype. The original moves channels
    last and reshapes to (-1, C) before the same mean; the result is identical.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4:
            raise ConfigError(
                f"CrossEntropyWithLogits expects logits (N, C, H, W), got {tuple(logits.shape)}"
            )
        log_prob = F.log_softmax(logits.float(), dim=1)
        if target.dim() == 3:
            if target.shape != logits.shape[:1] + logits.shape[2:]:
                raise ConfigError(
                    f"class-index target {tuple(target.shape)} does not fit logits {tuple(logits.shape)}"
                )
            return F.nll_loss(log_prob, target.long())
        if target.shape != logits.shape:
            raise ConfigError(
                f"one-hot target {tuple(target.shape)} does not fit logits {tuple(logits.shape)}; the labels must "
                "be cropped to the network's output size and have num_classes channels"
            )
        return -(target.float() * log_prob).sum(dim=1).mean()
