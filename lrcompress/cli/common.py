"""Shared CLI pieces: the click group, option sets, number parsing, progress bars."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable

import click

from ..errors import ConfigError, LrcompressError
from ..paths import PLOT_SUFFIXES, check_distinct, check_not_input, check_output_file


def progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def show_progress(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


def parse_number(flag: str, value: str | None, kind: type) -> Any:
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        want = "an integer, e.g. 64" if kind is int else "a number, e.g. 0.5"
        raise ConfigError(f"{flag} {value!r} is not a number; give {want}") from None


def parse_budget(text: str) -> tuple[str, Any]:
    """``--budget KIND=VALUE`` -> (kind, value) for latency, bytes, ratio, energy (floats) or rank (int)."""
    kind, sep, value = text.partition("=")
    kinds = ("latency", "bytes", "ratio", "energy", "rank")
    if not sep or kind not in kinds:
        raise ConfigError(f"--budget {text!r} must be KIND=VALUE with KIND one of {', '.join(kinds)}; e.g. "
                          "--budget latency=0.6")
    return kind, (parse_rank(value) if kind == "rank" else parse_number(f"--budget {kind}", value, float))


def parse_rank(text: str | None) -> int | tuple[int, int] | None:
    """--rank N, or R_OUT,R_IN for tucker."""
    if text is not None and "," in text:
        return tuple(parse_number("--rank", part.strip(), int) for part in text.split(","))  # type: ignore[return-value]
    return parse_number("--rank", text, int)


def parse_tt_shape(text: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        out_s, in_s = text.split(":")
        return tuple(int(v) for v in out_s.split("x")), tuple(int(v) for v in in_s.split("x"))
    except ValueError:
        raise ConfigError(f"--tt-shape {text!r} is not OUT:IN modes; write e.g. 8x12x16:8x8x6") from None


def check_device(device: str) -> str:
    import torch
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r} is not cpu or cuda[:N]; pick one of them")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for but no CUDA device is available; use --device cpu")
    return device


source_options = [
    click.option("--weights", type=str, default=None, help="Weights for the architecture (safetensors or state dict)."),
    click.option("--trust-pickle", is_flag=True, help="Allow loading a fully pickled module (runs code from the file)."),
    click.option("--trust-code", is_flag=True,
                 help="Allow a compressed folder (or recipe) to rebuild its architecture by running the factory "
                      "code it names."),
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


def apply_options(options: list) -> Any:
    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f
    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lrcompress")
def cli() -> None:
    """Post-training low-rank compression for PyTorch models."""


def need_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag} needs matplotlib; install it with pip install 'lrcompress[plot]'") from None


def is_writer() -> bool:
    """Only rank 0 of a torchrun job writes files and prints reports."""
    import os
    return os.environ.get("RANK", "0") == "0"


def source_paths(source: str | None) -> list[Path]:
    """The files or folders a SOURCE spec reads: a folder or file, the ``file.py`` of a
    factory, the embedded checkpoint's folder for ``minilm``."""
    if not source:
        return []
    if os.path.exists(source):
        return [Path(source)]
    if source == "minilm":
        from ..io.sources import minilm_path
        try:
            return [minilm_path()]
        except LrcompressError:  # not installed: resolve() will say so
            return []
    module, sep, _ = source.rpartition(":")
    if sep and module.endswith(".py"):
        return [Path(module)]
    return []


def check_paths(*, inputs: Iterable[str | None] = (), sources: Iterable[str | None] = (),
                folders: dict[str, str | None] | None = None, files: dict[str, str | None] | None = None,
                plots: dict[str, str | None] | None = None, others: dict[str, str | None] | None = None,
                overwrite: bool = False) -> None:
    """Before any work: no output (``folders``: replaced folders; ``files``/``plots``: files,
    replaced only with ``overwrite``; ``others``: paths managed elsewhere, e.g. a resumable state)
    may be an input of the command (the ``inputs`` and the paths ``sources`` read) or hold one,
    and no two outputs may share a path."""
    ins = [i for i in inputs if i] + [str(p) for s in sources for p in source_paths(s)]
    folders, files, plots, others = folders or {}, files or {}, plots or {}, others or {}
    for flag, out in folders.items():
        if out:
            check_not_input(flag, out, ins, folder=True)
    for flag, out in {**files, **plots, **others}.items():
        if out and out != "-":
            check_not_input(flag, out, ins, folder=False)
    for flag, out in {**files, **plots}.items():
        if out and out != "-":
            check_output_file(flag, out, overwrite=overwrite, suffixes=PLOT_SUFFIXES if flag in plots else None)
    check_distinct({k: v for k, v in {**folders, **files, **plots, **others}.items() if v and v != "-"})



def fit_max_length(model: Any, max_length: int) -> int:
    """``--max-length`` within the model's positions: the default is lowered to them (a small
    decoder may hold fewer than 128), a value the user gave beyond them is refused."""
    from ..edge.lm import max_positions
    limit = max_positions(model)
    if limit is None or max_length <= limit[0]:
        return max_length
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("max_length") == click.core.ParameterSource.DEFAULT:
        return limit[0]
    raise ConfigError(f"--max-length {max_length} exceeds the model's {limit[0]} positions ({limit[1]} in its "
                      f"config); use --max-length {limit[0]} or less")


class StageBars:
    """One progress bar per stage; starting a stage closes the previous stage's bar."""

    def __init__(self, show: bool) -> None:
        self.show, self.bars = show, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        """Stage ``stage`` has done ``done`` of ``total``."""
        if stage not in self.bars:
            self.close()
            self.bars[stage] = progress_bar(total, stage, self.show)
        self.bars[stage].n = done
        self.bars[stage].refresh()

    def close(self) -> None:
        for b in self.bars.values():
            b.close()
