"""Helpers for the test suites of every folder: where the real-data samples live, and skipping without them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """`../shared/data` beside the repository (CI has it; a user's clone usually does not).

    `MODELZOO_SHARED_DATA` overrides the location.
    """
    override = os.environ.get("MODELZOO_SHARED_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path to a real-data sample, or skip the calling test with the reason when it is absent."""
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real-data sample {path} is not present (it ships with CI, not with a clone)")
    return path


# ---- fault injection for the hardening suites (every folder's tests/test_hardening.py) ----------------


def truncate(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a file to `keep` of its size (a download that stopped half-way)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def garble(path: str | Path, offset: int = 64, length: int = 256) -> Path:
    """Overwrite bytes in the middle of a file with noise (a disk or transfer error)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    start = min(offset, max(0, len(data) - 1))
    for i in range(start, min(len(data), start + length)):
        data[i] = (data[i] * 131 + 17) % 256
    path.write_bytes(bytes(data))
    return path


def user_error(fn, *fragments: str, stderr=None) -> str:
    """Call `fn()` and require one clear user error whose message contains every fragment.

    A ModelZooError carries its message; for argparse's or `run_main`'s exit 2, pass
    `stderr=lambda: capsys.readouterr().err` so the printed message is checked. Returns the message.
    """
    from common.errors import ModelZooError

    try:
        fn()
    except ModelZooError as exc:
        message = str(exc)
    except SystemExit as exc:  # argparse or run_main already printed the message
        if exc.code in (0, None):
            raise AssertionError("expected a user error, the entry point succeeded") from None
        message = stderr() if stderr is not None else str(exc)
    else:
        raise AssertionError("expected a user error, nothing was raised")
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    return message


# Variables an outer launcher (torchrun, a ModelZoo script, CI) may have set; a test's child process must
# not inherit them, or it would join that job instead of starting its own.
_LAUNCHER_PREFIXES = ("MODELZOO_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "ASCEND_DEVICE")


def child_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment for a test's subprocess: this one without launcher variables, plus `extra`.

    One torch thread by default: on two cores, a child with two threads beside the test process (or beside
    its sibling rank) spends its time in spin-waits, and runs many times slower.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def fake_device_python(folder: Path, devices: int) -> Path:
    """A `PYTHON` for common/scripts/modelzoo.sh whose `-m common.device_count` reports `devices`
    accelerators; every other command goes to the real interpreter."""
    import sys

    fake = Path(folder) / "python_with_fake_devices"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1 $2" = "-m common.device_count" ]; then echo {int(devices)}; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    fake.chmod(0o755)
    return fake


class NaNLossAt:
    """A training loss that turns NaN at chosen training calls (1-based; `nan_calls(n) -> bool`), for the
    skipped-step and divergence tests; losses computed without gradients (validation) stay finite."""

    def __init__(self, loss, nan_calls):
        self.loss, self.nan_calls, self.calls = loss, nan_calls, 0

    def __call__(self, outputs, targets):
        value = self.loss(outputs, targets)
        import torch

        if torch.is_grad_enabled():
            self.calls += 1
            if self.nan_calls(self.calls):
                return value * float("nan")
        return value


# The child of `start_killed_training`: `train.main(args)` of a model folder, SIGKILLed at a chosen moment.
_KILLED_TRAINING = """
import io, os, signal, sys
folder, repo, moment, threads, loss_factory = sys.argv[1:6]
sys.path[:0] = [folder, repo]
import torch
torch.set_num_threads(int(threads))  # the same as the test process: bitwise equal results
import train
from common.engine import TrainingRun
TrainingRun._plot = lambda self, final: None  # as in the test process

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "mid_epoch":  # killed while computing epoch 2's loss: its data loaded, its step half done
    real = getattr(train, loss_factory)
    calls = [0]
    def build(*args, **kwargs):
        loss = real(*args, **kwargs)
        def counted(outputs, targets):
            if torch.is_grad_enabled():
                calls[0] += 1
                if calls[0] == 2:
                    die()
            return loss(outputs, targets)
        return counted
    setattr(train, loss_factory, build)
else:  # killed after half of epoch 2's checkpoint reached the disk
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
sys.exit(train.main(sys.argv[6:]))
"""


def start_killed_training(folder: Path, moment: str, loss_factory: str, args: list[str], cwd: Path):
    """Start `folder`'s `train.main(args)` in a process that SIGKILLs itself at `moment`: "mid_epoch" (in
    the second training step's loss; `loss_factory` names the attribute of train.py that builds the loss,
    for one step per epoch) or "mid_write" (after half of epoch 2's checkpoint reached the disk).

    Returns the running `subprocess.Popen` (stdout and stderr together, as text); the crash-safety tests
    then check that the last good checkpoint survives and `--resume` ends where an uninterrupted run does.
    """
    import subprocess
    import sys

    import torch

    if moment not in ("mid_epoch", "mid_write"):
        raise ValueError(f"moment must be mid_epoch or mid_write, got {moment!r}")
    runner = Path(cwd) / f"killed_training_{moment}.py"
    runner.write_text(_KILLED_TRAINING)
    command = [sys.executable, str(runner), str(folder), str(REPO_ROOT), moment, str(torch.get_num_threads()),
               loss_factory, *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELZOO_")}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


# ---- several ranks in one test -----------------------------------------------------------------------------


def run_ranks(target, world: int = 2, timeout: float = 180.0) -> dict:
    """Run `target(rank, world, port, queue)` in `world` spawned processes (a free local port for the
    process group); returns {rank: what the rank put on the queue as (rank, value)}. The target should put
    plain data (tensors sent from an exiting process may not arrive) and report its exceptions itself."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, world, port, queue)) for rank in range(world)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return results


# ---- host-device synchronisation counter -----------------------------------------------------------------


def __getattr__(name: str):
    # SyncCounter subclasses torch's dispatch mode; the script suites import this module without torch.
    if name == "SyncCounter":
        from common.sync_counter import SyncCounter

        return SyncCounter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
