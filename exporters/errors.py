"""Errors raised by the exporters. Each message is one line naming the value, the rule and the fix."""

from __future__ import annotations


class ExportError(Exception):
    """Base class for every error an exporter raises on purpose."""


class MissingDependency(ExportError, ImportError):
    """An optional package needed by an exporter or runner is not installed."""


class UnsupportedOp(ExportError):
    """The model uses an operator the target format cannot express."""


class CorruptArtifact(ExportError):
    """A file or package on disk is not a valid artifact of its format."""


class BadInput(ExportError, ValueError):
    """An argument (path, option, example input, runtime input) is not usable."""


class PredictionUnavailable(ExportError):
    """The artifact is valid but cannot be executed on this machine (e.g. Core ML on Linux)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, shortened to ``limit`` characters."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__
