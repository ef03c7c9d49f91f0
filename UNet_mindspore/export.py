"""`export.py`, the MindSpore original's name of `pthtar2onnx.py`, kept as an alias: the same program,
flags, help and exit status.

    python export.py --ckpt_file=ckpt_0/ckpt_unet_medical_adam-1_600.pth --file_name=unet --file_format=ONNX
"""

from __future__ import annotations

import runpy
from pathlib import Path

_PROGRAM = str(Path(__file__).with_name("pthtar2onnx.py"))

if __name__ == "__main__":
    # run_path also points sys.argv[0] at pthtar2onnx.py while it runs, so `--help` reads the same.
    runpy.run_path(_PROGRAM, run_name="__main__")
else:
    # Imported (`export.main(argv)`): the program's own functions.
    main = runpy.run_path(_PROGRAM)["main"]
