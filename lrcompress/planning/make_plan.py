"""Rank allocation: which layers to factorize, at which rank, before any weight changes."""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from ..calibration.calibrate import Calibration
from ..config import CompressConfig, WhitenedSVDConfig
from .allocation import allocate, budget_for, budget_fraction, mn, sensitivities
from ..errors import ConfigError
from .plan_types import LayerPlan, Plan, break_even_rank, plan_table  # noqa: F401  (re-exported)
from ..decompose import Metric, Spectrum, svd_spectrum, whitened_spectrum
from ..decompose.whiten import metric_from_stats
from .targets import check_finite, explicit_target, layer_kind, layer_matrix, select_targets, tied_weights


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
    from ..methods.tensor_plan import (allocate_tucker, auto_choice, check_tensor_budget, check_tt_shape_used,
                              explicit_refusal, plan_layer, tensor_method, unsupported)
    check_finite(model)
    check_tensor_budget(config)
    names = select_targets(model, config.targets, config.exclude, config.method.name)
    modules = dict(model.named_modules())
    tied = tied_weights(model, names)
    params_model = sum(p.numel() for p in model.parameters())
    whiten = isinstance(config.method, WhitenedSVDConfig)
    smoothing = config.method.embedding_smoothing if whiten else 0.0
    layers: dict[str, LayerPlan] = {}
    plan = Plan([], params_model, config, probe=list(calib.probe) if calib is not None else [])
    tensor_layers: list[tuple[LayerPlan, nn.Module, str]] = []
    tt_refused: list[tuple[str, nn.Module]] = []
    auto = config.method.name == "auto"
    if auto and config.ratio is None:
        raise ConfigError("--method auto compares methods at equal parameter budgets; give --ratio (not --rank "
                          "or --energy)")
    frac0 = None
    if auto:
        _, frac0 = budget_fraction(sum(modules[n].weight.numel() for n in names), config, params_model)
    auto_specs: dict[str, tuple[Metric | None, Spectrum]] = {}
    for name in names:
        mod = modules[name]
        w = layer_matrix(mod)
        m, n = w.shape
        kind = layer_kind(mod)
        shape = tuple(mod.weight.shape) if kind == "conv" else tuple(mod.weight.shape[:2])
        be = break_even_rank(m, n)
        tmethod, why = tensor_method(mod, config), ""
        if auto and name not in tied:
            gram = calib.layers[name].gram if calib is not None and name in calib else None
            werr = None
            if isinstance(mod, nn.Linear):  # kept for the plan below if SVD wins
                met = layer_metric(mod, name, calib, smoothing)
                spec = whitened_spectrum(w, met if met is not None else Metric(), config.method, None)
                auto_specs[name] = (met, spec)
                werr = spec.relative_error(max(1, math.floor(frac0 * m * n / (m + n))))
            tmethod, why = auto_choice(mod, config, frac0, gram, werr)
        if tmethod is not None or kind == "conv":
            lp = LayerPlan(name, kind, shape, tmethod or config.method.name, None, m * n, m * n, 0.0, be)
            layers[name] = lp
            explicit = explicit_target(name, config.targets)
            refused = None if tmethod is None else (explicit_refusal(mod, tmethod, config) if explicit
                                                    else unsupported(mod, tmethod, config))
            if tmethod is None:
                lp.reason = why or "kxk conv: only --method tucker or cp factorize it"
            elif name in tied:
                lp.reason = f"weight tied with {tied[name]}: kept dense"
            elif refused is not None:  # the method cannot take this layer: dense, outside the budget
                if explicit:
                    raise ConfigError(f"layer {name!r} is named in --targets but --method {tmethod} cannot take it: "
                                      f"{refused}; drop it from --targets or compress it with another --method")
                dense = refused if "dense" in refused else f"{refused}: kept dense"
                lp.reason = "; ".join(x for x in (why, dense) if x)
                if tmethod == "tt":
                    tt_refused.append((name, mod))
            else:
                lp.reason = why
                tensor_layers.append((lp, mod, tmethod))
                if calib is not None and name in calib:
                    plan.grams[name] = calib.layers[name].gram
            continue
        if tmethod is None and kind != "conv" and config.rank is not None and config.matrix_rank > min(m, n):
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
        metric, spec = auto_specs.get(name) or (layer_metric(mod, name, calib, smoothing), None)
        method = config.method
        if whiten and config.method.name != "svd-whiten":  # matrix layers under tucker/cp/tt
            lp.method = "svd-whiten" if metric is not None else "svd"
        elif whiten and metric is None:
            lp.reason = "no calibration input reached this layer: plain SVD"
            lp.method = "svd"
        max_rank = config.matrix_rank if config.rank is not None else be
        if whiten and metric is not None:
            plan.metrics[name] = metric
            plan.spectra[name] = spec or whitened_spectrum(w, metric, method, max_rank, config.seed)
        else:
            plan.metrics[name] = Metric()
            plan.spectra[name] = svd_spectrum(w, method, max_rank, config.seed)
            if metric is not None:  # judge plain SVD on the calibration outputs too
                plan.eval_metrics[name] = metric
                plan.eval_spectra[name] = whitened_spectrum(w, metric, WhitenedSVDConfig(), None)
        if progress is not None:
            progress(name)
    if not any(t == "tt" for _, _, t in tensor_layers):
        check_tt_shape_used(config, tt_refused)
    active = [l for l in layers.values() if l.name in plan.spectra]
    budget = None
    shared: list[LayerPlan] = []
    if config.method.name == "shared-svd":
        shared = _plan_shared(plan, active, modules, config, params_model, tensor_layers)
        active = [l for l in active if l not in shared]
        if config.ratio is not None:
            budget, _ = budget_for(active + shared + [t[0] for t in tensor_layers], config, params_model)
            budget -= sum(l.params_after for l in shared)
    if tensor_layers:
        frac = None
        if config.ratio is not None:
            if budget is None:
                budget, frac = budget_for(active + [t[0] for t in tensor_layers], config, params_model)
            else:
                frac = budget / max(sum(l.params_before for l in active + [t[0] for t in tensor_layers]), 1)
        presets: dict[str, Any] = {}
        tucker = [(lp, mod) for lp, mod, t in tensor_layers if t == "tucker"]
        if tucker and config.ratio is not None and config.allocate == "global":
            share = frac * sum(lp.params_before for lp, _ in tucker)
            presets = allocate_tucker(tucker, plan.grams, share)
        for lp, mod, tmethod in tensor_layers:
            plan_layer(lp, mod, tmethod, config, frac, plan.grams.get(lp.name), presets.get(lp.name, False))
            if progress is not None:
                progress(lp.name)
        if budget is not None:
            budget -= sum(lp.params_after for lp, _, _ in tensor_layers)
    weights = None
    latency = config.latency is not None
    if (config.allocate == "global" and (config.ratio is not None or latency) and config.probe_passes > 0
            and calib is not None and calib.probe):
        if latency:
            from .latency_plan import probe_fraction
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
        from .latency_plan import latency_ranks
        example = calib.latency_inputs if calib is not None else None
        ranks, reasons, plan.latency = latency_ranks(model, active, plan.spectra, weights, config, example)
    else:
        ranks = allocate(active, plan.spectra, config, params_model, weights, budget) if active else {}
    for lp in active:
        r = ranks[lp.name]
        if lp.name in reasons:
            lp.rank = None
            lp.reason = "; ".join(x for x in (lp.reason, reasons[lp.name]) if x)
            continue
        if r is None or r >= lp.break_even:
            lp.rank = None
            dense = (f"rank {r} >= break-even {lp.break_even}: kept dense" if r is not None
                     else "denser than break-even: kept dense")
            lp.reason = "; ".join(x for x in (lp.reason, dense) if x)
            continue
        lp.rank = r
        lp.params_after = r * sum(mn(lp))
        lp.predicted_error = plan.spectra[lp.name].relative_error(r)
    plan.layers = list(layers.values())
    return plan


def _plan_shared(plan: Plan, active: list[LayerPlan], modules: dict[str, nn.Module], config: CompressConfig,
                 params_model: int, tensor_layers: list) -> list[LayerPlan]:
    """Group same-role layers of K consecutive blocks; plan each group's shared rank."""
    from ..methods.shared import group_rank, group_spectrum, role_groups
    calibrated = [l.name for l in active if l.kind == "linear"]  # identity metric when uncalibrated
    groups = role_groups(calibrated, modules, config.method.share_group)
    by_name = {l.name: l for l in active}
    frac = None
    if config.ratio is not None:
        _, frac = budget_for(active + [t[0] for t in tensor_layers], config, params_model)
    out = []
    for g in groups:
        lps = [by_name[n] for n in g.names]
        g.spectrum = group_spectrum([layer_matrix(modules[n]) for n in g.names], [plan.metrics[n] for n in g.names])
        g.rank = group_rank(g, [lp.shape for lp in lps], config, frac)
        for i, lp in enumerate(lps):
            lp.method = "shared-svd"
            if g.rank is None:
                lp.reason = f"sharing a basis across {g.gid} saves nothing at this budget: kept dense"
                continue
            m, n = lp.shape
            lp.rank, lp.ranks = g.rank, [g.gid]
            lp.params_after = g.rank * n + (m * g.rank if i == 0 else 0)
            lp.predicted_error = g.spectrum.relative_error(g.rank)
            lp.reason = f"basis shared by {len(lps)} layers ({g.gid})" + ("; basis counted here" if i == 0 else "")
        plan.groups[g.gid] = g
        out.extend(lps)
    return out
