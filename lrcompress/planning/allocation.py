"""Rank allocation for matrix layers: budgets, uniform and global (sensitivity-weighted)."""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Callable

from torch import nn

from ..calibration.sensitivity import measure
from ..config import CompressConfig
from ..decompose import Spectrum, factorize
from ..errors import ConfigError
from .targets import layer_matrix, module_weight

if TYPE_CHECKING:
    from .plan_types import LayerPlan, Plan


def sensitivities(model: nn.Module, plan: Plan, layers: list[LayerPlan], ranks: dict[str, int],
                   probe: list, progress: Callable[[str], None] | None) -> dict[str, float]:
    """Measured output sensitivity of each layer in ``ranks``, probed at that rank."""

    probes = {}
    for l in layers:
        if l.name not in ranks:
            continue
        r = min(ranks[l.name], max(l.break_even - 1, 1))
        mod = model.get_submodule(l.name)
        f = factorize(layer_matrix(mod), plan.spectra[l.name], r, plan.metrics[l.name])
        probes[l.name] = (module_weight(mod, f.a @ f.b), f.relative_error ** 2)
    raw = measure(model, probe, probes, progress)
    positive = sorted(v for v in raw.values() if v > 0)
    floor = 1e-3 * positive[len(positive) // 2] if positive else 1.0
    return {k: max(v, floor) for k, v in raw.items()}


def budget_for(layers: list[LayerPlan], config: CompressConfig, params_model: int) -> tuple[float, float]:
    """(parameter budget for the targets, that budget as a fraction of their params)."""
    return budget_fraction(sum(l.params_before for l in layers), config, params_model)


def budget_fraction(total: int, config: CompressConfig, params_model: int) -> tuple[float, float]:
    """The ``ratio`` budget for targets holding ``total`` params, and its fraction of them."""
    budget = config.ratio * total
    if config.scope == "model":
        budget = config.ratio * params_model - (params_model - total)
        if budget <= 0:
            raise ConfigError(f"--ratio {config.ratio} of the whole model ({params_model} params) is below "
                              f"the {params_model - total} params outside the targets; raise --ratio or "
                              "widen --targets")
    return budget, (budget / total if total else 1.0)


def allocate(layers: list[LayerPlan], spectra: dict[str, Spectrum], config: CompressConfig,
              params_model: int, weights: dict[str, float] | None = None,
              budget: float | None = None) -> dict[str, int | None]:
    """Ranks for matrix layers; ``budget`` overrides the ratio budget (what tensor-method
    layers left of it)."""
    if config.rank is not None:
        return {l.name: config.matrix_rank for l in layers}
    if config.energy is not None:
        return {l.name: spectra[l.name].rank_for_energy(config.energy) for l in layers}
    if budget is None:
        budget, frac = budget_for(layers, config, params_model)
    else:
        total = sum(l.params_before for l in layers)
        frac = budget / total if total else 1.0
        if frac <= 0:
            raise ConfigError(f"--ratio {config.ratio} leaves no parameters for the low-rank layers after the "
                              "tensor-method layers took their share; raise --ratio")
    if frac >= 1.0:
        return {l.name: None for l in layers}
    if config.allocate == "uniform":
        return {l.name: max(1, math.floor(frac * l.params_before / sum(mn(l)))) for l in layers}
    return greedy_global(layers, spectra, budget, weights)


def mn(l: LayerPlan) -> tuple[int, int]:
    return l.shape if l.kind == "linear" else (l.shape[1], l.shape[0])


def greedy_global(layers: list[LayerPlan], spectra: dict[str, Spectrum], budget: float,
            weights: dict[str, float] | None = None) -> dict[str, int | None]:
    """Greedy: spend parameters where the normalized truncation loss per parameter is highest.

    Each rank step of a layer costs (m + n) params and removes s2[r] / total of its relative
    squared output error, times the layer's measured sensitivity when ``weights`` are given;
    going dense from the break-even rank removes the rest. Spectra are sorted, so step gains
    fall and the greedy order is optimal for this separable objective.
    """
    rank = {l.name: 1 for l in layers}
    spent = sum(sum(mn(l)) for l in layers)
    if spent > budget:
        raise ConfigError(f"the budget ({int(budget)} params) cannot hold even rank 1 for every target "
                          f"({spent} params); raise --ratio or narrow --targets")
    heap: list[tuple[float, str, int, bool]] = []
    by_name = {l.name: l for l in layers}

    def push(l: LayerPlan) -> None:
        s = spectra[l.name]
        r = rank[l.name]
        cost = sum(mn(l))
        if s.total <= 0:
            return
        scale = (weights or {}).get(l.name, 1.0) / s.total
        if r < l.break_even - 1:
            if r < len(s.s2):
                gain = float(s.s2[r]) * scale
            else:  # randomized spectrum: spread the unseen tail evenly
                k = min(mn(l)) - len(s.s2)
                gain = s.tail(len(s.s2)) * scale / max(k, 1)
            heapq.heappush(heap, (-gain / cost, l.name, cost, False))
        elif r == l.break_even - 1:
            cost = l.params_before - r * cost
            heapq.heappush(heap, (-(s.tail(r) * scale) / max(cost, 1), l.name, cost, True))

    for l in layers:
        push(l)
    while heap:
        _, name, cost, dense = heapq.heappop(heap)
        if spent + cost > budget:
            continue
        spent += cost
        l = by_name[name]
        if dense:
            rank[name] = None
            continue
        rank[name] += 1
        push(l)
    return rank


