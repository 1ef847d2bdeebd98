"""Per-layer rules of a recipe: assign layers to rules (first match wins), then compress each
rule's layers at its own budget and the rest at the default budget, from one calibration."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from .recipe import CompressSection, Rule, to_config
from .report import CompressionReport


def assign(model: nn.Module, section: CompressSection) -> tuple[list[tuple[Rule, list[str]]], list[str]]:
    """(rule, its layers) in rule order, and the default group's layers. Every rule must
    match a factorizable layer that no earlier rule took."""
    from ..planning.targets import _selected, check_pattern, factorizable, select_targets
    candidates = list(factorizable(model))
    taken: dict[str, int] = {}
    groups: list[tuple[Rule, list[str]]] = []
    for i, rule in enumerate(section.rules):
        check_pattern(f"recipe rule #{i + 1} match", rule.match)
        hit = [n for n in candidates if _selected(rule.match, n)]
        mine = [n for n in hit if n not in taken]
        if not mine:
            why = (f"its layers were taken by rule #{taken[hit[0]] + 1} (first match wins)" if hit else
                   f"it matches no factorizable layer (e.g. {', '.join(candidates[:3])})")
            raise ConfigError(f"recipe rule #{i + 1} match {rule.match!r} selects nothing: {why}; fix or remove the rule")
        for n in mine:
            taken[n] = i
        groups.append((rule, mine))
    for flag, pats in (("[compress].targets", section.targets), ("[compress].exclude", section.exclude)):
        for p in pats:  # a bad pattern is an error, not an empty default group
            check_pattern(flag, p)
    try:
        rest = select_targets(model, section.targets, section.exclude, section.method)
    except ConfigError:  # every layer the default method could take is claimed by rules or excluded
        rest = []
    return groups, [n for n in rest if n not in taken]


def compress_recipe(model: nn.Module, section: CompressSection, data: Any, *, batch_size: int = 32,
                    device: str | torch.device = "cpu", progress: Callable[[str, Any], None] | None = None,
                    assigned: tuple[list[tuple[Rule, list[str]]], list[str]] | None = None) -> CompressionReport:
    """Compress ``model`` in place per the recipe's [compress] section and rules (``assigned``:
    the result of :func:`assign` when the caller already checked the rules)."""
    from dataclasses import replace

    from .pipeline import compress_, gather
    if not section.rules:  # exactly what `lrcompress compress` does with the same options
        return compress_(model, to_config(section), data, batch_size=batch_size, device=device, progress=progress)
    groups, rest = assigned or assign(model, section)
    work = [(to_config(section, rule, tuple(names)), rule) for rule, names in groups if not rule.dense]
    if rest:
        work.append((to_config(section, None, tuple(rest)), None))
    if not work:
        raise ConfigError("every rule of the recipe keeps its layers dense and no layer is left for [compress]; "
                          "give a rule a budget or drop the dense rules")
    calib = None
    if data is not None:  # one calibration for every group (with the latency inputs if a group needs them)
        union = tuple(n for cfg, _ in work for n in cfg.targets)
        base = next((cfg for cfg, _ in work if cfg.latency is not None), work[0][0])
        calib = gather(model, replace(base, targets=union, exclude=()), data, batch_size=batch_size, device=device,
                       progress=(lambda x: progress("calibrate", x)) if progress else None)
    reports = [compress_(model, cfg, calib, batch_size=batch_size, device=device, progress=progress)
               for cfg, _ in work]
    return merge(reports, [rule for _, rule in work], [(rule, names) for rule, names in groups if rule.dense])


def merge(reports: list[CompressionReport], rules: list[Rule | None],
          dense: list[tuple[Rule, list[str]]]) -> CompressionReport:
    """One report for several groups compressed one after the other on the same model."""
    first, last = reports[0], reports[-1]
    seconds: dict[str, float] = {}
    for r in reports:
        for k, v in r.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    layers = [l for r in reports for l in r.layers]
    config = {"groups": [dict(r.config, rule=(rule.match if rule else None)) for r, rule in zip(reports, rules)],
              "dense_rules": [{"match": rule.match, "layers": names} for rule, names in dense]}
    plan_layers = [l for r in reports for l in r.plan.get("layers", [])]
    plan = {"config": config, "params_model": first.plan.get("params_model"),
            "params_after": last.plan.get("params_after"), "layers": plan_layers}
    merged = CompressionReport(layers=layers, params_before=first.params_before, params_after=last.params_after,
                               bytes_before=first.bytes_before, bytes_after=last.bytes_after, seconds=seconds,
                               calibration=first.calibration, config=config, plan=plan)
    merged.stats = first.stats
    return merged
