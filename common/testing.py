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
