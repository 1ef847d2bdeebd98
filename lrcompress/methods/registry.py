"""The method registry: the only place that lists the methods. Built-ins are registered on
first use; ``register`` adds a method of one's own (one line), after which the planner, apply,
checkpoints, reports, the CLI's ``--method`` and recipes know it."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import Method

DEFAULT = "svd-whiten"  # the method a run uses when none is named (plain SVD without calibration data)
_METHODS: dict[str, Method] = {}
_builtins_loaded = False


def _ensure_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from . import auto, cp, shared_svd, svd, svd_whiten, tt, tucker
    for module in (svd, svd_whiten, tucker, cp, tt, shared_svd, auto):
        _METHODS.setdefault(module.METHOD.name, module.METHOD)


def register(method: Method) -> Method:
    """Add ``method`` under its ``name`` (replacing an earlier one of that name); returns it."""
    _ensure_builtins()
    for attr in ("name", "config"):
        if not hasattr(method, attr):
            raise TypeError(f"a method needs a {attr!r} class attribute: {type(method).__name__}")
    if getattr(method.config, "__dataclass_fields__", {}).get("name") is None:
        raise TypeError(f"{method.config.__name__} needs a 'name' field (its default: {method.name!r})")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests, plugins that clean up)."""
    _ensure_builtins()
    _METHODS.pop(name, None)


def names() -> tuple[str, ...]:
    """Names of the registered methods, built-ins first, in registration order."""
    _ensure_builtins()
    return tuple(_METHODS)


def methods() -> list[Method]:
    """The registered methods, in registration order."""
    _ensure_builtins()
    return list(_METHODS.values())


def get(name: str) -> Method:
    """The method called ``name``; a one-line error listing the valid names otherwise."""
    _ensure_builtins()
    if not isinstance(name, str) or name not in _METHODS:
        raise ConfigError(f"--method {name!r} is not one of {', '.join(_METHODS)}; pick one of them")
    return _METHODS[name]


def configs() -> dict[str, type]:
    """Method name -> its config dataclass (recipe schema, docs)."""
    _ensure_builtins()
    return {n: m.config for n, m in _METHODS.items()}


def method_config(name: str, **kwargs: Any) -> Any:
    """Build the config for method ``name``; options that do not apply to it are refused."""
    cls = get(name).config
    if "embedding_smoothing" in kwargs and "embedding_smoothing" not in {f.name for f in fields(cls)}:
        kwargs.pop("embedding_smoothing")  # a whitening option: meaningless without whitening
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"options {unknown} do not apply to --method {name}; allowed: {sorted(known)}")
    return cls(**kwargs)


def for_config(config: Any) -> Method:
    """The method a config object belongs to."""
    return get(config.name)


def matrix_method(whitened: bool) -> Method:
    """The method that factorizes plain matrix layers: the first registered spectral method
    that is (``whitened``) or is not whitened."""
    _ensure_builtins()
    for m in _METHODS.values():
        if m.spectral and m.whitened == whitened and not m.grouped:
            return m
    raise ConfigError("no matrix method is registered; the built-in svd methods were unregistered")


def factorized_types() -> tuple[type[nn.Module], ...]:
    """Every module type a registered method builds (already factorized layers are skipped)."""
    _ensure_builtins()
    return tuple(t for m in _METHODS.values() for t in m.modules)


def owner(mod: nn.Module) -> Method | None:
    """The method that built ``mod`` (None: a module no method built)."""
    _ensure_builtins()
    for m in _METHODS.values():
        if type(mod) in m.modules:
            return m
    return None


def for_entry(kind: Any) -> Method | None:
    """The method whose shells read manifest entries of ``kind``."""
    _ensure_builtins()
    for m in _METHODS.values():
        if kind in m.entry_kinds:
            return m
    return None
