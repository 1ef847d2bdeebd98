"""Conv2d factorizations: Tucker-2 and CP keep every hyper-parameter, hit the HOOI / closed-form
errors, use the channel Gram, refuse what they cannot represent and reload from shells."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lrcompress.methods.conv_layers import (
    CPConv2d,
    TuckerConv2d,
    build_conv_shell,
    conv_hyper,
    conv_shell_info,
    conv_unsupported,
)
from lrcompress.errors import ConfigError
from lrcompress.methods import cp as cp_method
from lrcompress.methods import tucker as tucker_method
from lrcompress.decompose.cp import cp_break_even, cp_conv, cp_params
from lrcompress.decompose.tucker import (
    dense_conv_params,
    tucker2,
    tucker_break_even,
    tucker_params,
    tucker_saves,
)

# (kernel, stride, padding, dilation, bias, padding_mode)
CONVS = [
    (3, 1, 1, 1, True, "zeros"),
    ((3, 5), (2, 1), (0, 2), (1, 2), False, "zeros"),
    (3, 2, 2, 2, True, "zeros"),
    ((5, 3), 1, "same", (2, 1), True, "zeros"),  # torch allows 'same' only with stride 1
    ((2, 3), 1, "valid", 1, False, "zeros"),
    ((3, 2), (2, 1), (1, 1), 1, True, "reflect"),
    (3, (1, 2), (2, 1), (1, 2), True, "replicate"),
    ((3, 5), 1, (1, 2), 1, False, "circular"),
]


def _conv(cin: int, cout: int, spec, seed: int = 0) -> nn.Conv2d:
    kernel, stride, padding, dilation, bias, mode = spec
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=bias, padding_mode=mode)


def _x(cin: int, seed: int = 1, n: int = 2, hw: tuple[int, int] = (11, 13)) -> torch.Tensor:
    return torch.randn(n, cin, *hw, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tucker_module(conv: nn.Conv2d, ranks, gram=None) -> TuckerConv2d:
    return tucker_method.tucker_module(conv, ranks, in_gram=gram)[0]


def _anisotropic(cin: int, seed: int, n: int = 16, hw: int = 8, dead: int = 0) -> torch.Tensor:
    """Inputs whose channel covariance spans two decades, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cin, hw, hw, generator=g)
    q = torch.linalg.qr(torch.randn(cin, cin, generator=g))[0]
    x = torch.einsum("ij,bjhw->bihw", q * torch.logspace(0, -2, cin)[None, :], z)
    if dead:
        x[:, :dead] = 0.0
    return x


def _channel_gram(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return torch.einsum("bihw,bjhw->ij", xd, xd)


@pytest.mark.parametrize("spec", CONVS, ids=[f"{i}" for i in range(len(CONVS))])
@torch.no_grad()
def test_tucker_full_rank_reproduces_dense_and_reduced_shape(spec) -> None:
    conv = _conv(5, 7, spec)
    assert tucker_method.supported(conv) is None
    x = _x(5)
    y = conv(x)
    full = _tucker_module(conv, (7, 5))
    assert _rel(full(x), y) < 1e-5
    assert float((full.dense_weight() - conv.weight).abs().max()) < 1e-5
    small = _tucker_module(conv, (3, 2))
    assert small(x).shape == y.shape
    assert small.ranks == (3, 2) and "ranks(out,in)=(3, 2)" in repr(small)


@pytest.mark.parametrize("spec", CONVS, ids=[f"{i}" for i in range(len(CONVS))])
@torch.no_grad()
def test_cp_exact_factors_reproduce_dense_every_padding_mode(spec) -> None:
    """An exactly rank-R kernel rebuilt through the split depthwise convs matches the dense
    conv for every stride/padding/dilation and padding mode (padding commutes with the
    pointwise maps, and a row-only conv commutes with column padding)."""
    conv = _conv(5, 7, spec)
    assert cp_method.supported(conv) is None
    kh, kw = conv.kernel_size
    g = torch.Generator().manual_seed(3)
    r = 4
    a, b = torch.randn(7, r, generator=g), torch.randn(r, 5, generator=g)
    c, d = torch.randn(r, kh, generator=g), torch.randn(r, kw, generator=g)
    conv.weight.copy_(torch.einsum("or,ri,rp,rq->oipq", a, b, c, d))
    h = conv_hyper(conv)
    m = CPConv2d.from_factors(b[:, :, None, None], c[:, None, :, None], d[:, None, None, :],
                              a[:, :, None, None], conv.bias, stride=h["stride"],
                              padding=h["padding"], dilation=h["dilation"], padding_mode=h["padding_mode"])
    x = _x(5)
    assert _rel(m(x), conv(x)) < 1e-5
    m2, f = cp_method.cp_module(conv, 8)
    assert m2(x).shape == conv(x).shape and f.fit > 0.99
    assert "rank=8" in repr(m2)


def test_tucker_error_matches_hooi_and_closed_forms() -> None:
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    g = torch.Generator().manual_seed(0)
    # a kernel with decaying mode spectra, like a trained one
    w = torch.einsum("ai,bj,ijpq->abpq", torch.randn(24, 24, generator=g, dtype=torch.float64),
                     torch.randn(16, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 16, dtype=torch.float64),
                     torch.randn(24, 16, 3, 3, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 24, dtype=torch.float64)[:, None, None, None])
    ranks = (10, 6)
    f = tucker2(w, ranks)
    with tl.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = partial_tucker(w, list(ranks), modes=[0, 1], n_iter_max=200, tol=1e-12)
    ref = torch.einsum("abpq,oa,ib->oipq", core, u_out, u_in)
    ref_err = float((ref - w).norm() / w.norm())
    approx = torch.einsum("oa,abpq,bi->oipq", f.last[:, :, 0, 0], f.core, f.first[:, :, 0, 0])
    assert abs(float((approx - w).norm() / w.norm()) - f.relative_error) < 1e-9
    assert f.relative_error <= ref_err * (1 + 1e-6)
    assert f.relative_error == pytest.approx(ref_err, rel=1e-3)
    assert f.lower_bound <= f.relative_error + 1e-12 and f.optimal_error is None
    # one full rank: Tucker-2 is a matrix SVD of an unfolding, optimal in closed form
    for rk in ((24, 6), (10, 16)):
        fr = tucker2(w, rk)
        assert fr.optimal_error is not None and fr.error_ratio == pytest.approx(1.0, abs=1e-9)
    # factors are orthonormal, the core carries the scale
    a = f.first[:, :, 0, 0]
    u = f.last[:, :, 0, 0]
    assert torch.allclose(a @ a.T, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(10, dtype=torch.float64), atol=1e-10)
    # deterministic: bit-identical on a second run
    f2 = tucker2(w, ranks)
    assert torch.equal(f.first, f2.first) and torch.equal(f.core, f2.core) and torch.equal(f.last, f2.last)


@torch.no_grad()
def test_tucker_data_aware_lowers_output_error() -> None:
    conv = _conv(16, 24, (3, 1, 1, 1, True, "zeros"), seed=4)
    x = _anisotropic(16, seed=4)
    gram = _channel_gram(x)
    y = conv(x) - conv.bias[None, :, None, None]
    errs = {}
    for name, gm in (("plain", None), ("data", gram)):
        m = _tucker_module(conv, (8, 4), gm)
        errs[name] = _rel(m(x) - conv.bias[None, :, None, None], y)
    assert errs["data"] < 0.8 * errs["plain"]
    f = tucker2(conv.weight, (8, 4), in_gram=gram)
    assert f.data_aware
    # with i.i.d. pixels the channel-metric proxy predicts the measured output error
    assert f.relative_error == pytest.approx(errs["data"], rel=0.05)
    # input rank full / output rank full: the data-aware closed forms are attained
    for rk in ((8, 16), (24, 4)):
        fr = tucker2(conv.weight, rk, in_gram=gram)
        assert fr.error_ratio == pytest.approx(1.0, abs=1e-6)


@torch.no_grad()
def test_tucker_singular_gram_exact_at_full_rank_and_scale_free() -> None:
    conv = _conv(12, 10, ((3, 3), 1, 1, 1, True, "zeros"), seed=5)
    x = _anisotropic(12, seed=5, n=2, hw=2, dead=3)  # 8 pixels < 12 channels, 3 dead channels
    gram = _channel_gram(x)
    assert int(torch.linalg.matrix_rank(gram)) < 12
    full = _tucker_module(conv, (10, 12), gram)
    xt = _x(12)
    assert _rel(full(xt), conv(xt)) < 1e-5  # the completion keeps what the data never excites
    f1 = tucker2(conv.weight, (6, 5), in_gram=gram)
    f2 = tucker2(conv.weight, (6, 5), in_gram=gram * 1e6)
    assert f1.relative_error == pytest.approx(f2.relative_error, rel=1e-6)
    assert math.isfinite(f1.relative_error) and f1.relative_error >= f1.lower_bound - 1e-9
    # the data-aware error on the calibration data is the lowest one can ship at these ranks
    plain = tucker2(conv.weight, (6, 5))
    d = conv.weight.double()
    def data_err(f):
        ap = torch.einsum("oa,abpq,bi->oipq", f.last[:, :, 0, 0].double(), f.core.double(), f.first[:, :, 0, 0].double())
        diff = (d - ap).permute(2, 3, 0, 1).reshape(9, 10, 12)
        return float(torch.einsum("poi,ij,poj->", diff, gram, diff))
    assert data_err(f1) < data_err(plain)


def test_cp_recovers_exact_rank_kernel_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(7)
    r = 6
    w = torch.einsum("or,ir,pr,qr->oipq", torch.randn(16, r, generator=g), torch.randn(8, r, generator=g),
                     torch.randn(3, r, generator=g), torch.randn(3, r, generator=g))
    for rank in (r, r + 2):
        f = cp_conv(w, rank, max_iter=1000, tol=1e-10)
        assert f.fit > 0.999, (rank, f.fit, f.iterations)
        assert f.usable and f.reason is None
        assert f.first.shape == (rank, 8, 1, 1) and f.vertical.shape == (rank, 1, 3, 1)
        assert f.horizontal.shape == (rank, 1, 1, 3) and f.last.shape == (16, rank, 1, 1)
        m = CPConv2d.from_factors(f.first, f.vertical, f.horizontal, f.last).requires_grad_(False)
        assert float((m.dense_weight() - w).norm() / w.norm()) == pytest.approx(f.relative_error, abs=1e-6)
    f1, f2 = cp_conv(w, r, seed=3), cp_conv(w, r, seed=3)
    assert all(torch.equal(getattr(f1, k), getattr(f2, k)) for k in ("first", "vertical", "horizontal", "last"))


def test_cp_low_fit_is_flagged_not_usable_and_data_aware_runs() -> None:
    conv = _conv(16, 24, (3, 1, 1, 1, True, "zeros"), seed=6)
    f = cp_conv(conv.weight, 4, max_iter=30)
    assert not f.usable and "fit" in f.reason and not f.converged and f.iterations == 30
    x = _anisotropic(16, seed=6)
    gram = _channel_gram(x)
    y = (conv(x) - conv.bias[None, :, None, None]).detach()
    errs = {}
    for name, gm in (("plain", None), ("data", gram)):
        fc = cp_conv(conv.weight, 12, in_gram=gm, max_iter=100)
        m = CPConv2d.from_factors(fc.first, fc.vertical, fc.horizontal, fc.last, padding=1)
        with torch.no_grad():
            errs[name] = _rel(m(x), y)
    assert errs["data"] < errs["plain"]


def test_supported_refuses_with_reasons() -> None:
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    for method in (tucker_method.supported, cp_method.supported):
        assert "grouped/depthwise" in method(grouped) and "groups=2" in method(grouped)
        assert "svd-whiten" in method(nn.Conv2d(8, 8, 1))
        assert method(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")) is None
        assert method(nn.Conv2d(8, 8, (3, 1))) is None
        # 'same' with an even kernel pads asymmetrically: integer padding cannot express it
        reason = method(nn.Conv2d(8, 8, 2, padding="same"))
        assert reason is not None and "asymmetric" in reason
        assert "not an nn.Conv2d" in method(nn.Linear(3, 3))
    assert conv_hyper(nn.Conv2d(2, 2, (5, 3), padding="same", dilation=(1, 2)))["padding"] == (2, 2)
    assert conv_hyper(nn.Conv2d(2, 2, 3, padding="valid"))["padding"] == (0, 0)
    with pytest.raises(ConfigError, match="grouped"):
        tucker_method.tucker_module(grouped, (4, 4))
    with pytest.raises(ConfigError, match="grouped"):
        cp_method.cp_module(grouped, 4)
    with pytest.raises(ValueError):
        conv_unsupported(grouped, "tt")
    with pytest.raises(ValueError, match="ranks"):
        tucker2(torch.randn(4, 3, 3, 3), (5, 2))


@pytest.mark.parametrize("kind", ["tucker", "cp"])
@torch.no_grad()
def test_shell_roundtrip_identical(kind: str) -> None:
    conv = _conv(6, 9, ((3, 5), (2, 1), (1, 2), (1, 2), True, "reflect"), seed=2)
    h = conv_hyper(conv)
    hyper = {k: h[k] for k in ("stride", "padding", "dilation", "padding_mode")}
    if kind == "tucker":
        f = tucker2(conv.weight, (4, 3))
        mod = TuckerConv2d.from_factors(f.first, f.core, f.last, conv.bias, **hyper)
    else:
        f = cp_conv(conv.weight, 5, max_iter=20)
        mod = CPConv2d.from_factors(f.first, f.vertical, f.horizontal, f.last, conv.bias, **hyper)
    info = json.loads(json.dumps(conv_shell_info(mod)))
    assert info["kind"] == kind
    shell = build_conv_shell(kind, info)
    shell.load_state_dict(mod.state_dict())
    x = _x(6)
    assert torch.equal(shell(x), mod(x))
    with pytest.raises(ValueError):
        build_conv_shell("cp" if kind == "tucker" else "tucker", info)


def test_parameter_counts_and_break_even() -> None:
    assert tucker_params(128, 64, 3, 3, 32, 16) == 64 * 16 + 16 * 32 * 9 + 32 * 128 + 128
    assert dense_conv_params(128, 64, 3, 3) == 128 * 64 * 9 + 128
    r_out, r_in = tucker_break_even(128, 64, 3, 3)
    assert tucker_saves(128, 64, 3, 3, r_out, r_in)
    assert not tucker_saves(128, 64, 3, 3, 128, 64)
    m = TuckerConv2d(64, 128, 3, (r_out, r_in))
    assert sum(p.numel() for p in m.parameters()) == tucker_params(128, 64, 3, 3, r_out, r_in)
    r = cp_break_even(128, 64, 3, 3)
    assert cp_params(128, 64, 3, 3, r, bias=False) < 128 * 64 * 9 <= cp_params(128, 64, 3, 3, r + 1, bias=False)
    c = CPConv2d(64, 128, 3, 20)
    assert sum(p.numel() for p in c.parameters()) == cp_params(128, 64, 3, 3, 20)
