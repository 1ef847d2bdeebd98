"""The plan's data: one ``LayerPlan`` per target layer (rank or why dense, params before and
after, predicted error) and the ``Plan`` with totals; the dry-run table. Computed by
``planning.make_plan`` before any weight changes; read by allocation, apply and reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..config import CompressConfig
from ..decompose import Metric, Spectrum
from ..methods import registry
from ..methods.base import Choice


@dataclass
class LayerPlan:
    """One layer's decision. ``shape`` is the stored weight shape ((out, in) for Linear and
    1x1 Conv2d, (V, d) for Embedding); ``rank`` is None when the layer stays dense (``reason`` says why)."""

    name: str
    kind: str
    shape: tuple[int, int]
    method: str
    rank: int | None
    params_before: int
    params_after: int
    predicted_error: float
    break_even: int
    reason: str = ""
    sensitivity: float | None = None
    choice: Choice | None = None

    def add_reason(self, text: str) -> None:
        """Append ``text`` to the reason ('; '-separated)."""
        self.reason = "; ".join(x for x in (self.reason, text) if x)

    def set_rank(self, rank: int, params_after: int, method: str) -> None:
        """Take ``rank`` at ``params_after`` parameters, unless that saves nothing (break-even):
        then the layer stays dense and the reason says so."""
        if params_after >= self.params_before:
            self.reason = f"{method} at this rank needs {params_after} >= {self.params_before} params (break-even): kept dense"
            self.choice = None
            return
        self.rank, self.params_after = rank, params_after

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["shape"] = list(self.shape)
        d["choice"] = None if self.choice is None else self.choice.to_dict()
        return d


@dataclass
class Plan:
    """Per-layer plan plus totals. ``spectra``/``metrics`` are cached for factorization."""

    layers: list[LayerPlan]
    params_model: int
    config: CompressConfig
    spectra: dict[str, Spectrum] = field(default_factory=dict, repr=False)
    metrics: dict[str, Metric] = field(default_factory=dict, repr=False)
    eval_spectra: dict[str, Spectrum] = field(default_factory=dict, repr=False)
    eval_metrics: dict[str, Metric] = field(default_factory=dict, repr=False)
    grams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    groups: dict[str, Any] = field(default_factory=dict, repr=False)
    probe: list = field(default_factory=list, repr=False)
    latency: dict[str, Any] | None = None

    def table(self) -> str:
        """The dry-run table."""
        return plan_table(self)

    @property
    def params_after(self) -> int:
        return self.params_model - sum(l.params_before - l.params_after for l in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "params_model": self.params_model,
                "params_after": self.params_after, "layers": [l.to_dict() for l in self.layers],
                **({"latency": self.latency} if self.latency else {})}


def break_even_rank(m: int, n: int) -> int:
    """Smallest rank r with r (m + n) >= m n: factorizing at or above it saves nothing."""
    return math.ceil(m * n / (m + n))


def plan_table(plan: Plan) -> str:
    """The dry-run table: layer, shape, method, rank, params before/after, predicted error."""
    head = f"{'layer':44} {'shape':>12} {'method':>10} {'rank':>5} {'b-even':>6} {'params':>17} {'pred.err':>8}"
    lines = [head, "-" * len(head)]
    for l in plan.layers:
        shape = "x".join(map(str, l.shape))
        params = f"{l.params_before}->{l.params_after}"
        if l.rank is None:
            lines.append(f"{l.name[-44:]:44} {shape:>12} {'dense':>10} {'-':>5} {l.break_even:>6} {params:>17}  {l.reason}")
        elif not registry.get(l.method).spectral:  # no single spectrum: error is measured after factorizing
            rank = (l.choice.label() if l.choice is not None else "") or str(l.rank)
            lines.append(f"{l.name[-44:]:44} {shape:>12} {l.method:>10} {rank:>5} {'-':>6} {params:>17} "
                         f"{'-':>8}" + (f"  {l.reason}" if l.reason else ""))
        else:
            lines.append(f"{l.name[-44:]:44} {shape:>12} {l.method:>10} {l.rank:>5} {l.break_even:>6} {params:>17} "
                         f"{l.predicted_error:8.4f}" + (f"  {l.reason}" if l.reason else ""))
    lines.append("-" * len(head))
    after = plan.params_after
    lines.append(f"model params {plan.params_model:,} -> {after:,} ({after / plan.params_model:.1%})")
    return "\n".join(lines)
