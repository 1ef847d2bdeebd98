"""Method ``svd-whiten``: data-aware SVD. Minimises each layer's output error on the
calibration inputs (whitened by the Gram root; token-frequency weights for embeddings), so
its achieved error equals the proven optimum for the rank. The default with calibration data."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import _check_number
from ..errors import ConfigError
from .svd import SVDConfig, SVDMethod


@dataclass(frozen=True)
class WhitenedSVDConfig(SVDConfig):
    """Data-aware SVD: minimises the layer's output error on calibration data.

    embedding_smoothing: share of the token-frequency weight spread uniformly over the
    vocabulary, so tokens unseen in calibration keep some fidelity (0 = pure frequency).
    """

    embedding_smoothing: float = 0.1
    name: str = field(default="svd-whiten", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        s = _check_number("embedding_smoothing", self.embedding_smoothing)
        if not 0.0 <= s <= 1.0:
            raise ConfigError(f"embedding_smoothing={s} must be in [0, 1]; e.g. 0.1")


class WhitenedSVDMethod(SVDMethod):
    """The same two-factor modules as ``svd`` (which owns their manifest entries), planned on
    whitened spectra."""

    name = "svd-whiten"
    config = WhitenedSVDConfig
    summary = "data-aware (whitened) SVD; needs --calib (default with --calib)"
    modules = ()
    entry_kinds = ()
    needs_calibration = True
    proven_optimal = True
    whitened = True


METHOD = WhitenedSVDMethod()
