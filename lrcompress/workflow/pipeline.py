"""The compress pipeline as plain functions: calibrate -> plan -> factorize -> report."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..calibration.calibrate import Calibration, calibrate
from ..config import CompressConfig, RecoveryConfig
from ..edge.validate import latency_feed
from ..errors import ConfigError
from ..io.data import Batch, TensorData, TextData
from ..methods import registry
from ..methods.apply import apply_plan
from ..planning.make_plan import Plan, make_plan
from ..planning.targets import select_targets
from ..quant.plan import apply_bytes, plan_bytes
from ..recovery.train import recover
from ..streaming.engine import closed_applies
from .blocks import compress_blocks
from .report import CompressionReport, param_bytes

CalibrationLike = Calibration | TextData | TensorData | Iterable[Batch] | None


def gather(model: nn.Module, config: CompressConfig, data: CalibrationLike, *, batch_size: int = 32,
           device: str | torch.device = "cpu", progress: Callable[[int], None] | None = None) -> Calibration | None:
    """Turn data into per-layer statistics for the config's targets (pass-through if already done).
    NaN/Inf parameters or buffers are refused before any batch runs (``calibrate``)."""
    if data is None or isinstance(data, Calibration):
        return data
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 32")
    names = select_targets(model, config.targets, config.exclude, config.method.name)
    if isinstance(data, (TextData, TensorData)):
        calib = calibrate(model, data.batches(batch_size), names, device=device, progress=progress)
        calib.probe = [b.to(device) for b in probe_batches(data)]
        if config.latency is not None:
            attach_latency_feed(calib, data, config)
        return calib
    first: list[Batch] = []

    def stream() -> Iterator[Batch]:  # keep only the first batch (the probe), never the stream
        for b in data:
            if not first:
                first.append(b)
            yield b

    calib = calibrate(model, stream(), names, device=device, progress=progress)
    calib.probe = [b.to(device) for b in first]
    return calib


def attach_latency_feed(calib: Calibration, data: TextData | TensorData, config: CompressConfig) -> None:
    """Inputs of the latency budget's shape (batch x sequence), named as the exporters name them."""
    feed = latency_feed(data, config.latency_batch, config.latency_seq)
    calib.latency_inputs = {k: torch.from_numpy(v) for k, v in feed.items()}


def probe_batches(data: TextData | TensorData, examples: int = 16) -> list[Batch]:
    """A few calibration examples for sensitivity probes; text is sorted by length and
    batched by 8 so that padding costs little."""
    if isinstance(data, TextData):
        lines = sorted(data.lines[:examples], key=len)
        return list(TextData(lines, data.tokenizer, data.max_length).batches(8))
    return list(data.limit(min(examples, len(data))).batches(examples))


def check_calibration(config: CompressConfig, calibration: Any) -> None:
    """Refuse a method that needs calibration data when none is given."""
    if calibration is None and registry.for_config(config.method).needs_calibration:
        raise ConfigError(f"method {config.method.name} needs calibration data; pass --calib FILE or use --method "
                          f"{registry.matrix_method(False).name}")


def plan(model: nn.Module, config: CompressConfig, calibration: CalibrationLike = None, *,
         batch_size: int = 32) -> Plan:
    """The plan (ranks, predicted errors) without touching any weight."""
    check_calibration(config, calibration)
    return make_plan(model, config, gather(model, config, calibration, batch_size=batch_size))


def compress_(model: nn.Module, config: CompressConfig, calibration: CalibrationLike = None, *,
              batch_size: int = 32, device: str | torch.device = "cpu",
              progress: Callable[[str, Any], None] | None = None) -> CompressionReport:
    """Compress ``model`` in place; returns the report."""
    check_calibration(config, calibration)
    tick = lambda stage: (lambda x: progress(stage, x)) if progress else None  # noqa: E731
    if config.bytes is not None:
        return compress_bytes(model, config, calibration, batch_size=batch_size, device=device, tick=tick)
    if closed_applies(model, config, calibration):  # block by block, each layer fitted to the original outputs
        t0 = time.perf_counter()
        calib = gather(model, config, calibration, batch_size=batch_size, device=device, progress=tick("calibrate"))
        p = make_plan(model, config, calib, progress=tick("plan"))
        t_plan = time.perf_counter() - t0
        report = compress_blocks(model, config, calibration, plan=p, batch_size=batch_size, progress=progress)
        report.seconds = {"plan": t_plan + report.seconds["plan"], "factorize": report.seconds["factorize"],
                          "total": t_plan + report.seconds["total"]}
        report.stats = calib
        return report
    params_before, bytes_before = sum(p.numel() for p in model.parameters()), param_bytes(model)
    t0 = time.perf_counter()
    calib = gather(model, config, calibration, batch_size=batch_size, device=device, progress=tick("calibrate"))
    t1 = time.perf_counter()
    p = make_plan(model, config, calib, progress=tick("plan"))
    t2 = time.perf_counter()
    results = apply_plan(model, p, progress=tick("factorize"))
    t3 = time.perf_counter()
    report = CompressionReport(
        layers=results,
        params_before=params_before,
        params_after=sum(q.numel() for q in model.parameters()),
        bytes_before=bytes_before,
        bytes_after=param_bytes(model),
        seconds={"calibrate": t1 - t0, "plan": t2 - t1, "factorize": t3 - t2, "total": t3 - t0},
        calibration={"examples": calib.examples, "tokens": calib.tokens} if calib else {},
        config=config.to_dict(),
        plan=p.to_dict(),
    )
    report.stats = calib
    return report


def compress_bytes(model: nn.Module, config: CompressConfig, calibration: CalibrationLike, *, batch_size: int,
                   device: str | torch.device, tick: Callable[[str], Any]) -> CompressionReport:
    """``--budget bytes=F``: a choice per layer among dense, int8, int4, corrected int4 and quantized low rank
    (see :mod:`lrcompress.quant.plan`); the model keeps the weights as shipped, ``report.quant`` the grids."""
    params_before, bytes_before = sum(p.numel() for p in model.parameters()), param_bytes(model)
    t0 = time.perf_counter()
    calib = gather(model, config, calibration, batch_size=batch_size, device=device, progress=tick("calibrate"))
    t1 = time.perf_counter()
    bp, chosen = plan_bytes(model, config, calib, progress=tick("plan"))
    t2 = time.perf_counter()
    apply_bytes(model, bp, chosen)
    t3 = time.perf_counter()
    report = CompressionReport(layers=[], params_before=params_before,
                               params_after=sum(q.numel() for q in model.parameters()), bytes_before=bytes_before,
                               bytes_after=bp.planned_bytes, config=config.to_dict(),
                               seconds={"calibrate": t1 - t0, "plan": t2 - t1, "apply": t3 - t2, "total": t3 - t0},
                               calibration={"examples": calib.examples, "tokens": calib.tokens},
                               plan={"bytes": bp.to_dict()})
    report.quant, report.stats = bp, calib
    return report


@dataclass
class Job:
    """What one run does to a model, as every entry point builds it (the CLI's compress and
    recover, ``run RECIPE`` and the Python API): ``groups`` of layers to compress, one
    CompressConfig each (several when recipe rules give layers their own budget; none to only
    recover), then recovery with ``recovery`` when given. ``labels`` name each group's rule and
    ``dense`` lists the rules that keep their layers dense (both for the report)."""

    groups: list[CompressConfig] = field(default_factory=list)
    recovery: RecoveryConfig | None = None
    labels: list[str | None] = field(default_factory=list)
    dense: list[tuple[str, list[str]]] = field(default_factory=list)


Recover = Callable[[nn.Module, nn.Module, Any, RecoveryConfig, Any], Any]


def run(model: nn.Module, job: Job, calibration: CalibrationLike = None, *, teacher: nn.Module | None = None,
        in_place: bool = False, recovery_data: TextData | TensorData | None = None,
        eval_data: TextData | TensorData | None = None, recover_with: Recover | None = None, batch_size: int = 32,
        device: str | torch.device = "cpu", progress: Callable[[str, Any], None] | None = None
        ) -> tuple[nn.Module, CompressionReport | None, Any]:
    """The one pipeline: compress ``job``'s groups, then recover against ``teacher`` (default:
    ``model`` as it was). Works on a copy of ``model`` unless ``in_place``. ``recover_with``
    replaces the plain recovery call (the CLI adds resumable state and a progress bar).
    Returns (student, compression report or None, recovery report or None)."""
    if job.recovery is not None and teacher is None:
        teacher = copy.deepcopy(model) if in_place else model
    student = model if in_place else copy.deepcopy(model).to(device)
    report = compress_groups(student, job, calibration, batch_size=batch_size, device=device,
                             progress=progress) if job.groups else None
    rep = None
    if job.recovery is not None:
        train = recovery_data if recovery_data is not None else calibration
        if not isinstance(train, (TextData, TensorData)):
            raise ConfigError("recovery needs training data as TextData or TensorData; pass recovery_data=")
        stats = report.stats if report is not None else None
        if recover_with is None:
            rep = recover(student, teacher, train, job.recovery, eval_data=eval_data, calibration=stats, device=device)
        else:
            rep = recover_with(student, teacher, train, job.recovery, stats)
        if report is not None:
            report.add_recovery(rep, student)
    return student, report, rep


def compress_groups(model: nn.Module, job: Job, data: CalibrationLike, *, batch_size: int = 32,
                    device: str | torch.device = "cpu",
                    progress: Callable[[str, Any], None] | None = None) -> CompressionReport:
    """Compress ``model`` in place, group after group, from one calibration; one report."""
    if len(job.groups) == 1 and not job.dense:
        return compress_(model, job.groups[0], data, batch_size=batch_size, device=device, progress=progress)
    if not job.groups:
        raise ConfigError("every rule of the recipe keeps its layers dense and no layer is left for [compress]; "
                          "give a rule a budget or drop the dense rules")
    if any(cfg.bytes is not None for cfg in job.groups):
        raise ConfigError("a bytes budget plans the whole model at once and cannot share it with recipe rules that "
                          "give layers their own budget or keep them dense; drop the rules (use exclude) or the "
                          "bytes budget")
    calib = None
    if data is not None:  # one calibration for every group (with the latency inputs if a group needs them)
        union = tuple(n for cfg in job.groups for n in cfg.targets)
        base = next((cfg for cfg in job.groups if cfg.latency is not None), job.groups[0])
        calib = gather(model, replace(base, targets=union, exclude=()), data, batch_size=batch_size, device=device,
                       progress=(lambda x: progress("calibrate", x)) if progress else None)
    reports = [compress_(model, cfg, calib, batch_size=batch_size, device=device, progress=progress)
               for cfg in job.groups]
    return merge(reports, job.labels or [None] * len(reports), job.dense)


def merge(reports: list[CompressionReport], labels: list[str | None],
          dense: list[tuple[str, list[str]]]) -> CompressionReport:
    """One report for several groups compressed one after the other on the same model."""
    first, last = reports[0], reports[-1]
    seconds: dict[str, float] = {}
    for r in reports:
        for k, v in r.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    layers = [l for r in reports for l in r.layers]
    config = {"groups": [dict(r.config, rule=label) for r, label in zip(reports, labels)],
              "dense_rules": [{"match": match, "layers": names} for match, names in dense]}
    plan_layers = [l for r in reports for l in r.plan.get("layers", [])]
    plan = {"config": config, "params_model": first.plan.get("params_model"),
            "params_after": last.plan.get("params_after"), "layers": plan_layers}
    merged = CompressionReport(layers=layers, params_before=first.params_before, params_after=last.params_after,
                               bytes_before=first.bytes_before, bytes_after=last.bytes_after, seconds=seconds,
                               calibration=first.calibration, config=config, plan=plan)
    merged.stats = first.stats
    return merged


def compress(model: nn.Module, config: CompressConfig, calibration: CalibrationLike = None, *,
             recovery: RecoveryConfig | None = None, recovery_data: TextData | TensorData | None = None,
             eval_data: TextData | TensorData | None = None, **kwargs: Any) -> tuple[nn.Module, CompressionReport]:
    """Compress a copy of ``model``; the original is untouched. With ``recovery`` the copy is
    then distilled against ``model`` on ``recovery_data`` (default: the calibration data)."""
    student, report, _ = run(model, Job([config], recovery), calibration, recovery_data=recovery_data,
                             eval_data=eval_data, **kwargs)
    return student, report
