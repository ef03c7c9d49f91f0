"""Rebuild a trained UNet / UNet++ from its checkpoint and prepare images for it (shared by demo.py and
pthtar2onnx.py).

A checkpoint written by train.py carries its configuration (arch, deep supervision, input size and
channels, data root); flags given on the command line override it, and the reference's raw state_dicts
(`models/<name>/model.pth`, no configuration) are built from the flags alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import archs
import numpy as np
import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch
from dataset import decode_image, find_samples, normalise_for_network, split_ids

from common.checkpoint import load_checkpoint, load_weights
from common.cli import positive_int
from common.errors import ConfigError
from common.registry import get_model_builder

MODEL_KEYS = ("arch", "deep_supervision", "input_channels", "num_classes", "input_w", "input_h")
DEFAULTS = {"arch": "UNet", "deep_supervision": False, "input_channels": 3, "num_classes": 1,
            "input_w": 96, "input_h": 96}  # fmt: skip


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that override (or, for raw state_dicts, supply) the checkpoint's model settings."""
    parser.add_argument("--resume", "--pth_path", "--checkpoint", dest="resume", required=True,
                        help="checkpoint (model_best.pth.tar / checkpoint.pth.tar) or a raw state_dict")  # fmt: skip
    parser.add_argument("--arch", default=None, help="default: from the checkpoint, else UNet")
    parser.add_argument("--deep_supervision", default=None, choices=("true", "false"))
    parser.add_argument("--input_channels", type=int, default=None, choices=(1, 3), help="1 grey, 3 RGB")
    parser.add_argument("--input_w", type=positive_int, default=None)
    parser.add_argument("--input_h", type=positive_int, default=None)


def model_settings(checkpoint: Any, args: argparse.Namespace) -> dict:
    """Model settings: command-line flags, then the checkpoint's config, then the reference defaults."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    config = config if isinstance(config, dict) else {}
    settings = {key: config.get(key, DEFAULTS[key]) for key in MODEL_KEYS}
    for key in MODEL_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value == "true" if key == "deep_supervision" and isinstance(value, str) else value
    settings["data_root"] = config.get("data_root")
    settings["val_split"] = config.get("val_split", 0.2)
    settings["split_seed"] = config.get("split_seed", 41)
    settings["img_ext"] = config.get("img_ext", ".png")
    settings["mask_ext"] = config.get("mask_ext", ".png")
    for key in ("input_w", "input_h"):
        if settings[key] % archs.SIZE_DIVISOR:
            raise ConfigError(f"--{key} must be a multiple of {archs.SIZE_DIVISOR}, got {settings[key]}")
    return settings


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """(eval-mode CPU model with the checkpoint's weights, its settings)."""
    checkpoint = load_checkpoint(args.resume)
    settings = model_settings(checkpoint, args)
    builder = get_model_builder(settings["arch"], family=archs.FAMILY, flag="--arch")
    model = builder(
        settings["num_classes"], settings["input_channels"], deep_supervision=settings["deep_supervision"]
    )
    load_weights(model, checkpoint, name=str(args.resume))
    return model.eval(), settings


def image_loader(settings: dict):
    """`path -> (network input (C, H, W), display image)` as validation prepares images."""
    channels, height, width = settings["input_channels"], settings["input_h"], settings["input_w"]

    def load(path: Path) -> tuple[torch.Tensor, np.ndarray]:
        image = decode_image(path, channels)
        display = image if channels == 3 else image[:, :, 0]
        return normalise_for_network(image, height, width, channels), display

    return load


def validation_samples(settings: dict) -> list[tuple[str, Path, Path]]:
    """The validation split of the dataset the checkpoint was trained on, as (id, image, mask)."""
    root = settings.get("data_root")
    if not root or not Path(root).is_dir():
        raise ConfigError(
            f"the checkpoint names no readable training data folder ({root}); pass the images with --input"
        )
    samples = find_samples(root, settings["img_ext"], settings["mask_ext"])
    _, val_ids = split_ids([s[0] for s in samples], settings["val_split"], settings["split_seed"])
    wanted = set(val_ids)
    return [s for s in samples if s[0] in wanted]
