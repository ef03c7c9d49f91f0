"""Export a trained checkpoint to ONNX (opset 11, actual_input_1 / output1, dynamic batch) and check it
with onnxruntime: the ModelZoo's export script (code in common/isic/export.py).

    python pthtar2onnx.py [--pth_path models/<model_type>/model_best.pth.tar] [--output <model_type>.onnx]

`pthtar2onx.py`, the original's name, runs this same program.
"""

from __future__ import annotations

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
from main import DEFAULTS

from common.cli import run_main
from common.isic.export import main

if __name__ == "__main__":
    run_main(lambda: main(defaults=DEFAULTS))
