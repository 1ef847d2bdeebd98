"""Which layers a run may touch: factorizable modules, --targets/--exclude patterns, tied
weights, and the (out x in) matrix view of each layer kind."""

from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn

from ..errors import ConfigError, WeightError
from ..methods import registry
from ..methods.kinds import (  # noqa: F401  (re-exported)
    MATRIX_KINDS,
    UNSUPPORTED,
    is_conv1x1,
    is_embedding,
    is_kxk_conv,
    is_linear,
    layer_kind,
    layer_matrix,
    module_weight,
)

KIND_TEXT = {"linear": "Linear", "embedding": "Embedding", "conv1x1": "Conv2d", "conv": "Conv2d"}


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def check_pattern(flag: str, pattern: str) -> None:
    """Refuse a ``re:`` pattern that is not a valid regular expression (``flag`` names its origin)."""
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"{flag} {pattern!r} is not a valid regular expression ({e}); fix the pattern") from None


def explicit_target(name: str, targets: tuple[str, ...]) -> bool:
    """Whether ``name`` itself is one of ``targets`` by exact name (not a glob, regex, parent
    module or the method's default layers): only such a layer may fail a run it cannot take."""
    return any(p == name and not p.startswith("re:") and not any(c in p for c in "*?[") for p in targets)


def _selected(pattern: str, name: str) -> bool:
    """A pattern selects a layer when it matches the layer or one of its parent modules."""
    parts = name.split(".")
    return any(_matches(pattern, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """(factorizable, unsupported) modules outside factorized ones. Unsupported: a module that
    holds a weight matrix (``weight`` with 2+ dims) of no layer kind, e.g. nn.Conv1d, a
    positional embedding with its own forward, or nn.MultiheadAttention (its forward reads
    ``out_proj.weight`` directly, so nothing inside it may be swapped)."""
    FACTORIZED = registry.factorized_types()
    found: dict[str, nn.Module] = {}
    other: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(mod, FACTORIZED):
            skip.append(name + ".")
            continue
        if isinstance(mod, nn.MultiheadAttention):
            skip.append(name + ".")
            other[name] = mod
        elif is_linear(mod) or is_embedding(mod) or is_conv1x1(mod) or is_kxk_conv(mod):
            found[name] = mod
        elif isinstance(getattr(mod, "weight", None), torch.Tensor) and mod.weight.dim() >= 2:
            other[name] = mod
    return found, other


def factorizable(model: nn.Module) -> dict[str, nn.Module]:
    """Linear (and transformers' Conv1D), Embedding and Conv2d modules not already inside a
    factorized module."""
    return _layers(model)[0]


def unsupported_layers(model: nn.Module, targets: tuple[str, ...] = (),
                       exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Modules that act linearly on a weight matrix but that no layer kind covers, within the
    ``targets`` (all when empty) and outside ``exclude``: the plan lists them as dense with
    their type, never skips them in silence."""
    other = _layers(model)[1]
    return {n: m for n, m in other.items() if (not targets or any(_selected(p, n) for p in targets))
            and not any(_selected(p, n) for p in exclude)}


def unsupported_weight(mod: nn.Module) -> torch.Tensor | None:
    """The weight matrix of an unsupported module (MultiheadAttention: its input projection)."""
    w = getattr(mod, "weight", None)
    return w if isinstance(w, torch.Tensor) else getattr(mod, "in_proj_weight", None)






def select_targets(model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...],
                   method: str | None = None, kinds: tuple[str, ...] | None = None) -> list[str]:
    """Names of the layers to consider; every pattern must match something. Without
    ``targets``, the layer kinds the method works on (its ``kinds``; default: the matrix kinds)."""
    candidates = factorizable(model)
    all_names = [n for n, _ in model.named_modules() if n]
    for flag, pats in (("--targets", targets), ("--exclude", exclude)):
        for p in pats:
            check_pattern(flag, p)
            if not any(_matches(p, n) for n in all_names):
                hint = ", ".join(list(candidates)[:3])
                raise ConfigError(f"{flag} {p!r} matches no module of the model; use an exact name, a glob "
                                  f"or re:REGEX, e.g. {hint}")
    names = list(candidates)
    if targets:
        names = [n for n in names if any(_selected(p, n) for p in targets)]
        if not names:
            odd = unsupported_layers(model, targets)
            what = (f" ({', '.join(f'{n}: unsupported type {type(m).__name__}' for n, m in list(odd.items())[:2])})"
                    if odd else "")
            raise ConfigError(f"--targets {list(targets)} match modules but no Linear/Conv1D/Embedding/Conv2d layer{what}; "
                              "point them at layers that can be factorized")
    else:
        if kinds is None:
            kinds = registry.get(method).kinds if method is not None else MATRIX_KINDS
        names = [n for n in names if layer_kind(candidates[n]) in kinds]
        if not names:
            what = "/".join(dict.fromkeys(KIND_TEXT[k] for k in kinds))
            raise ConfigError(f"--method {method} works on {what} layers and the model has none; pick a "
                              f"method for its layers ({', '.join(sorted(set(layer_kind(m) for m in candidates.values()))) or 'none'})")
    names = [n for n in names if not any(_selected(p, n) for p in exclude)]
    if not names:
        raise ConfigError("no layer is left to compress after --targets/--exclude; widen --targets")
    return names


def check_finite(model: nn.Module, before: str = "compressing") -> None:
    """Refuse NaN/Inf parameters and buffers (e.g. BatchNorm running_var) up front, before any
    calibration pass or export (they would poison every statistic); names the first one in
    module order."""
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for what, items in (("parameter", mod.named_parameters(recurse=False)),
                            ("buffer", mod.named_buffers(recurse=False))):
            for pname, t in items:
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                if (t.is_floating_point() or t.is_complex()) and not t.is_meta and not bool(torch.isfinite(t).all()):
                    name = f"{mname}.{pname}" if mname else pname
                    raise WeightError(f"{what} {name!r} contains NaN or Inf; fix or re-export the checkpoint "
                                      f"before {before}")


def tied_weights(model: nn.Module, names: list[str]) -> dict[str, str]:
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(mname)
    out = {}
    modules = dict(model.named_modules())
    for n in names:
        others = sorted(set(owners.get(id(modules[n].weight), [])) - {n})
        if others:
            out[n] = others[0]
    return out

