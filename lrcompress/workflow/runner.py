"""``lrcompress run RECIPE``: compress -> recover -> export -> validate into one folder with
``report.json`` and ``report.md``; the exit code follows the validation gates."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from ..edge.artifacts import example_inputs, export_all
from ..edge.validate import validate
from ..errors import ConfigError
from ..io.checkpoint import atomic_folder, check_output, save
from ..io.data import open_data
from ..io.sources import resolve
from ..methods import registry
from ..quant.store import export_table
from ..recovery.train import recover
from .pipeline import run
from .recipe import ExportSection, Recipe, ValidateSection
from .recipe_write import dump_recipe, write_recipe
from .rules import assign, recipe_job

Progress = Callable[[str, str], None]


def _data_file(recipe: Recipe, key: str, value: str | None) -> str | None:
    p = recipe.path(value)
    if p is not None and not Path(p).is_file():
        raise ConfigError(f"recipe {key} = {value!r} does not exist (looked for {p!r}; paths are relative to the "
                          "recipe's folder); fix the path")
    return p


def candidate_path(folder: Path, v: ValidateSection, e: ExportSection | None) -> Path:
    """The artifact that [validate] checks inside a run folder."""
    if v.artifact == "model":
        return folder / "model"
    if v.artifact == "ort":
        return folder / "export" / "model.ort"
    if v.artifact == "coreml":
        return folder / "export" / "model.mlpackage"
    quant = e.quantize if e is not None and e.quantize in ("int8", "int4") else None
    return folder / "export" / (f"model.{quant}.onnx" if quant else "model.onnx")


def recipe_inputs(recipe: Recipe) -> list[str]:
    """The files a recipe reads (weights and data; the source separately), as usable paths."""
    rec = recipe.recovery
    paths = [recipe.path(recipe.weights), recipe.path(recipe.data.calib), recipe.path(recipe.data.eval),
             recipe.path(rec.data) if rec else None, recipe.path(rec.eval_data) if rec else None]
    return [p for p in paths if p]


def is_code_source(source: str) -> bool:
    """Whether a source spec names code to import (``package.module:factory``, ``file.py:factory``)."""
    import os
    return ":" in source and not source.startswith(("torchvision:", "timm:")) and not os.path.exists(source)


def run_recipe(recipe: Recipe, out: str | Path, *, overwrite: bool = False, trust_code: bool = False,
               progress: Progress | None = None) -> dict[str, Any]:
    """Run every stage the recipe names; returns the report (``exit_code`` 0, or 1 on failed gates).
    A recipe whose source is factory code runs it only with ``trust_code``."""
    import torch


    say = progress or (lambda stage, msg: None)
    source = recipe.source_path()
    if is_code_source(source) and not trust_code:
        raise ConfigError(f"the recipe's source {recipe.source!r} is code that running the recipe would import and "
                          "call; nothing was run: pass --trust-code (trust_code=True) if you trust the recipe")
    check_output(out, overwrite)
    calib_path = _data_file(recipe, "[data].calib", recipe.data.calib)
    eval_path = _data_file(recipe, "[data].eval", recipe.data.eval)
    rec = recipe.recovery
    train_path = _data_file(recipe, "[recovery].data", rec.data) if rec else None
    rec_eval_path = _data_file(recipe, "[recovery].eval_data", rec.eval_data) if rec else None
    if recipe.compress is not None and registry.get(recipe.compress.method).needs_calibration \
            and calib_path is None and not recipe.compress.rules:
        raise ConfigError(f"recipe [compress] method {recipe.compress.method} needs calibration data; set [data].calib "
                          f"= 'FILE' or method = '{registry.matrix_method(False).name}'")
    if rec is not None and recipe.compress is None:
        raise ConfigError("recipe [recovery] needs a [compress] section (it recovers the compressed model)")
    if rec is not None and not (train_path or calib_path):
        raise ConfigError("recipe [recovery] needs training text; set [recovery].data or [data].calib")
    seed = recipe.compress.seed if recipe.compress else 0
    torch.manual_seed(seed)
    loaded = resolve(source, weights=recipe.path(recipe.weights), trust_code=trust_code)
    d = recipe.data
    calib = open_data(calib_path, loaded.tokenizer, d.max_length, d.calib_samples) if calib_path else None
    held = open_data(eval_path, loaded.tokenizer, d.max_length, d.eval_samples) if eval_path else None
    assigned = None
    if recipe.compress is not None and recipe.compress.rules:
        assigned = assign(loaded.model, recipe.compress)  # rule errors before any stage starts
    report: dict[str, Any] = {"recipe": _recipe_dict(recipe), "source": recipe.source}
    t_all = time.perf_counter()
    model = loaded.model
    with atomic_folder(out, overwrite) as tmp:
        student = model
        if recipe.compress is not None:
            say("compress", "calibrate, plan, factorize")
            train = open_data(train_path, loaded.tokenizer, rec.config.max_length) if rec and train_path else None
            rev = open_data(rec_eval_path, loaded.tokenizer, rec.config.max_length) if rec and rec_eval_path else None

            def recover_with(student: Any, teacher: Any, data: Any, config: Any, stats: Any) -> Any:
                say("recover", f"{config.steps} steps")
                return recover(student, teacher, data, config, eval_data=rev, calibration=stats,
                               device=recipe.compress.device)

            job = recipe_job(model, recipe.compress, rec.config if rec else None, assigned)
            student, crep, rrep = run(model, job, calib, recovery_data=train, batch_size=d.batch_size,
                                      device=recipe.compress.device, recover_with=recover_with)
            crep.source, crep.output = recipe.source, str(Path(out) / "model")
            extra: dict[str, str] = {}
            if rrep is not None:
                extra["recovery.json"] = rrep.to_json() + "\n"
            extra["report.json"] = crep.to_json() + "\n"
            student = student.cpu()
            grids = crep.quant.grids if crep.quant is not None else None
            save(student, tmp / "model", loaded.spec, plan=crep.plan, side_files=loaded.side_files, extra_files=extra,
                 grids=grids)
            report["compression"] = crep.to_dict()
        if recipe.export is not None:
            e = recipe.export
            say("export", ", ".join(e.to))
            inputs = example_inputs(loaded.tokenizer, None if loaded.tokenizer else (calib_path or eval_path),
                                    max_length=d.max_length)
            quantize = None if e.quantize == "none" else e.quantize
            table = None
            if recipe.compress is not None and crep.quant is not None:  # a byte budget: its own int4/int8 choices
                if quantize not in (None, "int4"):
                    raise ConfigError(f"recipe [export].quantize = {e.quantize!r} does not apply to a bytes budget, "
                                      "which chose int4/int8 per layer; use quantize = \"int4\"")
                quantize, table = "int4", export_table(crep.quant.grids)
            rows = export_all(student, inputs,
                              tmp / "export", list(e.to), fp16=e.fp16, fp32=e.precision == "fp32",
                              quantize=quantize, opset=e.opset, table=table)
            for r in rows:
                r["path"] = str(Path(out) / "export" / Path(r["path"]).name)
            report["export"] = rows
        exit_code = 0
        if recipe.validate is not None:
            v = recipe.validate
            cand = candidate_path(tmp, v, recipe.export)
            say("validate", f"{cand.name} on {eval_path}")
            vrep = validate(str(cand), model, recipe.source, held, runtime=None if v.artifact != "model" else "torch",
                            threads=v.threads, batch_size=v.batch_size, max_length=d.max_length, runs=v.runs,
                            gates=v.gates, trust_code=trust_code)
            vrep.candidate = str(Path(out) / cand.relative_to(tmp))
            report["validation"] = vrep.to_dict()
            exit_code = 1 if vrep.failed else 0
        report["seconds"] = round(time.perf_counter() - t_all, 2)
        report["exit_code"] = exit_code
        write_recipe(recipe.resolved(), tmp / "recipe.toml")  # paths relative to the output folder
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(markdown(report))
    return report


def _recipe_dict(recipe: Recipe) -> dict[str, Any]:
    import tomllib
    return tomllib.loads(dump_recipe(recipe))


def markdown(report: dict[str, Any]) -> str:
    """The run report as Markdown: totals, artifacts, drift, latency, gates."""
    lines = [f"# lrcompress run: {report['source']}", ""]
    c = report.get("compression")
    if c:
        t = c["totals"]
        lines += ["## Compression", "", "| params before | params after | kept | factorized layers | dense layers |",
                  "|---|---|---|---|---|",
                  f"| {t['params_before']:,} | {t['params_after']:,} | {t['ratio']:.1%} | {t['factorized_layers']} | "
                  f"{t['dense_layers']} |", ""]
        r = c.get("recovery")
        if r:
            lines += [f"Recovery: {r['steps']} steps, held-out cosine {r['before'].get('cos_mean', float('nan')):.4f}"
                      f" -> {r['after_fold'].get('cos_mean', float('nan')):.4f}", ""]
    if report.get("export"):
        lines += ["## Artifacts", "", "| target | MB | seconds | path |", "|---|---|---|---|"]
        lines += [f"| {r['target']} | {r['bytes'] / 1e6:.2f} | {r['seconds']:.1f} | {r['path']} |"
                  for r in report["export"]]
        lines.append("")
    v = report.get("validation")
    if v:
        lines += ["## Validation", "", f"Candidate `{v['candidate']}` vs `{v['reference']}` on {v['runtime']}: "
                  f"**{v['status']}**", ""]
        if v.get("outputs"):
            lines += ["| output | cosine mean | cosine worst | max abs err | rel L2 | top-1 |", "|---|---|---|---|---|---|"]
            for name, o in v["outputs"].items():
                top1 = o.get("top1_agreement")
                lines.append(f"| {name} | {o['cos_mean']:.5f} | {o['cos_worst']:.5f} | {o['max_abs']:.4g} | "
                             f"{o['rel_l2']:.4g} | {'-' if top1 is None else f'{top1:.4f}'} |")
            lines.append("")
        lat = v.get("latency") or {}
        if all(isinstance(lat.get(w), dict) and "p50_ms" in lat[w] for w in ("reference", "candidate")):
            lines += ["| latency (ms) | p50 | p90 | p99 |", "|---|---|---|---|"]
            for who in ("reference", "candidate"):
                x = lat[who]
                lines.append(f"| {who} | {x['p50_ms']:.2f} | {x['p90_ms']:.2f} | {x['p99_ms']:.2f} |")
            lines.append("")
        if v.get("gates"):
            lines += ["| gate | limit | value | status |", "|---|---|---|---|"]
            lines += [f"| {g['gate']} | {g['limit']:g} | {'-' if g['value'] is None else format(g['value'], '.5g')} | "
                      f"{g['status']} |" for g in v["gates"]]
            lines.append("")
    lines.append(f"Exit code {report.get('exit_code', 0)}; {report.get('seconds', 0):.1f} s.")
    return "\n".join(lines) + "\n"
