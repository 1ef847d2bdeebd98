"""One unit's closed-loop compression: layers in the order they run, each group of layers fed
the same tensor fitted to the original outputs from what the partly compressed unit gives it."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..calibration.calibrate import _select
from ..config import CompressConfig
from ..decompose import factorize
from ..decompose.closed_loop import LoopStats, closed_factorize
from ..methods.apply import LayerResult, set_module
from ..methods.kinds import is_linear, layer_matrix
from ..methods.layers import LowRankLinear
from ..planning.plan_types import Plan

Run = Callable[[int], Any]


@torch.no_grad()
def run_order(modules: dict[str, nn.Module], run: Run) -> list[list[str]]:
    """Groups of ``modules`` fed the same tensor, in the order they first run (one batch)."""
    seen: list[tuple[str, torch.Tensor]] = []  # the inputs themselves: kept alive, their ids stay unique
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.append((n, a[0]))) for n, m in modules.items()]
    try:
        run(0)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[int, list[str]] = {}
    placed: set[str] = set()
    for n, x in seen:
        if n not in placed:
            groups.setdefault(id(x), []).append(n)
            placed.add(n)
    order = [g for g in groups.values()]
    missing = [n for n in modules if n not in {x for g in order for x in g}]
    return order + [[n] for n in missing]


@torch.no_grad()
def loop_stats(original: nn.Module, current: nn.Module, run_original: Run, run_current: Run,
               masks: list[torch.Tensor | None]) -> LoopStats | None:
    """G, Ĝ and C of one input, pairing token by token the original module's inputs (original
    unit on original activations) with the current module's (compressed unit on its own)."""
    stats: LoopStats | None = None
    for i, mask in enumerate(masks):
        got: list[torch.Tensor] = []
        got_hat: list[torch.Tensor] = []
        h1 = original.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
        try:
            run_original(i)
        finally:
            h1.remove()
        h2 = current.register_forward_pre_hook(lambda m, a: got_hat.append(a[0].detach()))
        try:
            run_current(i)
        finally:
            h2.remove()
        if not got or not got_hat:
            continue
        x, x_hat = _select(got[0], mask, True), _select(got_hat[0], mask, True)
        if stats is None:
            stats = LoopStats.zeros(x.shape[-1])
        stats.add(x, x_hat)
    return stats


def closed_unit(model: nn.Module, plan: Plan, names: list[str], original: Callable[[str], nn.Module],
                run_original: Run, run_current: Run, masks: list[torch.Tensor | None], config: CompressConfig
                ) -> tuple[list[LayerResult], dict[str, dict[str, float]], list[str]]:
    """Factorize the plan's linear layers among ``names`` in closed loop, in run order, swapping
    each group in before the next is measured. Returns (results, closed-loop figures by layer,
    the names left for the open-loop path: other kinds and methods without a spectrum)."""
    by_name = {lp.name: lp for lp in plan.layers}
    closed = [n for n in names if n in by_name and by_name[n].rank is not None and n in plan.spectra
              and is_linear(model.get_submodule(n))]
    results: list[LayerResult] = []
    figures: dict[str, dict[str, float]] = {}
    if not closed:
        return results, figures, [n for n in names if n in by_name]
    for group in run_order({n: model.get_submodule(n) for n in closed}, run_current):
        stats = loop_stats(original(group[0]), model.get_submodule(group[0]), run_original, run_current, masks)
        for name in group:
            lp, mod = by_name[name], model.get_submodule(name)
            if stats is None:  # never reached by the data: open loop
                continue
            w = layer_matrix(mod)
            f_open = factorize(w, plan.spectra[name], lp.rank, plan.metrics[name])
            fit = closed_factorize(w, stats, lp.rank, blend=config.closed_blend, ridge=config.closed_ridge,
                                   solver=config.method.solver, seed=config.seed, open_factors=(f_open.a, f_open.b))
            bias = None if getattr(mod, "bias", None) is None else mod.bias.detach()
            set_module(model, name, LowRankLinear.from_factors(fit.factors.a.contiguous(), fit.factors.b.contiguous(), bias))
            results.append(LayerResult(lp, fit.objective, fit.optimal, fit.error_ratio, "output"))
            figures[name] = {"closed_error": fit.closed_error, "open_error": float(fit.open_error),
                             "open_error_on_original": f_open.relative_error, "floor": fit.floor}
    done = {r.name for r in results}
    return results, figures, [n for n in names if n in by_name and n not in done]
