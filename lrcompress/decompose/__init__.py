"""Factorization methods: pure functions (weight, statistics, config) -> Factorization."""

from .lowrank import Factorization, Metric, Spectrum, factorize, spectrum
from .svd import svd_spectrum
from .whiten import whitened_spectrum

__all__ = [
    "Factorization",
    "Metric",
    "Spectrum",
    "factorize",
    "spectrum",
    "svd_spectrum",
    "whitened_spectrum",
]
