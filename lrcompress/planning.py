"""Rank allocation: which layers to factorize, at which rank, before any weight changes."""

from __future__ import annotations

import fnmatch
import heapq
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .calibrate import Calibration
from .config import CompressConfig, WhitenedSVDConfig
from .errors import ConfigError, WeightError
from .layers import LowRankConv1x1, LowRankEmbedding, LowRankLinear
from .methods import Metric, Spectrum, svd_spectrum, whitened_spectrum
from .methods.whiten import metric_from_stats


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
    ranks: list | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


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

    def table(self) -> str:
        """The dry-run table."""
        return plan_table(self)

    @property
    def params_after(self) -> int:
        return self.params_model - sum(l.params_before - l.params_after for l in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "params_model": self.params_model,
                "params_after": self.params_after, "layers": [l.to_dict() for l in self.layers]}


def break_even_rank(m: int, n: int) -> int:
    """Smallest rank r with r (m + n) >= m n: factorizing at or above it saves nothing."""
    return math.ceil(m * n / (m + n))


def module_weight(kind: str, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of layer_matrix: the (out x in) map back in the module's weight layout."""
    if kind == "embedding":
        return matrix.T
    if kind == "conv1x1":
        return matrix[:, :, None, None]
    return matrix


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern == name


def _selected(pattern: str, name: str) -> bool:
    """A pattern selects a layer when it matches the layer or one of its parent modules."""
    parts = name.split(".")
    return any(_matches(pattern, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def factorizable(model: nn.Module) -> dict[str, nn.Module]:
    """Linear, Embedding and Conv2d modules not already inside a factorized module."""
    FACTORIZED = _factorized_types()
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if isinstance(mod, FACTORIZED):
            skip.append(name + ".")
            continue
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(mod, (nn.Linear, nn.Embedding)) and mod.weight.dim() == 2:
            found[name] = mod
        elif is_conv1x1(mod) or is_kxk_conv(mod):
            found[name] = mod
    return found


def _factorized_types() -> tuple[type, ...]:
    from .conv_layers import CPConv2d, TuckerConv2d
    from .shared import SharedBasisLinear
    from .tt_layers import TTLinear
    return (LowRankLinear, LowRankEmbedding, LowRankConv1x1, TuckerConv2d, CPConv2d, TTLinear, SharedBasisLinear)


def is_kxk_conv(mod: nn.Module) -> bool:
    """A Conv2d with a kernel larger than 1x1 (Tucker/CP territory)."""
    return isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1)


def is_conv1x1(mod: nn.Module) -> bool:
    """A 1x1, ungrouped, undilated Conv2d: a linear map over channels at every pixel."""
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1
            and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros")


def layer_kind(mod: nn.Module) -> str:
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, nn.Conv2d):
        return "conv1x1" if is_conv1x1(mod) else "conv"
    return "linear"


def _default_kinds(method: str) -> tuple[str, ...]:
    """Layer kinds a method targets when no --targets are given."""
    if method in ("tucker", "cp"):
        return ("conv", "conv1x1")
    if method == "tt":
        return ("linear",)
    if method == "auto":
        return ("linear", "embedding", "conv1x1", "conv")
    return ("linear", "embedding", "conv1x1")


def select_targets(model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...],
                   method: str = "svd-whiten") -> list[str]:
    """Names of the layers to consider; every pattern must match something. Without
    ``targets``, the layer kinds the method works on (convs for tucker/cp, Linear for tt)."""
    candidates = factorizable(model)
    all_names = [n for n, _ in model.named_modules() if n]
    for flag, pats in (("--targets", targets), ("--exclude", exclude)):
        for p in pats:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ConfigError(f"{flag} {p!r} is not a valid regular expression ({e}); fix the pattern")
            if not any(_matches(p, n) for n in all_names):
                hint = ", ".join(list(candidates)[:3])
                raise ConfigError(f"{flag} {p!r} matches no module of the model; use an exact name, a glob "
                                  f"or re:REGEX, e.g. {hint}")
    names = list(candidates)
    if targets:
        names = [n for n in names if any(_selected(p, n) for p in targets)]
        if not names:
            raise ConfigError(f"--targets {list(targets)} match modules but no Linear/Embedding/Conv2d layer; "
                              "point them at layers that can be factorized")
    else:
        kinds = _default_kinds(method)
        names = [n for n in names if layer_kind(candidates[n]) in kinds]
        if not names:
            what = {"tucker": "Conv2d", "cp": "Conv2d", "tt": "Linear"}.get(method, "Linear/Embedding")
            raise ConfigError(f"--method {method} works on {what} layers and the model has none; pick a "
                              f"method for its layers ({', '.join(sorted(set(layer_kind(m) for m in candidates.values()))) or 'none'})")
    names = [n for n in names if not any(_selected(p, n) for p in exclude)]
    if not names:
        raise ConfigError("no layer is left to compress after --targets/--exclude; widen --targets")
    return names


def check_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf weights up front (they would poison every statistic)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise WeightError(f"parameter {name!r} contains NaN or Inf; fix or re-export the checkpoint "
                              "before compressing")


def _tied(model: nn.Module, names: list[str]) -> dict[str, str]:
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


def layer_matrix(mod: nn.Module) -> torch.Tensor:
    """The linear map as (out x in): Linear weight, 1x1 conv kernel, or the transposed
    embedding table (for a kxk conv: the (out x in*kh*kw) unfolding)."""
    if isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1):
        return mod.weight.reshape(mod.weight.shape[0], -1)
    if isinstance(mod, nn.Conv2d):
        return mod.weight[:, :, 0, 0]
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.T


def _metric(mod: nn.Module, name: str, calib: Calibration | None, smoothing: float) -> Metric | None:
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
    from .tensor_plan import allocate_tucker, auto_choice, plan_layer, tensor_method, unsupported
    check_finite(model)
    names = select_targets(model, config.targets, config.exclude, config.method.name)
    modules = dict(model.named_modules())
    tied = _tied(model, names)
    params_model = sum(p.numel() for p in model.parameters())
    whiten = isinstance(config.method, WhitenedSVDConfig)
    smoothing = config.method.embedding_smoothing if whiten else 0.0
    layers: dict[str, LayerPlan] = {}
    plan = Plan([], params_model, config, probe=list(calib.probe) if calib is not None else [])
    tensor_layers: list[tuple[LayerPlan, nn.Module, str]] = []
    auto = config.method.name == "auto"
    if auto and config.ratio is None:
        raise ConfigError("--method auto compares methods at equal parameter budgets; give --ratio (not --rank "
                          "or --energy)")
    frac0 = None
    if config.ratio is not None:
        total = sum(modules[n].weight.numel() for n in names)
        frac0 = config.ratio if config.scope == "targets" else (config.ratio * params_model - (params_model - total)) / total
    for name in names:
        mod = modules[name]
        w = layer_matrix(mod)
        m, n = w.shape
        kind = layer_kind(mod)
        shape = tuple(mod.weight.shape) if kind == "conv" else tuple(mod.weight.shape[:2])
        be = break_even_rank(m, n)
        tmethod, why = tensor_method(mod, config), ""
        if auto and frac0 is not None and frac0 > 0 and name not in tied:
            gram = calib.layers[name].gram if calib is not None and name in calib else None
            werr = None
            if isinstance(mod, nn.Linear):
                met = _metric(mod, name, calib, smoothing)
                spec = whitened_spectrum(w, met if met is not None else Metric(), config.method, None)
                werr = spec.relative_error(max(1, math.floor(frac0 * m * n / (m + n))))
            tmethod, why = auto_choice(mod, config, frac0, gram, werr)
        if tmethod is not None or kind == "conv":
            lp = LayerPlan(name, kind, shape, tmethod or config.method.name, None, m * n, m * n, 0.0, be)
            layers[name] = lp
            if tmethod is None:
                lp.reason = why or "kxk conv: only --method tucker or cp factorize it"
            elif name in tied:
                lp.reason = f"weight tied with {tied[name]}: kept dense"
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
        metric = _metric(mod, name, calib, smoothing)
        method = config.method
        if whiten and config.method.name != "svd-whiten":  # matrix layers under tucker/cp/tt
            lp.method = "svd-whiten" if metric is not None else "svd"
        elif whiten and metric is None:
            lp.reason = "no calibration input reached this layer: plain SVD"
            lp.method = "svd"
        max_rank = config.matrix_rank if config.rank is not None else be
        if whiten and metric is not None:
            plan.metrics[name] = metric
            plan.spectra[name] = whitened_spectrum(w, metric, method, max_rank, config.seed)
        else:
            plan.metrics[name] = Metric()
            plan.spectra[name] = svd_spectrum(w, method, max_rank, config.seed)
            if metric is not None:  # judge plain SVD on the calibration outputs too
                plan.eval_metrics[name] = metric
                plan.eval_spectra[name] = whitened_spectrum(w, metric, WhitenedSVDConfig(), None)
        if progress is not None:
            progress(name)
    active = [l for l in layers.values() if l.name in plan.spectra]
    budget = None
    shared: list[LayerPlan] = []
    if config.method.name == "shared-svd":
        shared = _plan_shared(plan, active, modules, config, params_model, tensor_layers)
        active = [l for l in active if l not in shared]
        if config.ratio is not None:
            budget, _ = _budget(active + shared + [t[0] for t in tensor_layers], config, params_model)
            budget -= sum(l.params_after for l in shared)
    if tensor_layers:
        frac = None
        if config.ratio is not None:
            if budget is None:
                budget, frac = _budget(active + [t[0] for t in tensor_layers], config, params_model)
            else:
                frac = budget / max(sum(l.params_before for l in active + [t[0] for t in tensor_layers]), 1)
        presets: dict[str, Any] = {}
        tucker = [(lp, mod) for lp, mod, t in tensor_layers if t == "tucker" and unsupported(mod, t) is None]
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
    if (config.allocate == "global" and config.ratio is not None and config.probe_passes > 0
            and calib is not None and calib.probe):
        if budget is None:
            _, frac = _budget(active, config, params_model)
        else:
            frac = budget / max(sum(l.params_before for l in active), 1)
        probe_ranks = {l.name: max(1, math.floor(min(frac, 1.0) * l.params_before / sum(_mn(l))))
                       for l in active}
        weights = {}
        for i in range(config.probe_passes):
            if i > 0:  # re-probe at the ranks the previous weights allocate
                probe_ranks = {k: r for k, r in _allocate(active, plan.spectra, config, params_model,
                                                          weights, budget).items() if r is not None}
            weights.update(_sensitivities(model, plan, active, probe_ranks, calib.probe, progress))
        for lp in active:
            lp.sensitivity = weights[lp.name]
    ranks = _allocate(active, plan.spectra, config, params_model, weights, budget) if active else {}
    for lp in active:
        r = ranks[lp.name]
        m, n = layer_matrix(modules[lp.name]).shape
        if r is None or r >= lp.break_even:
            lp.rank = None
            dense = (f"rank {r} >= break-even {lp.break_even}: kept dense" if r is not None
                     else "denser than break-even: kept dense")
            lp.reason = f"{lp.reason}; {dense}" if lp.reason.startswith("auto:") else (lp.reason or dense)
            continue
        lp.rank = r
        lp.params_after = r * (m + n)
        lp.predicted_error = plan.spectra[lp.name].relative_error(r)
    plan.layers = list(layers.values())
    return plan


def _plan_shared(plan: Plan, active: list[LayerPlan], modules: dict[str, nn.Module], config: CompressConfig,
                 params_model: int, tensor_layers: list) -> list[LayerPlan]:
    """Group same-role layers of K consecutive blocks; plan each group's shared rank."""
    from .shared import group_rank, group_spectrum, role_groups
    calibrated = [l.name for l in active if l.kind == "linear"]  # identity metric when uncalibrated
    groups = role_groups(calibrated, modules, config.method.share_group)
    by_name = {l.name: l for l in active}
    frac = None
    if config.ratio is not None:
        _, frac = _budget(active + [t[0] for t in tensor_layers], config, params_model)
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


def _sensitivities(model: nn.Module, plan: Plan, layers: list[LayerPlan], ranks: dict[str, int],
                   probe: list, progress: Callable[[str], None] | None) -> dict[str, float]:
    """Measured output sensitivity of each layer in ``ranks``, probed at that rank."""
    from .methods import factorize
    from .sensitivity import measure

    probes = {}
    for l in layers:
        if l.name not in ranks:
            continue
        r = min(ranks[l.name], max(l.break_even - 1, 1))
        w = layer_matrix(model.get_submodule(l.name))
        f = factorize(w, plan.spectra[l.name], r, plan.metrics[l.name])
        probes[l.name] = (module_weight(l.kind, f.a @ f.b), f.relative_error ** 2)
    raw = measure(model, probe, probes, progress)
    positive = sorted(v for v in raw.values() if v > 0)
    floor = 1e-3 * positive[len(positive) // 2] if positive else 1.0
    return {k: max(v, floor) for k, v in raw.items()}


def _budget(layers: list[LayerPlan], config: CompressConfig, params_model: int) -> tuple[float, float]:
    """(parameter budget for the targets, that budget as a fraction of their params)."""
    total = sum(l.params_before for l in layers)
    budget = config.ratio * total
    if config.scope == "model":
        budget = config.ratio * params_model - (params_model - total)
        if budget <= 0:
            raise ConfigError(f"--ratio {config.ratio} of the whole model ({params_model} params) is below "
                              f"the {params_model - total} params outside the targets; raise --ratio or "
                              "widen --targets")
    return budget, (budget / total if total else 1.0)


def _allocate(layers: list[LayerPlan], spectra: dict[str, Spectrum], config: CompressConfig,
              params_model: int, weights: dict[str, float] | None = None,
              budget: float | None = None) -> dict[str, int | None]:
    """Ranks for matrix layers; ``budget`` overrides the ratio budget (what tensor-method
    layers left of it)."""
    if config.rank is not None:
        return {l.name: config.matrix_rank for l in layers}
    if config.energy is not None:
        return {l.name: spectra[l.name].rank_for_energy(config.energy) for l in layers}
    if budget is None:
        budget, frac = _budget(layers, config, params_model)
    else:
        total = sum(l.params_before for l in layers)
        frac = budget / total if total else 1.0
        if frac <= 0:
            raise ConfigError(f"--ratio {config.ratio} leaves no parameters for the low-rank layers after the "
                              "tensor-method layers took their share; raise --ratio")
    if frac >= 1.0:
        return {l.name: None for l in layers}
    if config.allocate == "uniform":
        return {l.name: max(1, math.floor(frac * l.params_before / sum(_mn(l)))) for l in layers}
    return _global(layers, spectra, budget, weights)


def _mn(l: LayerPlan) -> tuple[int, int]:
    return l.shape if l.kind == "linear" else (l.shape[1], l.shape[0])


def _global(layers: list[LayerPlan], spectra: dict[str, Spectrum], budget: float,
            weights: dict[str, float] | None = None) -> dict[str, int | None]:
    """Greedy: spend parameters where the normalized truncation loss per parameter is highest.

    Each rank step of a layer costs (m + n) params and removes s2[r] / total of its relative
    squared output error, times the layer's measured sensitivity when ``weights`` are given;
    going dense from the break-even rank removes the rest. Spectra are sorted, so step gains
    fall and the greedy order is optimal for this separable objective.
    """
    rank = {l.name: 1 for l in layers}
    spent = sum(sum(_mn(l)) for l in layers)
    if spent > budget:
        raise ConfigError(f"the budget ({int(budget)} params) cannot hold even rank 1 for every target "
                          f"({spent} params); raise --ratio or narrow --targets")
    heap: list[tuple[float, str, int, bool]] = []
    by_name = {l.name: l for l in layers}

    def push(l: LayerPlan) -> None:
        s = spectra[l.name]
        r = rank[l.name]
        cost = sum(_mn(l))
        if s.total <= 0:
            return
        scale = (weights or {}).get(l.name, 1.0) / s.total
        if r < l.break_even - 1:
            if r < len(s.s2):
                gain = float(s.s2[r]) * scale
            else:  # randomized spectrum: spread the unseen tail evenly
                k = min(_mn(l)) - len(s.s2)
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


def plan_table(plan: Plan) -> str:
    """The dry-run table: layer, shape, method, rank, params before/after, predicted error."""
    head = f"{'layer':44} {'shape':>12} {'method':>10} {'rank':>5} {'b-even':>6} {'params':>17} {'pred.err':>8}"
    lines = [head, "-" * len(head)]
    for l in plan.layers:
        shape = "x".join(map(str, l.shape))
        params = f"{l.params_before}->{l.params_after}"
        if l.rank is None:
            lines.append(f"{l.name[-44:]:44} {shape:>12} {'dense':>10} {'-':>5} {l.break_even:>6} {params:>17}  {l.reason}")
        elif l.method in ("tucker", "cp", "tt"):  # no single spectrum: error is measured after factorizing
            rank = "/".join(map(str, l.ranks)) if l.method == "tucker" else str(l.rank)
            lines.append(f"{l.name[-44:]:44} {shape:>12} {l.method:>10} {rank:>5} {'-':>6} {params:>17} "
                         f"{'-':>8}" + (f"  {l.reason}" if l.reason else ""))
        else:
            lines.append(f"{l.name[-44:]:44} {shape:>12} {l.method:>10} {l.rank:>5} {l.break_even:>6} {params:>17} "
                         f"{l.predicted_error:8.4f}" + (f"  {l.reason}" if l.reason else ""))
    lines.append("-" * len(head))
    after = plan.params_after
    lines.append(f"model params {plan.params_model:,} -> {after:,} ({after / plan.params_model:.1%})")
    return "\n".join(lines)
