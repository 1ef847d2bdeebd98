"""CP (canonical polyadic) factorization of a Conv2d kernel for CPConv2d.

W[o, i, p, q] ~= sum_r A[o, r] B[i, r] C[p, r] D[q, r]  ->  1x1 (B^T) -> depthwise kh x 1 (C)
-> depthwise 1 x kw (D) -> 1x1 (A). Fitted by alternating least squares in float64, initialised
from the SVDs of the four unfoldings (HOSVD factors; columns beyond a mode's size are seeded
Gaussian), at most ``max_iter`` sweeps. Deterministic for a given seed.

Data-aware variant: with a channel Gram G of the conv input the loss is
sum_pq ||(W_pq - W'_pq) L||^2 (G = L L^T), the same channel-metric proxy as tucker.py. Only the
A, C, D updates change (B^T B -> B^T G B, B -> G B in the MTTKRP); the B update of plain ALS
already solves the metric normal equations G (B H - W_(in) K) = 0, so no inverse of G is needed.

CP has no closed-form optimum and ALS can stall or diverge into cancelling components, so the
result carries ``fit``, ``converged`` and ``cancellation`` and a ``usable`` verdict with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, WeightError
from .tucker import few_threads


@dataclass(frozen=True)
class CPFactors:
    """Factors for ``CPConv2d.from_factors(first, vertical, horizontal, last, bias, ...)``.

    first: (R, I, 1, 1), vertical: (R, 1, kh, 1), horizontal: (R, 1, 1, kw), last: (O, R, 1, 1),
    in the weight's dtype, each component balanced (equal norms across its four factors).
    fit: 1 - relative error of the factors as shipped (data metric with a Gram).
    cancellation: sqrt(sum_r ||component_r||^2) / ||W||; about 1 when components do not cancel,
    >> 1 for a degenerate solution that loses accuracy in fp16/fp32.
    """

    first: torch.Tensor
    vertical: torch.Tensor
    horizontal: torch.Tensor
    last: torch.Tensor
    rank: int
    fit: float
    relative_error: float
    converged: bool
    iterations: int
    cancellation: float
    usable: bool
    reason: str | None
    data_aware: bool


def _solve(m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """X with X H = M for a symmetric PSD H (tiny ridge for rank-deficient H)."""
    r = h.shape[0]
    ridge = 1e-12 * float(torch.diagonal(h).mean().clamp_min(1e-300))
    hr = h + ridge * torch.eye(r, dtype=h.dtype, device=h.device)
    l, info = torch.linalg.cholesky_ex(hr)
    if int(info) == 0:
        return torch.cholesky_solve(m.T, l).T
    return m @ torch.linalg.pinv(hr, hermitian=True)


def _init(w: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """HOSVD factors of each mode, padded with seeded Gaussian columns."""
    factors = []
    for mode in range(4):
        unf = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        u, s, _ = torch.linalg.svd(unf, full_matrices=False)
        k = min(rank, u.shape[1])
        f = u[:, :k]
        if k < rank:
            extra = torch.randn(w.shape[mode], rank - k, generator=gen, dtype=torch.float64).to(w.device)
            f = torch.cat([f, extra / math.sqrt(w.shape[mode])], 1)
        factors.append(f)
    return factors


def _balance(fs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give each component equal column norms across the four factors (same product)."""
    norms = torch.stack([f.norm(dim=0) for f in fs])            # 4 x R
    target = norms.clamp_min(1e-300).log().mean(0).exp()        # geometric mean
    zero = (norms == 0).any(0)
    target = torch.where(zero, torch.zeros_like(target), target)
    return [f * torch.where(n > 0, target / n.clamp_min(1e-300), torch.zeros_like(n))[None, :]
            for f, n in zip(fs, norms)]


def _sqnorm(d: torch.Tensor, g: torch.Tensor | None) -> float:
    if g is None:
        return float((d * d).sum())
    return float(torch.einsum("oipq,ij,ojpq->", d, g, d))


def cp_conv(weight: torch.Tensor, rank: int, *, max_iter: int = 100, tol: float = 1e-6, seed: int = 0,
            in_gram: torch.Tensor | None = None, min_fit: float = 0.8,
            max_cancellation: float = 10.0) -> CPFactors:
    """Rank-``rank`` CP of a conv kernel (out, in, kh, kw) by ALS.

    Stops when the relative error changes by less than ``tol`` between sweeps (converged) or
    after ``max_iter`` sweeps. ``usable`` is False when fit < ``min_fit``, when the components
    cancel (cancellation > ``max_cancellation``) or when the result is not finite; ``reason``
    says which, so the caller can keep the layer dense and report why.
    """
    shape = tuple(int(x) for x in weight.shape)
    work = math.prod(shape) * (int(rank) if isinstance(rank, int) else 1)
    with few_threads(work):
        return _cp_conv(weight, rank, max_iter=max_iter, tol=tol, seed=seed, in_gram=in_gram,
                        min_fit=min_fit, max_cancellation=max_cancellation)


def _cp_conv(weight: torch.Tensor, rank: int, *, max_iter: int, tol: float, seed: int,
             in_gram: torch.Tensor | None, min_fit: float, max_cancellation: float) -> CPFactors:
    if weight.dim() != 4:
        raise WeightError(f"conv kernel must be 4-d (out, in, kh, kw), got shape {tuple(weight.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r} must be an int >= 1; e.g. rank=cp_break_even(...) // 2")
    if max_iter < 1:
        raise ConfigError(f"max_iter={max_iter} must be >= 1")
    w = weight.detach().to(torch.float64)
    o, n, kh, kw = w.shape
    if not bool(torch.isfinite(w).all()):
        raise WeightError("conv kernel has NaN/Inf entries; fix or reload the checkpoint")
    g = None
    if in_gram is not None:
        if tuple(in_gram.shape) != (n, n):
            raise ConfigError(f"in_gram has shape {tuple(in_gram.shape)}, expected ({n}, {n})")
        g = 0.5 * (in_gram + in_gram.T).to(torch.float64)
        scale = float(torch.diagonal(g).mean())
        g = g / scale if scale > 0 else g
    total = _sqnorm(w, g)
    gen = torch.Generator().manual_seed(int(seed))
    a, b, c, d = _init(w, rank, gen)
    prev, err, converged, iterations = math.inf, math.inf, False, 0
    for it in range(1, max_iter + 1):
        gb = b if g is None else g @ b
        btgb, ctc, dtd = b.T @ gb, c.T @ c, d.T @ d
        a = _solve(torch.einsum("oipq,ir,pr,qr->or", w, gb, c, d), btgb * ctc * dtd)
        ata = a.T @ a
        b = _solve(torch.einsum("oipq,or,pr,qr->ir", w, a, c, d), ata * ctc * dtd)
        gb = b if g is None else g @ b
        btgb = b.T @ gb
        c = _solve(torch.einsum("oipq,or,ir,qr->pr", w, a, gb, d), ata * btgb * dtd)
        ctc = c.T @ c
        m_d = torch.einsum("oipq,or,ir,pr->qr", w, a, gb, c)
        d = _solve(m_d, ata * btgb * ctc)
        # ||W - W'||^2 = ||W||^2 - 2 <W, W'> + ||W'||^2 without forming W' (cheap per sweep)
        err2 = total - 2.0 * float((m_d * d).sum()) + float((ata * btgb * ctc * (d.T @ d)).sum())
        err = math.sqrt(max(err2, 0.0) / total) if total > 0 else 0.0
        a, b, c, d = _balance([a, b, c, d])
        iterations = it
        if not math.isfinite(err):
            break
        if abs(prev - err) <= tol * max(err, 1e-6) or err < 1e-7:
            converged = True
            break
        prev = err

    # deterministic signs: largest entry of each column of B, C, D positive, A takes the rest
    for f in (b, c, d):
        idx = f.abs().argmax(dim=0)
        sign = torch.sign(f[idx, torch.arange(rank, device=f.device)])
        sign[sign == 0] = 1
        f.mul_(sign[None, :])
        a.mul_(sign[None, :])
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    a_s, b_s, c_s, d_s = (t.to(dtype) for t in (a, b, c, d))
    approx = torch.einsum("or,ir,pr,qr->oipq", *(t.double() for t in (a_s, b_s, c_s, d_s)))
    achieved = math.sqrt(max(_sqnorm(w - approx, g), 0.0) / total) if total > 0 else 0.0
    comp = a.norm(dim=0) * b.norm(dim=0) * c.norm(dim=0) * d.norm(dim=0)
    wnorm = float(w.norm())
    cancellation = float(comp.square().sum().sqrt()) / wnorm if wnorm > 0 else 0.0
    fit = 1.0 - achieved
    reason = None
    if not (math.isfinite(achieved) and math.isfinite(cancellation)):
        reason = "CP-ALS diverged (non-finite factors)"
    elif fit < min_fit:
        reason = f"CP fit {fit:.3f} < {min_fit} at rank {rank}: raise the rank or use tucker"
    elif cancellation > max_cancellation:
        reason = (f"CP components cancel (cancellation {cancellation:.1f} > {max_cancellation}): "
                  "degenerate solution, unsafe in low precision")
    return CPFactors(
        first=b_s.T.reshape(rank, n, 1, 1).contiguous(),
        vertical=c_s.T.reshape(rank, 1, kh, 1).contiguous(),
        horizontal=d_s.T.reshape(rank, 1, 1, kw).contiguous(),
        last=a_s.reshape(o, rank, 1, 1).contiguous(),
        rank=rank, fit=fit, relative_error=achieved, converged=converged, iterations=iterations,
        cancellation=cancellation, usable=reason is None, reason=reason, data_aware=g is not None,
    )




def cp_params(out_ch: int, in_ch: int, kh: int, kw: int, rank: int, bias: bool = True) -> int:
    """Parameters of the four convs of a CPConv2d (bias on the last one)."""
    return rank * (in_ch + kh + kw + out_ch) + (out_ch if bias else 0)


def cp_break_even(out_ch: int, in_ch: int, kh: int, kw: int) -> int:
    """Largest CP rank that still needs fewer parameters than the dense kernel (0 if none)."""
    dense = out_ch * in_ch * kh * kw
    return max((dense - 1) // (in_ch + kh + kw + out_ch), 0)


def cp_macs(out_ch: int, in_ch: int, kh: int, kw: int, rank: int,
            in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Multiply-accumulates of a CPConv2d: first 1x1 at the input resolution, the kh x 1 conv
    at (out rows x in cols), the 1 x kw and last 1x1 at the output resolution."""
    hi, wi = in_hw
    ho, wo = out_hw
    return hi * wi * in_ch * rank + ho * wi * rank * kh + ho * wo * (rank * kw + rank * out_ch)
