"""Exceptions that carry a message a user can act on."""

from __future__ import annotations

from pathlib import Path


class ModelZooError(Exception):
    """Base class: the message alone tells the user what is wrong and what to do."""


class DataError(ModelZooError, ValueError):
    """Bad input data: the message names the file (or folder) and the problem."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class ConfigError(ModelZooError, ValueError):
    """A flag or configuration value that cannot work; the message states the rule."""


class CheckpointError(ModelZooError, RuntimeError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


class TrainingDiverged(ModelZooError, RuntimeError):
    """The loss or the gradients stayed non-finite; the last good checkpoint is kept."""
