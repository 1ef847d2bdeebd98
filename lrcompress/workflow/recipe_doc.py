"""The recipe reference (Markdown), generated from the recipe and config dataclasses so that the
README cannot drift from the code: ``python -m lrcompress.recipe_doc``."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from typing import Any

from ..config import CompressConfig, RecoveryConfig
from ..methods import registry
from .recipe import CompressSection, DataSection, ExportSection, Rule, ValidateSection

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def _default(f: Any) -> str:
    if f.default is not MISSING:
        v = f.default
    elif f.default_factory is not MISSING:  # type: ignore[misc]
        v = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(repr(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def _doc(cls: type) -> str:
    return " ".join(inspect.getdoc(cls).split()) if inspect.getdoc(cls) else ""


def _table(title: str, cls: type, skip: tuple[str, ...] = (), note: str | None = None) -> list[str]:
    lines = [f"#### {title}", "", note or _doc(cls), "", "| key | type | default |", "|---|---|---|"]
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = str(f.type).replace("|", "or")
        lines.append(f"| `{f.name}` | {kind} | `{_default(f)}` |")
    return lines + [""]


def reference() -> str:
    """The whole reference as Markdown."""
    out = ["Top level: `source` (required; a model folder, `minilm`, `torchvision:NAME`, `timm:NAME`, "
           "`package.module:factory` or `file.py:factory`) and `weights` (optional state dict). Relative paths are "
           "relative to the recipe's folder. Unknown keys are refused with the closest known one.", ""]
    out += _table("[data]", DataSection)
    compress = _table("[compress]", CompressConfig, skip=("method",), note=_doc(CompressSection))
    compress[6:6] = [f"| `method` | str (a registered method) | `{registry.DEFAULT!r}` |", "| `device` | str | `'cpu'` |"]
    out += compress
    out += ["Method options, in the same `[compress]` table, by `method`:", "", "| method | options (default) |",
            "|---|---|"]
    for name, cls in registry.configs().items():
        opts = ", ".join(f"`{f.name}` ({_default(f)})" for f in fields(cls) if f.init)
        out.append(f"| `{name}` | {opts or '-'} |")
    out.append("")
    out += _table("[[compress.rules]] (array; first match wins)", Rule)
    out += _table("[recovery]", RecoveryConfig, note=(
        "Recovery after compression (distillation against the original). `data` = training text "
        "(default: `[data].calib`), `eval_data` = early-stopping text (default: a share of `data`), plus:"))
    out += _table("[export]", ExportSection)
    out += _table("[validate]", ValidateSection)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
