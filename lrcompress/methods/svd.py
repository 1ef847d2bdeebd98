"""Method ``svd``: plain truncated SVD (Eckart-Young optimal in weight space, blind to the
data) of Linear, Embedding and 1x1 Conv2d layers into two-factor modules. Also the matrix
path every other method falls back to without calibration data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..decompose import factorize as factorize_matrix
from ..errors import ConfigError
from .base import Factorized, Method
from .kinds import dtype_name, layer_matrix
from .layers import CorrectedLinear, LowRankConv1x1, LowRankEmbedding, LowRankLinear, build_shell

if TYPE_CHECKING:
    from ..planning.plan_types import LayerPlan, Plan

SOLVERS = ("exact", "randomized")


@dataclass(frozen=True)
class SVDConfig:
    """Plain truncated SVD (Eckart-Young optimal in weight space).

    solver: "exact" (full SVD) or "randomized" (subspace iteration, for large matrices).
    """

    solver: str = "exact"
    oversample: int = 16
    power_iters: int = 4
    name: str = field(default="svd", init=False)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver={self.solver!r} is not one of {SOLVERS}; pick one of them")
        if not isinstance(self.oversample, int) or self.oversample < 0:
            raise ConfigError(f"oversample={self.oversample!r} must be an int >= 0; e.g. 16")
        if not isinstance(self.power_iters, int) or self.power_iters < 0:
            raise ConfigError(f"power_iters={self.power_iters!r} must be an int >= 0; e.g. 4")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SVDMethod(Method):
    """Two-factor modules from a spectrum; the planner's rank allocation picks the rank."""

    name = "svd"
    config = SVDConfig
    summary = "plain truncated SVD (Linear, Embedding, 1x1 Conv2d)"
    modules = (LowRankLinear, LowRankEmbedding, LowRankConv1x1, CorrectedLinear)
    entry_kinds = ("linear", "embedding", "conv1x1", "corrected")
    spectral = True
    latency_budget = True

    def factorize(self, model: nn.Module, lp: "LayerPlan", plan: "Plan") -> Factorized:
        """The optimal rank-r pair for the plan's spectrum (judged on the calibration outputs
        when the plan has that metric), as the module of the layer's kind."""
        mod = model.get_submodule(lp.name)
        metric = plan.metrics[lp.name]
        f = factorize_matrix(layer_matrix(mod), plan.spectra[lp.name], lp.rank, metric,
                             plan.eval_metrics.get(lp.name), plan.eval_spectra.get(lp.name))
        if isinstance(mod, nn.Embedding):
            new = LowRankEmbedding.from_factors(f.b.T.contiguous(), f.a.contiguous(), mod.padding_idx)
        elif isinstance(mod, nn.Conv2d):
            new = LowRankConv1x1.from_factors(f.a.contiguous(), f.b.contiguous(), mod)
        else:
            new = LowRankLinear.from_factors(f.a.contiguous(), f.b.contiguous(),
                                             None if mod.bias is None else mod.bias.detach())
        on_output = not metric.is_identity or lp.name in plan.eval_metrics
        return Factorized({lp.name: new}, f.relative_error, f.optimal_error, f.error_ratio,
                          "output" if on_output else "weight")

    def entry(self, mod: nn.Module, groups: dict[int, str]) -> dict[str, Any]:
        if isinstance(mod, LowRankEmbedding):
            return {"kind": "embedding", "shape": [mod.num_embeddings, mod.embedding_dim], "rank": mod.rank,
                    "padding_idx": mod.padding_idx, "dtype": dtype_name(mod.table.weight)}
        if isinstance(mod, LowRankConv1x1):
            return {"kind": "conv1x1", "shape": [mod.out_channels, mod.in_channels], "rank": mod.rank,
                    "bias": mod.second.bias is not None, "stride": list(mod.first.stride),
                    "padding": list(mod.first.padding), "dtype": dtype_name(mod.first.weight)}
        if isinstance(mod, CorrectedLinear):  # a quantized Linear + its low-rank correction (--budget bytes)
            return {"kind": "corrected", "shape": [mod.out_features, mod.in_features], "rank": mod.rank,
                    "bias": mod.base.bias is not None, "dtype": dtype_name(mod.base.weight)}
        return {"kind": "linear", "shape": [mod.out_features, mod.in_features], "rank": mod.rank,
                "bias": mod.second.bias is not None, "dtype": dtype_name(mod.first.weight)}

    def shell(self, info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
        import torch
        return build_shell(info["kind"], info["shape"], info["rank"], bias=info.get("bias", False),
                           padding_idx=info.get("padding_idx"), dtype=getattr(torch, info.get("dtype", "float32")),
                           info=info)


METHOD = SVDMethod()
