"""CLI: export to edge formats and validate on the runtime."""

from __future__ import annotations

import json
import sys

import click

from ..errors import ConfigError
from .common import (
    apply_options,
    check_paths,
    StageBars,
    cli,
    fit_max_length,
    parse_number,
    show_progress,
    source_options,
)


@cli.command()
@click.argument("source")
@click.option("--to", "targets", multiple=True, help="onnx | ort | coreml (repeatable).")
@click.option("-o", "--output", "output", type=str, default=None,
              help="Output folder (default: SOURCE-export beside a folder source, else ./NAME-export).")
@click.option("--fp16", is_flag=True, help="ONNX/ORT weights in fp16 where safe (Core ML is fp16 by default).")
@click.option("--fp32", is_flag=True, help="Core ML in fp32 compute precision.")
@click.option("--quantize", type=str, default=None,
              help="int8 (dynamic, per channel) | int4 (MatMulNBits / GatherBlockQuantized blocks) weights of the ONNX "
                   "(and .ort); Core ML: coremltools int8 per channel / int4 per block. A --budget bytes checkpoint "
                   "exports its own int4/int8 choices (default int4).")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4: weights per scale.")
@click.option("--accuracy-level", type=int, default=4, show_default=True,
              help="int4 MatMulNBits: 4 = int8 activations (fast on CPU), 0 = float compute (exactly the codes).")
@click.option("--int4-algorithm", type=str, default="rtn", show_default=True, help="int4 of a plain model: rtn | hqq.")
@click.option("--asymmetric", is_flag=True, help="int4: zero points per block (default symmetric).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--inputs", "inputs_file", type=str, default=None,
              help="Example inputs (.npy/.npz/.safetensors) for models without a tokenizer.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens of the sample sentence.")
@apply_options(source_options)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True)
def export(source: str, targets: tuple, output: str | None, fp16: bool, fp32: bool, quantize: str | None,
           block_size: int, accuracy_level: int, int4_algorithm: str, asymmetric: bool, opset: int,
           inputs_file: str | None, max_length: int, weights: str | None, trust_pickle: bool, trust_code: bool,
           overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Export SOURCE (a compressed folder or any model source) to edge formats."""
    from pathlib import Path

    from ..edge.artifacts import example_inputs, export_all, export_table, target_names
    from ..quant.store import checkpoint_grids
    from ..io.checkpoint import check_output
    from ..io.sources import resolve

    if not targets:
        raise ConfigError(f"no --to target given; pass one or more of {', '.join(target_names())}, "
                          "e.g. --to onnx --to ort")
    if output is None:
        p = Path(source)
        output = str(p.parent / f"{p.name}-export") if p.exists() else f"{source.replace(':', '_').replace('/', '_')}-export"
    check_paths(inputs=[weights, inputs_file], sources=[source], folders={"-o": output})
    check_output(output, overwrite)
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    table = checkpoint_grids(source, loaded.model)
    if table is not None:
        if quantize not in (None, "int4"):
            raise ConfigError(f"--quantize {quantize} does not apply to {source!r}: its --budget bytes plan chose "
                              "int4/int8 per layer; export it with --quantize int4 (or leave --quantize out)")
        quantize = "int4"
    inputs = example_inputs(loaded.tokenizer, inputs_file, max_length=max_length)
    rows = export_all(loaded.model, inputs, output, list(targets), fp16=fp16, fp32=fp32, quantize=quantize,
                      opset=opset, overwrite=overwrite, block_size=block_size, accuracy_level=accuracy_level,
                      algorithm=int4_algorithm, symmetric=not asymmetric, table=table)
    if as_json:
        click.echo(json.dumps({"source": source, "output": output, "artifacts": rows}, indent=2, default=str))
    elif not quiet:
        click.echo(export_table(rows))
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("candidate")
@click.option("--reference", required=True, help="The original model (any compress SOURCE).")
@click.option("--data", "data_path", required=True, help="Real inputs: text (one example per line) or tensors.")
@click.option("--runtime", type=str, default=None,
              help="torch | onnxruntime | coreml (default: torch for folders, onnxruntime for .onnx/.ort).")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per example (latency batch is padded to it).")
@click.option("--samples", type=int, default=None, help="Use only the first N examples of --data.")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed latency runs (after 5 warm-up runs).")
@click.option("--time-budget", type=float, default=None, help="Stop timing after this many seconds (>= 1 run).")
@click.option("--max-cosine-drift", type=str, default=None, help="Gate: 1 - mean cosine per output.")
@click.option("--max-abs-error", type=str, default=None, help="Gate: max absolute error over real positions.")
@click.option("--min-top1-agreement", type=str, default=None, help="Gate: argmax agreement for logits.")
@click.option("--max-latency-ratio", type=str, default=None, help="Gate: candidate p50 / reference p50.")
@click.option("--max-size-ratio", type=str, default=None, help="Gate: candidate bytes / reference bytes.")
@click.option("--max-ppl-ratio", type=str, default=None,
              help="Gate for causal LMs: candidate / reference perplexity on the --data text (tokenized once as one "
                   "stream; windows of the model's positions up to 1024, non-overlapping; see lrcompress eval).")
@apply_options(source_options)
@click.option("--json", "json_file", type=str, default=None, help="Also write the report as JSON to this file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
@click.option("-q", "--quiet", is_flag=True)
def validate(candidate: str, reference: str, data_path: str, runtime: str | None, threads: int, batch_size: int,
             max_length: int, samples: int | None, runs: int, time_budget: float | None, max_cosine_drift: str | None,
             max_abs_error: str | None, min_top1_agreement: str | None, max_latency_ratio: str | None,
             max_size_ratio: str | None, max_ppl_ratio: str | None, weights: str | None, trust_pickle: bool, trust_code: bool,
             json_file: str | None, overwrite: bool, quiet: bool) -> None:
    """Compare CANDIDATE with --reference on real data: drift, latency, size; exit 1 if a gate fails."""

    from ..edge.validate import check_gates, check_timing
    from ..edge.validate import validate as run_validate
    from ..io.data import open_data
    from ..io.sources import resolve
    from ..paths import write_text

    gates = check_gates({
        "max_cosine_drift": parse_number("--max-cosine-drift", max_cosine_drift, float),
        "max_abs_error": parse_number("--max-abs-error", max_abs_error, float),
        "min_top1_agreement": parse_number("--min-top1-agreement", min_top1_agreement, float),
        "max_latency_ratio": parse_number("--max-latency-ratio", max_latency_ratio, float),
        "max_size_ratio": parse_number("--max-size-ratio", max_size_ratio, float),
        "max_ppl_ratio": parse_number("--max-ppl-ratio", max_ppl_ratio, float)})
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1; e.g. --threads 1")
    check_timing(runs, time_budget)
    check_paths(inputs=[candidate, weights, data_path], sources=[reference], files={"--json": json_file},
                overwrite=overwrite)
    ref = resolve(reference, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    max_length = fit_max_length(ref.model, max_length)  # the default, lowered to a small decoder's positions
    data = open_data(data_path, ref.tokenizer, max_length, samples)
    show = show_progress(quiet, False)
    progress = StageBars(show)

    try:
        report = run_validate(candidate, ref.model, reference, data, runtime=runtime, threads=threads,
                              batch_size=batch_size, max_length=max_length, runs=runs, time_budget=time_budget,
                              gates=gates, trust_pickle=trust_pickle, trust_code=trust_code, progress=progress)
    finally:
        progress.close()
    if json_file is not None:
        write_text(json_file, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if not quiet:
        click.echo(report.table())
    if report.failed:
        click.echo("lrcompress: gates failed: " + "; ".join(
            f"{g['gate']} {g['value']:.5g} vs limit {g['limit']:g}" for g in report.failed), err=True)
        sys.exit(1)
