"""Plain truncated SVD: Eckart-Young optimal in weight space, blind to the data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .lowrank import Metric, Spectrum, spectrum

if TYPE_CHECKING:
    from ..methods.svd import SVDConfig


def svd_spectrum(weight: torch.Tensor, config: SVDConfig, max_rank: int | None = None,
                 seed: int = 0) -> Spectrum:
    """Spectrum of the weight itself (identity metric)."""
    return spectrum(weight, Metric(), max_rank=max_rank, solver=config.solver,
                    oversample=config.oversample, power_iters=config.power_iters, seed=seed)
