"""Data-aware (whitened) SVD: minimises ||(W - W') X||_F on the calibration inputs X."""

from __future__ import annotations

import torch

from ..config import SVDConfig
from .lowrank import Metric, Spectrum, spectrum


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


def metric_from_stats(gram: torch.Tensor | None = None, diag: torch.Tensor | None = None) -> Metric:
    """Metric for a full Gram matrix or for a diagonal one (token frequencies)."""
    return Metric(gram=gram, diag=diag)


def whitened_spectrum(weight: torch.Tensor, metric: Metric, config: SVDConfig,
                      max_rank: int | None = None, seed: int = 0) -> Spectrum:
    """Spectrum of W L: its energies are the eigenvalues of C = W G W^T."""
    return spectrum(weight, metric, max_rank=max_rank, solver=config.solver,
                    oversample=config.oversample, power_iters=config.power_iters, seed=seed)
