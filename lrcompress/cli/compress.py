"""CLI: compress and inspect."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import Any

import click

from ..errors import ConfigError
from ..methods import registry
from ..paths import atomic_file
from .common import (
    apply_options,
    calib_options,
    check_device,
    check_paths,
    cli,
    fit_max_length,
    is_writer,
    need_matplotlib,
    parse_budget,
    parse_number,
    parse_rank,
    parse_tt_shape,
    progress_bar,
    show_progress,
    source_options,
)
from .recovery import (
    finish_recovery,
    recover_options,
    recovery_config,
    run_recovery,
    state_file_for,
)


@cli.command()
@click.argument("source")
@click.option("-o", "--output", "output", type=str, default=None, help="Output folder (required unless --dry-run).")
@apply_options(source_options + calib_options)
@click.option("--method", type=str, default=None,
              help="A registered method (see: lrcompress methods); default: the whitened matrix method "
                   "with --calib, else plain SVD.")
@click.option("--rank", type=str, default=None,
              help="Exact rank for every target layer (tucker: N or R_OUT,R_IN; cp: CP rank; tt: largest TT bond).")
@click.option("--ratio", type=str, default=None, help="Fraction of parameters to keep, in (0, 1].")
@click.option("--energy", type=str, default=None, help="Fraction of (whitened) spectral energy to keep per layer.")
@click.option("--budget", type=str, default=None,
              help="latency=F: reach F x the original's ONNX Runtime latency (1 thread, batch 1, --max-length "
                   "tokens); layers not faster factorized stay dense. bytes=F: ship F x the float32 bytes, choosing "
                   "per layer among dense, int8, int4, int4 + low-rank correction and quantized low rank. "
                   "ratio=F / energy=F / rank=N also accepted.")
@click.option("--block-size", type=int, default=128, show_default=True,
              help="--budget bytes: weights per int4 scale, a power of two >= 16 (a layer whose inputs it does not "
                   "divide takes the largest smaller one that does).")
@click.option("--quantize-algorithm", type=str, default="gptq", show_default=True,
              help="--budget bytes: gptq (data-aware, uses --calib) | rtn (round to nearest) for int4/int8 weights.")
@click.option("--asymmetric", is_flag=True, help="--budget bytes: int4/int8 with a zero point per block.")
@click.option("--latency-threads", type=int, default=1, show_default=True, help="Threads for --budget latency.")
@click.option("--latency-int8", is_flag=True, help="--budget latency: plan for the int8-quantized export.")
@click.option("--allocate", type=str, default="global", show_default=True, help="uniform | global (with --ratio).")
@click.option("--scope", type=str, default="targets", show_default=True,
              help="--ratio counts the targeted layers' params (targets) or the whole model's (model).")
@click.option("--share-group", type=int, default=None,
              help="--method shared-svd: layers of one role in K consecutive blocks share a basis (default 2).")
@click.option("--tt-shape", type=str, default=None,
              help="--method tt: explicit modes OUT:IN, e.g. 8x12x16:8x8x6 (default: balanced, automatic).")
@click.option("--probe-passes", type=int, default=2, show_default=True,
              help="Global allocation: rounds of measured layer sensitivity (0 = off).")
@click.option("--solver", type=str, default="exact", show_default=True, help="exact | randomized SVD.")
@click.option("--calibration", "calibration_mode", type=str, default="auto", show_default=True,
              help="auto | open | closed: closed fits each layer, block by block, to the original outputs from the inputs "
                   "the compressed model gives it.")
@click.option("--closed-blend", type=str, default="0.75", show_default=True,
              help="--calibration closed: weight in [0, 1] of the open-loop error in each layer's fit.")
@click.option("--closed-ridge", type=str, default="1e-4", show_default=True,
              help="--calibration closed: ridge relative to the mean input energy.")
@click.option("--blocks", type=str, default=None,
              help="The model's block list (module-list name or pattern; found when not given).")
@click.option("--stream", is_flag=True,
              help="Compress a Hugging Face folder one block at a time, never holding the whole model; "
                   "writes a sharded checkpoint and resumes an interrupted run.")
@click.option("--max-memory", type=str, default=None,
              help="--stream: memory limit such as 8G; refused up front with the estimate when too low.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=str, default="cpu", show_default=True, help="cpu | cuda")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--recover-steps", type=int, default=0, show_default=True,
              help="Recovery (distillation against the original) steps after factorizing; 0 = none.")
@click.option("--recover-data", type=str, default=None, help="Recovery training data (default: --calib).")
@click.option("--recover-batch-size", type=int, default=16, show_default=True)
@apply_options(recover_options)
@click.option("--save-recipe", type=str, default=None,
              help="Write the equivalent recipe (lrcompress run FILE reproduces this run).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no table.")
def compress(source: str, output: str | None, weights: str | None, trust_pickle: bool, trust_code: bool,
             calib: str | None,
             max_length: int, calib_samples: int | None, batch_size: int, targets: tuple, exclude: tuple,
             method: str | None, rank: str | None, ratio: str | None, energy: str | None, budget: str | None,
             latency_threads: int, latency_int8: bool, save_recipe: str | None, allocate: str,
             scope: str, share_group: int | None, tt_shape: str | None, probe_passes: int, solver: str, seed: int,
             calibration_mode: str, closed_blend: str, closed_ridge: str, blocks: str | None, stream: bool,
             max_memory: str | None, device: str, dry_run: bool, recover_steps: int, recover_data: str | None, recover_batch_size: int,
             overwrite: bool, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Factorize SOURCE's Linear/Embedding layers and write a compressed checkpoint
    (optionally followed by LoRA residual recovery, --recover-steps)."""
    import torch

    from ..config import CompressConfig, method_config
    from ..io.checkpoint import check_output, save
    from ..io.data import open_data
    from ..io.sources import resolve
    from ..planning.make_plan import plan_table
    from ..workflow.pipeline import Job, plan, run

    method = method or registry.matrix_method(bool(calib)).name
    extra: dict[str, Any] = {}
    for flag, field_name, value in (("--tt-shape", "tt_shape", parse_tt_shape(tt_shape) if tt_shape is not None else None),
                                    ("--share-group", "share_group", share_group)):
        if value is None:
            continue
        owners = [m.name for m in registry.methods() if field_name in {f.name for f in fields(m.config) if f.init}]
        if method not in owners:
            raise ConfigError(f"{flag} is only for --method {' or '.join(owners)} (got --method {method}); drop it "
                              f"or use --method {owners[0]}")
        extra[field_name] = value
    if max_length < 1:
        raise ConfigError(f"--max-length {max_length} must be >= 1; e.g. --max-length 128")
    budgets = {"rank": parse_rank(rank), "ratio": parse_number("--ratio", ratio, float),
               "energy": parse_number("--energy", energy, float)}
    if budget is not None:
        kind, value = parse_budget(budget)
        if budgets.get(kind) is not None or any(v is not None for v in budgets.values()):
            given = [f"--{k}" for k, v in budgets.items() if v is not None]
            raise ConfigError(f"--budget {budget} contradicts {', '.join(given)}; give one budget")
        budgets[kind] = value
    if budgets.get("bytes") is not None and not calib:
        raise ConfigError(f"--budget bytes={budgets['bytes']} weighs each layer's choices on calibration outputs; "
                          "pass --calib FILE")
    config = CompressConfig(
        method=method_config(method, solver=solver, **extra), **budgets,
        allocate=allocate, scope=scope, targets=targets, exclude=exclude, seed=seed,
        probe_passes=probe_passes, latency_threads=latency_threads, latency_seq=max_length,
        latency_int8=latency_int8, calibration=calibration_mode, blocks=blocks,
        closed_blend=parse_number("--closed-blend", closed_blend, float),
        closed_ridge=parse_number("--closed-ridge", closed_ridge, float), block_size=kw.pop("block_size"),
        quant_algorithm=kw.pop("quantize_algorithm"), symmetric=not kw.pop("asymmetric"))
    if config.bytes is not None:
        for flag, on in (("--stream", stream or max_memory is not None), ("--recover-steps", recover_steps > 0),
                         ("--dry-run", dry_run)):
            if on:
                raise ConfigError(f"{flag} does not work with --budget bytes (recovery would move weights off their "
                                  "integer grids; streaming and dry runs plan by parameters); drop it")
    if registry.get(method).needs_calibration and not calib:
        raise ConfigError(f"--method {method} needs calibration data; pass --calib FILE or use --method "
                          f"{registry.matrix_method(False).name}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 32")
    device = check_device(device)
    if recover_steps < 0:
        raise ConfigError(f"--recover-steps {recover_steps} must be >= 0 (0 = no recovery); e.g. --recover-steps 300")
    rc = recovery_config(recover_steps, kw, recover_batch_size, max_length, seed) if recover_steps else None
    if rc is not None and not (calib or recover_data):
        raise ConfigError("--recover-steps needs training text; pass --calib FILE or --recover-data FILE")
    if kw.get("plot_file") and rc is None:
        raise ConfigError("--plot draws the recovery curve and needs --recover-steps N; drop --plot or add "
                          "--recover-steps")
    if kw.get("plot_file"):
        need_matplotlib("--plot")
    if not dry_run and output is None:
        raise ConfigError("no output folder given; pass -o OUT (or --dry-run to only print the plan)")
    state = state_file_for(output, kw.get("state_file")) if rc is not None and output else None
    check_paths(inputs=[weights, calib, recover_data, kw.get("eval_data")],
                sources=[source], folders={"-o": None if dry_run else output},
                files={"--save-recipe": save_recipe}, plots={"--plot": kw.get("plot_file")},
                others={"--state": state}, overwrite=overwrite)
    if not dry_run:
        check_output(output, overwrite)
    recipe = None
    if save_recipe is not None:
        from ..workflow.recipe import DataSection, Recipe, RecoverySection
        from ..workflow.recipe_write import section_from_config
        recipe = Recipe(source, weights, DataSection(calib=calib, max_length=max_length, calib_samples=calib_samples,
                                                     batch_size=batch_size),
                        section_from_config(config, device),
                        RecoverySection(rc, recover_data, kw.get("eval_data")) if rc is not None else None)
    torch.manual_seed(seed)
    if stream or max_memory is not None:
        from .stream import run_stream
        run_stream(source, output, config, calib=calib, weights=weights, rc=rc, dry_run=dry_run, max_memory=max_memory,
                   max_length=max_length, calib_samples=calib_samples, batch_size=batch_size, device=device,
                   overwrite=overwrite, as_json=as_json, quiet=quiet)
        return
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    fitted = fit_max_length(loaded.model, max_length)
    if fitted != max_length:  # the default, lowered to a small model's positions
        max_length = fitted
        config = replace(config, latency_seq=max_length)
        rc = replace(rc, max_length=max_length) if rc is not None else None
    data = open_data(calib, loaded.tokenizer, max_length, calib_samples) if calib else None
    show = show_progress(quiet, as_json)
    if dry_run:
        p = plan(loaded.model, config, data, batch_size=batch_size)
        click.echo(json.dumps(p.to_dict(), indent=2) if as_json else plan_table(p))
        return
    model = loaded.model.to(device)
    train = open_data(recover_data, loaded.tokenizer, max_length) if rc is not None and recover_data else None
    bars: dict[str, Any] = {}

    def close_bars() -> None:
        for b in bars.values():
            b.close()

    def progress(stage: str, x: Any) -> None:
        if stage not in bars:
            for b in bars.values():
                b.close()
            total = len(data) if stage == "calibrate" and data is not None else None
            bars[stage] = progress_bar(total, stage, show)
        bars[stage].update(x if isinstance(x, int) else 1)

    def recover_with(student: Any, teacher: Any, train_data: Any, config: Any, stats: Any) -> Any:
        close_bars()
        return run_recovery(student, teacher, config, train_data, kw.get("eval_data"), loaded.tokenizer, stats,
                            device, state, kw.get("resume", False), show)

    try:
        model, report, rep = run(model, Job([config], rc), data, in_place=True, recovery_data=train,
                                 recover_with=recover_with, batch_size=batch_size, device=device, progress=progress)
    finally:
        close_bars()
    report.source, report.output = source, output
    if not is_writer():
        return
    extra = {"report.json": report.to_json() + "\n"}
    if rep is not None:
        extra["recovery.json"] = rep.to_json() + "\n"
    save(model.cpu(), output, loaded.spec, plan=report.plan, side_files=loaded.side_files,
         extra_files=extra, overwrite=overwrite, grids=report.quant.grids if report.quant is not None else None)
    if rep is not None:
        finish_recovery(rep, state, kw.get("plot_file"))
    if recipe is not None:
        from ..workflow.recipe_write import write_recipe
        write_recipe(recipe, save_recipe)
    if as_json:
        click.echo(report.to_json())
    elif not quiet:
        click.echo(report.table())
        if rep is not None:
            click.echo(rep.table())
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("source")
@apply_options(source_options + calib_options)
@click.option("--ratio", type=str, default="0.5", show_default=True, help="Show the uniform rank this ratio gives.")
@click.option("--plot", type=str, default=None, help="Write normalized spectra to this PNG (needs matplotlib).")
@click.option("--suggest-recipe", type=str, default=None,
              help="Write a recipe with the per-layer ranks the global allocation picks at --ratio (needs --calib; "
                   "'-' prints it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot / --suggest-recipe file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True)
def inspect(source: str, weights: str | None, trust_pickle: bool, trust_code: bool, calib: str | None,
            max_length: int, calib_samples: int | None, batch_size: int, targets: tuple, exclude: tuple, ratio: str,
            plot: str | None, suggest_recipe: str | None, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Per layer: shape, params, break-even rank, ranks for 90/99 % energy, rank at --ratio;
    --suggest-recipe writes those ranks as a recipe."""
    from ..calibration.calibrate import calibrate
    from ..config import CompressConfig
    from ..io.data import open_data
    from ..io.sources import resolve
    from ..methods.kinds import LAYER_KINDS
    from ..planning.inspection import inspect as run_inspect
    from ..planning.targets import select_targets

    r = parse_number("--ratio", ratio, float)
    CompressConfig(ratio=r, targets=targets, exclude=exclude)  # validates ratio and patterns' syntax
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 32")
    if plot is not None:
        need_matplotlib("--plot")
    if suggest_recipe is not None and not calib:
        raise ConfigError("--suggest-recipe needs --calib FILE: the ranks come from the whitened spectra and "
                          "measured sensitivities")
    check_paths(inputs=[weights, calib], sources=[source], files={"--suggest-recipe": suggest_recipe},
                plots={"--plot": plot}, overwrite=overwrite)
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    stats = None
    if calib:
        data = open_data(calib, loaded.tokenizer, fit_max_length(loaded.model, max_length), calib_samples)
        names = select_targets(loaded.model, targets, exclude, kinds=LAYER_KINDS)
        stats = calibrate(loaded.model, data.batches(batch_size), names)
    rep = run_inspect(loaded.model, stats, ratio=r, targets=targets, exclude=exclude)
    if plot is not None:
        with atomic_file(plot) as tmp:
            rep.plot(tmp)
    if suggest_recipe is not None:
        from ..workflow.pipeline import plan
        from ..workflow.recipe_write import suggest_recipe as suggest
        from ..workflow.recipe_write import write_recipe
        p = plan(loaded.model, CompressConfig(ratio=r, targets=targets, exclude=exclude), data, batch_size=batch_size)
        suggestion = suggest(source, weights, calib, max_length, calib_samples, batch_size, p)
        if suggest_recipe == "-":
            from ..workflow.recipe_write import dump_recipe
            click.echo(dump_recipe(suggestion), nl=False)
            return
        write_recipe(suggestion, suggest_recipe)
    if as_json:
        click.echo(rep.to_json())
    elif not quiet:
        click.echo(rep.table())
        if plot:
            click.echo(f"wrote {plot}")
        if suggest_recipe:
            click.echo(f"wrote {suggest_recipe} (lrcompress run {suggest_recipe} -o OUT)")


@cli.command("methods")
def methods_command() -> None:
    """List the registered factorization methods: name, default layer kinds, summary."""
    for m in registry.methods():
        click.echo(f"{m.name:12} {','.join(m.kinds):34} {m.summary}")
