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


def onnx_failure(exc: BaseException, src: object, action: str, hint: str, marker: str = "protobuf") -> ExportError:
    """The error for a tool that failed on the ONNX file ``src``: CorruptArtifact when the file
    does not parse (a protobuf error type, or ``marker`` in the tool's message), else ExportError
    naming ``action`` and ``hint``."""
    kind = type(exc).__name__
    if kind in ("DecodeError", "InvalidProtobuf") or marker in str(exc).lower():
        return CorruptArtifact(f"'{src}' is not a valid ONNX model ({kind}: {first_line(exc)}); re-export it")
    return ExportError(f"{action} failed: {first_line(exc)}; {hint}")
