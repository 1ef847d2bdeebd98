"""Per-layer latency cost model measured on ONNX Runtime CPU, and a latency-budget allocator.

``matmul_costs`` times one dense layer and its rank-r factorizations as tiny ONNX graphs (optionally
int8-quantized, optionally as an embedding lookup), caching the numbers in a JSON file;
``allocate_latency`` picks one option per layer that minimises the total loss under a budget in ms.
onnx, onnxruntime and numpy are imported only inside the measuring functions.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .hull import hull as _hull
from .hull import hull_greedy

OPSET = 18
IR_VERSION = 9  # accepted by onnxruntime >= 1.16


def default_cache_path() -> Path:
    """``$LRCOMPRESS_CACHE/latency.json`` if that variable is set, else ``~/.cache/lrcompress/latency.json``."""
    root = os.environ.get("LRCOMPRESS_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "lrcompress") / "latency.json"


def _check_int(name: str, value: Any, low: int, high: int | None, fix: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}={value!r} must be an integer {rule}; {fix}")


def _build(path: Path, rows: int, m: int, n: int, r: int | None, embedding: bool) -> dict[str, Any]:
    """Write the one-layer ONNX graph to ``path``; return its input feed."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, int]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32), name)

    if embedding:  # table of V=m rows, d=n columns, looked up by `rows` ids
        x = helper.make_tensor_value_info("ids", TensorProto.INT64, [rows])
        feed = {"ids": rng.integers(0, m, size=rows, dtype=np.int64)}
        if r is None:
            nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)]
            inits = [init("table", (m, n))]
        else:
            nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], axis=0),
                     helper.make_node("MatMul", ["h", "b"], ["y"])]
            inits = [init("table", (m, r)), init("b", (r, n))]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, n])
        feed = {"x": rng.standard_normal((rows, n)).astype(np.float32)}
        if r is None:
            nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
            inits = [init("w", (n, m))]
        else:
            nodes = [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])]
            inits = [init("a", (n, r)), init("b", (r, m))]
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, m])
    graph = helper.make_graph(nodes, "layer", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.save(model, str(path))
    return feed


def _measure(rows: int, m: int, n: int, r: int | None, *, threads: int, int8: bool, embedding: bool,
             runs: int, warmup: int) -> float:
    """Median milliseconds of one ``session.run`` of the layer graph (dense when ``r`` is None)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lrc-latency-") as tmp:
        path = Path(tmp) / "layer.onnx"
        feed = _build(path, rows, m, n, r, embedding)
        if int8:
            from exporters import quantize_int8
            quantize_int8(path, Path(tmp) / "layer_int8.onnx")
            path = Path(tmp) / "layer_int8.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _load_cache(path: Path) -> dict[str, float]:
    """The cached ``key -> ms`` entries; an unreadable or malformed file counts as empty."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}


def _save_cache(path: Path, new: dict[str, float]) -> None:
    """Merge ``new`` into the file at ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _load_cache(path)  # re-read: keep entries another process added meanwhile
    data.update(new)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def matmul_costs(rows: int, m: int, n: int, ranks: Sequence[int], *, threads: int = 1, int8: bool = False,
                 embedding: bool = False, cache: str | Path | None = None, runs: int = 30,
                 warmup: int = 5) -> dict[int | None, float]:
    """Milliseconds of one layer on onnxruntime CPU: key ``None`` = dense, key ``r`` = rank-r factorization.

    Linear: ``X (rows, n) @ W (n, m)`` vs ``(X @ A (n, r)) @ B (r, m)``. ``embedding=True``: a table of
    ``m`` rows by ``n`` columns looked up by ``rows`` ids, vs ``Gather(T (m, r)) @ B (r, n)``. ``int8``
    times the ``exporters.quantize_int8`` copy. Each value is the median of ``runs`` timed runs after
    ``warmup``; only keys missing from the JSON ``cache`` file (if given) are measured, then saved.
    """
    import onnxruntime as ort

    _check_int("rows", rows, 1, None, "e.g. rows=128 (tokens per batch)")
    _check_int("m", m, 1, None, "give the layer's output size")
    _check_int("n", n, 1, None, "give the layer's input size")
    _check_int("threads", threads, 1, None, "e.g. threads=1")
    _check_int("runs", runs, 1, None, "e.g. runs=30")
    _check_int("warmup", warmup, 0, None, "e.g. warmup=5")
    for r in ranks:
        _check_int("rank", r, 1, min(m, n), f"pick ranks from 1 to min(m, n) = {min(m, n)} for a {m}x{n} layer")
    prefix = f"ort={ort.__version__}|threads={threads}|int8={int8}|emb={embedding}|rows={rows}|m={m}|n={n}"
    keys: dict[int | None, str] = {r: f"{prefix}|r={r or 'dense'}" for r in [None, *dict.fromkeys(ranks)]}
    path = Path(cache) if cache is not None else None
    known = _load_cache(path) if path is not None else {}
    new = {}
    for r, key in keys.items():
        if key not in known:
            new[key] = _measure(rows, m, n, r, threads=threads, int8=int8, embedding=embedding,
                                runs=runs, warmup=warmup)
    if path is not None and new:
        _save_cache(path, new)
    known.update(new)
    return {r: known[key] for r, key in keys.items()}


def rank_grid(m: int, n: int, step: int | None = None) -> list[int]:
    """Ranks worth timing for an (m, n) layer: ``step, 2*step, ...`` below the break-even rank
    ``be = ceil(m*n / (m+n))`` (where the factors hold as many weights as the dense matrix), plus ``be - 1``.

    The default step is ``max(8, ceil(be / 12))`` rounded up to a multiple of 8, so a grid has at most
    about 12 points. Empty when ``be == 1`` (a layer with one row or column has no useful rank).
    """
    _check_int("m", m, 1, None, "give the layer's output size")
    _check_int("n", n, 1, None, "give the layer's input size")
    be = math.ceil(m * n / (m + n))
    if step is None:
        step = 8 * math.ceil(max(8, math.ceil(be / 12)) / 8)
    _check_int("step", step, 1, None, "e.g. step=16 or leave it out for the default")
    grid = list(range(step, be, step))
    if be - 1 >= 1 and (not grid or grid[-1] != be - 1):
        grid.append(be - 1)
    return grid


def interpolate(costs: dict[int | None, float], r: int) -> float:
    """Cost at rank ``r``: linear between the measured ranks, extrapolated with the end segment's
    slope outside them, never below 0. The dense key ``None`` is not used."""
    pts = sorted((k, v) for k, v in costs.items() if k is not None)
    if not pts:
        raise ConfigError("interpolate() needs at least one measured rank in costs; measure ranks with matmul_costs")
    if len(pts) == 1:
        return max(0.0, float(pts[0][1]))
    i = 1
    while i < len(pts) - 1 and pts[i][0] < r:
        i += 1
    (r0, c0), (r1, c1) = pts[i - 1], pts[i]
    return max(0.0, float(c0 + (c1 - c0) * (r - r0) / (r1 - r0)))


def allocate_latency(options: dict[str, list[tuple[float, float, object]]], budget_ms: float) -> dict[str, object]:
    """One option ``(cost_ms, loss, choice)`` per layer, minimising the total loss with total cost <= ``budget_ms``.

    Greedy on each layer's lower convex hull of (cost, loss) (dominated options dropped): start at the
    cheapest options, then take the fitting hull step with the largest loss decrease per ms until none fits.
    Optimal when the budget ends on a step boundary, else at most one hull step's loss above it. Returns name -> choice.
    """
    if not isinstance(budget_ms, (int, float)) or math.isnan(budget_ms):
        raise ConfigError(f"budget_ms={budget_ms!r} is not a number; give the latency budget in ms, e.g. 5.0")
    hulls = {}
    for name, opts in options.items():
        bad = [o for o in opts if not (math.isfinite(o[0]) and o[0] >= 0 and math.isfinite(o[1]))]
        if not opts or bad:
            raise ConfigError(f"layer {name!r} has {'bad options ' + repr(bad[:2]) if bad else 'no options'}; "
                              "give it at least one (cost_ms >= 0, finite loss, choice) tuple")
        hulls[name] = _hull(list(opts))
    spent = sum(h[0][0] for h in hulls.values())
    tol = 1e-9 * max(1.0, abs(budget_ms))
    if spent > budget_ms + tol:
        raise ConfigError(f"latency budget {budget_ms:.4g} ms is below the minimum reachable {spent:.4g} ms "
                          "(cheapest option of every layer); raise the latency budget")
    return hull_greedy(hulls, budget_ms, tol)
