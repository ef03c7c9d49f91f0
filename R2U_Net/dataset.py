"""Split ISIC 2018 Task 1 into train/ valid/ test/ + _GT (seeded 70/10/20, with a split list file).

    python dataset.py --data_path /data/ISIC2018 --output_path ./dataset
    python dataset.py --origin_data_path .../ISIC2018_Task1-2_Training_Input \
                      --origin_GT_path .../ISIC2018_Task1_Training_GroundTruth --output_path ./dataset

Accepts the two official folders or the two zips. Prints `image count in <split> path :N`
(1815 / 259 / 520 on the full set). The code is common/isic/prepare.py.
"""

from __future__ import annotations

import repo_path  # noqa: F401  (puts the monorepo root on sys.path)

from common.cli import run_main
from common.isic.prepare import main

if __name__ == "__main__":
    run_main(main)
