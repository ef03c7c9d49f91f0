"""Masks and overlays for a folder of images with a trained network (common/isic/predict.py).

python predict.py --input /path/to/images --output ./predictions [--pth_path ...] [--gt_dir ...]
"""

from __future__ import annotations

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)
from main import DEFAULTS

from common.cli import run_main
from common.isic.predict import main

if __name__ == "__main__":
    run_main(lambda: main(defaults=DEFAULTS))
