"""A run's step losses as a small CSV that carries the configuration that produced them.

The Tecorigin loss check compares two raw logs made with different hyper-parameters, splits and data
orders (shared/docs/modelzoo.md B.4). A curve written here names everything that decides the loss of
step i: network, sizes, batch, ranks, optimiser settings, schedule, step cap, seed and the data split
(a hash of the ids of each split), plus a hash of all of them, so a comparison can refuse curves that
cannot be compared and say which setting differs. Format::

    # isic-loss-curve 1
    # config_hash: 0123456789abcdef
    # config: {"augmentation_prob": 0.4, "batch_size": 2, ...}
    step,loss
    1,0.712345
    2,0.698765
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from common.errors import DataError

MAGIC = "# isic-loss-curve 1"
CURVE_KEYS = (
    "model_type",
    "t",
    "image_size",
    "img_ch",
    "output_ch",
    "batch_size",
    "world_size",
    "lr",
    "beta1",
    "beta2",
    "augmentation_prob",
    "num_epochs",
    "num_epochs_decay",
    "max_iters",
    "seed",
    "split",
)


def split_hash(splits: Mapping[str, Sequence[str]]) -> str:
    """A short hash of the ids of each split (order inside a split does not matter)."""
    canonical = {name: sorted(ids) for name, ids in sorted(splits.items())}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(dict(config), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LossCurve:
    config: dict
    losses: list[float] = field(default_factory=list)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)


def write_curve(path: str | Path, config: Mapping[str, object], losses: Iterable[float]) -> Path:
    """Write the curve atomically; `config` must hold exactly the CURVE_KEYS."""
    missing = [k for k in CURVE_KEYS if k not in config]
    if missing:
        raise ValueError(f"loss-curve config lacks {', '.join(missing)}")
    config = {k: config[k] for k in CURVE_KEYS}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        MAGIC,
        f"# config_hash: {config_hash(config)}",
        f"# config: {json.dumps(config, sort_keys=True)}",
        "step,loss",
    ]
    lines += [f"{i},{loss:.6f}" for i, loss in enumerate(losses, start=1)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_curve(path: str | Path) -> LossCurve:
    """Read a curve written by `write_curve`; a file of another kind is a DataError that says so."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise DataError(path, "loss-curve file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot be read as a loss-curve CSV ({exc})") from exc
    lines = text.splitlines()
    if not lines or lines[0].strip() != MAGIC:
        raise DataError(
            path,
            "is not a loss-curve CSV written by main.py (loss_curve.csv): a raw log carries no "
            "configuration, so runs made with different settings could not be told apart",
        )
    config: dict | None = None
    stored_hash = None
    losses: list[float] = []
    for number, line in enumerate(lines[1:], start=2):
        if line.startswith("# config_hash:"):
            stored_hash = line.split(":", 1)[1].strip()
        elif line.startswith("# config:"):
            try:
                config = json.loads(line.split(":", 1)[1])
            except ValueError as exc:
                raise DataError(path, f"line {number}: the config is not valid JSON ({exc})") from exc
        elif line.strip() in ("", "step,loss") or line.startswith("#"):
            continue
        else:
            step, _, value = line.partition(",")
            try:
                if int(step) != len(losses) + 1:
                    raise ValueError(f"step {step} follows step {len(losses)}")
                losses.append(float(value))
            except ValueError as exc:
                raise DataError(path, f"line {number}: expected 'step,loss', got {line!r} ({exc})") from exc
    if config is None:
        raise DataError(path, "has no '# config:' line")
    if stored_hash is not None and stored_hash != config_hash(config):
        raise DataError(path, f"config_hash {stored_hash} does not match its config (edited by hand?)")
    if any(not math.isfinite(v) for v in losses):
        raise DataError(path, "holds non-finite losses (the run diverged)")
    return LossCurve(config=config, losses=losses)


def config_differences(a: Mapping, b: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """'key: a_value vs b_value' for every compared key whose values differ."""
    skip = set(ignore)
    keys = sorted((set(a) | set(b)) - skip)
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
