"""Method ``auto``: a chooser. Per layer, the registered candidate method (``auto_candidate``)
with the lowest predicted output error at the layer's share of a ``ratio`` budget, against
whitened SVD where the layer has a matrix path: Tucker-2 vs CP for kxk convs, whitened SVD vs
tensor-train for Linear (TT only when ``try_tt``), whitened SVD for the rest. Candidates run
with their default configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError
from .base import Method
from .kinds import MATRIX_KINDS, layer_kind
from .svd_whiten import WhitenedSVDConfig

if TYPE_CHECKING:
    from ..config import CompressConfig

NAME = "auto"


@dataclass(frozen=True)
class AutoConfig(WhitenedSVDConfig):
    """Per layer, the method with the lowest predicted output error at the layer's share of a
    ``ratio`` budget: Tucker-2 vs CP for kxk convs, whitened SVD vs tensor-train for Linear
    (TT only when ``try_tt``), whitened SVD for the rest. Sub-methods use their defaults."""

    try_tt: bool = True
    name: str = field(default=NAME, init=False)


class AutoMethod(Method):
    name = NAME
    config = AutoConfig
    summary = "per layer, the method with the lowest predicted error (needs --ratio)"
    kinds = ("linear", "embedding", "conv1x1", "conv")
    whitened = True

    def check(self, config: "CompressConfig") -> None:
        super().check(config)
        if config.ratio is None:
            raise ConfigError("--method auto compares methods at equal parameter budgets; give --ratio (not --rank "
                              "or --energy)")

    def choose(self, mod: nn.Module, config: "CompressConfig", frac: float, gram: torch.Tensor | None,
               matrix_error: float | None, candidates: list[Method]) -> tuple[Method | None, str]:
        """Candidates that take ``mod`` compared by predicted error at ``frac`` of its parameters;
        for matrix layers against ``matrix_error`` (whitened SVD, None when not computed)."""
        dense = mod.weight.numel()
        try_tt = getattr(config.method, "try_tt", True)
        takers = [m for m in candidates if m.auto_candidate and m.takes(mod, config)
                  and (try_tt or "tt_linear" not in m.entry_kinds)]
        matrix = layer_kind(mod) in MATRIX_KINDS
        if matrix and (matrix_error is None or layer_kind(mod) != "linear"):
            return None, ""
        if not takers:
            return None, ""
        errs: dict[str, tuple[Method, float]] = {}
        refused = []
        for m in takers:
            why = m.unsupported(mod)
            if why is not None:
                refused.append(why)
                continue
            errs[m.name] = (m, m.predicted_error(mod, frac * dense, gram))
        if matrix:
            if not errs:
                return None, f"auto: svd-whiten ({refused[0]})" if refused else ""
            name, (best, err) = min(errs.items(), key=lambda kv: kv[1][1])
            if err < matrix_error:
                return best, f"auto: {name} {err:.4f} < svd-whiten {matrix_error:.4f}"
            return None, f"auto: svd-whiten {matrix_error:.4f} <= {name} {err:.4f}"
        if not errs:
            return None, "auto: " + (refused[0] if refused else "no tensor method applies")
        name, (best, _) = min(errs.items(), key=lambda kv: kv[1][1])
        return best, "auto: " + ", ".join(f"{k} {v:.4f}" for k, (_, v) in errs.items()) + f" -> {name}"


METHOD = AutoMethod()
