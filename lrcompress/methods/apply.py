"""Factorize planned layers and swap the factorized modules into the model (in place). Each
layer goes to the method its plan names (through the registry); a method that does not
measure its own error is judged here on the probe inputs, or on the weight without them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..planning.plan_types import LayerPlan, Plan
from . import registry
from .base import Choice, Factorized


@dataclass
class LayerResult:
    """What happened to one layer: its plan plus the measured quality. Errors are relative;
    ``error_metric`` says whether they are measured on calibration outputs ("output") or on
    the weight ("weight"). ``kept_dense``: the method refused the planned layer at
    factorization (``note`` says why)."""

    plan: LayerPlan
    relative_error: float = 0.0
    optimal_error: float = 0.0
    error_ratio: float = 1.0
    error_metric: str = "-"
    note: str = ""
    kept_dense: bool = False

    @property
    def dense(self) -> bool:
        return self.kept_dense or self.plan.rank is None

    name = property(lambda self: self.plan.name)
    kind = property(lambda self: self.plan.kind)
    shape = property(lambda self: self.plan.shape)
    params_before = property(lambda self: self.plan.params_before)

    @property
    def method(self) -> str:
        return "dense" if self.dense else self.plan.method

    @property
    def rank(self) -> int | None:
        return None if self.dense else self.plan.rank

    @property
    def choice(self) -> Choice | None:
        return None if self.dense else self.plan.choice

    @property
    def params_after(self) -> int:
        return self.plan.params_before if self.kept_dense else self.plan.params_after

    @property
    def reason(self) -> str:
        if self.kept_dense:
            return self.note
        return "; ".join(x for x in (self.plan.reason, self.note) if x)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "method": self.method,
                "rank": self.rank, "params_before": self.params_before, "params_after": self.params_after,
                "relative_error": self.relative_error, "optimal_error": self.optimal_error,
                "error_ratio": self.error_ratio, "error_metric": self.error_metric, "reason": self.reason,
                "choice": None if self.choice is None else self.choice.to_dict()}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_plan(model: nn.Module, plan: Plan,
               progress: Callable[[str], None] | None = None) -> list[LayerResult]:
    """Factorize every layer with a rank in ``plan`` and swap it in. Returns per-layer results."""
    results: list[LayerResult] = []
    unmeasured = [lp.name for lp in plan.layers if lp.rank is not None and not registry.get(lp.method).spectral]
    inputs = capture_inputs(model, plan.probe, unmeasured) if unmeasured else {}
    for lp in plan.layers:
        if lp.rank is None:
            results.append(LayerResult(lp))
            continue
        dense = model.get_submodule(lp.name)
        f: Factorized = registry.get(lp.method).factorize(model, lp, plan)
        if f.dense:
            results.append(LayerResult(lp, note=f.note, kept_dense=True))
            continue
        if f.relative_error is None:  # judge the new module against the dense one
            new = f.modules[lp.name]
            new.train(dense.training)
            if inputs.get(lp.name):
                f.relative_error, f.error_metric = _output_error(dense, new, inputs[lp.name]), "output"
            else:
                w = dense.weight.detach().double()
                f.relative_error = float((new.dense_weight().detach().double().reshape(w.shape) - w).norm() / w.norm())
                f.error_metric = "weight"
        for name, new in f.modules.items():
            new.train(model.get_submodule(name).training)
            set_module(model, name, new)
        results.append(LayerResult(lp, f.relative_error, f.optimal_error, f.error_ratio, f.error_metric, f.note))
        if progress is not None and not registry.get(lp.method).grouped:
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
