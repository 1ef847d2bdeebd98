"""Per-layer rules of a recipe: assign layers to rules (first match wins); the Job that
compresses each rule's layers at its own budget and the rest at the default budget."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..planning.targets import _selected, check_pattern, factorizable, select_targets
from .pipeline import Job
from .recipe import CompressSection, Rule, to_config


def assign(model: nn.Module, section: CompressSection) -> tuple[list[tuple[Rule, list[str]]], list[str]]:
    """(rule, its layers) in rule order, and the default group's layers. Every rule must
    match a factorizable layer that no earlier rule took."""
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


def recipe_job(model: nn.Module, section: CompressSection, recovery: Any = None,
               assigned: tuple[list[tuple[Rule, list[str]]], list[str]] | None = None) -> Job:
    """The Job a recipe's [compress] section (and its RecoveryConfig) describes: without rules,
    exactly what ``lrcompress compress`` does with the same options; with rules, one group per
    rule with a budget plus the default group (``assigned``: :func:`assign`'s result when the
    caller already checked the rules)."""
    if not section.rules:
        return Job([to_config(section)], recovery)
    groups, rest = assigned or assign(model, section)
    work = [(to_config(section, rule, tuple(names)), rule.match) for rule, names in groups if not rule.dense]
    if rest:
        work.append((to_config(section, None, tuple(rest)), None))
    return Job([cfg for cfg, _ in work], recovery, [label for _, label in work],
               [(rule.match, names) for rule, names in groups if rule.dense])
