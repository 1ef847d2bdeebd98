"""Writing recipes: canonical TOML (every setting spelled out), recipe files with paths relative
to their folder, the recipe equivalent to a CLI compress run, and a suggested per-layer recipe."""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ..methods.kinds import MATRIX_KINDS
from ..paths import check_output_file, write_text
from .recipe import CompressSection, DataSection, Recipe, Rule
from .schema import toml_value


def _table(name: str | None, items: dict[str, Any]) -> list[str]:
    lines = [f"[{name}]"] if name else []
    lines += [f"{k} = {toml_value(v)}" for k, v in items.items() if v is not None]
    return lines


def _rel(p: str | None, base: str) -> str | None:
    """A path relative to the recipe's folder (kept as is when it is not a file or folder here)."""
    if p is None or not os.path.exists(p):
        return p
    return os.path.relpath(os.path.abspath(p), os.path.abspath(base))


def dump_recipe(r: Recipe) -> str:
    """The canonical TOML text of a recipe: every setting spelled out, defaults included."""
    out = ["# lrcompress recipe: lrcompress run THIS_FILE -o OUT", *_table(None, {"source": r.source,
                                                                                  "weights": r.weights})]
    out += ["", *_table("data", {f.name: getattr(r.data, f.name) for f in fields(r.data)})]
    if r.compress is not None:
        c = r.compress
        d = {"method": c.method, **{f.name: getattr(c.config, f.name) for f in fields(c.config) if f.name != "method"},
             "device": c.device, **{k: v for k, v in c.config.method.to_dict().items() if k != "name"}}
        out += ["", *_table("compress", d)]
        for rule in c.rules:
            out += ["", *_table("[compress.rules]", {f.name: getattr(rule, f.name) for f in fields(rule)
                                                     if f.name != "dense" or rule.dense})]
    if r.recovery is not None:
        d = r.recovery.config.to_dict()
        d.update({"data": r.recovery.data, "eval_data": r.recovery.eval_data})
        if d.get("warmup") is None:
            d.pop("warmup")
        out += ["", *_table("recovery", d)]
    if r.export is not None:
        out += ["", *_table("export", {f.name: getattr(r.export, f.name) for f in fields(r.export)})]
    if r.validate is not None:
        out += ["", *_table("validate", {f.name: getattr(r.validate, f.name) for f in fields(r.validate)})]
    return "\n".join(out) + "\n"


def write_recipe(r: Recipe, path: str | os.PathLike[str]) -> Path:
    """Write ``r`` with its paths made relative to ``path``'s folder; atomic."""
    p = check_output_file("recipe", path, overwrite=True)
    base = str(p.parent)
    rel = lambda s: _rel(s, base)  # noqa: E731
    src = r.source
    if ":" in src and src.rpartition(":")[0].endswith(".py"):
        file, _, fn = src.rpartition(":")
        src = f"{rel(file)}:{fn}"
    elif src != "minilm":
        src = rel(src) or src
    rec = r.recovery
    if rec is not None:
        rec = replace(rec, data=rel(rec.data), eval_data=rel(rec.eval_data))
    text = dump_recipe(replace(r, source=src, weights=rel(r.weights), recovery=rec, base=base,
                               data=replace(r.data, calib=rel(r.data.calib), eval=rel(r.data.eval))))
    return write_text(p, text)


def section_from_config(config: Any, device: str = "cpu") -> CompressSection:
    """The [compress] section that rebuilds ``config`` exactly (every method option spelled out)."""
    return CompressSection(config, device=device)


def suggest_recipe(source: str, weights: str | None, calib: str, max_length: int, calib_samples: int | None,
                   batch_size: int, plan: Any) -> Recipe:
    """A recipe pinning ``plan``'s per-layer ranks (one exact-name rule per layer; dense layers
    as dense rules), so that it can be edited layer by layer and re-run."""
    rules = tuple(Rule(match=l.name, rank=l.rank) if l.rank is not None else Rule(match=l.name, dense=True)
                  for l in plan.layers if l.kind in MATRIX_KINDS)
    section = replace(section_from_config(plan.config), rules=rules)
    return Recipe(source, weights, DataSection(calib=calib, max_length=max_length, calib_samples=calib_samples,
                                               batch_size=batch_size), section)
