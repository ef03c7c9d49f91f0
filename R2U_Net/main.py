"""Train or test on ISIC 2018 Task 1: the reference's main.py for R2U_Net (default --model_type R2AttU_Net, t=3).

    python main.py --mode train --data_path /data/ISIC2018 [--batch_size 16 --num_epochs 150 ...]
    python main.py --mode test  --data_path /data/ISIC2018

The program is common/isic/solver.py, shared with the other ISIC folder; `python main.py -h` lists
every flag.
"""

from __future__ import annotations

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)

from common.cli import run_main
from common.isic.solver import main

DEFAULTS = {"model_type": "R2AttU_Net", "t": 3}

if __name__ == "__main__":
    run_main(lambda: main(defaults=DEFAULTS))
