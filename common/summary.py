"""The ModelZoo result files, written by Python from the numbers it measured (nothing is scraped from logs).

In `test/output/<id>/` (or the run's own folder when no test script launched it):

* `<CaseName>.log`: the `Key = Value` lines in the ModelZoo order (shared/docs/modelzoo.md A.5):
  Network, RankSize, BatchSize, DeviceType, CaseName, ActualFPS, TrainingTime (ms per iteration,
  always), TrainAccuracy (not in `_perf` cases), ActualLoss, E2ETrainingTime; `_eval` cases have no FPS
  and no TrainingTime. Folder-specific extra lines (e.g. `ErrorRate = 0.43%`) follow.
* `train_<CaseName>_loss.txt`: one step loss per line; ActualLoss is its last line.
* `final_result.txt`: the console "Final result" block the scripts print, then the run's notes (one
  line each, e.g. how many bad samples `--skip_bad_samples` left out and where they are listed).
* `summary.json`: everything above plus device, versions, configuration, per-epoch history and timings;
  `skipped_samples` (samples left out of the data, 0 for a run on all of it) and `notes` always.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MODES = ("acc", "perf", "eval")


@dataclass
class SummaryTarget:
    """Where and under which names the result files go; the shell library passes it in MODELZOO_* vars."""

    output_dir: Path
    network: str
    case_name: str
    batch_size: int
    rank_size: int
    mode: str
    start_time: float

    @classmethod
    def from_env(
        cls, default_dir: str | Path, network: str, batch_size: int, rank_size: int, mode: str = "acc"
    ):
        """The test script's settings when it launched us, else names built like the scripts build them."""
        env = os.environ
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}")
        batch_size = int(env.get("MODELZOO_BATCH_SIZE", batch_size))
        rank_size = int(env.get("MODELZOO_RANK_SIZE", rank_size))
        mode = env.get("MODELZOO_MODE", mode)
        network = env.get("MODELZOO_NETWORK", network)
        return cls(
            output_dir=Path(env.get("MODELZOO_OUTPUT_DIR", default_dir)),
            network=network,
            case_name=env.get("MODELZOO_CASE_NAME", f"{network}_bs{batch_size}_{rank_size}p_{mode}"),
            batch_size=batch_size,
            rank_size=rank_size,
            mode=mode,
            start_time=float(env.get("MODELZOO_START_TIME", time.time())),
        )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "None"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class RunSummary:
    """The measured numbers of one run."""

    fps: float | None = None
    train_accuracy: float | str | None = None
    actual_loss: float | None = None
    step_losses: list[float] = field(default_factory=list)
    extra_lines: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    # Lines a reader of the console must see with the result (a result on part of the data says so).
    notes: list[str] = field(default_factory=list)
    skipped_samples: int = 0


def summary_lines(target: SummaryTarget, run: RunSummary, e2e_seconds: float) -> list[str]:
    lines = [
        f"Network = {target.network}",
        f"RankSize = {target.rank_size}",
        f"BatchSize = {target.batch_size}",
        f"DeviceType = {platform.machine()}",
        f"CaseName = {target.case_name}",
    ]
    if target.mode != "eval":
        fps = run.fps if run.fps and run.fps > 0 else float("nan")
        lines.append(f"ActualFPS = {_fmt(fps, 3)}")
        lines.append(f"TrainingTime = {_fmt(target.batch_size * 1000.0 / fps, 2)}")
    if target.mode != "perf":
        lines.append(f"TrainAccuracy = {_fmt(run.train_accuracy)}")
    lines.append(f"ActualLoss = {_fmt(run.actual_loss)}")
    lines.append(f"E2ETrainingTime = {int(round(e2e_seconds))}")
    lines.extend(f"{key} = {value}" for key, value in run.extra_lines.items())
    return lines


def final_result_block(target: SummaryTarget, run: RunSummary, e2e_seconds: float) -> str:
    lines = ["------------------ Final result ------------------"]
    if target.mode != "eval":
        lines.append(f"Final Performance images/sec : {_fmt(run.fps, 3)}")
    if target.mode != "perf":
        label = "Final eval Accuracy" if target.mode == "eval" else "Final Train Accuracy"
        lines.append(f"{label} : {_fmt(run.train_accuracy)}")
    lines.append(f"E2E Training Duration sec : {int(round(e2e_seconds))}")
    lines.extend(f"Note: {note}" for note in run.notes)
    return "\n".join(lines) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return _json_safe(value.item())
    return value


def write_summary(target: SummaryTarget, run: RunSummary) -> Path:
    """Write every result file; returns the path of `<CaseName>.log`."""
    target.output_dir.mkdir(parents=True, exist_ok=True)
    e2e = time.time() - target.start_time
    lines = summary_lines(target, run, e2e)
    case_log = target.output_dir / f"{target.case_name}.log"
    _atomic_write_text(case_log, "\n".join(lines) + "\n")
    losses = "".join(f"{loss:.6f}\n" for loss in run.step_losses)
    _atomic_write_text(target.output_dir / f"train_{target.case_name}_loss.txt", losses)
    block = final_result_block(target, run, e2e)
    _atomic_write_text(target.output_dir / "final_result.txt", block)
    payload = {
        "network": target.network,
        "case_name": target.case_name,
        "mode": target.mode,
        "rank_size": target.rank_size,
        "batch_size": target.batch_size,
        "device_type": platform.machine(),
        "actual_fps": run.fps,
        "training_time_ms": (target.batch_size * 1000.0 / run.fps) if run.fps else None,
        "train_accuracy": run.train_accuracy,
        "actual_loss": run.actual_loss,
        "e2e_training_time_s": e2e,
        "summary_lines": lines,
        "skipped_samples": run.skipped_samples,
        "notes": list(run.notes),
        **run.details,
    }
    _atomic_write_text(target.output_dir / "summary.json", json.dumps(_json_safe(payload), indent=2) + "\n")
    print(block, end="", flush=True)
    return case_log


def parse_summary(path: str | Path) -> dict[str, str]:
    """Read a `<CaseName>.log` back into an ordered dict (for tests and the loss-curve tools)."""
    out: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition(" = ")
        if not sep:
            raise ValueError(f"{path}: line {line!r} is not 'Key = Value'")
        out[key] = value
    return out
