"""Rank allocation: which layers to factorize, at which rank, before any weight changes.

Every target layer goes one of three ways, decided by its method (through the registry):
structured methods that ``take`` it plan it themselves (with a global hull allocation where the
method offers ``options``); group methods plan shared factors over the matrix layers; all other
layers are matrix layers, planned from one spectrum each by the rank allocator."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from ..calibration.calibrate import Calibration
from ..config import CompressConfig
from ..decompose import Metric, Spectrum, svd_spectrum, whitened_spectrum
from ..decompose.whiten import metric_from_stats
from ..errors import ConfigError
from ..methods import registry
from ..methods.base import Method
from ..methods.kinds import UNSUPPORTED
from .allocation import allocate, budget_for, budget_fraction, mn, sensitivities
from .hull import hull, hull_greedy
from .latency_plan import latency_ranks, probe_fraction
from .plan_types import LayerPlan, Plan, break_even_rank, plan_table  # noqa: F401  (re-exported)
from .targets import (
    check_finite,
    explicit_target,
    layer_kind,
    layer_matrix,
    select_targets,
    tied_weights,
    unsupported_layers,
    unsupported_weight,
)


def layer_metric(mod: nn.Module, name: str, calib: Calibration | None, smoothing: float) -> Metric | None:
    if calib is None or name not in calib:
        return None
    st = calib.layers[name]
    if isinstance(mod, nn.Embedding):
        counts = st.counts
        w = (1.0 - smoothing) * counts / counts.sum() + smoothing / counts.numel()
        return metric_from_stats(diag=w)
    return metric_from_stats(gram=st.gram)


def make_plan(model: nn.Module, config: CompressConfig, calib: Calibration | None = None,
              progress: Callable[[str], None] | None = None) -> Plan:
    """Decide ranks for every target layer. Touches no weight."""
    check_finite(model)
    method = registry.for_config(config.method)
    method.check(config)
    names = select_targets(model, config.targets, config.exclude, config.method.name)
    modules = dict(model.named_modules())
    tied = tied_weights(model, names)
    params_model = sum(p.numel() for p in model.parameters())
    whiten = method.whitened
    smoothing = getattr(config.method, "embedding_smoothing", 0.0) if whiten else 0.0
    matrix_plain, matrix_whitened = registry.matrix_method(False), registry.matrix_method(True)
    layers: dict[str, LayerPlan] = {}
    plan = Plan([], params_model, config, probe=list(calib.probe) if calib is not None else [])
    structured: list[tuple[LayerPlan, nn.Module, Method]] = []
    refused_by: dict[str, list[tuple[str, nn.Module]]] = {}
    frac0 = None
    candidates = registry.methods()
    if type(method).choose is not Method.choose:  # a chooser compares methods at its share of the budget
        _, frac0 = budget_fraction(sum(modules[n].weight.numel() for n in names), config, params_model)
    chosen_specs: dict[str, tuple[Metric | None, Spectrum]] = {}
    for name in names:
        mod = modules[name]
        w = layer_matrix(mod)
        m, n = w.shape
        kind = layer_kind(mod)
        # stored weight shape ((V, d) for an embedding), (out, in) for every linear map (Conv1D stores (in, out))
        shape = tuple(mod.weight.shape) if kind == "conv" else tuple(w.shape) if kind == "linear" else tuple(mod.weight.shape[:2])
        be = break_even_rank(m, n)
        taker, why = (method if method.takes(mod, config) else None), ""
        if frac0 is not None and name not in tied:
            gram = calib.layers[name].gram if calib is not None and name in calib else None
            merr = None
            if kind == "linear":  # kept for the plan below if the matrix path wins
                met = layer_metric(mod, name, calib, smoothing)
                spec = whitened_spectrum(w, met if met is not None else Metric(), config.method, None)
                chosen_specs[name] = (met, spec)
                merr = spec.relative_error(max(1, math.floor(frac0 * m * n / (m + n))))
            taker, why = method.choose(mod, config, frac0, gram, merr, candidates)
        if taker is not None or kind == "conv":
            lp = LayerPlan(name, kind, shape, taker.name if taker else config.method.name, None, m * n, m * n, 0.0, be)
            layers[name] = lp
            explicit = explicit_target(name, config.targets)
            refused = None if taker is None else (taker.refusal(mod, config) if explicit else taker.unsupported(mod, config))
            if taker is None:
                takers = " or ".join(c.name for c in candidates if c.takes(mod, config))
                lp.reason = why or f"kxk conv: only --method {takers or 'of another kind'} factorize it"
            elif name in tied:
                lp.reason = f"weight tied with {tied[name]}: kept dense"
            elif refused is not None:  # the method cannot take this layer: dense, outside the budget
                if explicit:
                    raise ConfigError(f"layer {name!r} is named in --targets but --method {taker.name} cannot take it: "
                                      f"{refused}; drop it from --targets or compress it with another --method")
                dense = refused if "dense" in refused else f"{refused}: kept dense"
                lp.reason = "; ".join(x for x in (why, dense) if x)
                refused_by.setdefault(taker.name, []).append((name, mod))
            else:
                lp.reason = why
                structured.append((lp, mod, taker))
                if calib is not None and name in calib:
                    plan.grams[name] = calib.layers[name].gram
            continue
        if config.rank is not None and config.matrix_rank > min(m, n):
            raise ConfigError(f"--rank {config.matrix_rank} exceeds min(m, n) = {min(m, n)} of layer {name!r} "
                              f"{shape}; use --rank <= {min(m, n)} or --exclude {name}")
        lp = LayerPlan(name, kind, shape, config.method.name, None, m * n, m * n, 0.0, be, why)
        layers[name] = lp
        if name in tied:
            lp.reason = f"weight tied with {tied[name]}: kept dense"
            continue
        if be <= 1:
            lp.reason = "too small: no rank saves parameters (break-even 1): kept dense"
            continue
        metric, spec = chosen_specs.get(name) or (layer_metric(mod, name, calib, smoothing), None)
        if whiten and method is not matrix_whitened:  # matrix layers under another method
            lp.method = (matrix_whitened if metric is not None else matrix_plain).name
        elif whiten and metric is None:
            lp.reason = "no calibration input reached this layer: plain SVD"
            lp.method = matrix_plain.name
        max_rank = config.matrix_rank if config.rank is not None else be
        if whiten and metric is not None:
            plan.metrics[name] = metric
            plan.spectra[name] = spec or whitened_spectrum(w, metric, config.method, max_rank, config.seed)
        else:
            plan.metrics[name] = Metric()
            plan.spectra[name] = svd_spectrum(w, config.method, max_rank, config.seed)
            if metric is not None:  # judge plain SVD on the calibration outputs too
                plan.eval_metrics[name] = metric
                plan.eval_spectra[name] = whitened_spectrum(w, metric, matrix_whitened.config(), None)
        if progress is not None:
            progress(name)
    for name, mod in unsupported_layers(model, config.targets, config.exclude).items():
        w = unsupported_weight(mod)
        n = int(w.numel()) if w is not None else 0
        layers[name] = LayerPlan(name, UNSUPPORTED, tuple(w.shape[:2]) if w is not None else (0, 0), config.method.name,
                                 None, n, n, 0.0, 0, f"unsupported type {type(mod).__name__}: no method takes it; kept dense")
    for taker in dict.fromkeys([t for *_, t in structured] + [registry.get(n) for n in refused_by]):
        taker.finish(config, [lp for lp, _, t in structured if t is taker], refused_by.get(taker.name, []))
    active = [l for l in layers.values() if l.name in plan.spectra]
    tensor_plans = [t[0] for t in structured]
    budget = None
    if method.grouped:
        frac = budget_for(active + tensor_plans, config, params_model)[1] if config.ratio is not None else None
        shared = method.plan_groups(plan, active, modules, config, frac)
        active = [l for l in active if l not in shared]
        if config.ratio is not None:
            budget, _ = budget_for(active + shared + tensor_plans, config, params_model)
            budget -= sum(l.params_after for l in shared)
    if structured:
        budget = _plan_structured(plan, structured, active, config, params_model, budget, progress)
    _plan_matrix(model, plan, active, config, params_model, budget, calib, progress)
    plan.layers = list(layers.values())
    return plan


def _plan_structured(plan: Plan, structured: list[tuple[LayerPlan, nn.Module, Method]], active: list[LayerPlan],
                     config: CompressConfig, params_model: int, budget: float | None,
                     progress: Callable[[str], None] | None) -> float | None:
    """Plan the layers structured methods take: each its uniform share of a ``ratio``, or the
    choices a global allocation makes over the options a method offers. Returns the budget left."""
    frac = None
    plans = [lp for lp, _, _ in structured]
    if config.ratio is not None:
        if budget is None:
            budget, frac = budget_for(active + plans, config, params_model)
        else:
            frac = budget / max(sum(l.params_before for l in active + plans), 1)
    presets: dict[str, Any] = {}
    if config.ratio is not None and config.allocate == "global":
        for taker in dict.fromkeys(t for *_, t in structured):
            members = [(lp, mod) for lp, mod, t in structured if t is taker]
            hulls = {}
            for lp, mod in members:
                opts = taker.options(lp, mod, plan.grams.get(lp.name))
                if opts is not None:
                    hulls[lp.name] = hull(opts)
            if not hulls:
                continue
            share = frac * sum(lp.params_before for lp, _ in members if lp.name in hulls)
            spent = sum(h[0][0] for h in hulls.values())
            if spent > share:
                raise ConfigError(f"the budget ({int(share)} params) cannot hold even the smallest {taker.name} "
                                  f"choice for every layer ({spent} params); raise --ratio or narrow --targets")
            presets.update(hull_greedy(hulls, share))
    for lp, mod, taker in structured:
        taker.plan_layer(lp, mod, config, frac, plan.grams.get(lp.name), presets.get(lp.name, False))
        if progress is not None:
            progress(lp.name)
    if budget is not None:
        budget -= sum(lp.params_after for lp in plans)
    return budget


def _plan_matrix(model: nn.Module, plan: Plan, active: list[LayerPlan], config: CompressConfig, params_model: int,
                 budget: float | None, calib: Calibration | None, progress: Callable[[str], None] | None) -> None:
    """Ranks for the matrix layers: measured sensitivities (global allocation), then the
    parameter or latency budget; a rank at or above break-even keeps the layer dense."""
    weights = None
    latency = config.latency is not None
    if (config.allocate == "global" and (config.ratio is not None or latency) and config.probe_passes > 0
            and calib is not None and calib.probe):
        if latency:
            frac = probe_fraction(config)
        elif budget is None:
            _, frac = budget_for(active, config, params_model)
        else:
            frac = budget / max(sum(l.params_before for l in active), 1)
        probe_ranks = {l.name: max(1, math.floor(min(frac, 1.0) * l.params_before / sum(mn(l))))
                       for l in active}
        weights = {}
        for i in range(1 if latency else config.probe_passes):
            if i > 0:  # re-probe at the ranks the previous weights allocate
                probe_ranks = {k: r for k, r in allocate(active, plan.spectra, config, params_model,
                                                          weights, budget).items() if r is not None}
            weights.update(sensitivities(model, plan, active, probe_ranks, calib.probe, progress))
        for lp in active:
            lp.sensitivity = weights[lp.name]
    reasons: dict[str, str] = {}
    if latency and active:
        example = calib.latency_inputs if calib is not None else None
        ranks, reasons, plan.latency = latency_ranks(model, active, plan.spectra, weights, config, example)
    else:
        ranks = allocate(active, plan.spectra, config, params_model, weights, budget) if active else {}
    for lp in active:
        r = ranks[lp.name]
        if lp.name in reasons:
            lp.rank = None
            lp.add_reason(reasons[lp.name])
            continue
        if r is None or r >= lp.break_even:
            lp.rank = None
            lp.add_reason(f"rank {r} >= break-even {lp.break_even}: kept dense" if r is not None
                          else "denser than break-even: kept dense")
            continue
        lp.rank = r
        lp.params_after = r * sum(mn(lp))
        lp.predicted_error = plan.spectra[lp.name].relative_error(r)
