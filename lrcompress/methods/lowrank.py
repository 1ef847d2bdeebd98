"""Rank-r factorization W ~= A B under an input metric G (identity, full Gram or diagonal).

For any square root L of G (G = L L^T), the rank-r minimiser of ||(W - W')L||_F is the
projection W' = Q_r Q_r^T W onto the top left singular vectors of W L (equivalently the top
eigenvectors of C = W G W^T). No inverse of G is needed, so singular or ill-conditioned Grams
(dead channels, fewer tokens than features) are handled exactly. The minimum error is
sqrt(sum_{i>r} sigma_i(W L)^2). Factors are returned in the balanced gauge A^T A = B B^T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metric:
    """Input metric of a layer: ``root`` is L (n x k) with G = L L^T, or ``diag`` holds G's
    diagonal (n,), or both None for the identity (plain weight-space error)."""

    root: torch.Tensor | None = None
    diag: torch.Tensor | None = None

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """Return W L."""
        if self.root is not None:
            return w @ self.root
        if self.diag is not None:
            return w * self.diag.clamp_min(0).sqrt()[None, :]
        return w

    @property
    def is_identity(self) -> bool:
        return self.root is None and self.diag is None


@dataclass(frozen=True)
class Spectrum:
    """Output directions of W L and their energies (float64).

    u: m x k left singular vectors, s2: k energies (descending), total: ||W L||_F^2.
    ``exact`` is False when a randomized solver computed only the leading part.
    """

    u: torch.Tensor
    s2: torch.Tensor
    total: float
    exact: bool = True

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
        """Achieved / optimal relative error (1.0 when both are ~0)."""
        if self.optimal_error <= 1e-12:
            return 1.0 if self.relative_error <= 1e-9 else math.inf
        return self.relative_error / self.optimal_error


def spectrum(
    weight: torch.Tensor,
    metric: Metric,
    *,
    max_rank: int | None = None,
    solver: str = "exact",
    oversample: int = 16,
    power_iters: int = 4,
    seed: int = 0,
) -> Spectrum:
    """Spectrum of W L in float64. ``max_rank`` bounds what the randomized solver computes."""
    w = weight.detach().to(torch.float64)
    wl = metric.apply(w)
    total = float((wl * wl).sum())
    k = min(wl.shape)
    if solver == "randomized" and max_rank is not None and max_rank + oversample < k:
        q = max_rank + oversample
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, s, _ = torch.svd_lowrank(wl, q=q, niter=power_iters)
        return Spectrum(u=u[:, :q].contiguous(), s2=(s * s)[:q], total=total, exact=False)
    u, s, _ = torch.linalg.svd(wl, full_matrices=False)
    return Spectrum(u=u, s2=s * s, total=total, exact=True)


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
    w = weight.detach().to(torch.float64)
    m, n = w.shape
    if rank < 1 or rank > spec.u.shape[1]:
        raise ValueError(f"rank {rank} outside [1, {spec.u.shape[1]}] for a {m}x{n} weight")
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
    dl = eval_metric.apply(diff)
    total = eval_spec.total
    achieved = math.sqrt(float((dl * dl).sum()) / total) if total > 0 else 0.0
    return Factorization(
        a=a_s,
        b=b_s,
        rank=rank,
        shape=(m, n),
        relative_error=achieved,
        optimal_error=eval_spec.relative_error(rank),
    )
