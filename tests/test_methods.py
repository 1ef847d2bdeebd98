"""The maths: whitened SVD hits the theoretical optimum, gauge, singular Grams, embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrcompress.config import SVDConfig, WhitenedSVDConfig
from lrcompress.decompose import Metric, factorize, spectrum
from lrcompress.decompose.whiten import gram_root, metric_from_stats


def _problem(m: int, n: int, tokens: int, seed: int = 0, dead: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    # anisotropic, correlated inputs, like real activations
    x = torch.randn(n, tokens, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)[:, None]
    x = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] @ x
    if dead:
        x[:dead] = 0.0
    return w, x


def _numpy_optimum(w: torch.Tensor, x: torch.Tensor, r: int) -> float:
    """Independent reference: sqrt(sum_{i>r} lambda_i(W G W^T)) / sqrt(trace), via numpy eigvalsh."""
    wn, xn = w.numpy(), x.numpy()
    c = wn @ (xn @ xn.T) @ wn.T
    lam = np.sort(np.linalg.eigvalsh(c))[::-1]
    lam = np.clip(lam, 0, None)
    return math.sqrt(lam[r:].sum() / lam.sum())


def _output_error(w, a, b, x) -> float:
    d = (w - a.double() @ b.double()) @ x
    return float(d.norm() / (w @ x).norm())


@pytest.mark.parametrize("m,n,tokens,r", [(40, 30, 500, 5), (30, 40, 500, 12), (64, 64, 1000, 20)])
def test_whitened_svd_reaches_the_optimum(m, n, tokens, r):
    w, x = _problem(m, n, tokens)
    metric = metric_from_stats(gram=x @ x.T)
    spec = spectrum(w, metric)
    f = factorize(w.float(), spec, r, metric)
    achieved = _output_error(w.float().double(), f.a, f.b, x)
    optimum = _numpy_optimum(w.float().double(), x, r)
    assert achieved == pytest.approx(optimum, rel=2e-3)
    assert f.relative_error == pytest.approx(achieved, rel=1e-6)
    assert f.optimal_error == pytest.approx(optimum, rel=1e-6)
    assert f.error_ratio <= 1.005


def test_whitened_beats_plain_svd_on_the_data():
    w, x = _problem(48, 48, 800)
    metric = metric_from_stats(gram=x @ x.T)
    fw = factorize(w, spectrum(w, metric), 10, metric)
    fp = factorize(w, spectrum(w, Metric()), 10, Metric(), eval_metric=metric, eval_spec=spectrum(w, metric))
    assert fw.relative_error < 0.8 * fp.relative_error
    assert fp.error_ratio > 1.2  # plain SVD is far from the data optimum


def test_plain_svd_is_eckart_young():
    w, _ = _problem(30, 50, 10)
    s = torch.linalg.svdvals(w)
    f = factorize(w, spectrum(w, Metric()), 7, Metric())
    expected = math.sqrt(float((s[7:] ** 2).sum() / (s ** 2).sum()))
    assert f.relative_error == pytest.approx(expected, rel=1e-9)
    assert f.error_ratio == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("m,n", [(24, 32), (48, 20)])
@pytest.mark.parametrize("tokens,dead", [(10, 0), (200, 15), (3, 5)])
def test_singular_gram_is_handled_exactly(m, n, tokens, dead):
    """Fewer tokens than features and dead channels: no failure, still optimal, any rank fits."""
    w, x = _problem(m, n, tokens, dead=dead)
    g = x @ x.T
    assert torch.linalg.matrix_rank(g) < n
    metric = metric_from_stats(gram=g)
    spec = spectrum(w, metric)
    k = min(m, n)
    assert spec.u.shape[1] == k  # basis completed up to min(m, n)
    assert torch.allclose(spec.u.T @ spec.u, torch.eye(k, dtype=torch.float64), atol=1e-10)
    for r in (1, max(min(tokens, k) - 1, 1), k - 2):
        f = factorize(w, spec, r, metric)
        assert f.relative_error == pytest.approx(_numpy_optimum(w, x, r), rel=1e-6, abs=1e-7)
        assert torch.isfinite(f.a).all() and torch.isfinite(f.b).all()


def test_gram_root_squares_back():
    _, x = _problem(4, 20, 50, dead=3)
    g = x @ x.T
    l = gram_root(g)
    assert torch.allclose(l @ l.T, g, atol=1e-10 * float(g.abs().max()))


def test_balanced_gauge():
    w, x = _problem(50, 20, 400)
    metric = metric_from_stats(gram=x @ x.T)
    f = factorize(w, spectrum(w, metric), 8, metric)
    ata = f.a.T @ f.a
    bbt = f.b @ f.b.T
    assert torch.allclose(ata, bbt, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ata, torch.diag(torch.diagonal(ata)), atol=1e-9)


def test_factors_are_deterministic_and_sign_fixed():
    w, x = _problem(40, 30, 300)
    metric = metric_from_stats(gram=x @ x.T)
    f1 = factorize(w.float(), spectrum(w.float(), metric), 6, metric)
    f2 = factorize(w.float(), spectrum(w.float(), metric), 6, metric)
    assert torch.equal(f1.a, f2.a) and torch.equal(f1.b, f2.b)
    idx = f1.a.abs().argmax(0)
    assert (f1.a[idx, torch.arange(6)] > 0).all()


def test_diagonal_metric_weights_rows_by_frequency():
    """Embedding case: E^T with a diagonal Gram of token frequencies; optimum vs dense reference."""
    g = torch.Generator().manual_seed(3)
    e = torch.randn(100, 16, generator=g, dtype=torch.float64)
    freq = torch.rand(100, generator=g, dtype=torch.float64) ** 4
    metric = metric_from_stats(diag=freq)
    w = e.T
    f = factorize(w, spectrum(w, metric), 4, metric)
    x = torch.diag(freq.sqrt())  # any X with X X^T = diag(freq)
    assert f.relative_error == pytest.approx(_numpy_optimum(w, x, 4), rel=1e-6)
    plain = factorize(w, spectrum(w, Metric()), 4, Metric(), eval_metric=metric, eval_spec=spectrum(w, metric))
    assert f.relative_error < plain.relative_error


def test_randomized_solver_matches_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -4, 150, dtype=torch.float64)
    w = u[:, :150] @ torch.diag(s) @ v.T
    exact = factorize(w, spectrum(w, Metric()), 10, Metric())
    spec = spectrum(w, Metric(), max_rank=10, solver="randomized", oversample=10, power_iters=3, seed=0)
    assert not spec.exact and spec.u.shape[1] == 20
    approx = factorize(w, spec, 10, Metric())
    assert approx.relative_error == pytest.approx(exact.relative_error, rel=1e-3)


def test_config_round_trips():
    from lrcompress.config import CompressConfig
    for cfg in (CompressConfig(ratio=0.5), CompressConfig(method=SVDConfig(solver="randomized"), rank=8,
                                                           targets=("re:fc.*",), exclude=("head",)),
                CompressConfig(method=WhitenedSVDConfig(embedding_smoothing=0.3), energy=0.9, allocate="uniform",
                               scope="model")):
        import json
        assert CompressConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
