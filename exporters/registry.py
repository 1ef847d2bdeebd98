"""Registry of exporters by name: the export targets (onnx, ort, coreml...) and the transforms (int8, int4) in the
order they were registered; the built-in ones come first."""

from __future__ import annotations

from .base import Exporter
from .errors import BadInput

_REGISTRY: dict[str, Exporter] = {}
_builtins_loaded = False


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from .coreml_export import CoreMLExporter
    from .int4 import Int4Exporter
    from .int8 import Int8Exporter
    from .onnx_export import OnnxExporter
    from .ort_format import OrtFormatExporter

    for cls in (OnnxExporter, OrtFormatExporter, CoreMLExporter, Int8Exporter, Int4Exporter):
        _REGISTRY.setdefault(cls.name, cls())


def register(exporter: Exporter) -> Exporter:
    """Add ``exporter`` under its ``name`` (replacing an earlier one of the same name, in its place) and return it."""
    _ensure_builtins()
    if not isinstance(exporter, Exporter):
        raise BadInput(f"register() takes an Exporter instance, not {type(exporter).__name__}; instantiate the class")
    _REGISTRY[exporter.name] = exporter
    return exporter


def unregister(name: str) -> Exporter | None:
    """Remove the exporter called ``name`` and return it (None if there was none)."""
    _ensure_builtins()
    return _REGISTRY.pop(name, None)


def target_names() -> list[str]:
    """Names of the export targets (every exporter but the transforms), in registration order."""
    _ensure_builtins()
    return [name for name, exp in _REGISTRY.items() if not exp.transform]


def transform_names() -> list[str]:
    """Names of the transforms (exporters that rewrite another's artifact in its own format, e.g. int8)."""
    _ensure_builtins()
    return [name for name, exp in _REGISTRY.items() if exp.transform]


def exporter_names() -> list[str]:
    """Names of the export targets, sorted (see :func:`transform_names` for the transforms)."""
    return sorted(target_names())


def get_exporter(name: str) -> Exporter:
    """The exporter or transform called ``name``; :class:`BadInput` listing the valid names otherwise."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        extra = f" (transforms: {', '.join(transform_names())})" if transform_names() else ""
        raise BadInput(f"unknown exporter {name!r}; valid: {', '.join(exporter_names())}{extra}") from None


def exporter_for_path(path: str) -> Exporter:
    """The first registered export target whose suffix ends ``path`` (e.g. '.onnx' -> onnx)."""
    _ensure_builtins()
    lowered = str(path).rstrip("/\\").lower()
    targets = [_REGISTRY[n] for n in target_names()]
    for exporter in targets:
        if lowered.endswith(exporter.suffix):
            return exporter
    suffixes = ", ".join(sorted({e.suffix for e in targets}))
    raise BadInput(f"no exporter handles '{path}'; artifact paths must end with one of: {suffixes}")


def runtime_names() -> list[str]:
    """The runtimes of the export targets, in registration order, each once."""
    return list(dict.fromkeys(_REGISTRY[n].runtime for n in target_names()))


def exporter_for_runtime(runtime: str) -> Exporter:
    """The first registered export target whose artifacts run on ``runtime`` (onnxruntime -> onnx)."""
    for name in target_names():
        if _REGISTRY[name].runtime == runtime:
            return _REGISTRY[name]
    raise BadInput(f"no exporter runs on {runtime!r}; valid runtimes: {', '.join(runtime_names())}")


def available_exporters() -> dict[str, str | None]:
    """Export target name -> ``None`` if usable here, else the one-line reason it is not."""
    return {name: _REGISTRY[name].unavailable_reason() for name in exporter_names()}
