"""The compress pipeline as plain functions: calibrate -> plan -> factorize -> report."""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..methods import registry
from ..methods.apply import apply_plan
from ..calibration.calibrate import Calibration, calibrate
from ..config import CompressConfig, RecoveryConfig
from ..io.data import Batch, TensorData, TextData
from ..errors import ConfigError
from ..planning.make_plan import Plan, make_plan
from ..planning.targets import select_targets
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
    from ..edge.validate import latency_feed
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


def compress(model: nn.Module, config: CompressConfig, calibration: CalibrationLike = None, *,
             recovery: RecoveryConfig | None = None, recovery_data: TextData | TensorData | None = None,
             eval_data: TextData | TensorData | None = None, **kwargs: Any) -> tuple[nn.Module, CompressionReport]:
    """Compress a copy of ``model``; the original is untouched. With ``recovery`` the copy is
    then distilled against ``model`` on ``recovery_data`` (default: the calibration data)."""
    student = copy.deepcopy(model)
    report = compress_(student, config, calibration, **kwargs)
    if recovery is not None:
        from ..recovery.train import recover
        train = recovery_data if recovery_data is not None else calibration
        if not isinstance(train, (TextData, TensorData)):
            raise ConfigError("recovery needs training data as TextData or TensorData; pass recovery_data=")
        rep = recover(student, model, train, recovery, eval_data=eval_data, calibration=report.stats,
                      device=kwargs.get("device", "cpu"))
        report.add_recovery(rep, student)
    return student, report
