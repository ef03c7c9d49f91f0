"""BatchNorm running statistics that describe the trained weights ("precise BN").

BatchNorm's running statistics are an exponential average (momentum 0.1) over the last few dozen training
batches, each taken while the weights were still moving. With small, heterogeneous batches (one ISIC image
per device, two ISBI tiles) that average follows the last images seen, and evaluation-mode outputs drift
away from what the network learned. Recomputing the statistics with the final weights, as an equal-weight
average over many batches, repairs that: the "precise BN" of Wu & Johnson, "Rethinking 'Batch' in
BatchNorm" (arXiv:2105.07576), and `torch.optim.swa_utils.update_bn` of SWA (Izmailov et al., UAI 2018).

`recompute_bn_statistics` does what `update_bn` does (reset, momentum None = cumulative average, one
forward per batch) with three differences that training here needs:
- only BatchNorm layers are in training mode; dropout and everything else stay in evaluation mode, so the
  statistics describe the activations evaluation will see;
- the forward runs under the run's autocast (bf16/fp16 activations as in training and validation) and on
  the bare network (no DDP forward, no collective per batch);
- under DDP every rank averages over the same number of batches of its own shard, then the statistics are
  averaged over ranks: the result is what one process would compute over all ranks' batches, and every
  rank holds the same values (hence every checkpoint, `predict` and `export`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from common.checkpoint import unwrap_model
from common.errors import ConfigError

SETTINGS = ("auto", "on", "off", "compare")
# --precise_bn=auto turns it on below this per-device batch (the measurements are in the README).
AUTO_BELOW_BATCH = 8
DEFAULT_BATCHES = 200


def batches_per_rank(setting: str, batches: int, per_device_batch: int) -> int:
    """Batches per rank for the recomputation (0: off) from `--precise_bn` and `--precise_bn_batches`."""
    if setting not in SETTINGS:
        raise ConfigError(f"--precise_bn must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if batches < 1:
        raise ConfigError(f"--precise_bn_batches must be at least 1, got {batches}")
    if setting == "off" or (setting == "auto" and per_device_batch >= AUTO_BELOW_BATCH):
        return 0  # "compare" recomputes at every batch size
    return batches


def describe(batches: int, compare: bool = False, has_batchnorm: bool = True) -> str:
    if not has_batchnorm:
        return "BatchNorm statistics: none to recompute (the network has no BatchNorm layer)"
    if compare:
        return (
            f"BatchNorm statistics: running averages kept; each validation also scored with statistics "
            f"recomputed over up to {batches} training batch(es) per rank (--precise_bn=compare)"
        )
    if not batches:
        return (
            "BatchNorm statistics: the running averages of training (--precise_bn off, or auto at this batch)"
        )
    return (
        f"BatchNorm statistics: recomputed before each validation over up to {batches} training batch(es) per "
        "rank with the evaluation transform (--precise_bn)"
    )


def batchnorm_layers(model: torch.nn.Module) -> list[_BatchNorm]:
    return [m for m in unwrap_model(model).modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _full_batches(loader: Iterable) -> int:
    """Batches of the full size in an evaluation loader: its ragged last batch is left out (one image of a
    1x1 bottleneck has no variance, and a smaller batch would weigh as much as a full one)."""
    batch_size, sampler = getattr(loader, "batch_size", None), getattr(loader, "sampler", None)
    if batch_size and sampler is not None and hasattr(sampler, "__len__"):
        return len(sampler) // batch_size
    return len(loader)  # type: ignore[arg-type]


def recompute_bn_statistics(
    model: torch.nn.Module,
    loader: Iterable,
    runtime: Any,
    *,
    batches: int,
    prepare_batch: Callable,
    forward: Callable[[torch.nn.Module, torch.Tensor], Any] | None = None,
) -> int:
    """Replace every BatchNorm layer's running statistics by their average over `batches` batches.

    All ranks must call it. `prepare_batch(batch, device, channels_last) -> (inputs, targets)` as in the
    training step; `forward(model, inputs)` replaces `model(inputs)`. Returns the number of batches each
    rank used (0: nothing changed: no BatchNorm layer, or a rank without a batch).
    """
    layers = batchnorm_layers(model)
    if not layers or batches < 1:
        return 0
    device = runtime.device.device
    available = min(batches, _full_batches(loader))
    # Every rank takes as many batches as the shortest shard holds, so the rank average weighs batches equally.
    (neg,) = runtime.dist.reduce_scalars([-available], device, "max")
    used = int(-neg)
    if used < 1:
        return 0
    bare = unwrap_model(model)
    modes = {m: m.training for m in bare.modules()}
    momenta = [layer.momentum for layer in layers]
    bare.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every batch weighs the same
        layer.train()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i == used:
                    break
                inputs, _ = prepare_batch(batch, device, runtime.options.channels_last)
                with runtime.amp.autocast():
                    forward(bare, inputs) if forward is not None else bare(inputs)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    if runtime.dist.world_size > 1:
        stats = torch.cat(
            [t.detach().float().flatten() for m in layers for t in (m.running_mean, m.running_var)]
        )
        runtime.dist.all_reduce(stats)
        stats /= runtime.dist.world_size
        offset = 0
        for layer in layers:
            for tensor in (layer.running_mean, layer.running_var):
                n = tensor.numel()
                tensor.copy_(stats[offset : offset + n].view_as(tensor))
                offset += n
    return used
