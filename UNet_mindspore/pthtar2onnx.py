"""Export a U-Net checkpoint to ONNX and check it against PyTorch with onnxruntime.

    python pthtar2onnx.py --ckpt_file=ckpt_0/ckpt_unet_medical_adam-1_600.pth --file_name=unet --file_format=ONNX

The graph takes `actual_input_1` (batch, 1, S, S) and returns `output1` (batch, num_classes, S-184, S-184)
logits (opset 11, dynamic batch: the ModelZoo conventions). S is the checkpoint's image size (572 by
default). MindSpore's AIR and MINDIR formats have no PyTorch counterpart.

`export.py`, the MindSpore original's name, runs this same program.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch
from src.config import cfg_unet
from src.unet import UNetMedical, check_input_size, output_size

from common.checkpoint import load_checkpoint, load_weights
from common.cli import run_main
from common.errors import ConfigError
from common.export import export_onnx, verify_onnx


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a UNet checkpoint to ONNX")
    parser.add_argument(
        "--ckpt_file", "--checkpoint_file_path", "--pth_path", dest="ckpt_file", required=True
    )
    parser.add_argument("--file_name", default="unet_medical", help="output path without the .onnx suffix")
    parser.add_argument(
        "--file_format", default="ONNX", type=str.upper, help="ONNX (AIR and MINDIR are MindSpore's)"
    )
    parser.add_argument("--image_size", type=int, default=None, help="default: the checkpoint's image size")
    parser.add_argument(
        "--batch_size", type=int, default=1, help="batch of the example input (the batch is dynamic)"
    )
    parser.add_argument("--no_verify", action="store_true", help="skip the onnxruntime parity check")
    return parser


def check_size(size: int) -> None:
    try:
        check_input_size(size, size)
    except ValueError as exc:
        raise ConfigError(f"--image_size: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.file_format != "ONNX":
        raise ConfigError(f"--file_format {args.file_format}: only ONNX can be written from PyTorch")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.image_size is not None:
        check_size(args.image_size)
    state = load_checkpoint(args.ckpt_file)
    saved = state.get("config", {}) if isinstance(state, dict) else {}
    saved = saved if isinstance(saved, dict) else {}
    size = args.image_size or int(saved.get("image_size", cfg_unet["image_size"]))
    check_size(size)
    model = UNetMedical(n_channels=1, n_classes=int(saved.get("num_classes", cfg_unet["num_classes"])))
    load_weights(model, state, name=str(args.ckpt_file))
    model.eval()
    example = torch.randn(args.batch_size, 1, size, size, generator=torch.Generator().manual_seed(0))
    path = export_onnx(model, example, Path(f"{args.file_name}.onnx"))
    print(f"exported {path}: input (batch, 1, {size}, {size}) -> output (batch, {model.n_classes}, "
          f"{output_size(size)}, {output_size(size)})", flush=True)  # fmt: skip
    if not args.no_verify:
        worst = verify_onnx(path, model, example)
        print(f"onnxruntime matches PyTorch: max abs difference {worst:.3g}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
