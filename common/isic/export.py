"""ONNX export of a trained ISIC network with the ModelZoo names, checked against eager PyTorch.

    python pthtar2onnx.py [--pth_path models/AttU_Net/model_best.pth.tar] [--output AttU_Net.onnx]

Opset 11, input `actual_input_1` (N, 3, S, S) in [-1, 1], output `output1` (N, 1, S, S) logits, dynamic
batch (the ModelZoo's pthtar2onx.py exports 4x3x224x224 and strips DDP's `module.` prefix, which
common.checkpoint does for any file). After writing, onnxruntime must agree with the eager model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from common.checkpoint import load_checkpoint, load_weights
from common.cli import positive_int, status_of
from common.errors import ConfigError
from common.export import export_onnx, verify_onnx
from common.isic.dataset import check_image_size
from common.isic.solver import MODEL_TYPES, build_network


def build_parser(
    defaults: Mapping[str, Any] | None = None, prog: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--model_type", default="U_Net", choices=MODEL_TYPES)
    parser.add_argument("--t", type=positive_int, default=3, help="recurrent steps of the R2 models")
    parser.add_argument(
        "--image_size", type=positive_int, default=224, help="input side of the exported graph"
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=1,
        help="batch of the example input (the axis stays dynamic)",
    )
    parser.add_argument("--model_path", default="./models", help="where main.py wrote <model_type>/")
    parser.add_argument(
        "--pth_path", default="", help="weights (default <model_path>/<model_type>/model_best.pth.tar)"
    )
    parser.add_argument("--output", default="", help="ONNX file (default <model_type>.onnx)")
    parser.add_argument("--no_verify", action="store_true", help="skip the onnxruntime comparison")
    if defaults:
        parser.set_defaults(**dict(defaults))
    return parser


def run(args: argparse.Namespace) -> Path:
    check_image_size(args.image_size)
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    weights = (
        Path(args.pth_path)
        if args.pth_path
        else Path(args.model_path) / args.model_type / "model_best.pth.tar"
    )
    if not weights.is_file():
        raise ConfigError(f"no weights at {weights}: train first or pass --pth_path")
    state = load_checkpoint(weights)  # corrupted or unsafe files fail before the model is built
    output = Path(args.output or f"{args.model_type}.onnx")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give the ONNX file's name")
    model = build_network(args.model_type, t=args.t)
    load_weights(model, state, name=str(weights))
    del state
    model.eval()
    example = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
    )
    path = export_onnx(model, example, output)
    print(f"Exported {args.model_type} ({weights}) to {path}")
    if not args.no_verify:
        diff = verify_onnx(path, model, example)
        print(f"onnxruntime agrees with PyTorch: max abs difference {diff:.3g}")
    return path


def main(argv: Sequence[str] | None = None, defaults: Mapping[str, Any] | None = None,
         prog: str | None = None) -> int:  # fmt: skip
    args = build_parser(defaults, prog).parse_args(argv)
    return status_of(lambda: run(args))
