"""`pthtar2onx.py`, the original's name of `pthtar2onnx.py`, kept as an alias: the same program, flags,
help and exit status.

    python pthtar2onx.py [--pth_path models/<model_type>/model_best.pth.tar] [--output <model_type>.onnx]
"""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    # run_path also points sys.argv[0] at pthtar2onnx.py while it runs, so `--help` reads the same.
    runpy.run_path(str(Path(__file__).with_name("pthtar2onnx.py")), run_name="__main__")
