"""Options of run_AttU_Net.py: every main.py flag plus the launcher's own (Tecorigin's argument.py).

The launcher parses the command line with main.py's own parser first, so a mistyped flag or a bad value
is reported before torchrun starts, and then forwards every main.py flag exactly as it was given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the AttU_Net folder: repo_path, main

import repo_path  # noqa: E402, F401  (puts the monorepo root on sys.path)
from main import DEFAULTS  # noqa: E402

from common.cli import positive_int  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.isic.solver import build_parser, check_args  # noqa: E402

# The launcher's own flags (torchrun's); everything else goes to main.py.
LAUNCHER_FLAGS = ("--nproc_per_node", "--master_port")


def build_options_parser() -> argparse.ArgumentParser:
    parser = build_parser(DEFAULTS, prog="run_AttU_Net.py")
    parser.description = "Launch main.py through torchrun: AttU_Net training on ISIC 2018 Task 1."
    group = parser.add_argument_group("launcher (not forwarded)")
    group.add_argument(
        "--nproc_per_node", type=positive_int, default=1, help="processes (devices) on this node"
    )
    group.add_argument(
        "--master_port", type=positive_int, default=None, help="rendezvous port (default: free)"
    )
    return parser


def split_launcher_flags(argv: Sequence[str]) -> list[str]:
    """argv without the launcher's own flags (either `--flag value` or `--flag=value`)."""
    out: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCHER_FLAGS:
            skip_next = "=" not in arg
            continue
        out.append(arg)
    return out


def parse_options(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(parsed options, the flags to forward to main.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_options_parser()
    options = parser.parse_args(argv)
    try:
        check_args(options)  # main.py's own rules, before torchrun starts anything
    except ConfigError as exc:
        parser.error(str(exc))
    return options, split_launcher_flags(argv)
