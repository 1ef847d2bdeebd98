"""The float32 fast path of ``spectrum`` (decompose/fast_spectrum.py) against the float64 one.

The fast path is forced on medium matrices (it only engages by itself above
FAST_PATH_MIN_WORK); the float64 path is the reference optimum.
"""

from __future__ import annotations

import math

import pytest
import torch

from lrcompress.decompose import lowrank
from lrcompress.decompose.fast_spectrum import _plan, subspace_eigh
from lrcompress.decompose.lowrank import Metric, factorize, spectrum
from lrcompress.scoped import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these matrices are small, and multi-threaded LAPACK calls (eigh,
    SVD) slow down by orders of magnitude when other jobs share the cores."""
    with torch_threads(1):
        yield


def _data(m: int, n: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight with a decaying spectrum and the Gram X X^T of correlated inputs (rank
    min(n, tokens))."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    d = (1 + torch.arange(k, dtype=torch.float32) / 8) ** -0.7
    w = (torch.randn(m, k, generator=gen) * d) @ torch.randn(k, n, generator=gen) / math.sqrt(n)
    x = torch.randn(n, tokens, generator=gen) * ((1 + torch.arange(n) / 10.0) ** -0.5)[:, None]
    x = torch.randn(n, n, generator=gen) @ x / math.sqrt(n)
    return w, (x @ x.T).double()


def _metric(kind: str, m: int, n: int) -> tuple[torch.Tensor, Metric]:
    if kind == "identity":
        return _data(m, n, 10)[0], Metric()
    w, g = _data(m, n, 2000 if kind == "gram" else n // 2)
    return w, Metric(gram=g)


def _true_ratio(w: torch.Tensor, spec: lowrank.Spectrum, ref: lowrank.Spectrum, rank: int, metric: Metric) -> float:
    """Achieved error of the shipped factors over the float64 optimum, float64 total."""
    f = factorize(w, spec, rank, metric)
    d = w.double() - f.a.double() @ f.b.double()
    return math.sqrt(metric.sqnorm(d) / ref.tail(rank))


def _orthonormal(u: torch.Tensor) -> float:
    return float((u.T @ u - torch.eye(u.shape[1], dtype=u.dtype)).abs().max())


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
@pytest.mark.parametrize("kind", ["gram", "rank-deficient", "identity"])
@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_fast_path_is_optimal(shape, kind, solver):
    m, n = shape
    w, metric = _metric(kind, m, n)
    ref = spectrum(w, metric, fast=False)
    rank = 60
    spec = spectrum(w, metric, max_rank=rank, solver=solver, fast=True)
    assert torch.is_tensor(spec.noise) and spec.u.dtype == torch.float64 and spec.s2.dtype == torch.float64
    assert spec.u.shape == (m, rank + 16)
    assert _orthonormal(spec.u) < 1e-12
    assert spec.total == pytest.approx(ref.total, rel=1e-6)
    for r in (5, 30, rank):
        assert spec.trusted(r)
        assert spec.relative_error(r) == pytest.approx(ref.relative_error(r), rel=1e-5 if spec.exact else 1e-4)
        f = factorize(w, spec, r, metric)
        assert f.error_ratio <= 1 + 1e-3
        assert _true_ratio(w, spec, ref, r, metric) <= 1 + 1e-3


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
def test_subspace_iteration_path(shape):
    """A small block against a large side: the randomized solver iterates instead of eigh."""
    m, n = shape
    w, metric = _metric("gram", m, n)
    assert _plan(min(m, n), max(m, n), 36, "randomized", 16, 4)[0] == "explicit"
    ref = spectrum(w, metric, fast=False)
    spec = spectrum(w, metric, max_rank=20, solver="randomized", fast=True)
    assert not spec.exact and len(spec.s2) == 36 + 16
    assert _orthonormal(spec.u) < 1e-12
    assert spec.total == pytest.approx(ref.total, rel=1e-6)
    for r in (5, 20):
        assert spec.relative_error(r) == pytest.approx(ref.relative_error(r), rel=1e-3)
        assert factorize(w, spec, r, metric).error_ratio <= 1 + 1e-3
        assert _true_ratio(w, spec, ref, r, metric) <= 1 + 1e-3


def test_implicit_operator():
    """The implicit product (never forming the s x s matrix) is chosen for thin blocks
    over a long side, and its Ritz values are the top eigenvalues."""
    assert _plan(4096, 11008, 40, "randomized", 16, 4)[0] == "implicit"
    assert _plan(4096, 11008, 1040, "exact", 16, 4)[0] == "eigh"
    w, _ = _data(200, 900, 10)
    a = (w.double() @ w.double().T)
    evals = torch.linalg.eigvalsh(a).flip(0)
    theta, v = subspace_eigh(lambda x: w @ (w.T @ x), 200, 30, 4, 0)
    assert torch.allclose(theta[:10], evals[:10], rtol=1e-4)
    assert v.shape == (200, 30)


def test_full_spectrum_and_completion():
    """max_rank None: every energy and a full orthonormal basis, completed from the
    weight itself where the Gram has fewer directions than the layer."""
    w, metric = _metric("rank-deficient", 700, 300)
    ref = spectrum(w, metric, fast=False)
    spec = spectrum(w, metric, fast=True)
    assert spec.exact and spec.u.shape == (700, 300)
    assert _orthonormal(spec.u) < 1e-12
    assert len(spec.s2) == metric.root().shape[1]
    for r in (10, 100):
        assert spec.relative_error(r) == pytest.approx(ref.relative_error(r), rel=1e-5)
    f = factorize(w, spec, 300, metric)
    assert f.relative_error < 1e-5  # full rank: the weight itself


def test_untrusted_rank_falls_back_to_float64():
    """A nearly exactly low-rank layer: below the float32 noise the optimum is re-derived
    in float64, so the reported ratio stays exact."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(400, 12, generator=gen) @ torch.randn(12, 250, generator=gen)
    w = w + 1e-4 * torch.randn(400, 250, generator=gen)
    metric = Metric()
    spec = spectrum(w, metric, max_rank=40, fast=True)
    assert spec.trusted(4) and not spec.trusted(30)
    f = factorize(w, spec, 30, metric)
    assert f.error_ratio <= 1 + 1e-3 and spec.refined  # the float64 spectrum, cached
    ref = spectrum(w, metric, fast=False)
    assert f.optimal_error == pytest.approx(ref.relative_error(30), rel=1e-9)


def test_small_layers_keep_the_float64_path(monkeypatch):
    """Below FAST_PATH_MIN_WORK nothing changes, bit for bit (MiniLM-sized layers)."""
    for m, n in ((384, 1536), (1536, 384)):
        assert m * n * min(m, n) < lowrank.FAST_PATH_MIN_WORK
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 160, generator=gen)
    x, y = torch.randn(160, 400, generator=gen), torch.randn(96, 50, generator=gen)
    for weight, metric in ((w, Metric(gram=x @ x.T)), (w.T.contiguous(), Metric(gram=y @ y.T)), (w, Metric())):
        auto = spectrum(weight, metric, max_rank=20)
        old = spectrum(weight, metric, max_rank=20, fast=False)
        assert auto.noise == 0 and torch.equal(auto.u, old.u) and torch.equal(auto.s2, old.s2)
        assert auto.total == old.total
        fa, fo = factorize(weight, auto, 20, metric), factorize(weight, old, 20, metric)
        assert torch.equal(fa.a, fo.a) and torch.equal(fa.b, fo.b)
        assert fa.relative_error == fo.relative_error and fa.optimal_error == fo.optimal_error
    monkeypatch.setattr(lowrank, "FAST_PATH_MIN_WORK", 1)
    assert torch.is_tensor(spectrum(w, Metric(), max_rank=20).noise)
