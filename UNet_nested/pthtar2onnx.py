"""Export a trained UNet / UNet++ checkpoint to ONNX (ModelZoo conventions) and check it with onnxruntime.

    python pthtar2onnx.py --resume models/dsb2018_96_UNet_woDS/model_best.pth.tar [--output UNet.onnx]
                          [--image path/to/image.png]

Opset 11, input `actual_input_1` (N, C, H, W) normalised as in validation, output `output1` (N, 1, H, W)
logits, dynamic batch. For UNet++ with deep supervision the last (full-depth) head is exported. The file
is then run with onnxruntime on a real image (`--image`, default: the first validation image of the
checkpoint's training data) and compared with PyTorch; a difference beyond the tolerance is an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
import torch
from inference import add_model_args, image_loader, load_model, validation_samples

from common.cli import non_negative_float, run_main
from common.export import export_onnx, verify_onnx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--output", default=None, help="default: <arch>.onnx beside the checkpoint")
    parser.add_argument("--image", default=None, help="real image for the onnxruntime check")
    parser.add_argument("--rtol", type=non_negative_float, default=1e-3)
    parser.add_argument("--atol", type=non_negative_float, default=1e-4)
    args = parser.parse_args(argv)
    model, settings = load_model(args)
    image = Path(args.image) if args.image else validation_samples(settings)[0][1]
    x, _ = image_loader(settings)(image)
    example = x[None]
    output = Path(args.output) if args.output else Path(args.resume).with_name(f"{settings['arch']}.onnx")
    export_onnx(model, example, output)
    worst = verify_onnx(output, model, example, rtol=args.rtol, atol=args.atol)
    with torch.no_grad():
        out = model(example)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    fg = float((torch.sigmoid(out) > 0.5).float().mean())
    print(f"wrote {output} ({settings['arch']}, input {tuple(example.shape)}); onnxruntime matches PyTorch on "
          f"{image} within {worst:.2e} (foreground {fg:.1%})")  # fmt: skip
    return 0


if __name__ == "__main__":
    run_main(main)
