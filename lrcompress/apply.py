"""Factorize planned layers and swap the factorized modules into the model (in place)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from torch import nn

from .layers import LowRankConv1x1, LowRankEmbedding, LowRankLinear
from .methods import factorize
from .planning import Plan, layer_matrix


@dataclass
class LayerResult:
    """What happened to one layer. Errors are relative; ``error_metric`` says whether they
    are measured on calibration outputs ("output") or on the weight ("weight")."""

    name: str
    kind: str
    shape: tuple[int, int]
    method: str
    rank: int | None
    params_before: int
    params_after: int
    relative_error: float
    optimal_error: float
    error_ratio: float
    error_metric: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_plan(model: nn.Module, plan: Plan,
               progress: Callable[[str], None] | None = None) -> list[LayerResult]:
    """Factorize every layer with a rank in ``plan`` and swap it in. Returns per-layer results."""
    results: list[LayerResult] = []
    for lp in plan.layers:
        if lp.rank is None:
            results.append(LayerResult(lp.name, lp.kind, lp.shape, "dense", None, lp.params_before,
                                       lp.params_after, 0.0, 0.0, 1.0, "-", lp.reason))
            continue
        mod = model.get_submodule(lp.name)
        w = layer_matrix(mod)
        metric = plan.metrics[lp.name]
        f = factorize(w, plan.spectra[lp.name], lp.rank, metric,
                      plan.eval_metrics.get(lp.name), plan.eval_spectra.get(lp.name))
        if isinstance(mod, nn.Embedding):
            new = LowRankEmbedding.from_factors(f.b.T.contiguous(), f.a.contiguous(), mod.padding_idx)
        elif isinstance(mod, nn.Conv2d):
            new = LowRankConv1x1.from_factors(f.a.contiguous(), f.b.contiguous(), mod)
        else:
            new = LowRankLinear.from_factors(f.a.contiguous(), f.b.contiguous(),
                                             None if mod.bias is None else mod.bias.detach())
        new.train(mod.training)
        set_module(model, lp.name, new)
        measured_on_output = not metric.is_identity or lp.name in plan.eval_metrics
        results.append(LayerResult(lp.name, lp.kind, lp.shape, lp.method, lp.rank, lp.params_before,
                                   lp.params_after, f.relative_error, f.optimal_error, f.error_ratio,
                                   "output" if measured_on_output else "weight", lp.reason))
        if progress is not None:
            progress(lp.name)
    return results
