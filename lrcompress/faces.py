"""Package faces: the names a stage package offers the others, imported on first use (PEP 562),
so importing a package costs nothing and cannot close an import cycle."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_face(package: str, face: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for ``package`` exporting ``face`` (name -> its submodule)."""

    def __getattr__(name: str) -> Any:
        if name in face:
            return getattr(importlib.import_module(f"{package}.{face[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(face)
