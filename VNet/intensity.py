"""Intensity normalisation (CT in Hounsfield units, MRI per volume) and label maps -> binary targets.

CT: clip to the lung window [-1000, 400] HU, then (HU - mean) / std with the LUNA16 statistics the
reference used (mattmacy/vnet.pytorch train.py: mean -642.794, std 459.512, measured on clipped scans).
MRI has no absolute scale, so each volume is standardised by its own mean and standard deviation
(z-score), the usual choice for the Medical Segmentation Decathlon's MRI tasks.

Label maps turn a multi-label mask into the binary target:
  "3,4"  these labels are foreground (LUNA16 seg-lungs: 3 = left lung, 4 = right lung; 5 = trachea and
         main bronchi is background unless listed);
  "gt0"  every label above 0 (also "gtN" for labels above N; ">0" is accepted too);
  "all"  the same as "gt0".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError

HU_WINDOW = (-1000.0, 400.0)
LUNA_MEAN = -642.794
LUNA_STD = 459.512
INTENSITY_MODES = ("auto", "ct", "zscore")

LUNA_LEFT_LUNG, LUNA_RIGHT_LUNG, LUNA_TRACHEA = 3, 4, 5
LUNA_LUNG_LABELS = "3,4"


def normalize_ct(hu: np.ndarray) -> np.ndarray:
    """float32 (clip(HU, -1000, 400) - mean) / std; air maps to about -0.78, soft tissue to about 1.5."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), *HU_WINDOW)
    return ((clipped - LUNA_MEAN) / LUNA_STD).astype(np.float32)


def denormalize_ct(values: np.ndarray) -> np.ndarray:
    """Hounsfield units (within the window) back from `normalize_ct` values."""
    return np.asarray(values, dtype=np.float32) * LUNA_STD + LUNA_MEAN


def zscore(array: np.ndarray) -> np.ndarray:
    """float32 (x - mean) / std over the whole volume; a constant volume becomes zeros."""
    x = np.asarray(array, dtype=np.float32)
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    if not std > 1e-8:
        return np.zeros_like(x)
    return ((x - mean) / std).astype(np.float32)


def normalize_intensity(array: np.ndarray, mode: str) -> np.ndarray:
    """Apply "ct" or "zscore" normalisation (resolve "auto" before calling)."""
    if mode == "ct":
        return normalize_ct(array)
    if mode == "zscore":
        return zscore(array)
    raise ConfigError(f"intensity mode must be 'ct' or 'zscore' here, got {mode!r}")


@dataclass(frozen=True)
class LabelMap:
    """Which label values are foreground: a fixed set, or every value above a threshold."""

    spec: str
    labels: tuple[int, ...] = ()
    above: int | None = None

    @classmethod
    def parse(cls, spec: str) -> LabelMap:
        text = str(spec).strip().lower().replace(" ", "")
        if text in ("all", "gt0", ">0"):
            return cls(spec=text, above=0)
        if text.startswith(("gt", ">")):
            number = text[2:] if text.startswith("gt") else text[1:]
            if number.lstrip("-").isdigit():
                return cls(spec=text, above=int(number))
        parts = [p for p in text.split(",") if p]
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            return cls(spec=text, labels=tuple(sorted({int(p) for p in parts})))
        raise ConfigError(
            f"--label_map {spec!r}: give foreground labels as a comma list ('3,4'), 'gtN' for every label "
            "above N ('gt0' = every label above 0), or 'all'"
        )

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """bool foreground mask of an integer label array."""
        arr = np.asarray(labels)
        if self.above is not None:
            return arr > self.above
        return np.isin(arr, self.labels)

    def describe(self) -> str:
        if self.above is not None:
            return f"label > {self.above}"
        return "label in {" + ", ".join(str(v) for v in self.labels) + "}"
