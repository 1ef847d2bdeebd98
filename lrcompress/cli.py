"""Command line: a thin click layer over the pipeline. User errors exit 2 with one line."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .errors import ConfigError, LrcompressError


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def _show_progress(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


def _parse_number(flag: str, value: str | None, kind: type) -> Any:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        want = "an integer, e.g. 64" if kind is int else "a number, e.g. 0.5"
        raise ConfigError(f"{flag} {value!r} is not a number; give {want}") from None


def _parse_rank(text: str | None) -> int | tuple[int, int] | None:
    """--rank N, or R_OUT,R_IN for tucker."""
    if text is not None and "," in text:
        return tuple(_parse_number("--rank", part.strip(), int) for part in text.split(","))  # type: ignore[return-value]
    return _parse_number("--rank", text, int)


def _parse_tt_shape(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        out_s, in_s = text.split(":")
        return tuple(int(v) for v in out_s.split("x")), tuple(int(v) for v in in_s.split("x"))
    except ValueError:
        raise ConfigError(f"--tt-shape {text!r} is not OUT:IN modes; write e.g. 8x12x16:8x8x6") from None


def _device(device: str) -> str:
    import torch
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r} is not cpu or cuda[:N]; pick one of them")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return device


source_options = [
    click.option("--weights", type=str, default=None, help="Weights for the architecture (safetensors or state dict)."),
    click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled module (runs code from the file)."),
]
calib_options = [
    click.option("--calib", "calib", type=str, default=None,
                 help="Calibration data: text file (one example per line) or .npy/.npz/.safetensors."),
    click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per example."),
    click.option("--calib-samples", type=int, default=None, help="Use only the first N examples (default: all)."),
    click.option("--batch-size", type=int, default=32, show_default=True),
    click.option("--targets", multiple=True, help="Layers to compress: exact name, glob or re:REGEX (repeatable)."),
    click.option("--exclude", multiple=True, help="Layers to leave dense: exact name, glob or re:REGEX (repeatable)."),
]


recover_options = [
    click.option("--lora-rank", type=int, default=8, show_default=True, help="Adapter rank per factorized layer."),
    click.option("--lr", type=str, default="3e-4", show_default=True, help="Peak AdamW learning rate."),
    click.option("--train", "train_mode", type=str, default="factors", show_default=True,
                 help="factors | lora | both: what recovery trains."),
    click.option("--init", "lora_init", type=str, default="residual", show_default=True,
                 help="residual (top directions of W - W') | zero (classic LoRA)."),
    click.option("--fold", type=str, default="budget", show_default=True,
                 help="budget: re-truncate adapters into each layer's rank | exact: rank r + lora rank."),
    click.option("--eval-data", type=str, default=None, help="Held-out data (default: --eval-fraction of the data)."),
    click.option("--eval-every", type=int, default=100, show_default=True),
    click.option("--eval-fraction", type=str, default="0.1", show_default=True),
    click.option("--patience", type=int, default=5, show_default=True,
                 help="Stop after this many evaluations without improvement (0 = never)."),
    click.option("--loss", type=str, default=None, help="Comma list of hidden, pooled, kl (default: hidden,pooled "
                 "for token outputs, else hidden)."),
    click.option("--feature-weight", type=str, default="0", show_default=True,
                 help="Weight of per-layer feature matching."),
    click.option("--ortho-weight", type=str, default="0", show_default=True,
                 help="Weight of the orthogonality penalty on factor bases."),
    click.option("--rank-schedule", type=str, default=None, help="Grow adapters: STEP:RANK,... e.g. 200:16,500:32."),
    click.option("--augment", type=str, default="0", show_default=True,
                 help="Share of text tokens replaced by random vocabulary tokens in training batches."),
    click.option("--warmup", type=int, default=None, help="Warm-up steps (default: 5 % of the steps)."),
    click.option("--weight-decay", type=str, default="0", show_default=True),
    click.option("--clip", type=str, default="1.0", show_default=True, help="Gradient-norm clipping."),
    click.option("--bf16", is_flag=True, help="bfloat16 autocast for the student's forward."),
    click.option("--resume", is_flag=True, help="Continue an interrupted recovery from its state file."),
    click.option("--state", "state_file", type=str, default=None,
                 help="Resumable state file (default: OUT.recover-state.pt beside the output)."),
    click.option("--plot", "plot_file", type=str, default=None, help="Write the training curve to this PNG."),
]


def _recovery_config(steps: int, kw: dict[str, Any], batch_size: int, max_length: int, seed: int) -> Any:
    """RecoveryConfig from the shared CLI options (pops them from ``kw``)."""
    from .config import RecoveryConfig
    sched = kw.pop("rank_schedule")
    pairs: tuple = ()
    if sched:
        try:
            pairs = tuple(tuple(int(v) for v in item.split(":")) for item in sched.split(","))
        except ValueError:
            raise ConfigError(f"--rank-schedule {sched!r} is not STEP:RANK,...; write e.g. 200:16,500:32") from None
    loss = kw.pop("loss")
    return RecoveryConfig(
        steps=steps, lr=_parse_number("--lr", kw.pop("lr"), float), lora_rank=kw.pop("lora_rank"),
        train=kw.pop("train_mode"), init=kw.pop("lora_init"), fold=kw.pop("fold"), batch_size=batch_size,
        max_length=max_length, eval_every=kw.pop("eval_every"),
        eval_fraction=_parse_number("--eval-fraction", kw.pop("eval_fraction"), float),
        patience=kw.pop("patience"), warmup=kw.pop("warmup"),
        weight_decay=_parse_number("--weight-decay", kw.pop("weight_decay"), float),
        clip=_parse_number("--clip", kw.pop("clip"), float),
        loss=tuple(t.strip() for t in loss.split(",")) if loss else (),
        feature_weight=_parse_number("--feature-weight", kw.pop("feature_weight"), float),
        ortho_weight=_parse_number("--ortho-weight", kw.pop("ortho_weight"), float),
        rank_schedule=pairs, augment=_parse_number("--augment", kw.pop("augment"), float), bf16=kw.pop("bf16"),
        seed=seed)


def _state_path(output: str, state_file: str | None) -> Any:
    from pathlib import Path
    return Path(state_file) if state_file else Path(str(output).rstrip("/") + ".recover-state.pt")


def _run_recovery(student: Any, teacher: Any, rc: Any, data: Any, eval_path: str | None, tokenizer: Any,
                  calibration: Any, device: str, state: Any, resume: bool, show: bool) -> Any:
    """Recovery with a progress bar (step, loss, last held-out cosine); rank 0 shows it."""
    from .data import open_data
    from .recovery import dist_info, recover

    rank, _ = dist_info()
    if resume and not state.is_file():
        raise ConfigError(f"--resume given but there is no recovery state at {str(state)!r}; run without --resume")
    eval_data = open_data(eval_path, tokenizer, rc.max_length) if eval_path else None
    bar = _progress(rc.steps, "recover", show and rank == 0)
    last: dict[str, float] = {}

    def progress(step: int, info: dict[str, Any]) -> None:
        if "cos_mean" in info:
            last["cos"] = info["cos_mean"]
        bar.set_postfix(loss=f"{info['loss']:.4g}", **({"eval_cos": f"{last['cos']:.4f}"} if last else {}))
        bar.n = step
        bar.refresh()

    try:
        return recover(student, teacher, data, rc, eval_data=eval_data, calibration=calibration, device=device,
                       state_path=state, resume=resume, progress=progress)
    except KeyboardInterrupt:
        if rank == 0 and state.is_file():
            click.echo(f"recovery interrupted; its last evaluated state is in {state}: re-run the same command "
                       "with --resume to continue", err=True)
        raise
    finally:
        bar.close()


def _apply(options: list) -> Any:
    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrcompress")
def cli() -> None:
    """Post-training low-rank compression for PyTorch models."""


@cli.command()
@click.argument("source")
@click.option("-o", "--output", "output", type=str, default=None, help="Output folder (required unless --dry-run).")
@_apply(source_options + calib_options)
@click.option("--method", type=str, default=None,
              help="svd | svd-whiten | tucker | cp (kxk Conv2d) | tt (Linear) | shared-svd; default: svd-whiten "
                   "with --calib, else svd.")
@click.option("--rank", type=str, default=None,
              help="Exact rank for every target layer (tucker: N or R_OUT,R_IN; cp: CP rank; tt: largest TT bond).")
@click.option("--ratio", type=str, default=None, help="Fraction of parameters to keep, in (0, 1].")
@click.option("--energy", type=str, default=None, help="Fraction of (whitened) spectral energy to keep per layer.")
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=str, default="cpu", show_default=True, help="cpu | cuda")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--recover-steps", type=int, default=0, show_default=True,
              help="Recovery (distillation against the original) steps after factorizing; 0 = none.")
@click.option("--recover-data", type=str, default=None, help="Recovery training data (default: --calib).")
@click.option("--recover-batch-size", type=int, default=16, show_default=True)
@_apply(recover_options)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars, no table.")
def compress(source: str, output: str | None, weights: str | None, trust_pickle: bool, calib: str | None,
             max_length: int, calib_samples: int | None, batch_size: int, targets: tuple, exclude: tuple,
             method: str | None, rank: str | None, ratio: str | None, energy: str | None, allocate: str,
             scope: str, share_group: int | None, tt_shape: str | None, probe_passes: int, solver: str, seed: int,
             device: str, dry_run: bool, recover_steps: int, recover_data: str | None, recover_batch_size: int,
             overwrite: bool, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Factorize SOURCE's Linear/Embedding layers and write a compressed checkpoint
    (optionally followed by LoRA residual recovery, --recover-steps)."""
    import copy

    import torch

    from .checkpoint import check_output, save
    from .config import CompressConfig, method_config
    from .data import open_data
    from .pipeline import compress_, param_bytes, plan
    from .planning import plan_table
    from .sources import resolve

    method = method or ("svd-whiten" if calib else "svd")
    extra: dict[str, Any] = {}
    if tt_shape is not None:
        if method != "tt":
            raise ConfigError(f"--tt-shape is only for --method tt (got --method {method}); drop it or use --method tt")
        extra["tt_shape"] = _parse_tt_shape(tt_shape)
    if share_group is not None:
        if method != "shared-svd":
            raise ConfigError(f"--share-group is only for --method shared-svd (got --method {method}); drop it "
                              "or use --method shared-svd")
        extra["share_group"] = share_group
    config = CompressConfig(
        method=method_config(method, solver=solver, **extra), rank=_parse_rank(rank),
        ratio=_parse_number("--ratio", ratio, float), energy=_parse_number("--energy", energy, float),
        allocate=allocate, scope=scope, targets=targets, exclude=exclude, seed=seed,
        probe_passes=probe_passes)
    if method == "svd-whiten" and not calib:
        raise ConfigError("--method svd-whiten needs calibration data; pass --calib FILE or use --method svd")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 32")
    device = _device(device)
    if recover_steps < 0:
        raise ConfigError(f"--recover-steps {recover_steps} must be >= 0 (0 = no recovery); e.g. --recover-steps 300")
    rc = _recovery_config(recover_steps, kw, recover_batch_size, max_length, seed) if recover_steps else None
    if rc is not None and not (calib or recover_data):
        raise ConfigError("--recover-steps needs training text; pass --calib FILE or --recover-data FILE")
    if kw.get("plot_file") and rc is not None:
        _need_matplotlib("--plot")
    if not dry_run:
        if output is None:
            raise ConfigError("no output folder given; pass -o OUT (or --dry-run to only print the plan)")
        check_output(output, overwrite)
    torch.manual_seed(seed)
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle)
    data = open_data(calib, loaded.tokenizer, max_length, calib_samples) if calib else None
    show = _show_progress(quiet, as_json)
    if dry_run:
        p = plan(loaded.model, config, data, batch_size=batch_size)
        click.echo(json.dumps(p.to_dict(), indent=2) if as_json else plan_table(p))
        return
    model = loaded.model.to(device)
    teacher = copy.deepcopy(model) if rc is not None else None
    train = open_data(recover_data, loaded.tokenizer, max_length) if rc is not None and recover_data else data
    bars: dict[str, Any] = {}

    def progress(stage: str, x: Any) -> None:
        if stage not in bars:
            for b in bars.values():
                b.close()
            total = len(data) if stage == "calibrate" and data is not None else None
            bars[stage] = _progress(total, stage, show)
        bars[stage].update(x if isinstance(x, int) else 1)

    try:
        report = compress_(model, config, data, batch_size=batch_size, device=device, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    report.source, report.output = source, output
    rep = None
    if rc is not None:
        state = _state_path(output, kw.get("state_file"))
        rep = _run_recovery(model, teacher, rc, train, kw.get("eval_data"), loaded.tokenizer, report.stats,
                            device, state, kw.get("resume", False), show)
        report.recovery = rep.to_dict()
        report.params_after = sum(q.numel() for q in model.parameters())
        report.bytes_after = param_bytes(model)
    if not _is_writer():
        return
    extra = {"report.json": report.to_json() + "\n"}
    if rep is not None:
        extra["recovery.json"] = rep.to_json() + "\n"
    save(model.cpu(), output, loaded.spec, plan=report.plan, side_files=loaded.side_files,
         extra_files=extra, overwrite=overwrite)
    if rep is not None:
        _finish_recovery(rep, state, kw.get("plot_file"))
    if as_json:
        click.echo(report.to_json())
    elif not quiet:
        click.echo(report.table())
        if rep is not None:
            click.echo(rep.table())
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("source")
@_apply(source_options + calib_options)
@click.option("--ratio", type=str, default="0.5", show_default=True, help="Show the uniform rank this ratio gives.")
@click.option("--plot", type=str, default=None, help="Write normalized spectra to this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True)
def inspect(source: str, weights: str | None, trust_pickle: bool, calib: str | None, max_length: int,
            calib_samples: int | None, batch_size: int, targets: tuple, exclude: tuple, ratio: str,
            plot: str | None, as_json: bool, quiet: bool) -> None:
    """Per layer: shape, params, break-even rank, ranks for 90/99 % energy, rank at --ratio."""
    from .calibrate import calibrate
    from .config import CompressConfig
    from .data import open_data
    from .inspection import inspect as run_inspect
    from .targets import select_targets
    from .sources import resolve

    r = _parse_number("--ratio", ratio, float)
    CompressConfig(ratio=r, targets=targets, exclude=exclude)  # validates ratio and patterns' syntax
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 32")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib; install it with pip install 'lrcompress[plot]'") from None
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle)
    stats = None
    if calib:
        data = open_data(calib, loaded.tokenizer, max_length, calib_samples)
        names = select_targets(loaded.model, targets, exclude, "auto")
        stats = calibrate(loaded.model, data.batches(batch_size), names)
    rep = run_inspect(loaded.model, stats, ratio=r, targets=targets, exclude=exclude)
    if plot is not None:
        rep.plot(plot)
    if as_json:
        click.echo(rep.to_json())
    elif not quiet:
        click.echo(rep.table())
        if plot:
            click.echo(f"wrote {plot}")


def _need_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag} needs matplotlib; install it with pip install 'lrcompress[plot]'") from None


def _is_writer() -> bool:
    """Only rank 0 of a torchrun job writes files and prints reports."""
    import os
    return os.environ.get("RANK", "0") == "0"


def _finish_recovery(rep: Any, state: Any, plot_file: str | None) -> None:
    """After a successful save: drop the resumable state, draw the curve."""
    state.unlink(missing_ok=True)
    if plot_file:
        rep.plot(plot_file)


@cli.command()
@click.argument("checkpoint")
@click.option("--reference", required=True, help="The original model (any compress SOURCE) to distil against.")
@click.option("--data", "data_path", required=True, help="Training data: text (one example per line) or tensors.")
@click.option("-o", "--output", "output", required=True, help="Output folder for the recovered checkpoint.")
@click.option("--steps", type=int, default=300, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per example.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=str, default="cpu", show_default=True, help="cpu | cuda")
@_apply(source_options)
@_apply(recover_options)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table.")
def recover(checkpoint: str, reference: str, data_path: str, output: str, steps: int, batch_size: int,
            max_length: int, seed: int, device: str, weights: str | None, trust_pickle: bool, overwrite: bool,
            as_json: bool, quiet: bool, **kw: Any) -> None:
    """Distil a compressed CHECKPOINT against its original (--reference) and fold the adapters."""
    import json as _json
    from pathlib import Path

    import torch

    from .checkpoint import MANIFEST, PICKLED, WEIGHTS, check_output, load, read_manifest, save
    from .data import open_data
    from .sources import resolve

    rc = _recovery_config(steps, kw, batch_size, max_length, seed)
    device = _device(device)
    if kw.get("plot_file"):
        _need_matplotlib("--plot")
    read_manifest(checkpoint)
    check_output(output, overwrite)
    if Path(output).resolve() == Path(checkpoint).resolve():
        raise ConfigError(f"-o {output!r} is the input checkpoint; write the recovered model to another folder")
    torch.manual_seed(seed)
    student, tokenizer, manifest = load(checkpoint, trust_pickle=trust_pickle, with_manifest=True)
    ref = resolve(reference, weights=weights, trust_pickle=trust_pickle)
    data = open_data(data_path, tokenizer or ref.tokenizer, max_length)
    state = _state_path(output, kw.get("state_file"))
    show = _show_progress(quiet, as_json)
    rep = _run_recovery(student, ref.model, rc, data, kw.get("eval_data"), tokenizer or ref.tokenizer, None,
                        device, state, kw.get("resume", False), show)
    if not _is_writer():
        return
    ck = Path(checkpoint)
    skip = {WEIGHTS, MANIFEST, PICKLED, "report.json", "recovery.json"}
    side = {str(f.relative_to(ck)): f for f in ck.rglob("*") if f.is_file() and f.name not in skip}
    old = _json.loads((ck / "report.json").read_text()) if (ck / "report.json").is_file() else None
    summary = {"checkpoint": checkpoint, "reference": reference, "recovery": rep.to_dict(), "compression": old}
    save(student.cpu(), output, {"arch": manifest["source"]}, plan=manifest.get("plan"), side_files=side,
         extra_files={"report.json": _json.dumps(summary, indent=2) + "\n", "recovery.json": rep.to_json() + "\n"},
         overwrite=overwrite)
    _finish_recovery(rep, state, kw.get("plot_file"))
    if as_json:
        click.echo(rep.to_json())
    elif not quiet:
        click.echo(rep.table())
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("source")
@click.option("--to", "targets", multiple=True, help="onnx | ort | coreml (repeatable).")
@click.option("-o", "--output", "output", type=str, default=None,
              help="Output folder (default: SOURCE-export beside a folder source, else ./NAME-export).")
@click.option("--fp16", is_flag=True, help="ONNX/ORT weights in fp16 where safe (Core ML is fp16 by default).")
@click.option("--fp32", is_flag=True, help="Core ML in fp32 compute precision.")
@click.option("--quantize", type=str, default=None, help="int8: dynamic weight quantization of the ONNX (and .ort).")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--inputs", "inputs_file", type=str, default=None,
              help="Example inputs (.npy/.npz/.safetensors) for models without a tokenizer.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens of the sample sentence.")
@_apply(source_options)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True)
def export(source: str, targets: tuple, output: str | None, fp16: bool, fp32: bool, quantize: str | None, opset: int,
           inputs_file: str | None, max_length: int, weights: str | None, trust_pickle: bool, overwrite: bool,
           as_json: bool, quiet: bool) -> None:
    """Export SOURCE (a compressed folder or any model source) to edge formats."""
    from pathlib import Path

    from .checkpoint import check_output
    from .edge import TARGETS, example_inputs, export_all, export_table
    from .sources import resolve

    if not targets:
        raise ConfigError(f"no --to target given; pass one or more of {', '.join(TARGETS)}, e.g. --to onnx --to ort")
    if output is None:
        p = Path(source)
        output = str(p.parent / f"{p.name}-export") if p.exists() else f"{source.replace(':', '_').replace('/', '_')}-export"
    check_output(output, overwrite)
    loaded = resolve(source, weights=weights, trust_pickle=trust_pickle)
    inputs = example_inputs(loaded.tokenizer, inputs_file, max_length=max_length)
    rows = export_all(loaded.model, inputs, output, list(targets), fp16=fp16, fp32=fp32, quantize=quantize,
                      opset=opset, overwrite=overwrite)
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
@_apply(source_options)
@click.option("--json", "json_file", type=str, default=None, help="Also write the report as JSON to this file.")
@click.option("-q", "--quiet", is_flag=True)
def validate(candidate: str, reference: str, data_path: str, runtime: str | None, threads: int, batch_size: int,
             max_length: int, samples: int | None, runs: int, time_budget: float | None, max_cosine_drift: str | None,
             max_abs_error: str | None, min_top1_agreement: str | None, max_latency_ratio: str | None,
             max_size_ratio: str | None, weights: str | None, trust_pickle: bool, json_file: str | None,
             quiet: bool) -> None:
    """Compare CANDIDATE with --reference on real data: drift, latency, size; exit 1 if a gate fails."""
    from pathlib import Path

    from .data import open_data
    from .sources import resolve
    from .validate import check_gates
    from .validate import validate as run_validate

    gates = check_gates({
        "max_cosine_drift": _parse_number("--max-cosine-drift", max_cosine_drift, float),
        "max_abs_error": _parse_number("--max-abs-error", max_abs_error, float),
        "min_top1_agreement": _parse_number("--min-top1-agreement", min_top1_agreement, float),
        "max_latency_ratio": _parse_number("--max-latency-ratio", max_latency_ratio, float),
        "max_size_ratio": _parse_number("--max-size-ratio", max_size_ratio, float)})
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1; e.g. --threads 1")
    if json_file is not None and Path(json_file).is_dir():
        raise ConfigError(f"--json {json_file!r} is a folder; give a file path")
    ref = resolve(reference, weights=weights, trust_pickle=trust_pickle)
    data = open_data(data_path, ref.tokenizer, max_length, samples)
    show = _show_progress(quiet, False)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for b in bars.values():
                b.close()
            bars[stage] = _progress(total, stage, show)
        bars[stage].n = done
        bars[stage].refresh()

    try:
        report = run_validate(candidate, ref.model, reference, data, runtime=runtime, threads=threads,
                              batch_size=batch_size, max_length=max_length, runs=runs, time_budget=time_budget,
                              gates=gates, trust_pickle=trust_pickle, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    if json_file is not None:
        Path(json_file).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    if not quiet:
        click.echo(report.table())
    if report.failed:
        click.echo("lrcompress: gates failed: " + "; ".join(
            f"{g['gate']} {g['value']:.5g} vs limit {g['limit']:g}" for g in report.failed), err=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps user errors to one line on stderr and exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="lrcompress", standalone_mode=False)
    except click.exceptions.UsageError as e:
        msg = " ".join(e.format_message().split())
        click.echo(f"lrcompress: error: {msg} (see lrcompress --help)", err=True)
        sys.exit(2)
    except LrcompressError as e:
        click.echo(f"lrcompress: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except Exception as e:  # exporters' errors (a separate package, no heavy imports)
        from exporters.errors import ExportError
        if not isinstance(e, ExportError):
            raise
        click.echo(f"lrcompress: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("lrcompress: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
