"""Data-aware (whitened) SVD: minimises ||(W - W') X||_F on the calibration inputs X."""

from __future__ import annotations

import torch

from ..config import SVDConfig
from .lowrank import Metric, Spectrum, spectrum


def gram_root(gram: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """A square root L (n x k) with L L^T = G, dropping the null space (k = numerical rank).

    Uses eigh, so a singular or indefinite-by-rounding Gram is fine: negative and
    negligible eigenvalues are discarded, nothing is inverted.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    evals, evecs = torch.linalg.eigh(g)
    top = float(evals.max()) if evals.numel() else 0.0
    keep = evals > max(top, 0.0) * rtol
    if not bool(keep.any()):
        return torch.zeros(g.shape[0], 1, dtype=torch.float64, device=g.device)
    return evecs[:, keep] * evals[keep].sqrt()[None, :]


def metric_from_stats(gram: torch.Tensor | None = None, diag: torch.Tensor | None = None) -> Metric:
    """Metric for a full Gram matrix or for a diagonal one (token frequencies)."""
    if gram is not None:
        return Metric(root=gram_root(gram))
    if diag is not None:
        return Metric(diag=diag.to(torch.float64))
    return Metric()


def whitened_spectrum(weight: torch.Tensor, metric: Metric, config: SVDConfig,
                      max_rank: int | None = None, seed: int = 0) -> Spectrum:
    """Spectrum of W L: its energies are the eigenvalues of C = W G W^T."""
    return spectrum(weight, metric, max_rank=max_rank, solver=config.solver,
                    oversample=config.oversample, power_iters=config.power_iters, seed=seed)
