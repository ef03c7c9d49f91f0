"""Launch AttU_Net training through torchrun (the Tecorigin run_scripts launcher).

    python run_AttU_Net.py --model_type AttU_Net --cuda_idx 0 --nproc_per_node 1 [any main.py flag]

Every main.py flag is forwarded as given (the original dropped all but two), the command is printed
before it runs, and the launcher exits with the training's exit code. With one process, --cuda_idx
picks the device (through CUDA_VISIBLE_DEVICES / ASCEND_RT_VISIBLE_DEVICES, since torchrun's LOCAL_RANK
would otherwise choose device 0); with N processes, ranks take devices 0..N-1. A one-process
--dry_run (check data and settings, train nothing) runs in the launcher's own process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from argument import parse_options

MODEL_ROOT = Path(__file__).resolve().parents[1]
VISIBLE = ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")


def child_env(device_id: int | None, nproc: int) -> tuple[dict[str, str], dict[str, str]]:
    """(environment of the child, the variables this launcher set)."""
    env = dict(os.environ)
    repo = str(MODEL_ROOT.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    changed: dict[str, str] = {}
    if nproc == 1 and device_id is not None:
        for name in VISIBLE:
            current = [d for d in env.get(name, "").split(",") if d.strip()]
            chosen = current[device_id] if device_id < len(current) else str(device_id)
            env[name] = changed[name] = chosen
    return env, changed


def build_command(nproc: int, forwarded: Sequence[str], master_port: int | None = None) -> list[str]:
    rendezvous = (
        ["--standalone"]
        if master_port is None
        else ["--master_addr=127.0.0.1", f"--master_port={master_port}"]
    )
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={nproc}", "--max_restarts=0",
            "main.py", *forwarded]  # fmt: skip


def dry_run_in_process(forwarded: Sequence[str]) -> int:
    """A one-process --dry_run trains nothing, so it runs here instead of in a torchrun child."""
    from main import DEFAULTS

    from common.isic.solver import main as solver_main

    print(f"Executing in this process: main.py {shlex.join(forwarded)}", flush=True)
    os.chdir(MODEL_ROOT)
    return solver_main(list(forwarded), defaults=DEFAULTS, prog="main.py")


def main(argv: Sequence[str] | None = None) -> int:
    options, forwarded = parse_options(argv)
    if options.dry_run and options.nproc_per_node == 1:
        return dry_run_in_process(forwarded)
    env, changed = child_env(options.device_id, options.nproc_per_node)
    command = build_command(options.nproc_per_node, forwarded, options.master_port)
    prefix = " ".join(f"{k}={v}" for k, v in changed.items())
    print(f"Executing command: {(prefix + ' ') if prefix else ''}{shlex.join(command)}", flush=True)
    rc = subprocess.call(command, cwd=MODEL_ROOT, env=env)
    if rc != 0:
        print(f"Command failed with exit code: {rc}", flush=True)
    return rc


if __name__ == "__main__":
    from common.cli import run_main

    run_main(main)
