"""Errors a user can cause. Each message names the value, the rule and the fix."""

from __future__ import annotations


class LrcompressError(Exception):
    """Base class: the CLI prints the message on one line and exits with code 2."""


class ConfigError(LrcompressError, ValueError):
    """An option or config value is out of its allowed range."""


class SourceError(LrcompressError, ValueError):
    """A model source cannot be resolved or loaded."""


class DataError(LrcompressError, ValueError):
    """Calibration or evaluation data is missing, empty or does not fit the model."""


class WeightError(LrcompressError, ValueError):
    """A weight is unusable (NaN/Inf) or weights do not match the architecture."""


class OutputError(LrcompressError, RuntimeError):
    """The output location cannot be written."""


class CheckpointError(LrcompressError, ValueError):
    """A compressed checkpoint folder is missing files or is inconsistent."""


class TrainingError(LrcompressError, RuntimeError):
    """Recovery training diverged (NaN/Inf loss); the message says what was kept."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the command line: clean-up runs as for any error, then the
    process exits with 128 + the signal number (130, 143)."""

    def __init__(self, signum: int, note: str = "") -> None:
        super().__init__(signum)
        self.signum, self.note = signum, note


class DataWarning(UserWarning):
    """Data that loads but will not help (e.g. lines that tokenize to special tokens only)."""
