"""Chained exports: the steps that give the asked-for targets, in dependency order (an exporter after the one it
``derives_from``, a transform right after its source), each exporting the torch module or converting the artifact
of an earlier step. ONNX -> int8 -> ORT: the .ort is converted from the quantized ONNX file when int8 is asked for."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Exporter, ExportResult
from .errors import BadInput
from .registry import get_exporter, target_names, transform_names


@dataclass(frozen=True)
class ExportStep:
    """One step of a chain: ``label`` names its artifact (the exporter's name, ``<source>-<transform>`` for a
    transform); ``source`` is the label of the step whose artifact it converts (None: the torch module);
    ``keep`` is False for an artifact made only as the source of a later step."""

    label: str
    exporter: Exporter
    file_name: str
    source: str | None
    keep: bool


@dataclass
class StepResult:
    """What a step wrote and how long it took."""

    step: ExportStep
    result: ExportResult
    seconds: float


def plan_exports(targets: Sequence[str], transforms: Sequence[str] = (), *, stem: str = "model") -> list[ExportStep]:
    """The steps that produce ``targets`` (export target names), with ``transforms`` applied to the artifacts of
    their ``derives_from`` format when that format is in the chain. Raises :class:`BadInput` for unknown names."""
    valid_targets, valid_transforms = target_names(), transform_names()
    wanted = list(dict.fromkeys(targets))
    bad = [t for t in wanted if t not in valid_targets]
    if bad or not wanted:
        raise BadInput(f"unknown export target(s) {', '.join(map(repr, bad)) or '(none)'}; valid: {', '.join(valid_targets)}")
    bad = [t for t in transforms if t not in valid_transforms]
    if bad:
        raise BadInput(f"unknown transform(s) {', '.join(map(repr, bad))}; valid: {', '.join(valid_transforms) or 'none'}")
    needed: set[str] = set()
    for name in wanted:
        _add_with_sources(name, needed, [])
    steps: list[ExportStep] = []
    latest: dict[str, str] = {}  # format -> label of the step holding its newest artifact
    for name in _dependency_order(needed, valid_targets):
        exporter = get_exporter(name)
        source = latest[exporter.derives_from] if exporter.derives_from else None
        steps.append(ExportStep(name, exporter, exporter.file_name(stem), source, name in wanted))
        latest[name] = name
        for tname in dict.fromkeys(transforms):
            transform = get_exporter(tname)
            if transform.derives_from == name:
                label = f"{name}-{tname}"
                steps.append(ExportStep(label, transform, transform.file_name(stem), latest[name], name in wanted))
                latest[name] = label
    return steps


def _add_with_sources(name: str, needed: set[str], trail: list[str]) -> None:
    if name in trail:
        raise BadInput(f"exporters derive from each other in a loop: {' -> '.join(trail + [name])}; fix derives_from")
    needed.add(name)
    source = get_exporter(name).derives_from
    if source is not None:
        if source not in target_names():
            raise BadInput(f"exporter '{name}' derives from {source!r}, which is not a registered export target")
        _add_with_sources(source, needed, trail + [name])


def _dependency_order(needed: set[str], order: list[str]) -> list[str]:
    """``needed`` in registration order, each exporter after the one it derives from."""
    out: list[str] = []

    def place(name: str) -> None:
        if name in out:
            return
        source = get_exporter(name).derives_from
        if source is not None:
            place(source)
        out.append(name)

    for name in order:
        if name in needed:
            place(name)
    return out


def export_targets(
    model: Any,
    example_inputs: Any,
    folder: str | os.PathLike[str],
    steps: Sequence[ExportStep],
    options: Mapping[str, Any] | None = None,
    *,
    progress: Callable[[ExportStep], None] | None = None,
) -> list[StepResult]:
    """Run ``steps`` (from :func:`plan_exports`) into ``folder``: every exporter gets the same model and inputs, and
    of ``options`` the ones it declares (``options`` to export, ``derive_options`` to convert). Checks that every
    step can run here before writing anything; removes the artifacts not kept; returns the kept steps' results."""
    for step in steps:
        step.exporter.ensure_available()
    folder = Path(folder)
    shared = dict(options or {})
    done: dict[str, ExportResult] = {}
    results: list[StepResult] = []
    for step in steps:
        if progress is not None:
            progress(step)
        exporter = step.exporter
        start = time.perf_counter()
        if step.source is None:
            mine = {k: v for k, v in shared.items() if k in exporter.options}
            result = exporter.export_with_info(model, example_inputs, folder / step.file_name, **mine)
        else:
            mine = {k: v for k, v in shared.items() if k in exporter.derive_options}
            result = exporter.derive(done[step.source].path, folder / step.file_name, **mine)
        done[step.label] = result
        results.append(StepResult(step, result, time.perf_counter() - start))
    for r in results:
        if not r.step.keep:
            _remove(r.result.path)
    return [r for r in results if r.step.keep]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
