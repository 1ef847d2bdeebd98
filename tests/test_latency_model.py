"""Latency cost model on onnxruntime CPU and the latency-budget allocator."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lrcompress.planning import latency_model as lm
from lrcompress.errors import ConfigError


def _positive(costs: dict) -> bool:
    return all(math.isfinite(v) and v > 0 for v in costs.values())


# Which form is faster is a wall-clock question for the benchmarks (samples/bench_workflow.py):
# on a busy 2-core machine a timing comparison in a test flakes. These check what is measured.
def test_costs_dense_and_factorized():
    c = lm.matmul_costs(128, 512, 512, [8, 64], runs=15, warmup=3)
    assert set(c) == {None, 8, 64} and _positive(c)


def test_embedding_costs():
    c = lm.matmul_costs(64, 2000, 128, [8, 32], embedding=True, runs=15, warmup=3)
    assert set(c) == {None, 8, 32} and _positive(c)


def test_int8_runs():
    c = lm.matmul_costs(32, 128, 128, [8], int8=True, runs=5, warmup=1)
    assert set(c) == {None, 8} and _positive(c)
    e = lm.matmul_costs(32, 500, 64, [8], int8=True, embedding=True, runs=5, warmup=1)
    assert set(e) == {None, 8} and _positive(e)


def test_cache_reused_and_corrupt_file_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "latency.json"
    first = lm.matmul_costs(16, 64, 32, [4, 8, 8], cache=path, runs=3, warmup=1)
    assert set(first) == {None, 4, 8}
    data = json.loads(path.read_text())
    assert len(data) == 3 and all("|rows=16|m=64|n=32|" in k for k in data)
    assert {k.rsplit("|", 1)[1] for k in data} == {"r=dense", "r=4", "r=8"}
    assert sorted(data.values()) == sorted(first.values())
    assert not [p for p in path.parent.iterdir() if p != path]  # no temp file left over

    def boom(*a, **k):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(lm, "_measure", boom)
    assert lm.matmul_costs(16, 64, 32, [8, 4], cache=path, runs=3, warmup=1) == first
    monkeypatch.undo()

    calls = []
    real = lm._measure
    monkeypatch.setattr(lm, "_measure", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    lm.matmul_costs(16, 64, 32, [4, 12], cache=path, runs=3, warmup=1)
    assert calls == [12]  # only the missing key
    assert len(json.loads(path.read_text())) == 4

    for junk in ("{not json", "[1, 2]"):
        path.write_text(junk)
        calls.clear()
        again = lm.matmul_costs(16, 64, 32, [4], cache=path, runs=3, warmup=1)
        assert calls == [None, 4] and _positive(again)
        assert len(json.loads(path.read_text())) == 2


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("LRCOMPRESS_CACHE", str(tmp_path))
    assert lm.default_cache_path() == tmp_path / "latency.json"
    monkeypatch.delenv("LRCOMPRESS_CACHE")
    assert lm.default_cache_path().parts[-3:] == (".cache", "lrcompress", "latency.json")


@pytest.mark.parametrize("ranks, extra, word", [
    ([0], {}, "rank=0"), ([33], {}, "rank=33"), ([4], {"threads": 0}, "threads=0"),
    ([4], {"runs": 0}, "runs=0"), ([4], {"rows": 0}, "rows=0"),
])
def test_bad_arguments(ranks, extra, word):
    rows = extra.pop("rows", 8)
    with pytest.raises(ConfigError, match=word) as e:
        lm.matmul_costs(rows, 64, 32, ranks, **extra)
    assert "\n" not in str(e.value)


def test_rank_grid():
    assert lm.rank_grid(384, 384) == [16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 191]
    assert lm.rank_grid(256, 256, step=32) == [32, 64, 96, 127]
    assert lm.rank_grid(256, 256, step=64) == [64, 127]
    assert lm.rank_grid(8, 8) == [3]
    assert lm.rank_grid(1, 9) == []
    for m, n in [(768, 3072), (30522, 384), (100, 200)]:
        g, be = lm.rank_grid(m, n), math.ceil(m * n / (m + n))
        assert 8 <= len(g) <= 13 and g[-1] == be - 1 and g[-1] * (m + n) < m * n and g == sorted(set(g))
    with pytest.raises(ConfigError, match="step=0"):
        lm.rank_grid(64, 64, step=0)


def test_interpolate():
    costs = {None: 9.0, 8: 1.0, 16: 2.0, 32: 6.0}
    assert lm.interpolate(costs, 8) == 1.0 and lm.interpolate(costs, 16) == 2.0 and lm.interpolate(costs, 32) == 6.0
    assert lm.interpolate(costs, 12) == pytest.approx(1.5)
    assert lm.interpolate(costs, 24) == pytest.approx(4.0)
    assert lm.interpolate(costs, 40) == pytest.approx(8.0)  # end slope 0.25 / rank
    assert lm.interpolate(costs, 4) == pytest.approx(0.5)
    assert lm.interpolate({8: 1.0, 16: 5.0}, 2) == 0.0  # clamped
    assert lm.interpolate({8: 1.5}, 100) == 1.5
    with pytest.raises(ConfigError):
        lm.interpolate({None: 1.0}, 4)


def test_allocate_known_optimum_and_dominated():
    opts = {
        "a": [(1.0, 10.0, "a1"), (2.0, 4.0, "a2"), (3.0, 3.0, "a3"), (2.5, 9.0, "a_dominated")],
        "b": [(1.0, 8.0, "b1"), (2.0, 6.0, "b2"), (4.0, 1.0, "b4")],
    }
    assert lm.allocate_latency(opts, 2.0) == {"a": "a1", "b": "b1"}
    assert lm.allocate_latency(opts, 3.0) == {"a": "a2", "b": "b1"}  # a: -6/ms beats b: -2/ms
    assert lm.allocate_latency(opts, 6.0) == {"a": "a2", "b": "b4"}  # b's hull skips b2: -2.33/ms
    assert lm.allocate_latency(opts, 6.5) == {"a": "a2", "b": "b4"}  # a3 (+1 ms) no longer fits
    assert lm.allocate_latency(opts, 100.0) == {"a": "a3", "b": "b4"}
    only_dominated = {"a": [(1.0, 1.0, "cheap"), (2.0, 1.0, "same loss"), (3.0, 2.0, "worse")]}
    assert lm.allocate_latency(only_dominated, 10.0) == {"a": "cheap"}


def test_allocate_infeasible():
    with pytest.raises(ConfigError, match=r"1\.5 ms.*2\.5 ms.*raise the latency budget"):
        lm.allocate_latency({"a": [(1.0, 1.0, 1), (2.0, 0.0, 2)], "b": [(1.5, 0.0, 1)]}, 1.5)
    with pytest.raises(ConfigError, match="'a'"):
        lm.allocate_latency({"a": []}, 1.0)


def _convex_layer(rng: random.Random, tag: str) -> list[tuple[float, float, object]]:
    """Options with decreasing loss and decreasing loss drop per ms (a convex curve), shuffled."""
    cost, loss, slope, out = rng.uniform(0.1, 1.0), rng.uniform(5.0, 10.0), rng.uniform(2.0, 4.0), []
    for i in range(rng.randint(1, 5)):
        out.append((cost, loss, f"{tag}{i}"))
        dc = rng.uniform(0.2, 1.5)
        cost, loss, slope = cost + dc, loss - slope * dc, slope * rng.uniform(0.3, 0.9)
    rng.shuffle(out)
    return out


def test_allocate_matches_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        opts = {f"L{j}": _convex_layer(rng, f"L{j}_") for j in range(rng.randint(2, 4))}
        combos = list(itertools.product(*opts.values()))
        lo = sum(min(o[0] for o in v) for v in opts.values())
        # Budgets at greedy step boundaries: all steps sorted by loss-per-ms, prefix sums.
        steps = []
        for v in opts.values():
            s = sorted(v, key=lambda o: o[0])
            steps += [((a[1] - b[1]) / (b[0] - a[0]), b[0] - a[0]) for a, b in itertools.pairwise(s)]
        boundaries = [lo + sum(d for _, d in sorted(steps, reverse=True)[:k]) for k in range(len(steps) + 1)]
        for budget in boundaries + [rng.uniform(lo, boundaries[-1]) for _ in range(3)]:
            pick = lm.allocate_latency(opts, budget + 1e-9)
            chosen = [next(o for o in v if o[2] == pick[name]) for name, v in opts.items()]
            cost, loss = sum(o[0] for o in chosen), sum(o[1] for o in chosen)
            best = min(sum(o[1] for o in c) for c in combos if sum(o[0] for o in c) <= budget + 1e-9)
            assert cost <= budget + 1e-9
            if budget in boundaries:
                assert loss == pytest.approx(best)
            else:  # off a boundary the greedy may leave at most one step's gain unused
                assert loss <= best + max(g * d for g, d in steps) + 1e-9
