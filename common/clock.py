"""A stopwatch for time limits on shared machines.

`--time_limit`-style flags stop a run after so many seconds. On an idle machine wall-clock seconds are
the natural unit; on a shared one (CI, a login node, agents running beside each other) other jobs steal
the cores and wall time says little about the work done. The "cpu" basis counts this process's CPU
seconds divided by its torch threads: the seconds of the cores it was given, equal to wall time when the
machine is idle. On a loaded machine it errs on the short side (threads that wait for a busy core spin,
and spinning counts as CPU time), so a budget met on that basis is met on an idle machine too.
"""

from __future__ import annotations

import time

import torch

BASES = ("wall", "cpu")


def cpu_seconds_per_thread() -> float:
    """This process's CPU time (all its threads) divided by torch's intra-op thread count."""
    return time.process_time() / max(1, torch.get_num_threads())


class Clock:
    """Seconds since construction on the chosen basis; `wall()` and `cpu()` are always available."""

    def __init__(self, basis: str = "wall"):
        if basis not in BASES:
            raise ValueError(f"clock basis must be one of {BASES}, not {basis!r}")
        self.basis = basis
        self.began_wall, self.began_cpu = time.monotonic(), cpu_seconds_per_thread()

    def wall(self) -> float:
        return time.monotonic() - self.began_wall

    def cpu(self) -> float:
        return cpu_seconds_per_thread() - self.began_cpu

    def elapsed(self) -> float:
        return self.cpu() if self.basis == "cpu" else self.wall()
