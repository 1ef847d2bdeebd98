"""Factorize planned layers and swap the factorized modules into the model (in place)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from torch import nn

from .layers import LowRankConv1x1, LowRankEmbedding, LowRankLinear
from ..config import TENSOR_METHODS
from ..decompose import factorize
from ..planning.plan_types import LayerPlan, Plan
from ..planning.targets import layer_matrix


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
    ranks: list | None = None

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
    tensor = [lp for lp in plan.layers if lp.rank is not None and lp.method in TENSOR_METHODS]
    inputs = capture_inputs(model, plan.probe, [lp.name for lp in tensor]) if tensor else {}
    done: dict[str, tuple[dict[str, float], float]] = {}
    for lp in plan.layers:
        if lp.rank is None:
            results.append(LayerResult(lp.name, lp.kind, lp.shape, "dense", None, lp.params_before,
                                       lp.params_after, 0.0, 0.0, 1.0, "-", lp.reason))
            continue
        mod = model.get_submodule(lp.name)
        if lp.method == "shared-svd":
            results.append(_apply_shared(model, lp, plan, done))
            continue
        if lp.method in TENSOR_METHODS:
            results.append(_apply_tensor(model, lp, mod, plan, inputs.get(lp.name, [])))
            if progress is not None:
                progress(lp.name)
            continue
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
                                   "output" if measured_on_output else "weight", lp.reason, lp.ranks))
        if progress is not None:
            progress(lp.name)
    return results


@torch.no_grad()
def capture_inputs(model: nn.Module, probe: list, names: list[str]) -> dict[str, list[torch.Tensor]]:
    """Inputs of the named modules on the probe batches (a few calibration examples)."""
    found: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: found[n].append(a[0].detach())) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in probe:
            batch.run(model)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


@torch.no_grad()
def _output_error(dense: nn.Module, new: nn.Module, inputs: list[torch.Tensor]) -> float:
    """||new(x) - dense(x)|| / ||dense(x) - bias|| over the captured inputs."""
    num = den = 0.0
    bias = getattr(dense, "bias", None)
    for x in inputs:
        y = dense(x).double()
        d = new(x).double() - y
        if bias is not None:
            shape = [1] * y.dim()
            shape[1 if isinstance(dense, nn.Conv2d) else -1] = -1
            y = y - bias.double().reshape(shape)
        num += float((d * d).sum())
        den += float((y * y).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _apply_tensor(model: nn.Module, lp: LayerPlan, mod: nn.Module, plan: Plan,
                  inputs: list[torch.Tensor]) -> LayerResult:
    """Tucker/CP/TT: factorize, judge on the probe inputs (or on the weight), swap in."""
    from .tensor_plan import factorize_layer
    new, note = factorize_layer(mod, lp, plan.config, plan.grams.get(lp.name))
    if new is None:
        return LayerResult(lp.name, lp.kind, lp.shape, "dense", None, lp.params_before, lp.params_before,
                           0.0, 0.0, 1.0, "-", note)
    new.train(mod.training)
    if inputs:
        err, metric = _output_error(mod, new, inputs), "output"
    else:
        w = mod.weight.detach().double()
        err, metric = float((new.dense_weight().double().reshape(w.shape) - w).norm() / w.norm()), "weight"
    set_module(model, lp.name, new)
    return LayerResult(lp.name, lp.kind, lp.shape, lp.method, lp.rank, lp.params_before, lp.params_after,
                       err, math.nan, math.nan, metric, "; ".join(x for x in (lp.reason, note) if x),
                       lp.ranks)


def _apply_shared(model: nn.Module, lp: LayerPlan, plan: Plan,
                  done: dict[str, tuple[dict[str, float], float]]) -> LayerResult:
    """Build a shared-basis group on its first member, then report each member."""
    from .shared import build_group
    gid = lp.ranks[0]
    if gid not in done:
        group = plan.groups[gid]
        modules = {n: model.get_submodule(n) for n in group.names}
        new, errs, ratio = build_group(group, modules, [plan.metrics[n] for n in group.names])
        for n, m in new.items():
            m.train(modules[n].training)
            set_module(model, n, m)
        done[gid] = (errs, ratio)
    errs, ratio = done[gid]
    return LayerResult(lp.name, lp.kind, lp.shape, "shared-svd", lp.rank, lp.params_before, lp.params_after,
                       errs[lp.name], math.nan, ratio, "output", lp.reason, lp.ranks)
