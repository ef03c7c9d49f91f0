"""Where UNet_mindspore's checkpoints go when --ckpt_dir is not given: one folder for the whole job."""

from __future__ import annotations


def default_ckpt_dir(runtime) -> str:
    """`ckpt_<device id of global rank 0>`, the same folder on every rank.

    MindSpore names the folder after each process's device, but only rank 0 writes checkpoints, so with
    per-device folders `--resume=True` on N devices found a checkpoint on rank 0 alone and every other rank
    stopped with "no checkpoint". The checkpoint is rank 0's; every rank reads it from rank 0's folder.
    On one process this is MindSpore's name, ckpt_<device id>. With several ranks it is one collective, so
    every rank must call it.

    `runtime`: what common.cli.setup_runtime returns (its `device` and its started process group `dist`).
    """
    index = runtime.device.index
    dist = runtime.dist
    if dist.world_size > 1:
        shared = dist.reduce_scalars([float(index) if dist.is_main else 0.0], runtime.device.device)
        index = int(round(shared[0]))
    return f"ckpt_{index}"
