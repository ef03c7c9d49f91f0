"""Export a V-Net checkpoint to ONNX (opset 11, input `actual_input_1`, output `output1`) and check it.

    python3 pthtar2onnx.py --checkpoint work/<run>/vnet_model_best.pth.tar --output vnet.onnx \
        [--input_size 64x80x80] [--layout logits|modelzoo]

The ModelZoo's VNet export used a fixed 1x1x64x80x80 input (a 2x2x2 sub-volume of a 128x160x160 scan);
that is the default here, with a dynamic batch axis. `--layout logits` (default) exports (N, 2, D, H, W)
logits; `--layout modelzoo` exports what the ModelZoo port returned, (N, D, H, W, 2) log-probabilities.
After export, onnxruntime is compared with PyTorch on a random volume (common.export.verify_onnx);
a sliding-window runtime feeds the same window size (see predict.py).
"""

from __future__ import annotations

import repo_path  # noqa: F401  # isort: skip  (puts the monorepo root on sys.path)

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
from dataset import check_patch_size, parse_size
from torch import nn
from vnet import VNet

from common.checkpoint import extract_state_dict, load_checkpoint, load_weights
from common.cli import run_main
from common.errors import ModelZooError
from common.export import export_onnx, verify_onnx


class ModelZooLayout(nn.Module):
    """(N, D, H, W, 2) log-probabilities, the ModelZoo port's output layout."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.net(x).permute(0, 2, 3, 4, 1), dim=-1)


def build_model(checkpoint: str | None) -> nn.Module:
    if not checkpoint:
        print("warning: no --checkpoint: exporting randomly initialised weights", file=sys.stderr)
        return VNet(elu=False, nll=True).eval()
    state = load_checkpoint(checkpoint)
    config = state.get("config", {}) if isinstance(state, dict) else {}
    model = VNet(elu=bool(config.get("elu", False)), nll=True)
    load_weights(model, extract_state_dict(state, str(checkpoint)), name=str(checkpoint))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", "--pth_path", dest="checkpoint", default="", help="vnet_*.pth.tar")
    parser.add_argument("--output", default="vnet.onnx")
    parser.add_argument("--input_size", default="64x80x80", help="D x H x W of the exported input")
    parser.add_argument("--layout", default="logits", choices=("logits", "modelzoo"))
    parser.add_argument("--no_verify", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    try:
        size = check_patch_size(parse_size(args.input_size, "--input_size"), "--input_size")
        model = build_model(args.checkpoint)
        if args.layout == "modelzoo":
            model = ModelZooLayout(model).eval()
        example = torch.randn(1, 1, *size, generator=torch.Generator().manual_seed(0))
        path = export_onnx(model, example, args.output)
        print(
            f"exported {path} ({Path(path).stat().st_size / 2**20:.1f} MiB), input 1x1x{'x'.join(map(str, size))}"
        )
        if not args.no_verify:
            worst = verify_onnx(path, model, example, rtol=1e-3, atol=1e-3)
            print(f"onnxruntime matches PyTorch: max abs difference {worst:.2e}")
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main)
