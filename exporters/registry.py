"""Registry of exporters by name."""

from __future__ import annotations

from .base import Exporter
from .errors import BadInput

_REGISTRY: dict[str, Exporter] = {}
_builtins_loaded = False


def register(exporter: Exporter) -> Exporter:
    """Add ``exporter`` under its ``name`` (replacing an earlier one of the same name)."""
    _REGISTRY[exporter.name] = exporter
    return exporter


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from .coreml_export import CoreMLExporter
    from .onnx_export import OnnxExporter
    from .ort_format import OrtFormatExporter

    for cls in (OnnxExporter, OrtFormatExporter, CoreMLExporter):
        _REGISTRY.setdefault(cls.name, cls())


def exporter_names() -> list[str]:
    """Names of all registered exporters, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_exporter(name: str) -> Exporter:
    """The exporter called ``name``; :class:`BadInput` listing the valid names otherwise."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise BadInput(f"unknown exporter {name!r}; valid: {', '.join(sorted(_REGISTRY))}") from None


def exporter_for_path(path: str) -> Exporter:
    """The exporter whose suffix matches ``path`` (e.g. '.onnx' -> onnx)."""
    _ensure_builtins()
    lowered = str(path).rstrip("/\\").lower()
    for exporter in _REGISTRY.values():
        if lowered.endswith(exporter.suffix):
            return exporter
    suffixes = ", ".join(sorted(e.suffix for e in _REGISTRY.values()))
    raise BadInput(f"no exporter handles '{path}'; artifact paths must end with one of: {suffixes}")


def available_exporters() -> dict[str, str | None]:
    """Name -> ``None`` if usable here, else the one-line reason it is not."""
    _ensure_builtins()
    return {name: _REGISTRY[name].unavailable_reason() for name in sorted(_REGISTRY)}
