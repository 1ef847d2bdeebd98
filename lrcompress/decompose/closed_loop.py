"""Closed-loop whitened SVD: the rank-r W' minimising the error of the original output W X
when the layer is fed what the partly compressed model gives it, X̂ (same tokens).

Statistics (all n x n, float64, accumulated over calibration tokens):
G = X Xᵀ (original inputs), Ĝ = X̂ X̂ᵀ (actual inputs), C = X X̂ᵀ (cross term).

The objective blends the closed-loop error with the open-loop one (``blend`` = α):

    J(W') = (1-α) ‖W X - W' X̂‖² + α ‖W X - W' X‖² + δ ‖W'‖²
          = tr(W G Wᵀ) - 2 tr(W K W'ᵀ) + tr(W' M W'ᵀ),
    M = (1-α) Ĝ + α G + δ I,  K = (1-α) C + α G,

with δ = ``ridge`` x mean(diag((1-α) Ĝ + α G)). Its unconstrained minimiser is W* = W K M⁻¹ and
J(W') = J(W*) + tr((W' - W*) M (W' - W*)ᵀ), so the best rank-r W' is the whitened truncation of
W* in the metric M (the open-loop machinery applied to W*, M): still a closed form with a
provable optimum, reported as achieved/optimal. α = 1, δ = 0 is open-loop whitened SVD; X̂ = X
makes every α the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lowrank import Factorization, Metric, factorize, spectrum


@dataclass
class LoopStats:
    """Closed-loop statistics of one layer input (shared by layers fed the same tensor)."""

    gram: torch.Tensor
    gram_hat: torch.Tensor
    cross: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, n: int) -> "LoopStats":
        z = lambda: torch.zeros(n, n, dtype=torch.float64)  # noqa: E731
        return cls(z(), z(), z(), 0)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Accumulate rows (tokens x n) of the original and the actual inputs, paired by token."""
        x, x_hat = x.to(torch.float64), x_hat.to(torch.float64)
        self.gram.addmm_(x.T, x)
        self.gram_hat.addmm_(x_hat.T, x_hat)
        self.cross.addmm_(x.T, x_hat)
        self.rows += x.shape[0]


@dataclass(frozen=True)
class LoopFit:
    """A closed-loop factorization and its figures, all relative to ‖W X‖.

    ``objective``/``optimal``: sqrt(J / ‖WX‖²) achieved and the minimum over rank r (ratio = 1
    up to rounding of the shipped factors). ``closed_error``: ‖WX - W'X̂‖ / ‖WX‖ of these
    factors; ``open_error``: the same for the open-loop factors at the same rank (None when not
    computed); ``floor``: ‖WX - W* X̂‖ / ‖WX‖, what no rank can remove when α = 0.
    """

    factors: Factorization
    objective: float
    optimal: float
    closed_error: float
    open_error: float | None
    floor: float

    @property
    def error_ratio(self) -> float:
        floor = 1e-6
        return max(self.objective, floor) / max(self.optimal, floor)


def loop_metric(stats: LoopStats, blend: float, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) of the blended, ridge-regularised objective."""
    m = (1.0 - blend) * stats.gram_hat + blend * stats.gram
    k = (1.0 - blend) * stats.cross + blend * stats.gram
    n = m.shape[0]
    delta = ridge * float(torch.diagonal(m).mean()) if n else 0.0
    if delta > 0:
        m = m + delta * torch.eye(n, dtype=m.dtype)
    return 0.5 * (m + m.T), k


def closed_target(w: torch.Tensor, stats: LoopStats, blend: float, ridge: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W*, M, K): the unconstrained minimiser of J and the objective's matrices."""
    m, k = loop_metric(stats, blend, ridge)
    wk = w.to(torch.float64) @ k
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        w_star = torch.cholesky_solve(wk.T, chol).T
    else:  # singular M (no ridge and dead channels): least-norm solution
        w_star = wk @ torch.linalg.pinv(m, hermitian=True)
    return w_star, m, k


def _quad(a: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> float:
    """tr(A G Bᵀ)."""
    return float(((a @ g) * b).sum())


def output_error(w: torch.Tensor, w2: torch.Tensor, stats: LoopStats) -> float:
    """‖W X - W2 X̂‖ / ‖W X‖ from the statistics (W2 may be any m x n matrix)."""
    w, w2 = w.to(torch.float64), w2.to(torch.float64)
    ref = _quad(w, stats.gram, w)
    e2 = ref - 2.0 * _quad(w, stats.cross, w2) + _quad(w2, stats.gram_hat, w2)
    return math.sqrt(max(e2, 0.0) / ref) if ref > 0 else 0.0


def closed_factorize(weight: torch.Tensor, stats: LoopStats, rank: int, *, blend: float = 0.0,
                     ridge: float = 1e-6, solver: str = "exact", seed: int = 0,
                     open_factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> LoopFit:
    """The rank-``rank`` minimiser of J as balanced factors in ``weight``'s dtype, with its
    figures. ``open_factors`` (A, B of the open-loop fit) adds their closed-loop error."""
    w = weight.detach().to(torch.float64)
    w_star, m, k = closed_target(w, stats, blend, ridge)
    metric = Metric(gram=m)
    spec = spectrum(w_star, metric, max_rank=rank, solver=solver, seed=seed)
    f = factorize(w_star, spec, rank, metric)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    a, b = f.a.to(dtype), f.b.to(dtype)
    w2 = a.to(torch.float64) @ b.to(torch.float64)
    ref = _quad(w, stats.gram, w)
    j_star = ref - _quad(w_star, m, w_star)  # J(W*) = tr(WGWᵀ) - tr(W* M W*ᵀ)
    j_opt = j_star + spec.tail(rank)
    j = ref - 2.0 * _quad(w, k, w2) + _quad(w2, m, w2)
    rel = (lambda v: math.sqrt(max(v, 0.0) / ref)) if ref > 0 else (lambda v: 0.0)
    floor_e2 = ref - 2.0 * _quad(w, stats.cross, w_star) + _quad(w_star, stats.gram_hat, w_star)
    open_err = None
    if open_factors is not None:
        open_err = output_error(w, open_factors[0].double() @ open_factors[1].double(), stats)
    factors = Factorization(a=a, b=b, rank=rank, shape=tuple(w.shape), relative_error=f.relative_error,
                            optimal_error=f.optimal_error)
    return LoopFit(factors, rel(j), rel(j_opt), output_error(w, w2, stats), open_err, rel(floor_e2))
