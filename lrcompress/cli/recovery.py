"""CLI: recovery options shared with compress, and the recover command."""

from __future__ import annotations

from typing import Any

import click

from ..errors import ConfigError, Interrupted
from .common import (
    apply_options,
    check_device,
    check_paths,
    cli,
    is_writer,
    need_matplotlib,
    parse_number,
    progress_bar,
    show_progress,
    source_options,
)

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


def recovery_config(steps: int, kw: dict[str, Any], batch_size: int, max_length: int, seed: int) -> Any:
    """RecoveryConfig from the shared CLI options (pops them from ``kw``)."""
    from ..config import RecoveryConfig
    sched = kw.pop("rank_schedule")
    pairs: tuple = ()
    if sched:
        try:
            pairs = tuple(tuple(int(v) for v in item.split(":")) for item in sched.split(","))
        except ValueError:
            raise ConfigError(f"--rank-schedule {sched!r} is not STEP:RANK,...; write e.g. 200:16,500:32") from None
    loss = kw.pop("loss")
    return RecoveryConfig(
        steps=steps, lr=parse_number("--lr", kw.pop("lr"), float), lora_rank=kw.pop("lora_rank"),
        train=kw.pop("train_mode"), init=kw.pop("lora_init"), fold=kw.pop("fold"), batch_size=batch_size,
        max_length=max_length, eval_every=kw.pop("eval_every"),
        eval_fraction=parse_number("--eval-fraction", kw.pop("eval_fraction"), float),
        patience=kw.pop("patience"), warmup=kw.pop("warmup"),
        weight_decay=parse_number("--weight-decay", kw.pop("weight_decay"), float),
        clip=parse_number("--clip", kw.pop("clip"), float),
        loss=tuple(t.strip() for t in loss.split(",")) if loss else (),
        feature_weight=parse_number("--feature-weight", kw.pop("feature_weight"), float),
        ortho_weight=parse_number("--ortho-weight", kw.pop("ortho_weight"), float),
        rank_schedule=pairs, augment=parse_number("--augment", kw.pop("augment"), float), bf16=kw.pop("bf16"),
        seed=seed)


def state_file_for(output: str, state_file: str | None) -> Any:
    from pathlib import Path
    return Path(state_file) if state_file else Path(str(output).rstrip("/") + ".recover-state.pt")


def run_recovery(student: Any, teacher: Any, rc: Any, data: Any, eval_path: str | None, tokenizer: Any,
                  calibration: Any, device: str, state: Any, resume: bool, show: bool) -> Any:
    """Recovery with a progress bar (step, loss, last held-out cosine); rank 0 shows it."""
    from ..io.data import open_data
    from ..recovery.train import dist_info, recover

    rank, _ = dist_info()
    if resume and not state.is_file():
        raise ConfigError(f"--resume given but there is no recovery state at {str(state)!r}; run without --resume")
    eval_data = open_data(eval_path, tokenizer, rc.max_length) if eval_path else None
    bar = progress_bar(rc.steps, "recover", show and rank == 0)
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
    except (KeyboardInterrupt, Interrupted) as e:
        if rank == 0 and state.is_file():
            note = f"the last evaluated recovery state is in {state}: re-run the same command with --resume"
            if isinstance(e, Interrupted):
                e.note = note  # said on the CLI's one interrupt line
            else:
                click.echo(f"recovery interrupted; {note}", err=True)
        raise
    finally:
        bar.close()


def finish_recovery(rep: Any, state: Any, plot_file: str | None) -> None:
    """After a successful save: drop the resumable state, draw the curve."""
    from ..paths import atomic_file
    state.unlink(missing_ok=True)
    if plot_file:
        with atomic_file(plot_file) as tmp:
            rep.plot(tmp)


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
@apply_options(source_options)
@apply_options(recover_options)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table.")
def recover(checkpoint: str, reference: str, data_path: str, output: str, steps: int, batch_size: int,
            max_length: int, seed: int, device: str, weights: str | None, trust_pickle: bool, trust_code: bool,
            overwrite: bool, as_json: bool, quiet: bool, **kw: Any) -> None:
    """Distil a compressed CHECKPOINT against its original (--reference) and fold the adapters."""
    import json as _json
    from pathlib import Path

    import torch

    from ..io.checkpoint import (
        MANIFEST,
        PICKLED,
        WEIGHTS,
        check_output,
        load,
        read_manifest,
        save,
    )
    from ..io.data import open_data
    from ..io.sources import resolve
    from ..workflow.pipeline import Job, run

    rc = recovery_config(steps, kw, batch_size, max_length, seed)
    device = check_device(device)
    if kw.get("plot_file"):
        need_matplotlib("--plot")
    read_manifest(checkpoint)
    state = state_file_for(output, kw.get("state_file"))
    check_paths(inputs=[checkpoint, weights, data_path, kw.get("eval_data")],
                sources=[reference], folders={"-o": output}, plots={"--plot": kw.get("plot_file")},
                others={"--state": state}, overwrite=overwrite)
    check_output(output, overwrite)
    torch.manual_seed(seed)
    student, tokenizer, manifest = load(checkpoint, trust_pickle=trust_pickle, trust_code=trust_code,
                                        with_manifest=True)
    ref = resolve(reference, weights=weights, trust_pickle=trust_pickle, trust_code=trust_code)
    data = open_data(data_path, tokenizer or ref.tokenizer, max_length)
    show = show_progress(quiet, as_json)
    def recover_with(student: Any, teacher: Any, train: Any, config: Any, stats: Any) -> Any:
        return run_recovery(student, teacher, config, train, kw.get("eval_data"), tokenizer or ref.tokenizer, stats,
                            device, state, kw.get("resume", False), show)

    _, _, rep = run(student, Job([], rc), None, teacher=ref.model, in_place=True, recovery_data=data,
                    recover_with=recover_with, device=device)
    if not is_writer():
        return
    ck = Path(checkpoint)
    skip = {WEIGHTS, MANIFEST, PICKLED, "report.json", "recovery.json"}
    side = {str(f.relative_to(ck)): f for f in ck.rglob("*") if f.is_file() and f.name not in skip}
    old = _json.loads((ck / "report.json").read_text()) if (ck / "report.json").is_file() else None
    summary = {"checkpoint": checkpoint, "reference": reference, "recovery": rep.to_dict(), "compression": old}
    save(student.cpu(), output, {"arch": manifest["source"]}, plan=manifest.get("plan"), side_files=side,
         extra_files={"report.json": _json.dumps(summary, indent=2) + "\n", "recovery.json": rep.to_json() + "\n"},
         overwrite=overwrite)
    finish_recovery(rep, state, kw.get("plot_file"))
    if as_json:
        click.echo(rep.to_json())
    elif not quiet:
        click.echo(rep.table())
        click.echo(f"wrote {output}")
