"""Data-aware (whitened) SVD: minimises ||(W - W') X||_F on the calibration inputs X."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .lowrank import Metric, Spectrum, gram_root, spectrum

if TYPE_CHECKING:
    from ..methods.svd import SVDConfig

__all__ = ["gram_root", "metric_from_stats", "whitened_spectrum"]


def metric_from_stats(gram: torch.Tensor | None = None, diag: torch.Tensor | None = None) -> Metric:
    """Metric for a full Gram matrix or for a diagonal one (token frequencies)."""
    return Metric(gram=gram, diag=diag)


def whitened_spectrum(weight: torch.Tensor, metric: Metric, config: SVDConfig,
                      max_rank: int | None = None, seed: int = 0) -> Spectrum:
    """Spectrum of W L: its energies are the eigenvalues of C = W G W^T."""
    return spectrum(weight, metric, max_rank=max_rank, solver=config.solver,
                    oversample=config.oversample, power_iters=config.power_iters, seed=seed)
