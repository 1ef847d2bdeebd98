"""Tucker-2 factorization of a Conv2d kernel on its (out, in) modes, plain or data-aware.

Kernel W (O, I, kh, kw); slices W_pq (O x I) for each kernel offset (p, q). The factorized conv
computes W'_pq = U C_pq A with U (O x r_out) the last 1x1 conv, C (r_out, r_in, kh, kw) the core
conv and A (r_in x I) the first 1x1 conv.

Metric. With a channel Gram G = L L^T of the conv input (summed over batch and pixels) the
error is  E = sum_pq ||(W_pq - W'_pq) L||_F^2,  i.e. the Frobenius error of the whitened kernel
Z = W x_in L^T. This is the layer's output error on the data exactly for 1x1 kernels; for k x k
kernels it ignores the correlation between pixels at different offsets (it treats the patch
Gram as block-diagonal G, ..., G), so it is a proxy. Without G, L = I (plain Tucker-2).

Algorithm: HOSVD initialisation + HOOI on Z (float64, torch only, deterministic):
  U <- top r_out eigenvectors of sum_pq (W_pq L V)(W_pq L V)^T
  V <- top r_in  eigenvectors of M = L^T S L,   S = sum_pq W_pq^T U U^T W_pq.
The input factor is mapped back without inverting L (which may be singular): the rows
a_i = S L v_i / lambda_i satisfy L^T a_i = v_i exactly (M v_i = lambda_i v_i), so A L = V^T and
W'_pq L = U U^T W_pq L V V^T -- the Tucker-2 projection of Z. Directions the data never excites
(null space of G) are completed from the weight itself, so at full rank W' = W exactly. Finally
A is re-orthonormalised (A = R^T Q^T, core absorbs R), so U and A have orthonormal rows/columns
and the core carries the scale, as in plain HOSVD.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import ConfigError, WeightError
from ..scoped import torch_threads
from .whiten import gram_root

SMALL_WORK = 1 << 26  # multiply-accumulates per sweep below which one thread is fastest


@contextlib.contextmanager
def few_threads(work: int) -> Iterator[None]:
    """Run small factorizations on one intra-op thread, restoring the count afterwards.

    These loops issue many tiny BLAS/LAPACK calls; each opens an OpenMP region, and on a busy
    CPU every region waits for a descheduled worker (measured here: CP of a 64->128 3x3 conv,
    300 sweeps, 0.9 s on one thread vs 84 s on two under load). Large problems keep all threads.
    """
    with torch_threads(None if work >= SMALL_WORK else 1):
        yield




@dataclass(frozen=True)
class TuckerFactors:
    """Factors for ``TuckerConv2d.from_factors(first, core, last, bias, ...)`` (weight dtype).

    first: (r_in, I, 1, 1), core: (r_out, r_in, kh, kw), last: (O, r_out, 1, 1).
    relative_error: achieved error of the factors as shipped, in the metric used (data metric
    sqrt(E / sum_pq ||W_pq L||^2) with a Gram, plain kernel Frobenius error without).
    optimal_error: the proven minimum at these ranks when a closed form exists (one of the two
    ranks full: a matrix SVD of an unfolding), else None.
    lower_bound: max of the two single-mode truncation errors, a lower bound for any Tucker-2.
    """

    first: torch.Tensor
    core: torch.Tensor
    last: torch.Tensor
    ranks: tuple[int, int]
    relative_error: float
    optimal_error: float | None
    lower_bound: float
    data_aware: bool
    iterations: int
    converged: bool

    @property
    def error_ratio(self) -> float | None:
        """Achieved / optimal error (1.0 = optimal), None without a closed-form optimum."""
        if self.optimal_error is None:
            return None
        return max(self.relative_error, 1e-6) / max(self.optimal_error, 1e-6)


def _top_eig(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``r`` eigenpairs of a symmetric PSD matrix, descending, deterministic signs."""
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.T))
    order = torch.argsort(evals, descending=True, stable=True)[:r]
    vecs = evecs[:, order]
    idx = vecs.abs().argmax(dim=0)
    sign = torch.sign(vecs[idx, torch.arange(vecs.shape[1], device=vecs.device)])
    sign[sign == 0] = 1
    return evals[order].clamp_min(0), vecs * sign[None, :]


def _tail(evals: torch.Tensor, r: int, total: float) -> float:
    """sqrt(sum_{i>=r} lambda_i / total)."""
    if total <= 0:
        return 0.0
    return math.sqrt(max(float(evals[r:].clamp_min(0).sum()), 0.0) / total)


def _null_basis(root: torch.Tensor, n: int) -> torch.Tensor:
    """Orthonormal basis (n x (n-k)) of the complement of range(root) (null space of G)."""
    if root.shape[1] >= n:
        u, s, _ = torch.linalg.svd(root, full_matrices=True)
        keep = s > (float(s.max()) if s.numel() else 0.0) * 1e-12
        return u[:, int(keep.sum()):]
    u, _, _ = torch.linalg.svd(root, full_matrices=True)
    return u[:, root.shape[1]:]


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], in_gram: torch.Tensor | None = None,
            *, max_iter: int = 50, tol: float = 1e-9) -> TuckerFactors:
    """Tucker-2 of a conv kernel (out, in, kh, kw) at ranks (r_out, r_in).

    With ``in_gram`` (in x in channel Gram of the conv input, float64) the factors minimise
    the channel-metric output error sum_pq ||(W_pq - W'_pq) L||^2 (see module docstring);
    without it the plain kernel Frobenius error. HOSVD init + HOOI, at most ``max_iter`` sweeps,
    stopping when the captured energy improves by less than ``tol`` (relative).
    """
    o, n, kh, kw = (int(x) for x in weight.shape) if weight.dim() == 4 else (0, 0, 0, 0)
    with few_threads(o * n * kh * kw * max(o, n, 1)):
        return _tucker2(weight, ranks, in_gram, max_iter=max_iter, tol=tol)


def _tucker2(weight: torch.Tensor, ranks: tuple[int, int], in_gram: torch.Tensor | None,
             *, max_iter: int, tol: float) -> TuckerFactors:
    if weight.dim() != 4:
        raise WeightError(f"conv kernel must be 4-d (out, in, kh, kw), got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    o, n, kh, kw = w.shape
    r_out, r_in = int(ranks[0]), int(ranks[1])
    if not (1 <= r_out <= o and 1 <= r_in <= n):
        raise ConfigError(f"ranks (r_out={r_out}, r_in={r_in}) outside [1, {o}] x [1, {n}] "
                          f"for a {o}x{n}x{kh}x{kw} kernel; pick ranks inside that range")
    if max_iter < 1:
        raise ConfigError(f"max_iter={max_iter} must be >= 1")
    if not bool(torch.isfinite(w).all()):
        raise WeightError("conv kernel has NaN/Inf entries; fix or reload the checkpoint")
    slices = w.permute(2, 3, 0, 1).reshape(kh * kw, o, n)  # W_pq, (P, O, I)
    if in_gram is not None:
        if tuple(in_gram.shape) != (n, n):
            raise ConfigError(f"in_gram has shape {tuple(in_gram.shape)}, expected ({n}, {n})")
        g = 0.5 * (in_gram + in_gram.T).to(torch.float64)
        scale = float(torch.diagonal(g).mean())
        g = g / scale if scale > 0 else g  # the minimiser does not depend on the scale
        root = gram_root(g)
    else:
        g, root = None, None
    zs = slices if root is None else slices @ root  # whitened slices W_pq L, (P, O, k)
    k = zs.shape[2]
    total = float((zs * zs).sum())

    # closed-form single-mode optima (also the lower bound of the Tucker-2 error)
    z_out = zs.permute(1, 0, 2).reshape(o, -1)  # mode-out unfolding of Z
    ev_out = torch.linalg.eigvalsh(z_out @ z_out.T).flip(0)
    gram_in = torch.einsum("poi,poj->ij", zs, zs)  # Z_(in) Z_(in)^T, k x k
    ev_in = torch.linalg.eigvalsh(0.5 * (gram_in + gram_in.T)).flip(0)
    err_out, err_in = _tail(ev_out, r_out, total), _tail(ev_in, min(r_in, k), total)
    lower = max(err_out, err_in)
    r_v = min(r_in, k)  # whitened input rank available

    # HOSVD init of V, then HOOI sweeps (U update, V update)
    _, v = _top_eig(gram_in, r_v)
    captured, iterations, converged = -1.0, 0, False
    for it in range(1, max_iter + 1):
        zv = zs @ v                                             # (P, O, r_v)
        zv_u = zv.permute(1, 0, 2).reshape(o, -1)
        _, u = _top_eig(zv_u @ zv_u.T, r_out)
        uz = torch.einsum("oa,poi->pai", u, zs)                 # U^T W_pq L, (P, r_out, k)
        m = torch.einsum("pai,paj->ij", uz, uz)                 # L^T S L
        lam, v = _top_eig(m, r_v)
        new = float(lam.sum())
        iterations = it
        if r_out == o or r_in >= k or (captured >= 0 and new - captured <= tol * max(total, 1e-300)):
            converged = True
            break
        captured = new

    # map the input factor back without inverting L
    if root is None:
        good = v.shape[1]
        a_good = v.T                                            # L = I: A = V^T exactly
        core_good = torch.einsum("oa,poi,ir->par", u, slices, v)
    else:
        s_out = _s_out(slices, u)
        tiny = float(lam.max()) * 1e-10 if lam.numel() else 0.0
        good = int((lam > tiny).sum()) if tiny > 0 else 0
        vg = v[:, :good]
        a_good = (vg.T @ root.T @ s_out) / lam[:good, None]    # rows a_i = S L v_i / lambda_i
        core_good = torch.einsum("poi,ir->por", uz, vg).reshape(kh * kw, r_out, good)
    rows, cores = [a_good], [core_good.reshape(kh * kw, r_out, -1)]
    extra = r_in - a_good.shape[0]
    if extra > 0:
        # complete from directions the data never excites, best for the weight itself
        resid = slices - torch.einsum("oa,pab,bi->poi", u, cores[0], a_good)
        null = _null_basis(root, n) if root is not None else w.new_zeros(n, 0)
        take = min(extra, null.shape[1])
        if take > 0:
            rn = torch.einsum("oa,poi,ij->paj", u, resid, null)  # U^T R_pq N
            _, y = _top_eig(torch.einsum("pai,paj->ij", rn, rn), take)
            a_null = (null @ y).T
            rows.append(a_null)
            cores.append(torch.einsum("paj,jr->par", rn, y))
        pad = extra - take
        if pad > 0:  # nothing left to represent: orthonormal filler rows with a zero core
            have = torch.cat(rows, 0)
            q_all, _ = torch.linalg.qr(have.T, mode="complete")
            rows.append(q_all[:, have.shape[0]:have.shape[0] + pad].T)
            cores.append(w.new_zeros(kh * kw, r_out, pad))
    a = torch.cat(rows, 0)                                      # r_in x I
    c = torch.cat(cores, 2)                                     # (P, r_out, r_in)
    # orthonormal rows for A; the core absorbs the triangular factor
    q, rr = torch.linalg.qr(a.T)                                # A^T = Q R
    d = torch.sign(torch.diagonal(rr))
    d[d == 0] = 1
    q, rr = q * d[None, :], rr * d[:, None]
    c = c @ rr.T
    a = q.T
    core = c.reshape(kh, kw, r_out, r_in).permute(2, 3, 0, 1).contiguous()

    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    first, core_s, last = a.to(dtype), core.to(dtype), u.to(dtype)
    approx = torch.einsum("oa,abpq,bi->oipq", last.double(), core_s.double(), first.double())
    diff = (w - approx).permute(2, 3, 0, 1).reshape(kh * kw, o, n)
    if g is None:
        err2 = float((diff * diff).sum())
    else:
        err2 = float(torch.einsum("poi,ij,poj->", diff, g, diff))
    achieved = math.sqrt(max(err2, 0.0) / total) if total > 0 else 0.0
    if r_out == o:
        optimal = err_in
    elif r_in >= n or r_in >= k:
        optimal = err_out
    else:
        optimal = None
    return TuckerFactors(
        first=first.reshape(r_in, n, 1, 1), core=core_s, last=last.reshape(o, r_out, 1, 1),
        ranks=(r_out, r_in), relative_error=achieved, optimal_error=optimal, lower_bound=lower,
        data_aware=g is not None, iterations=iterations, converged=converged,
    )




def _s_out(slices: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """S = sum_pq W_pq^T U U^T W_pq (I x I)."""
    uw = torch.einsum("oa,poi->pai", u, slices)
    return torch.einsum("pai,paj->ij", uw, uw)


def tucker_params(out_ch: int, in_ch: int, kh: int, kw: int, r_out: int, r_in: int,
                  bias: bool = True) -> int:
    """Parameters of the three convs of a TuckerConv2d (bias on the last one)."""
    return in_ch * r_in + r_in * r_out * kh * kw + r_out * out_ch + (out_ch if bias else 0)


def dense_conv_params(out_ch: int, in_ch: int, kh: int, kw: int, bias: bool = True) -> int:
    """Parameters of a dense, ungrouped conv."""
    return out_ch * in_ch * kh * kw + (out_ch if bias else 0)


def tucker_saves(out_ch: int, in_ch: int, kh: int, kw: int, r_out: int, r_in: int) -> bool:
    """True when ranks (r_out, r_in) need fewer parameters than the dense kernel."""
    return tucker_params(out_ch, in_ch, kh, kw, r_out, r_in) < dense_conv_params(out_ch, in_ch, kh, kw)


def tucker_break_even(out_ch: int, in_ch: int, kh: int, kw: int) -> tuple[int, int]:
    """Largest ranks (r_out, r_in), proportional to (out, in), that still save parameters;
    (0, 0) when none do."""
    best = (0, 0)
    for r_in in range(1, in_ch + 1):
        r_out = max(1, min(out_ch, round(r_in * out_ch / in_ch)))
        if tucker_saves(out_ch, in_ch, kh, kw, r_out, r_in):
            best = (r_out, r_in)
    return best


def tucker_macs(out_ch: int, in_ch: int, kh: int, kw: int, r_out: int, r_in: int,
                in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Multiply-accumulates of a TuckerConv2d: the first 1x1 runs at the input resolution,
    the core and last convs at the output one (so stride > 1 saves less than parameters)."""
    hi, wi = in_hw
    ho, wo = out_hw
    return hi * wi * in_ch * r_in + ho * wo * (r_in * r_out * kh * kw + r_out * out_ch)
