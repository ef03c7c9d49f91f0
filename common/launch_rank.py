"""Run one rank of a torchrun job with its output in the ModelZoo log of that rank.

    torchrun --nproc_per_node=8 -m common.launch_rank test/output -- train.py --flag ...

Global rank r (torchrun's RANK = NODE_RANK * nproc_per_node + LOCAL_RANK) writes stdout and stderr to
`test/output/<r>/train_<r>.log`, then becomes the training script (exec), so torchrun still watches the real
process: when one rank fails, torchrun stops the others and exits non-zero. The global rank, not LOCAL_RANK,
names the log: on several nodes sharing a filesystem, local rank 0 of every node would otherwise truncate
the same file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from common.errors import ConfigError, ModelZooError


def global_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank in the whole job: RANK (torchrun), else LOCAL_RANK (one node), else 0."""
    env = os.environ if env is None else env
    for name in ("RANK", "LOCAL_RANK"):
        text = env.get(name, "").strip()
        if text:
            if not text.isdigit():
                raise ConfigError(f"{name} must be a non-negative integer, got {text!r}")
            return int(text)
    return 0


def log_path(output_dir: str | Path, rank: int) -> Path:
    """`<output_dir>/<rank>/train_<rank>.log`, the ModelZoo log of one rank."""
    return Path(output_dir) / str(rank) / f"train_{rank}.log"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m common.launch_rank <output_dir> -- <script.py> [args...]")
    output_dir, command = Path(argv[0]), argv[2:]
    path = log_path(output_dir, global_rank())
    path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    os.execv(sys.executable, [sys.executable, *command])


if __name__ == "__main__":
    # common.cli.run_main would import torch in every rank before the exec; the same rule, without it.
    try:
        main()
    except ModelZooError as exc:
        print(f"[Error] {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
