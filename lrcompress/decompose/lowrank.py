"""Rank-r factorization W ~= A B under an input metric G (identity, full Gram or diagonal).

For any square root L of G (G = L L^T), the rank-r minimiser of ||(W - W')L||_F is the
projection W' = Q_r Q_r^T W onto the top left singular vectors of W L (equivalently the top
eigenvectors of C = W G W^T). No inverse of G is needed, so singular or ill-conditioned Grams
(dead channels, fewer tokens than features) are handled exactly. The minimum error is
sqrt(sum_{i>r} sigma_i(W L)^2). Factors are returned in the balanced gauge A^T A = B B^T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .fast_spectrum import fast_spectrum

ROUNDING_FLOOR = 1e-6

# Layers with m * n * min(m, n) below this keep the float64 path of ``spectrum`` unchanged
# (bitwise: compressing MiniLM, 384/1536-dim layers, must give the same model file). At this
# size (2048 x 2048, 1024 x 8192, ...) float64 takes about a second on a 2-core CPU; above it
# the float32 path of ``fast_spectrum`` (float64 bases) is several times faster. Its
# optimality is checked by ``Factorization.error_ratio``, computed in float64.
FAST_PATH_MIN_WORK = 2**33
# A fast-path spectrum vouches for a rank only while its tail (the optimal squared error)
# is at least TAIL_MARGIN times the energy that float32 rounding may cost (Spectrum.noise):
# the achieved/optimal ratio is then within 1 + 1 / (2 TAIL_MARGIN) of 1. For ranks below
# that (relative errors around 1% or less), ``factorize`` redoes the layer in float64.
TAIL_MARGIN = 1e3


def gram_root(gram: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """A square root L with L L^T = G.

    Cholesky when G is positive definite; otherwise (singular: dead channels, fewer tokens
    than features) an eigh root that drops the null space (n x k, k = numerical rank).
    Nothing is ever inverted.
    """
    g = 0.5 * (gram + gram.T).to(torch.float64)
    l, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0 and bool(torch.isfinite(l).all()):
        d = torch.diagonal(l)
        if float(d.min()) > float(d.max()) * 1e-7:  # well enough conditioned to trust
            return l
    evals, evecs = torch.linalg.eigh(g)
    top = float(evals.max()) if evals.numel() else 0.0
    keep = evals > max(top, 0.0) * rtol
    if not bool(keep.any()):
        return torch.zeros(g.shape[0], 1, dtype=torch.float64, device=g.device)
    return evecs[:, keep] * evals[keep].sqrt()[None, :]


class Metric:
    """Input metric of a layer: a full Gram G (n x n), its diagonal (n,) for one-hot inputs
    such as token ids, or neither for the identity (plain weight-space error)."""

    def __init__(self, gram: torch.Tensor | None = None, diag: torch.Tensor | None = None) -> None:
        self.gram = None if gram is None else 0.5 * (gram + gram.T).to(torch.float64)
        self.diag = None if diag is None else diag.to(torch.float64).clamp_min(0)
        self._root: torch.Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.gram is None and self.diag is None

    def root(self) -> torch.Tensor:
        """A square root L with L L^T = G (Cholesky; eigh fallback for singular G), cached."""
        if self._root is None:
            self._root = gram_root(self.gram)
        return self._root

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """Return W L."""
        if self.gram is not None:
            return w @ self.root()
        if self.diag is not None:
            return w * self.diag.sqrt()[None, :]
        return w

    def cov(self, w: torch.Tensor) -> torch.Tensor:
        """Return C = W G W^T (m x m)."""
        if self.gram is not None:
            return w @ self.gram @ w.T
        if self.diag is not None:
            return (w * self.diag[None, :]) @ w.T
        return w @ w.T

    def sqnorm(self, d: torch.Tensor) -> float:
        """||D L||_F^2 = trace(D G D^T), without forming L."""
        if self.gram is not None:
            return float(((d @ self.gram) * d).sum())
        if self.diag is not None:
            return float(((d * d) * self.diag[None, :]).sum())
        return float((d * d).sum())


@dataclass(frozen=True)
class Spectrum:
    """Output directions of W L and their energies (float64).

    u: m x k left singular vectors, s2: k energies (descending), total: ||W L||_F^2.
    ``exact`` is False when a randomized solver computed only the leading part. ``noise``
    (fast path only, else 0) is the energy float32 rounding may cost or misplace at each
    rank 1..k (a float: at every rank).
    """

    u: torch.Tensor
    s2: torch.Tensor
    total: float
    exact: bool = True
    noise: float | torch.Tensor = 0.0
    refined: dict = field(default_factory=dict, repr=False, compare=False)  # float64 spectra, by metric

    def trusted(self, rank: int) -> bool:
        """Whether the spectrum pins the optimum at ``rank`` to 3 decimals (see TAIL_MARGIN)."""
        noise = self.noise if isinstance(self.noise, float) else float(self.noise[min(rank, len(self.noise)) - 1])
        return noise <= 0 or self.tail(rank) >= TAIL_MARGIN * noise

    def tail(self, rank: int) -> float:
        """Squared error left at ``rank`` (the theoretical minimum)."""
        kept = float(self.s2[:rank].sum())
        return max(self.total - kept, 0.0)

    def relative_error(self, rank: int) -> float:
        """sqrt(tail / total): the minimum relative error achievable at ``rank``."""
        if self.total <= 0:
            return 0.0
        return math.sqrt(self.tail(rank) / self.total)

    def rank_for_energy(self, energy: float) -> int:
        """Smallest rank keeping at least ``energy`` of the total (may exceed len(s2)+1 when
        the randomized solver did not see enough of the spectrum)."""
        if self.total <= 0:
            return 1
        cum = torch.cumsum(self.s2, 0) / self.total
        hits = torch.nonzero(cum >= energy - 1e-12)
        if len(hits) == 0:
            return len(self.s2) + 1
        return max(int(hits[0]) + 1, 1)


@dataclass(frozen=True)
class Factorization:
    """W ~= a @ b with a: m x r, b: r x n (float64), plus quality figures."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    shape: tuple[int, int]
    relative_error: float
    optimal_error: float

    @property
    def error_ratio(self) -> float:
        """Achieved / optimal relative error. Both are floored at 1e-6, the level of float32
        rounding of the factors, so a rank that captures everything reads 1.0, not 0/0."""
        return max(self.relative_error, ROUNDING_FLOOR) / max(self.optimal_error, ROUNDING_FLOOR)


def spectrum(
    weight: torch.Tensor,
    metric: Metric,
    *,
    max_rank: int | None = None,
    solver: str = "exact",
    oversample: int = 16,
    power_iters: int = 4,
    seed: int = 0,
    fast: bool | None = None,
) -> Spectrum:
    """Spectrum of W L (float64 outputs). ``max_rank`` bounds what the randomized solver
    computes, and on the fast path also the columns of u (plus ``oversample``).

    ``fast``: None picks by size (``FAST_PATH_MIN_WORK``), True / False force the float32
    path of ``fast_spectrum`` / the float64 one.
    """
    m, n = weight.shape
    full = min(m, n)
    if (m * n * full >= FAST_PATH_MIN_WORK) if fast is None else fast:
        keep = None if max_rank is None else max_rank + oversample
        root = metric.root() if metric.gram is not None and m > n else None
        f = fast_spectrum(weight, gram=metric.gram, diag=metric.diag, root=root, keep=keep, solver=solver,
                          oversample=oversample, power_iters=power_iters, seed=seed)
        return Spectrum(u=f.u, s2=f.s2, total=f.total, exact=f.exact, noise=f.noise)
    w = weight.detach().to(torch.float64)
    if solver == "randomized" and max_rank is not None and max_rank + oversample < full:
        wl = metric.apply(w)
        q = max_rank + oversample
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, _ = torch.svd_lowrank(wl, q=q, niter=power_iters)
        return Spectrum(u=u[:, :q].contiguous(), s2=(s * s)[:q], total=float((wl * wl).sum()), exact=False)
    if m <= n:
        # C = W G W^T is m x m: its eigenvectors are the output directions, its eigenvalues
        # the energies. No square root of G is needed (form 2 of the design notes).
        c = metric.cov(w)
        evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
        order = torch.argsort(evals, descending=True, stable=True)
        s2 = evals[order].clamp_min(0)
        u = evecs[:, order]
        total = float(torch.diagonal(c).sum())
        return Spectrum(u=u, s2=s2, total=total, exact=True)
    wl = metric.apply(w)
    u, s, _ = torch.linalg.svd(wl, full_matrices=False)
    if u.shape[1] < full:  # metric of low rank (few tokens, dead channels): complete the basis
        u, s = _complete(w, u, s, full)
    return Spectrum(u=u, s2=s * s, total=float((wl * wl).sum()), exact=True)


def _complete(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend u with output directions of W outside its span, at zero calibration energy.

    The data cannot tell these directions apart, so any rank up to min(m, n) stays optimal;
    taking them from the residual W - U U^T W keeps as much of the weight as possible.
    """
    resid = w - u @ (u.T @ w)
    ur, sr, _ = torch.linalg.svd(resid, full_matrices=False)
    extra = ur[:, : full - u.shape[1]]
    extra = extra - u @ (u.T @ extra)  # re-orthogonalize against rounding
    extra, _ = torch.linalg.qr(extra)
    return torch.cat([u, extra], 1), torch.cat([s, torch.zeros(extra.shape[1], dtype=s.dtype, device=s.device)])


def _vouched(spec: Spectrum, rank: int, weight: torch.Tensor, metric: Metric) -> Spectrum:
    """``spec``, or the float64 spectrum of the layer (cached in ``spec``) when the fast
    path cannot vouch for ``rank`` (see TAIL_MARGIN)."""
    if spec.trusted(rank):
        return spec
    hit = spec.refined.get(id(metric))
    if hit is None:  # the metric is kept with it, so that its id cannot be reused
        hit = spec.refined[id(metric)] = (metric, spectrum(weight, metric, fast=False))
    return hit[1]


def _fix_signs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic sign per component: the largest-magnitude entry of each column of a is > 0."""
    idx = a.abs().argmax(dim=0)
    sign = torch.sign(a[idx, torch.arange(a.shape[1])])
    sign[sign == 0] = 1
    return a * sign[None, :], b * sign[:, None]


def factorize(weight: torch.Tensor, spec: Spectrum, rank: int, metric: Metric,
              eval_metric: Metric | None = None, eval_spec: Spectrum | None = None) -> Factorization:
    """Project W onto the top ``rank`` output directions of ``spec`` and return balanced factors.

    The achieved error is measured on the factors as shipped (rounded to the weight's dtype),
    in ``eval_metric`` (default: ``metric``) and compared with the optimum of ``eval_spec``
    (default: ``spec``) at the same rank -- e.g. plain SVD judged on calibration outputs.
    """
    eval_metric = metric if eval_metric is None else eval_metric
    eval_spec = spec if eval_spec is None else eval_spec
    m, n = weight.shape
    if rank < 1 or rank > spec.u.shape[1]:
        raise ValueError(f"rank {rank} outside [1, {spec.u.shape[1]}] for a {m}x{n} weight")
    same = eval_spec is spec and eval_metric is metric
    spec = _vouched(spec, rank, weight, metric)
    eval_spec = spec if same else _vouched(eval_spec, rank, weight, eval_metric)
    w = weight.detach().to(torch.float64)
    q = spec.u[:, :rank]
    core = q.T @ w  # r x n, W' = q core
    p, sig, rt = torch.linalg.svd(core, full_matrices=False)
    root = sig.clamp_min(0).sqrt()
    a = (q @ p) * root[None, :]
    b = root[:, None] * rt
    a, b = _fix_signs(a, b)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    a_s, b_s = a.to(dtype), b.to(dtype)
    diff = w - a_s.to(torch.float64) @ b_s.to(torch.float64)
    total = eval_spec.total
    achieved = math.sqrt(max(eval_metric.sqnorm(diff), 0.0) / total) if total > 0 else 0.0
    return Factorization(
        a=a_s,
        b=b_s,
        rank=rank,
        shape=(m, n),
        relative_error=achieved,
        optimal_error=eval_spec.relative_error(rank),
    )
