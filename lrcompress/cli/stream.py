"""``lrcompress compress --stream``: a Hugging Face folder compressed one block at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from .common import fit_max_length, progress_bar, show_progress


def stream_folder(source: str) -> Path:
    """The Hugging Face folder a streaming run reads ('minilm' = the bundled checkpoint)."""
    from ..io.sources import minilm_path
    folder = minilm_path() if source == "minilm" else Path(source)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--stream reads a Hugging Face folder (config.json + safetensors); {source!r} is not one: "
                          "drop --stream to compress it in memory")
    return folder


def run_stream(source: str, output: str | None, config: Any, *, calib: str | None, weights: str | None, rc: Any,
               dry_run: bool, max_memory: str | None, max_length: int, calib_samples: int | None, batch_size: int,
               device: str, overwrite: bool, as_json: bool, quiet: bool) -> None:
    from ..io.sources import folder_tokenizer
    from ..io.data import open_data
    from ..streaming.memory import parse_size
    from ..workflow.blocks import stream_compress
    from ..streaming.weights import LazyCheckpoint

    limit = parse_size(max_memory) if max_memory is not None else None
    for given, why in ((weights, "--weights"), (rc, "--recover-steps"), (dry_run or None, "--dry-run")):
        if given is not None:
            raise ConfigError(f"{why} cannot be combined with --stream (it needs the whole model in memory); run "
                              "it on the streamed output instead, or drop --stream")
    if device != "cpu":
        raise ConfigError(f"--stream runs on the CPU (got --device {device}); drop --device")
    if not calib:
        raise ConfigError("--stream needs calibration data to push through the blocks; pass --calib FILE")
    folder = stream_folder(source)
    lazy = LazyCheckpoint(folder)
    max_length = fit_max_length(lazy.build(), max_length)
    tokenizer = folder_tokenizer(folder)
    data = open_data(calib, tokenizer, max_length, calib_samples)
    show = show_progress(quiet, as_json)
    bars: dict[str, Any] = {}

    def progress(stage: str, unit: Any) -> None:
        if stage not in bars:
            for b in bars.values():
                b.close()
            bars[stage] = progress_bar(None, stage, show)
        bars[stage].update(1)

    try:
        report = stream_compress(folder, config, data, output, max_memory=limit, batch_size=batch_size,
                                 overwrite=overwrite, progress=progress)
    finally:
        for b in bars.values():
            b.close()
    report.source = source
    if as_json:
        click.echo(report.to_json())
    elif not quiet:
        click.echo(report.table())
        click.echo(stream_table(report.plan["stream"]))
        click.echo(f"wrote {output}")


def stream_table(stream: dict[str, Any]) -> str:
    """Per unit: seconds, peak resident memory, relative error of its output."""
    from ..streaming.memory import fmt_size
    lines = [f"{'unit':28} {'seconds':>8} {'peak RSS':>10} {'output err':>10}"]
    for u in stream["units"]:
        err = "-" if u.get("output_error") is None else f"{u['output_error']:.4f}"
        lines.append(f"{u['unit'][-28:]:28} {u['seconds']:8.2f} {fmt_size(u['peak_rss']):>10} {err:>10}")
    lines.append(f"calibration {stream['calibration']}; peak resident memory {fmt_size(stream['peak_rss'])}")
    return "\n".join(lines)
