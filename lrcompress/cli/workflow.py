"""CLI: run (a recipe, end to end) and sweep (ratios x methods x quantization, Pareto front)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import ConfigError
from ..methods import registry
from .common import (
    apply_options,
    calib_options,
    check_paths,
    cli,
    need_matplotlib,
    source_options,
)


@cli.command()
@click.argument("recipe_file", metavar="RECIPE")
@click.option("-o", "--output", "output", required=True, help="Output folder (model/, export/, report.json, report.md).")
@click.option("--save-recipe", type=str, default=None, help="Also write the recipe as canonical TOML to this file.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder (and an existing --save-recipe).")
@click.option("--trust-code", is_flag=True, help="Allow a recipe whose source is factory code to run that code.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of report.md.")
@click.option("-q", "--quiet", is_flag=True)
def run(recipe_file: str, output: str, save_recipe: str | None, overwrite: bool, trust_code: bool, as_json: bool,
        quiet: bool) -> None:
    """Compress -> recover -> export -> validate as RECIPE (TOML) says; exit 1 if a gate fails."""
    from ..workflow.recipe import load_recipe
    from ..workflow.recipe_write import write_recipe
    from ..workflow.runner import markdown, recipe_inputs, run_recipe

    recipe = load_recipe(recipe_file)
    check_paths(inputs=[recipe_file, *recipe_inputs(recipe)], sources=[recipe.source_path()],
                folders={"-o": output}, files={"--save-recipe": save_recipe}, overwrite=overwrite)

    def say(stage: str, msg: str) -> None:
        if not quiet and not as_json:
            click.echo(f"[{stage}] {msg}", err=True)

    report = run_recipe(recipe, output, overwrite=overwrite, trust_code=trust_code, progress=say)
    if save_recipe:
        write_recipe(recipe, save_recipe)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif not quiet:
        click.echo(markdown(report))
        click.echo(f"wrote {output}")
    if report["exit_code"]:
        failed = [g for g in report["validation"]["gates"] if g["status"] == "failed"]
        click.echo("lrcompress: gates failed: " + "; ".join(
            f"{g['gate']} {g['value']:.5g} vs limit {g['limit']:g}" for g in failed), err=True)
        sys.exit(report["exit_code"])


@cli.command()
@click.argument("source")
@apply_options(source_options + calib_options)
@click.option("--ratios", type=str, required=True, help="Fractions of the model's params to keep, e.g. 0.9,0.75,0.5.")
@click.option("--methods", type=str, default=registry.DEFAULT, show_default=True,
              help="Comma-separated registered methods.")
@click.option("--quantize", type=str, default="none", show_default=True, help="Comma-separated: none,int8,int4.")
@click.option("--bytes", "bytes_list", type=str, default=None,
              help="Also --budget bytes=F points (int4/int8/corrected per layer), e.g. 0.12,0.15 (needs --calib).")
@click.option("--data", "data_path", required=True, help="Held-out data for drift (text or tensors).")
@click.option("--samples", type=int, default=None, help="Use only the first N held-out examples.")
@click.option("--threads", type=int, default=1, show_default=True, help="ONNX Runtime threads for latency.")
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs per point (batch 1).")
@click.option("--plot", type=str, default=None, help="Write the Pareto plot (size vs drift, latency as colour).")
@click.option("--json", "json_file", type=str, default=None, help="Also write the points as JSON to this file.")
@click.option("--keep", type=str, default=None, help="Keep the exported .onnx of every point in this new folder.")
@click.option("--overwrite", is_flag=True, help="Replace existing --plot / --json files and a non-empty --keep folder.")
@click.option("-q", "--quiet", is_flag=True)
def sweep(source: str, weights: str | None, trust_pickle: bool, trust_code: bool, calib: str | None, max_length: int,
          calib_samples: int | None, batch_size: int, targets: tuple, exclude: tuple, ratios: str, methods: str,
          quantize: str, bytes_list: str | None, data_path: str, samples: int | None, threads: int, runs: int,
          plot: str | None, json_file: str | None, keep: str | None, overwrite: bool, quiet: bool) -> None:
    """Compress SOURCE at each ratio x method, export to ONNX (x quantization), validate on
    ONNX Runtime; print params, bytes, latency, drift and the Pareto-optimal points."""
    from ..workflow.sweep import check_bytes, check_sweep, run_sweep, sweep_table

    ratio_list, method_list, quant_list = check_sweep(ratios, methods, quantize)
    fractions = check_bytes(bytes_list)
    if fractions and not calib:
        raise ConfigError("--bytes points weigh their choices on calibration data; pass --calib FILE or drop --bytes")
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1; e.g. --threads 1")
    if runs < 1:
        raise ConfigError(f"--runs {runs} must be >= 1; e.g. --runs 30")
    plain = registry.matrix_method(False).name
    if any(registry.get(m).whitened or registry.get(m).needs_calibration for m in method_list) and not calib:
        raise ConfigError(f"--methods {methods} needs calibration data; pass --calib FILE (or --methods {plain})")
    if plot is not None:
        need_matplotlib("--plot")
    check_paths(inputs=[weights, calib, data_path], sources=[source], folders={"--keep": keep},
                files={"--json": json_file}, plots={"--plot": plot}, overwrite=overwrite)
    if keep is not None:
        from ..paths import check_output
        check_output(keep, overwrite, flag="--keep")
    from ..io.data import open_data
    from ..io.sources import resolve
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    cal = open_data(calib, loaded.tokenizer, max_length, calib_samples) if calib else None
    held = open_data(data_path, loaded.tokenizer, max_length, samples)

    def say(msg: str) -> None:
        if not quiet:
            click.echo(msg, err=True)

    points = run_sweep(loaded, cal, held, ratio_list, method_list, quant_list, fractions=fractions, targets=targets,
                       exclude=exclude, batch_size=batch_size, max_length=max_length, threads=threads, runs=runs, keep=keep,
                       progress=say)
    from ..paths import atomic_file, write_text
    if json_file is not None:
        write_text(json_file, json.dumps(points, indent=2) + "\n")
    if plot is not None:
        from ..workflow.sweep import pareto_plot
        with atomic_file(plot) as tmp:
            pareto_plot(points, tmp, title=source)
    if not quiet:
        click.echo(sweep_table(points))
        if plot:
            click.echo(f"wrote {plot}")

