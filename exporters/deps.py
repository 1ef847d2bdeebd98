"""Optional-dependency checks: import heavy packages lazily and fail with the pip extra to install."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependency

PROJECT = "lrcompress"


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install '{PROJECT}[{extra}]'"


def is_importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a module blocked in sys.modules counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependency(f"{top} is not installed; {install_hint(extra)}") from exc
