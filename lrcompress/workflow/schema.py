"""Recipe tables generated from the dataclasses they build: each field's TOML type and an
example for error messages come from its type hint, default or ``metadata["example"]``, so a
recipe key cannot drift from the Python config it sets. Also the TOML spelling of values."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Any

Spec = dict[str, tuple[type, str]]
_GENERIC = {int: "1", float: "0.5", str: "'...'", bool: "true", list: "['...']"}


def toml_value(v: Any) -> str:
    """``v`` as TOML (tuples as arrays)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def toml_kind(hint: Any) -> type | None:
    """The TOML type of a field's type hint (None for types a recipe does not spell)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return toml_kind(args[0]) if len(args) == 1 else None
    if typing.get_origin(hint) in (tuple, list) or hint in (tuple, list):
        return list
    return hint if hint in (bool, int, float, str) else None


def _example(f: Field, kind: type) -> str:
    if "example" in f.metadata:
        return str(f.metadata["example"])
    default = f.default if f.default is not MISSING else (
        f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
    if default is None or default == () or default == []:
        return _GENERIC[kind]
    text = toml_value(default)
    return text.replace('"', "'")


def spec_of(cls: type, skip: tuple[str, ...] = ()) -> Spec:
    """key -> (TOML type, example) for every init field of dataclass ``cls`` not in ``skip``."""
    hints = typing.get_type_hints(cls)
    out: Spec = {}
    for f in fields(cls):
        if not f.init or f.name in skip:
            continue
        kind = toml_kind(hints[f.name])
        if kind is not None:
            out[f.name] = (kind, _example(f, kind))
    return out
