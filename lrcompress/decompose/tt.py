"""Tensor-train (TT-matrix) factorization of a Linear weight.

A weight W (out x in) with out = o_1...o_d and in = i_1...i_d is viewed as the tensor
W[(o_1,i_1), ..., (o_d,i_d)] and split by TT-SVD (Oseledets 2011) into d cores
G_k of shape (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1 (tensorly's TT-matrix layout):

    W[o, i] = G_1[:, o_1, i_1, :] @ G_2[:, o_2, i_2, :] @ ... @ G_d[:, o_d, i_d, :]

TT-SVD is tensorly's ``tensorly.decomposition.tensor_train_matrix`` (sequential truncated SVDs
of the unfoldings), run in float64 on tensorly's PyTorch backend inside a thread-local
``tensorly.backend_context("pytorch")`` (tensorly's global backend is never changed; tensorly is
imported on the first factorization, not with this module). Its cores already come in the layout
above and its ``svd_flip`` makes the signs deterministic (largest-|u| entry of each left singular
vector > 0). The squared error of TT-SVD is the sum of the discarded squared singular values of
every step, within sqrt(d-1) of the best TT approximation at those ranks (quasi-optimal; unlike
the matrix SVD there is no closed-form optimum).

Own code, where tensorly has nothing for it: the mode shapes (``tt_shape``/``tt_modes``), the
rank arguments (``_resolve_ranks``: int / inner / full ranks, ``max_rank``, clipped by tensorly
to the unfolding sizes), tolerance-driven ranks (``_tol_ranks``: tensorly takes ranks only, so
``tol`` and the exact default choose the ranks by their own sequential SVD sweep, then tensorly
decomposes at those ranks), zero-padding to the modes, the balanced scalar gauge (``_balance``),
the data-aware input scaling below and the reported errors (weight, TT-SVD and Gram-based output
error, all measured on the cores as computed).

Data: TT is a weight-space method. A full input whitening W L (L L^T = G) cannot be undone
inside the TT format (L^{-1} is not a Kronecker product), so ``in_gram`` is used (1) to measure
the relative output error ||(W - W')X||_F / ||W X||_F on the calibration data and (2) with
``scale_inputs=True``, for its diagonal part only (activation-aware scaling as in ASVD):
W S with S = diag(G_jj^(p/2)) is decomposed and TTLinear multiplies its input by 1/S first
(``in_features`` extra parameters, an ONNX Mul). p = ``scale_power``, default 0.5: on inputs
whose channel scales span three decades it gave the same output error as p = 1 (the full
sqrt(G_jj)) while the weight-space error stayed ~1.3x instead of ~10x the weight's norm, i.e.
less blow-up on channels the calibration data barely exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .tt_shapes import balanced_split, tt_flops, tt_full_ranks, tt_max_rank_for_params, tt_modes, tt_params, tt_shape

__all__ = ["TTFactors", "balanced_split", "tt_shape", "tt_modes", "tt_full_ranks", "tt_params", "tt_flops",
           "tt_max_rank_for_params", "tt_matrix", "tt_to_matrix"]


@dataclass(frozen=True)
class TTFactors:
    """TT-matrix cores of a weight and quality figures.

    cores: d tensors (r_{k-1}, o_k, i_k, r_k) in the weight's dtype; ranks: (1, r_1, ..., 1);
    shape: the original (out, in); out_modes/in_modes may multiply to more than ``shape`` when the
    weight was zero-padded (the extra rows are dropped, the extra inputs are zeros).
    relative_error: ||W - W'||_F / ||W||_F of the cores as shipped (on the unpadded block).
    svd_error: the relative error of the float64 TT-SVD result on the tensor it decomposed (the
    zero-padded, input-scaled weight when ``in_scale`` is set), before the cast to the weight's
    dtype; it equals sqrt(sum of the discarded squared singular values) / ||tensor|| up to rounding
    (~1e-15 for exact ranks).
    output_error: ||(W - W')X||_F / ||W X||_F on the calibration Gram, when one was given.
    in_scale: per-input multiplier applied before the cores (``scale_inputs=True``), else None.
    params: number of core entries (+ len(in_scale)); bias not included.
    """

    cores: list[torch.Tensor]
    ranks: tuple[int, ...]
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    shape: tuple[int, int]
    relative_error: float
    svd_error: float
    output_error: float | None = None
    in_scale: torch.Tensor | None = None

    @property
    def params(self) -> int:
        n = sum(int(c.numel()) for c in self.cores)
        return n + (0 if self.in_scale is None else int(self.in_scale.numel()))

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def ratio(self) -> float:
        """params / dense params."""
        return self.params / self.dense_params


# --------------------------------------------------------------------------- TT-SVD

def _check_modes(weight: torch.Tensor, out_modes: Sequence[int], in_modes: Sequence[int]) -> None:
    if weight.ndim != 2:
        raise ValueError(f"tt_matrix: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if len(out_modes) != len(in_modes) or len(out_modes) < 1:
        raise ValueError(f"tt_matrix: out_modes {tuple(out_modes)} and in_modes {tuple(in_modes)} must have "
                         "the same length >= 1 (one pair per core)")
    if any(int(m) < 1 for m in (*out_modes, *in_modes)):
        raise ValueError(f"tt_matrix: modes must be >= 1, got {tuple(out_modes)}, {tuple(in_modes)}")
    m, n = weight.shape
    po, pi = math.prod(out_modes), math.prod(in_modes)
    if po < m or pi < n:
        raise ValueError(f"tt_matrix: modes {tuple(out_modes)} x {tuple(in_modes)} hold {po} x {pi} but the "
                         f"weight is {m} x {n}; use tt_modes({m}, {n}) or modes whose products are >= the "
                         "shape (larger products zero-pad)")


def _resolve_ranks(d: int, ranks: int | Sequence[int] | None, max_rank: int | None) -> list[int] | None:
    if ranks is not None and max_rank is not None:
        raise ValueError("tt_matrix: give ranks or max_rank, not both")
    if max_rank is not None:
        ranks = max_rank
    if ranks is None:
        return None
    if isinstance(ranks, int):
        inner = [ranks] * (d - 1)
    else:
        r = [int(v) for v in ranks]
        if len(r) == d + 1:
            if r[0] != 1 or r[-1] != 1:
                raise ValueError(f"tt_matrix: boundary ranks must be 1, got {tuple(r)}")
            inner = r[1:-1]
        elif len(r) == d - 1:
            inner = r
        else:
            raise ValueError(f"tt_matrix: ranks {tuple(r)} must have {d - 1} inner or {d + 1} entries "
                             f"(with the boundary 1s) for {d} cores")
    if any(v < 1 for v in inner):
        raise ValueError(f"tt_matrix: ranks {tuple(inner)} must be >= 1")
    return [1] + inner + [1]


def _tol_ranks(t: torch.Tensor, dims: list[int], tol: float) -> list[int]:
    """TT-ranks (1, r_1, ..., 1) that a tolerance-driven TT-SVD of ``t`` (float64, numel =
    prod(dims)) keeps: at each step the smallest rank whose discarded squared singular values are
    <= delta^2 = tol^2 ||t||^2 / (d-1) (Oseledets 2011, so the total relative error is <= tol).

    Own code because tensorly's TT-SVD takes ranks only (no accuracy argument). The unfolding of
    step k depends on the truncation of the steps before, so this runs the same sequential SVDs
    as TT-SVD itself; the cores are then computed by tensorly at these ranks (``_tensorly_tt``),
    which repeats them: 2x the SVD work, only when ``tt_matrix`` gets ``tol`` or no ranks at all
    (the compression pipeline passes ranks). tol = 0 (the exact default) keeps every non-zero
    singular value, dropping only exactly-zero ones (e.g. an all-zero weight -> rank 1).
    """
    d = len(dims)
    delta2 = (tol ** 2) * float((t * t).sum()) / max(d - 1, 1)
    ranks, r_prev = [1], 1
    c = t.reshape(-1)
    for k in range(d - 1):
        _, s, vt = torch.linalg.svd(c.reshape(r_prev * dims[k], -1), full_matrices=False)
        tails = torch.flip(torch.cumsum(torch.flip(s * s, [0]), 0), [0])  # tails[j] = sum_{i>=j} s_i^2
        ok = torch.nonzero(tails <= delta2)
        r = max(int(ok[0]) if len(ok) else len(s), 1)
        ranks.append(r)
        c = s[:r, None] * vt[:r]
        r_prev = r
    return ranks + [1]


def _tensorly_tt(t: torch.Tensor, out_modes: tuple[int, ...], in_modes: tuple[int, ...], ranks: list[int]
                 ) -> list[torch.Tensor]:
    """TT-matrix cores (r_{k-1}, o_k, i_k, r_k) of the matrix ``t`` (prod out_modes x prod in_modes,
    float64) by ``tensorly.decomposition.tensor_train_matrix``: TT-SVD (sequential truncated SVDs of
    the unfoldings), ranks (1, r_1, ..., 1) each clipped to its unfolding's size, singular vectors
    sign-fixed by tensorly's ``svd_flip`` (largest-|u| entry of each left singular vector > 0).

    tensorly runs on its PyTorch backend (same device and dtype as ``t``) inside a thread-local
    ``backend_context``: tensorly's global backend is never changed. It takes the matrix as the
    tensor (o_1, ..., o_d, i_1, ..., i_d) and returns the cores in the layout used here.
    """
    import tensorly  # heavy (~0.3 s): only when a TT is actually computed
    from tensorly.decomposition import tensor_train_matrix

    with tensorly.backend_context("pytorch", local_threadsafe=True):
        ttm = tensor_train_matrix(t.reshape(*out_modes, *in_modes), rank=list(ranks))
    return list(ttm.factors)


def _balance(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Scalar gauge: rescale cores (product unchanged) so they all have the same Frobenius norm."""
    norms = [float(c.norm()) for c in cores]
    if min(norms) <= 0:
        return cores
    g = math.exp(sum(math.log(v) for v in norms) / len(norms))
    return [c * (g / v) for c, v in zip(cores, norms)]


def tt_to_matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense (prod o_k, prod i_k) matrix of TT-matrix cores (r_{k-1}, o_k, i_k, r_k)."""
    d = len(cores)
    res = cores[0]
    for c in cores[1:]:
        res = torch.tensordot(res, c, dims=([res.ndim - 1], [0]))
    outs = [c.shape[1] for c in cores]
    ins = [c.shape[2] for c in cores]
    res = res.reshape([v for pair in zip(outs, ins) for v in pair])
    res = res.permute(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2)))
    return res.reshape(math.prod(outs), math.prod(ins))


def tt_matrix(
    weight: torch.Tensor,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: int | Sequence[int] | None = None,
    *,
    max_rank: int | None = None,
    tol: float | None = None,
    in_gram: torch.Tensor | None = None,
    scale_inputs: bool = False,
    scale_power: float = 0.5,
) -> TTFactors:
    """TT-matrix cores of ``weight`` (out x in) by TT-SVD in float64 (tensorly's
    ``tensor_train_matrix``, PyTorch backend; see the module notes for what is own code).

    Ranks: ``ranks`` (int = same for every bond, or d-1 inner / d+1 full values) or ``max_rank``
    (same meaning as an int), each clipped to the exact TT-ranks; or ``tol``, a relative
    Frobenius error target (TT-SVD guarantees svd_error <= tol); nothing = exact (full ranks,
    less exactly-zero singular values). tol and exact choose their ranks by own code, then
    tensorly decomposes at those ranks. ``in_gram`` (in x in, X X^T of the layer inputs) adds
    ``output_error``; with ``scale_inputs=True`` its diagonal also weights the decomposition by
    G_jj^(scale_power/2) (see the module notes).
    """
    _check_modes(weight, out_modes, in_modes)
    out_modes, in_modes = tuple(int(v) for v in out_modes), tuple(int(v) for v in in_modes)
    d = len(out_modes)
    r_spec = _resolve_ranks(d, ranks, max_rank)
    if tol is not None:
        if r_spec is not None:
            raise ValueError("tt_matrix: give tol or ranks/max_rank, not both")
        if not 0 <= tol < 1:
            raise ValueError(f"tt_matrix: tol={tol!r} must be in [0, 1) (a relative Frobenius error)")
    if scale_inputs and in_gram is None:
        raise ValueError("tt_matrix: scale_inputs=True needs in_gram (the calibration Gram of the inputs)")
    if not 0 < scale_power <= 1:
        raise ValueError(f"tt_matrix: scale_power={scale_power!r} must be in (0, 1]; 0.5 is the usual choice")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("tt_matrix: weight has NaN or Inf entries; fix the checkpoint before factorizing")
    m, n = weight.shape
    w = weight.detach().to(torch.float64)
    gram = None
    if in_gram is not None:
        if tuple(in_gram.shape) != (n, n):
            raise ValueError(f"tt_matrix: in_gram has shape {tuple(in_gram.shape)}, expected ({n}, {n})")
        gram = 0.5 * (in_gram + in_gram.T).to(device=w.device, dtype=torch.float64)

    scale = None
    target = w
    if scale_inputs:
        s = torch.diagonal(gram).clamp_min(0) ** (scale_power / 2)
        s = s / s.max() if float(s.max()) > 0 else torch.ones_like(s)
        s = s.clamp_min(1e-3)  # dead channels: keep their weights bounded
        scale = s
        target = w * s[None, :]

    po, pi = math.prod(out_modes), math.prod(in_modes)
    wp = torch.zeros(po, pi, dtype=torch.float64, device=w.device)
    wp[:m, :n] = target
    if r_spec is None:  # tol, or nothing = tol 0 (exact): own rank choice, tensorly has none
        t = wp.reshape(*out_modes, *in_modes).permute([p for k in range(d) for p in (k, d + k)])
        r_spec = _tol_ranks(t.contiguous(), [o * i for o, i in zip(out_modes, in_modes)], tol or 0.0)
    cores = _balance(_tensorly_tt(wp, out_modes, in_modes, r_spec))
    dense = tt_to_matrix(cores)  # float64
    total_t = float((wp * wp).sum())
    svd_err = math.sqrt(float(((wp - dense) ** 2).sum()) / total_t) if total_t > 0 else 0.0

    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    shipped = [c.to(dtype) for c in cores]
    in_scale = None if scale is None else (1.0 / scale).to(dtype)
    approx = dense if dtype == torch.float64 else tt_to_matrix([c.to(torch.float64) for c in shipped])
    approx = approx[:m, :n]
    if in_scale is not None:
        approx = approx * in_scale.to(torch.float64)[None, :]
    diff = w - approx
    wn2 = float((w * w).sum())
    rel = math.sqrt(float((diff * diff).sum()) / wn2) if wn2 > 0 else 0.0
    out_err = None
    if gram is not None:
        base = float(((w @ gram) * w).sum())
        out_err = math.sqrt(max(float(((diff @ gram) * diff).sum()), 0.0) / base) if base > 0 else 0.0
    ranks_out = (1,) + tuple(c.shape[3] for c in shipped[:-1]) + (1,)
    return TTFactors(cores=shipped, ranks=ranks_out, out_modes=out_modes, in_modes=in_modes,
                     shape=(m, n), relative_error=rel, svd_error=svd_err, output_error=out_err,
                     in_scale=in_scale)
