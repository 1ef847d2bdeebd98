"""Latency measurement of a runner: warm-up, timed runs, percentiles in milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .errors import BadInput


def run_latency(
    runner: Callable[[Mapping[str, np.ndarray]], Any],
    inputs: Mapping[str, np.ndarray],
    warmup: int = 5,
    runs: int = 50,
    time_budget_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Time ``runner(inputs)``: ``warmup`` untimed calls, then up to ``runs`` timed calls.

    With ``time_budget_s`` the timed loop stops once the budget is spent (at least one run is always made).
    ``progress(done, runs)`` is called after each timed run. Returns p50/p90/p99/mean/min/max in ms and
    ``runs`` (the number actually timed).
    """
    if warmup < 0 or runs < 1:
        raise BadInput(f"warmup={warmup}, runs={runs}: need warmup >= 0 and runs >= 1")
    if time_budget_s is not None and time_budget_s <= 0:
        raise BadInput(f"time_budget_s={time_budget_s} must be > 0 or None")
    if getattr(runner, "available_for_prediction", True) is False:
        from .errors import PredictionUnavailable

        raise PredictionUnavailable(getattr(runner, "unavailable_reason", None) or "this runner cannot predict on this machine")
    for _ in range(warmup):
        runner(inputs)
    times: list[float] = []
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    for i in range(runs):
        t0 = time.perf_counter()
        runner(inputs)
        times.append((time.perf_counter() - t0) * 1000.0)
        if progress is not None:
            progress(i + 1, runs)
        if deadline is not None and time.perf_counter() >= deadline:
            break
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "min_ms": float(arr.min()),
        "max_ms": float(arr.max()),
        "runs": int(arr.size),
        "warmup": int(warmup),
    }
