"""Compare a run's loss curve with a baseline run's and plot both (Tecorigin's run_scripts/loss.py, made strict).

    python loss.py --sdaa-log outputs/result/AttU_Net/loss_curve.csv --cuda-log baseline_loss.csv

Inputs are the loss-curve CSVs main.py writes (<result_path>/<model_type>/loss_curve.csv); the baseline
is such a file, committed. The comparison is refused (exit 2, saying why) when the two runs were made
with different settings (model, sizes, batch, ranks, lr, betas, augmentation, schedule, seed, data split)
or when their lengths differ by more than --max_length_diff steps; then the first min(len) steps are
compared step by step, s = run, c = baseline.

Output: the original's four lines, byte-compatible (signed means, as it printed them)::

    MeanRelativeError: <mean((s - c) / c)>
    MeanAbsoluteError: <mean(s - c)>
    Rule,mean_relative_error <x>      (or Rule,mean_absolute_error <y>)
    pass|fail mean_relative_error=<x> <= 0.05 or mean_absolute_error=<y> <= 0.0002

then the unsigned means mean(|s - c| / c) and mean(|s - c|), which decide pass or fail here, so that
errors of opposite sign cannot cancel and a curve that is merely lower on average cannot pass. Exit 0 =
pass, 1 = fail, 2 = not comparable. The plot (loss.jpg) shows both curves, Savitzky-Golay smoothed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the AttU_Net folder: repo_path

import repo_path  # noqa: E402, F401  (puts the monorepo root on sys.path)

from common.errors import DataError  # noqa: E402
from common.isic.losscurve import LossCurve, config_differences, read_curve  # noqa: E402
from common.plots import plot_curves  # noqa: E402

HERE = Path(__file__).resolve().parent
RELATIVE_TOLERANCE = 0.05
ABSOLUTE_TOLERANCE = 0.0002


@dataclass
class Comparison:
    steps: int
    mean_relative_error: float  # signed, as the original computed it
    mean_absolute_error: float  # signed, despite its name
    unsigned_relative_error: float
    unsigned_absolute_error: float
    relative_tolerance: float = RELATIVE_TOLERANCE
    absolute_tolerance: float = ABSOLUTE_TOLERANCE

    @property
    def passed(self) -> bool:
        return (
            self.unsigned_relative_error <= self.relative_tolerance
            or self.unsigned_absolute_error <= self.absolute_tolerance
        )

    def lines(self) -> list[str]:
        mean_relative_error, mean_absolute_error = self.mean_relative_error, self.mean_absolute_error
        if mean_relative_error <= mean_absolute_error:
            rule = f"Rule,mean_relative_error {mean_relative_error}"
        else:
            rule = f"Rule,mean_absolute_error {mean_absolute_error}"
        verdict = "pass" if self.passed else "fail"
        return [
            f"MeanRelativeError: {mean_relative_error}",
            f"MeanAbsoluteError: {mean_absolute_error}",
            rule,
            f"{verdict} {mean_relative_error=} <= {self.relative_tolerance} or "
            f"{mean_absolute_error=} <= {self.absolute_tolerance}",
            f"UnsignedMeanRelativeError: {self.unsigned_relative_error}",
            f"UnsignedMeanAbsoluteError: {self.unsigned_absolute_error}",
            f"Verdict (unsigned errors decide): {verdict} mean(|s-c|/c)={self.unsigned_relative_error:.6g} <= "
            f"{self.relative_tolerance} or mean(|s-c|)={self.unsigned_absolute_error:.6g} <= "
            f"{self.absolute_tolerance}, over {self.steps} steps",
        ]


def compare(
    run: Sequence[float],
    baseline: Sequence[float],
    relative_tolerance: float = RELATIVE_TOLERANCE,
    absolute_tolerance: float = ABSOLUTE_TOLERANCE,
) -> Comparison:
    """Step-by-step errors of `run` against `baseline` over their common length."""
    n = min(len(run), len(baseline))
    if n == 0:
        raise ValueError("nothing to compare: a curve is empty")
    s = np.asarray(run[:n], dtype=np.float64)
    c = np.asarray(baseline[:n], dtype=np.float64)
    denominator = np.where(np.abs(c) > 1e-12, c, 1e-12)  # BCE losses are positive; this only guards 0
    return Comparison(
        steps=n,
        mean_relative_error=float(np.mean((s - c) / denominator)),
        mean_absolute_error=float(np.mean(s - c)),
        unsigned_relative_error=float(np.mean(np.abs(s - c) / np.abs(denominator))),
        unsigned_absolute_error=float(np.mean(np.abs(s - c))),
        relative_tolerance=relative_tolerance,
        absolute_tolerance=absolute_tolerance,
    )


def comparable(run: LossCurve, baseline: LossCurve, ignore: Sequence[str], max_length_diff: int) -> list[str]:
    """Why the two curves cannot be compared (empty when they can)."""
    problems = [f"setting differs: {d}" for d in config_differences(run.config, baseline.config, ignore)]
    if abs(len(run.losses) - len(baseline.losses)) > max_length_diff:
        problems.append(
            f"lengths differ by more than {max_length_diff} steps: run {len(run.losses)}, "
            f"baseline {len(baseline.losses)}"
        )
    if not run.losses or not baseline.losses:
        problems.append("a curve holds no steps")
    return problems


def save_plot(run: Sequence[float], baseline: Sequence[float], path: Path, window: int) -> Path:
    """Both curves smoothed (Savitzky-Golay, order 1) as a JPEG, like the original's loss.jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        png = plot_curves(
            {"run (sdaa_loss)": list(run), "baseline (cuda_loss)": list(baseline)},
            Path(tmp) / "loss.png",
            "Iteration",
            "Loss",
            "Model Training Loss Curves (Smoothed)",
            smooth_window=window,
        )
        with Image.open(png) as image:
            image.convert("RGB").save(path, format="JPEG", quality=92)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdaa-log", "--sdaa_log", "--run", dest="run",
                        default=str(HERE / "outputs" / "result" / "AttU_Net" / "loss_curve.csv"),
                        help="loss_curve.csv of the run under test")  # fmt: skip
    parser.add_argument("--cuda-log", "--cuda_log", "--baseline", dest="baseline",
                        default=str(HERE / "baseline_loss.csv"), help="loss-curve CSV of the reference run")  # fmt: skip
    parser.add_argument("--plot", default="loss.jpg", help="where the picture goes ('' for none)")
    parser.add_argument("--smooth_window", type=int, default=5, help="Savitzky-Golay window of the plot")
    parser.add_argument(
        "--max_length_diff", type=int, default=5, help="refuse curves whose lengths differ more"
    )
    parser.add_argument("--relative_tolerance", type=float, default=RELATIVE_TOLERANCE)
    parser.add_argument("--absolute_tolerance", type=float, default=ABSOLUTE_TOLERANCE)
    parser.add_argument("--ignore_config", nargs="*", default=[], metavar="KEY",
                        help="compare although these settings differ (e.g. lr, to see how far curves move)")  # fmt: skip
    parser.add_argument("--config_only", action="store_true",
                        help="only check that the settings match (e.g. on a --dry_run's header) and stop")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run, baseline = read_curve(args.run), read_curve(args.baseline)
    except DataError as exc:
        print(f"[Error] {exc}", flush=True)
        return 2
    if args.config_only:
        differences = config_differences(run.config, baseline.config, args.ignore_config)
        if differences:
            print(
                "[Error] the run's settings differ from the baseline's:\n  " + "\n  ".join(differences),
                flush=True,
            )
            return 2
        print(f"Settings match the baseline (config {baseline.config_hash})", flush=True)
        return 0
    problems = comparable(run, baseline, args.ignore_config, args.max_length_diff)
    if problems:
        print("[Error] refusing to compare these loss curves:\n  " + "\n  ".join(problems), flush=True)
        print(
            f"  run: {args.run} (config {run.config_hash})\n  baseline: {args.baseline} (config {baseline.config_hash})"
        )
        return 2
    result = compare(run.losses, baseline.losses, args.relative_tolerance, args.absolute_tolerance)
    print("\n".join(result.lines()), flush=True)
    if args.plot:
        print(f"Plot: {save_plot(run.losses, baseline.losses, Path(args.plot), args.smooth_window)}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
