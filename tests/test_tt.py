"""Tensor-train Linear: TT-SVD (decompose/tt.py, tensorly's tensor_train_matrix) and TTLinear (tt_layers.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from lrcompress.decompose.tt import (tt_flops, tt_full_ranks, tt_matrix, tt_max_rank_for_params, tt_modes,
                                   tt_params, tt_shape, tt_to_matrix)
from lrcompress.methods.tt_layers import TTLinear, build_tt_shell, tt_shell_info


def _linear(out_f: int, in_f: int, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f))
        lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("n, d", [(384, 3), (1536, 3), (768, 3), (4096, 3), (1000, 3), (64, 2), (3072, 4)])
def test_tt_shape_balanced(n: int, d: int) -> None:
    modes = tt_shape(n, d)
    assert len(modes) == d and math.prod(modes) == n and min(modes) >= 2
    assert max(modes) / min(modes) <= 4
    assert list(modes) == sorted(modes)


def test_tt_shape_examples() -> None:
    assert tt_shape(384) == (6, 8, 8)
    assert tt_shape(1536) == (8, 12, 16)
    assert tt_modes(1536, 384) == ((8, 12, 16), (8, 8, 6))


@pytest.mark.parametrize("n", [997, 998, 30522])
def test_tt_shape_awkward_sizes_fail_clearly(n: int) -> None:
    with pytest.raises(ValueError) as e:
        tt_shape(n)
    msg = str(e.value)
    assert str(n) in msg and "pad=True" in msg and "explicit modes" in msg
    if n == 997:
        assert "997 is prime" in msg and "1000" in msg


def test_tt_shape_pad() -> None:
    assert tt_shape(997, pad=True) == (10, 10, 10)
    with pytest.raises(ValueError, match="positive int"):
        tt_shape(0)
    with pytest.raises(ValueError, match="d=1"):
        tt_shape(64, 1)


# ----------------------------------------------------------------------------- TT-SVD

def test_full_ranks_reproduce_dense_linear() -> None:
    lin = _linear(96, 48)
    om, im = tt_modes(96, 48)
    f = tt_matrix(lin.weight, om, im)
    assert f.ranks == tt_full_ranks(om, im)
    assert f.relative_error < 1e-6 and f.svd_error < 1e-12
    m = TTLinear.from_factors(f, lin.bias)
    with torch.no_grad():
        for shape in [(7, 48), (3, 5, 48), (48,)]:
            x = torch.randn(*shape)
            y, ref = m(x), lin(x)
            assert y.shape == ref.shape
            assert _rel(y, ref) < 1e-5
        assert _rel(m.dense_weight(), lin.weight) < 1e-6


def test_reduced_ranks_match_independent_tt_svd() -> None:
    """Error equals tensorly's tensor_train_matrix (independent TT-SVD) and the discarded energy."""
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_matrix

    w = _linear(96, 48).weight.detach().to(torch.float64)
    om, im = (4, 4, 6), (4, 4, 3)
    for ranks in [(1, 5, 7, 1), (1, 12, 3, 1)]:
        f = tt_matrix(w, om, im, ranks)
        assert f.ranks == ranks
        with tl.backend_context("pytorch"):
            ref = tt_matrix_to_matrix(tensor_train_matrix(w.reshape(*om, *im), rank=list(ranks)))
        err_ref = _rel(ref, w)
        assert 0.05 < f.relative_error < 1
        assert f.relative_error == pytest.approx(err_ref, rel=1e-9)
        assert f.svd_error == pytest.approx(err_ref, rel=1e-9)
        assert _rel(tt_to_matrix(f.cores), ref) < 1e-9  # same approximation, not just the same error
        ours = TTLinear.from_factors(f).dense_weight()
        assert _rel(ours, ref) < 1e-9


def test_float32_weight_error_measured_on_shipped_cores() -> None:
    lin = _linear(64, 64)
    f = tt_matrix(lin.weight, (4, 4, 4), (4, 4, 4), max_rank=8)
    assert all(c.dtype == torch.float32 for c in f.cores)
    assert f.relative_error == pytest.approx(f.svd_error, rel=1e-4)
    m = TTLinear.from_factors(f, lin.bias)
    assert _rel(m.dense_weight().double(), lin.weight.double()) == pytest.approx(f.relative_error, rel=1e-4)


def test_tol_controls_error_and_ranks_clip() -> None:
    w = _linear(64, 64).weight.detach()
    # a weight with exact TT structure at ranks (1, 3, 2, 1) plus a tiny perturbation
    g = torch.Generator().manual_seed(3)
    cores = [torch.randn(1, 4, 4, 3, generator=g), torch.randn(3, 4, 4, 2, generator=g),
             torch.randn(2, 4, 4, 1, generator=g)]
    low = tt_to_matrix(cores)
    f = tt_matrix(low + 1e-8 * w, (4, 4, 4), (4, 4, 4), tol=1e-5)
    assert f.ranks == (1, 3, 2, 1) and f.relative_error < 1e-5
    f = tt_matrix(w, (4, 4, 4), (4, 4, 4), tol=0.3)
    assert f.relative_error <= 0.3
    f = tt_matrix(w, (4, 4, 4), (4, 4, 4), max_rank=10_000)  # clipped to the exact ranks
    assert f.ranks == tt_full_ranks((4, 4, 4), (4, 4, 4)) == (1, 16, 16, 1)


def test_params_count() -> None:
    lin = _linear(1536, 384)
    om, im = tt_modes(1536, 384)
    f = tt_matrix(lin.weight, om, im, max_rank=16)
    expected = 1 * 8 * 8 * 16 + 16 * 12 * 8 * 16 + 16 * 16 * 6 * 1
    assert f.ranks == (1, 16, 16, 1)
    assert f.params == expected == tt_params(om, im, f.ranks)
    assert f.ratio == pytest.approx(expected / (1536 * 384))
    m = TTLinear.from_factors(f, lin.bias)
    assert sum(p.numel() for p in m.parameters()) == expected + 1536
    r = tt_max_rank_for_params(om, im, expected)
    assert r == 16
    assert tt_flops(om, im, f.ranks) == 48 * (8 * 8 * 16) + (8 * 6) * (16 * 8 * 12 * 16) + 96 * (16 * 6 * 16)


def test_bad_arguments() -> None:
    w = torch.randn(64, 64)
    with pytest.raises(ValueError, match="hold 64 x 32"):
        tt_matrix(w, (4, 4, 4), (4, 4, 2))
    with pytest.raises(ValueError, match="inner or 4 entries"):
        tt_matrix(w, (4, 4, 4), (4, 4, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="not both"):
        tt_matrix(w, (4, 4, 4), (4, 4, 4), 4, max_rank=4)
    with pytest.raises(ValueError, match="needs in_gram"):
        tt_matrix(w, (4, 4, 4), (4, 4, 4), 4, scale_inputs=True)
    with pytest.raises(ValueError, match="scale_power"):
        tt_matrix(w, (4, 4, 4), (4, 4, 4), 4, in_gram=torch.eye(64), scale_inputs=True, scale_power=2)
    with pytest.raises(ValueError, match="NaN"):
        tt_matrix(torch.full((64, 64), float("nan")), (4, 4, 4), (4, 4, 4), 4)


# ----------------------------------------------------------------------------- padding and data

def test_padded_modes_give_exactly_the_unpadded_result() -> None:
    lin = _linear(997, 30)
    om = tt_shape(997, pad=True)
    im = (2, 3, 5)
    f = tt_matrix(lin.weight, om, im)  # exact ranks on the zero-padded 1000 x 30 weight
    m = TTLinear.from_factors(f, lin.bias)
    x = torch.randn(4, 6, 30)
    with torch.no_grad():
        assert _rel(m(x), lin(x)) < 1e-5
    # truncated: the padded layer computes exactly W'[:out, :in] x + b
    f = tt_matrix(lin.weight, om, (2, 4, 4), max_rank=6)  # 32 inputs for 30 features
    m = TTLinear.from_factors(f, lin.bias)
    with torch.no_grad():
        assert torch.allclose(m(x), x @ m.dense_weight().T + lin.bias, atol=1e-5)
        assert m(x).shape == (4, 6, 997)


def test_in_gram_output_error_and_input_scaling() -> None:
    lin = _linear(64, 64)
    g = torch.Generator().manual_seed(2)
    # inputs whose channels differ in scale by orders of magnitude (as in transformer activations)
    x = torch.randn(2048, 64, generator=g) * torch.logspace(-2, 1, 64)[torch.randperm(64, generator=g)]
    gram = (x.T.double() @ x.double())
    plain = tt_matrix(lin.weight, (4, 4, 4), (4, 4, 4), max_rank=12, in_gram=gram)
    scaled = tt_matrix(lin.weight, (4, 4, 4), (4, 4, 4), max_rank=12, in_gram=gram, scale_inputs=True)
    with torch.no_grad():
        for f in (plain, scaled):
            m = TTLinear.from_factors(f, None)
            measured = _rel(m(x).double(), (x @ lin.weight.T).double())
            assert f.output_error == pytest.approx(measured, rel=1e-3)
    assert scaled.in_scale is not None and scaled.params == plain.params + 64
    assert scaled.output_error < 0.7 * plain.output_error
    assert plain.relative_error < scaled.relative_error < 2  # weight space favours the plain one


# ----------------------------------------------------------------------------- module

def test_shell_round_trip_is_exact() -> None:
    lin = _linear(96, 48)
    for kw in ({}, {"in_gram": torch.eye(48, dtype=torch.float64) * torch.arange(1, 49), "scale_inputs": True}):
        f = tt_matrix(lin.weight, (4, 4, 6), (4, 4, 3), max_rank=5, **kw)
        m = TTLinear.from_factors(f, lin.bias)
        info = json.loads(json.dumps(tt_shell_info(m)))
        shell = build_tt_shell(info)
        shell.load_state_dict(m.state_dict())
        x = torch.randn(3, 5, 48)
        with torch.no_grad():
            assert torch.equal(shell(x), m(x))
        assert "ranks=(1, 5, 5, 1)" in repr(shell)
    no_bias = TTLinear.from_factors(f, None)
    assert build_tt_shell(tt_shell_info(no_bias)).bias is None
    with pytest.raises(ValueError, match="kind"):
        build_tt_shell({"kind": "linear"})


def test_fresh_module_init_scale_and_gradients() -> None:
    m = TTLinear(384, 1536, (8, 12, 16), (8, 8, 6), (1, 16, 16, 1))
    w = m.dense_weight().detach()
    assert 0.5 < float(w.var()) * 3 * 384 < 2.0
    x = torch.randn(4, 384)
    m(x).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_exports_with_plain_ops_and_dynamic_batch() -> None:
    lin = _linear(96, 48)
    f = tt_matrix(lin.weight, (4, 4, 6), (4, 4, 3), max_rank=5)
    m = TTLinear.from_factors(f, lin.bias).eval()
    ex = torch.export.export(m, (torch.randn(2, 5, 48),),
                             dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("t")},))
    ops = {str(n.target) for n in ex.graph.nodes if n.op == "call_function"}
    allowed = {"aten.reshape.default", "aten.view.default", "aten.matmul.default", "aten.mm.default",
               "aten.permute.default", "aten.transpose.int", "aten.add.Tensor", "aten.sym_size.int"}
    assert ops <= allowed, ops - allowed
    x = torch.randn(7, 3, 48)
    with torch.no_grad():
        assert torch.allclose(ex.module()(x), m(x), atol=1e-6)


def test_batch1_speed_vs_dense_is_reasonable() -> None:
    """Printed, not asserted on wall time: TT saves parameters much more than it saves time."""
    lin = _linear(1536, 384)
    om, im = tt_modes(1536, 384)
    x = torch.randn(1, 384)
    lines = []

    def median_us(fn) -> float:
        with torch.no_grad():
            for _ in range(10):
                fn(x)
            ts = []
            for _ in range(200):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2] * 1e6

    dense = median_us(lin)
    for r in (8, 16):
        f = tt_matrix(lin.weight, om, im, max_rank=r)
        m = TTLinear.from_factors(f, lin.bias)
        tt = median_us(m)
        lines.append(f"rank {r}: TT {tt:.0f} us vs dense {dense:.0f} us (x{tt / dense:.2f}), params "
                     f"{f.params} vs {1536 * 384}, MACs {tt_flops(om, im, f.ranks)} vs {1536 * 384}")
        assert math.isfinite(tt)
    print("\nTT 1536x384 batch 1:\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------- tensorly port

def _np_tt_svd(w: np.ndarray, om: tuple[int, ...], im: tuple[int, ...], ranks: tuple[int, ...]
               ) -> tuple[np.ndarray, float]:
    """Independent TT-SVD in numpy: (dense approximation, sqrt(sum of discarded sigma^2))."""
    d = len(om)
    dims = [o * i for o, i in zip(om, im)]
    t = w.reshape(*om, *im).transpose([p for k in range(d) for p in (k, d + k)])
    c, r_prev, disc, cores = t.reshape(-1), 1, 0.0, []
    for k in range(d - 1):
        u, s, vt = np.linalg.svd(c.reshape(r_prev * dims[k], -1), full_matrices=False)
        r = min(ranks[k + 1], len(s))
        disc += float((s[r:] ** 2).sum())
        cores.append(u[:, :r].reshape(r_prev, om[k], im[k], r))
        c, r_prev = s[:r, None] * vt[:r], r
    cores.append(c.reshape(r_prev, om[-1], im[-1], 1))
    res = cores[0]
    for core in cores[1:]:
        res = np.tensordot(res, core, axes=(-1, 0))
    res = res.reshape([v for pair in zip(om, im) for v in pair])  # (o_1, i_1, ..., o_d, i_d)
    res = res.transpose(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
    return res.reshape(math.prod(om), math.prod(im)), math.sqrt(disc)


@pytest.mark.parametrize("om, im, ranks", [((4, 4, 6), (4, 4, 3), (1, 5, 7, 1)),
                                          ((4, 4, 6), (4, 4, 3), (1, 12, 3, 1)),
                                          ((2, 3, 4, 4), (3, 2, 2, 4), (1, 4, 9, 6, 1)),
                                          ((8, 12), (6, 8), (1, 10, 1))])
def test_port_matches_numpy_tt_svd(om, im, ranks) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(math.prod(om), math.prod(im), generator=g, dtype=torch.float64)
    ref, disc = _np_tt_svd(w.numpy(), om, im, ranks)
    err_ref = float(np.linalg.norm(w.numpy() - ref) / np.linalg.norm(w.numpy()))
    f = tt_matrix(w, om, im, ranks)
    assert f.ranks == ranks
    assert 0.05 < f.relative_error < 1
    assert f.relative_error == pytest.approx(err_ref, rel=1e-9)
    assert f.svd_error == pytest.approx(err_ref, rel=1e-9)
    assert err_ref == pytest.approx(disc / float(w.norm()), rel=1e-9)  # TT-SVD: error^2 = discarded energy
    assert _rel(tt_to_matrix(f.cores), torch.from_numpy(ref)) < 1e-9  # the same approximation


def test_port_two_cores_is_the_optimal_kronecker_sum() -> None:
    """d = 2: TT-SVD is the truncated SVD of the rearranged (o_1 i_1) x (o_2 i_2) matrix, so its
    error is the Eckart-Young optimum sqrt(sum_{j > r} sigma_j^2) (Van Loan-Pitsianis)."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(96, 48, generator=g, dtype=torch.float64)
    om, im = (8, 12), (6, 8)
    rearranged = w.reshape(8, 12, 6, 8).permute(0, 2, 1, 3).reshape(48, 96)
    s = torch.linalg.svdvals(rearranged)
    for r in (1, 7, 30):
        f = tt_matrix(w, om, im, r)
        assert f.ranks == (1, r, 1)
        assert f.relative_error == pytest.approx(float(s[r:].norm() / w.norm()), rel=1e-9)


def test_port_exact_cases() -> None:
    """Full ranks reproduce the matrix; a matrix of known TT-ranks is recovered at those ranks."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 48, generator=g, dtype=torch.float64)
    f = tt_matrix(w, (4, 4, 6), (4, 4, 3))
    assert f.ranks == tt_full_ranks((4, 4, 6), (4, 4, 3))
    assert f.relative_error < 1e-10 and f.svd_error < 1e-10
    assert _rel(tt_to_matrix(f.cores), w) < 1e-10

    cores = [torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64),
             torch.randn(3, 5, 4, 2, generator=g, dtype=torch.float64),
             torch.randn(2, 3, 4, 1, generator=g, dtype=torch.float64)]
    low = tt_to_matrix(cores)  # 60 x 48 of TT-ranks (1, 3, 2, 1)
    f = tt_matrix(low, (4, 5, 3), (3, 4, 4), (1, 3, 2, 1))
    assert f.relative_error < 1e-10 and _rel(tt_to_matrix(f.cores), low) < 1e-10
    f = tt_matrix(low, (4, 5, 3), (3, 4, 4), tol=1e-10)  # own rank choice finds the ranks
    assert f.ranks == (1, 3, 2, 1) and f.relative_error < 1e-10
    f = tt_matrix(low, (4, 5, 3), (3, 4, 4), (1, 2, 2, 1))  # one bond short: not exact
    assert f.relative_error > 1e-3


def test_port_tol_ranks_then_tensorly_at_those_ranks() -> None:
    w = _linear(64, 64).weight.detach().double()
    for tol in (0.1, 0.3, 0.6):
        f = tt_matrix(w, (4, 4, 4), (4, 4, 4), tol=tol)
        assert f.svd_error <= tol
        same = tt_matrix(w, (4, 4, 4), (4, 4, 4), f.ranks)
        assert all(torch.equal(a, b) for a, b in zip(f.cores, same.cores))
        smaller = [(f.ranks[:k] + (f.ranks[k] - 1,) + f.ranks[k + 1:]) for k in (1, 2) if f.ranks[k] > 1]
        # each bond is the smallest its step allows: one less there alone discards > tol^2 / (d - 1)
        assert tt_matrix(w, (4, 4, 4), (4, 4, 4), smaller[0]).svd_error > tol / math.sqrt(2)
    z = tt_matrix(torch.zeros(16, 16, dtype=torch.float64), (4, 4), (4, 4))  # exact default drops zeros
    assert z.ranks == (1, 1, 1) and z.relative_error == 0 and z.svd_error == 0


def test_port_uses_tensorly_without_touching_its_global_backend(monkeypatch) -> None:
    tl = pytest.importorskip("tensorly")
    import tensorly.decomposition as tld

    assert tl.get_backend() == "numpy"
    seen = []
    orig = tld.tensor_train_matrix

    def spy(tensor, rank, **kw):
        other = []
        th = threading.Thread(target=lambda: other.append(tl.get_backend()))
        th.start()
        th.join()
        seen.append((tl.get_backend(), other[0], tuple(tensor.shape), list(rank), tensor.dtype))
        return orig(tensor, rank, **kw)

    monkeypatch.setattr(tld, "tensor_train_matrix", spy)
    f = tt_matrix(_linear(96, 48).weight, (4, 4, 6), (4, 4, 3), max_rank=5)
    assert f.ranks == (1, 5, 5, 1)
    # pytorch backend in this thread only, float64, matrix given as (o_1..o_d, i_1..i_d)
    assert seen == [("pytorch", "numpy", (4, 4, 6, 4, 4, 3), [1, 5, 5, 1], torch.float64)]
    assert tl.get_backend() == "numpy"


def test_module_import_does_not_import_tensorly() -> None:
    code = "import sys, lrcompress.decompose.tt; print('tensorly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("scale_inputs", [False, True])
def test_port_output_error_is_measured_on_inputs(scale_inputs: bool) -> None:
    g = torch.Generator().manual_seed(8)
    w = torch.randn(60, 30, generator=g, dtype=torch.float64)
    x = torch.randn(30, 500, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 30, dtype=torch.float64)[:, None]
    om, im = (3, 4, 5), (2, 4, 4)  # 32 inputs for 30 features: zero-padded
    f = tt_matrix(w, om, im, max_rank=6, in_gram=x @ x.T, scale_inputs=scale_inputs)
    approx = tt_to_matrix(f.cores)[:60, :30]
    if scale_inputs:
        approx = approx * f.in_scale[None, :]
    direct = float(((w - approx) @ x).norm() / (w @ x).norm())
    assert 0.01 < direct < 1
    assert f.output_error == pytest.approx(direct, rel=1e-9)
    assert f.relative_error == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-9)
