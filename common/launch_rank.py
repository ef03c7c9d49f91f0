"""Run one rank of a torchrun job with its output in the ModelZoo log of its device.

    torchrun --nproc_per_node=8 -m common.launch_rank test/output -- train.py --flag ...

Rank r (LOCAL_RANK) writes stdout and stderr to `test/output/<r>/train_<r>.log`, then becomes the training
script (exec), so torchrun still watches the real process: when one rank fails, torchrun stops the others
and exits non-zero.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m common.launch_rank <output_dir> -- <script.py> [args...]")
    output_dir, command = Path(argv[0]), argv[2:]
    local_rank = os.environ.get("LOCAL_RANK", "0")
    log_dir = output_dir / local_rank
    log_dir.mkdir(parents=True, exist_ok=True)
    log = os.open(log_dir / f"train_{local_rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.execv(sys.executable, [sys.executable, *command])


if __name__ == "__main__":
    main()
