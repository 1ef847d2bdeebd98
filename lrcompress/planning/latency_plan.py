"""Latency-aware rank allocation: per-layer dense vs factorized costs measured on ONNX Runtime
(cached), the rest of the model measured once, ranks chosen to fit a fraction of the
original's latency with the least (sensitivity-weighted) truncation loss."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CompressConfig
from ..errors import ConfigError
from ..io.data import Batch
from .latency_model import (
    allocate_latency,
    default_cache_path,
    interpolate,
    matmul_costs,
    rank_grid,
)


def layer_rows(model: nn.Module, names: list[str], example: dict[str, torch.Tensor]) -> dict[str, int]:
    """Rows each layer multiplies per forward on ``example`` (tokens, pixels or ids)."""
    modules = dict(model.named_modules())
    rows: dict[str, int] = {}
    hooks = []
    for name in names:
        mod = modules[name]

        def pre(m: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0]
            if isinstance(m, nn.Embedding):
                rows[name] = rows.get(name, 0) + x.numel()
            elif isinstance(m, nn.Conv2d):
                rows[name] = rows.get(name, 0) + x.numel() // m.in_channels
            else:
                rows[name] = rows.get(name, 0) + x.numel() // x.shape[-1]
        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            Batch(example).run(model)
    finally:
        for h in hooks:
            h.remove()
    return rows


def model_ms(model: nn.Module, example: dict[str, torch.Tensor], threads: int, runs: int = 30,
             int8: bool = False) -> tuple[float, float | None]:
    """p50 milliseconds of the whole model exported to ONNX on ONNX Runtime CPU, and of its
    int8-quantized copy when ``int8`` (None otherwise); one export serves both."""
    import exporters
    feed = {k: v.numpy() for k, v in example.items()}

    def p50(path: Path) -> float:
        runner = exporters.ort_runner(path, threads=threads)
        return float(exporters.run_latency(runner, feed, warmup=5, runs=runs)["p50_ms"])

    with tempfile.TemporaryDirectory(prefix="lrcompress-latency-") as tmp:
        path = exporters.export_onnx(model, example, Path(tmp) / "model.onnx").path
        quantized = None
        if int8:
            quantized = Path(tmp) / "model.int8.onnx"
            exporters.quantize_int8(path, quantized)
        return p50(path), (p50(quantized) if quantized is not None else None)


def latency_ranks(model: nn.Module, active: list[Any], spectra: dict[str, Any], weights: dict[str, float] | None,
                  config: CompressConfig, example: dict[str, torch.Tensor] | None,
                  cache: str | Path | None = None) -> tuple[dict[str, int | None], dict[str, str], dict[str, Any]]:
    """(rank or None per layer, reason per dense layer, summary) for ``config.latency``."""
    if example is None:
        raise ConfigError("--budget latency needs calibration data to build a latency input; pass --calib FILE")
    threads, int8 = config.latency_threads, config.latency_int8
    original, quantized = model_ms(model, example, threads, int8=int8)
    total = quantized if quantized is not None else original
    rows = layer_rows(model, [l.name for l in active], example)
    cache = default_cache_path() if cache is None else cache
    options: dict[str, list[tuple[float, float, Any]]] = {}
    dense_ms: dict[str, float] = {}
    for l in active:
        emb = l.kind == "embedding"
        m, n = l.shape[0], l.shape[1]  # (out, in); (V, d) for embeddings
        grid = [r for r in rank_grid(m, n) if r < l.break_even]
        costs = matmul_costs(max(rows.get(l.name, 1), 1), m, n, grid, threads=threads, embedding=emb, cache=cache,
                             int8=int8)
        dense_ms[l.name] = costs[None]
        s = spectra[l.name]
        w = (weights or {}).get(l.name, 1.0) / s.total if s.total > 0 else 0.0
        opts = [(costs[None], 0.0, None)]
        opts += [(interpolate(costs, r), w * s.tail(r), r) for r in grid if costs[r] < costs[None]]
        options[l.name] = opts
    fixed = max(total - sum(dense_ms.values()), 0.0)
    budget = config.latency * original - fixed
    if budget <= 0:
        raise ConfigError(f"--budget latency={config.latency} asks for {config.latency * original:.2f} ms but the layers "
                          f"that cannot be factorized already take {fixed:.2f} ms of {total:.2f} ms; raise the budget")
    if sum(dense_ms.values()) <= budget:  # already fast enough (e.g. int8 alone): nothing to factorize
        choice = dict.fromkeys(options)
    else:
        choice = allocate_latency(options, budget)
    reasons = {}
    for name, opts in options.items():
        if choice[name] is None:
            reasons[name] = ("not faster factorized on onnxruntime: kept dense" if len(opts) == 1 else
                             "latency budget met with it dense")
    predicted = fixed + sum(next(c for c, _, ch in options[n] if ch == choice[n]) for n in options)
    summary = {"original_ms": round(original, 3), **({"original_int8_ms": round(total, 3)} if int8 else {}),
               "fixed_ms": round(fixed, 3), "budget_ms": round(config.latency * original, 3), "int8": int8,
               "predicted_ms": round(predicted, 3), "threads": threads,
               "shape": [config.latency_batch, config.latency_seq]}
    return {n: (None if c is None else int(c)) for n, c in choice.items()}, reasons, summary


def probe_fraction(config: CompressConfig) -> float:
    """A parameter fraction to probe sensitivities at before latency costs are known."""
    return min(1.0, max(0.05, math.sqrt(config.latency or 1.0) * 0.8))
