"""``--budget bytes=F``: per layer, the choice among dense, int8, int4, int4 + low-rank correction and
low rank with quantized factors that spends the model's bytes where the measured loss per byte falls
fastest (the hull greedy of the parameter planner, with bytes as the cost and the layer's measured
output sensitivity times its relative output error as the loss); then the model is rebuilt with the
weights as shipped (on their integer grids) and the grids are kept for the export."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..calibration.calibrate import Calibration
from ..calibration.sensitivity import measure
from ..decompose import Metric
from ..errors import ConfigError
from ..methods.layers import CorrectedLinear, LowRankEmbedding, LowRankLinear
from ..planning.hull import hull, hull_greedy
from ..planning.targets import select_targets, tied_weights
from .grid import Grid
from .options import Choice, embedding_choices, linear_choices

GRAPH_BASE, GRAPH_PER_MODULE = 16 * 1024, 1536  # bytes kept aside for the graph itself (nodes, names): MiniLM's
# int4 ONNX has 116 kB of graph for 85 leaf modules (reserve: 16 kB + 85 x 1.5 kB = 144 kB)


def graph_reserve(model: nn.Module) -> int:
    """Bytes set aside for what is not a weight in the exported file."""
    return GRAPH_BASE + GRAPH_PER_MODULE * sum(1 for m in model.modules() if not any(True for _ in m.children()))


def expected_grids(rows: list[dict[str, Any]], kinds: dict[str, str]) -> dict[str, int]:
    """Parameter name -> bits of every grid the plan's ``rows`` imply (``kinds``: layer name -> "embedding" or
    "linear"): what the checkpoint must hold, checked when it is read back."""
    out: dict[str, int] = {}
    for r in rows:
        n, kind = r["name"], r["kind"]
        if kind == "dense":
            continue
        if kinds.get(n) == "embedding":
            out.update({f"{n}.table.weight": 4, f"{n}.proj.weight": 8} if kind == "lowrank" else {f"{n}.weight": 4})
        elif kind in ("int8", "int4"):
            out[f"{n}.weight"] = int(kind[3:])
        elif kind == "int4+fix":
            out.update({f"{n}.base.weight": 4, f"{n}.fix.first.weight": 8, f"{n}.fix.second.weight": 8})
        else:
            bits = int(r["choice"].rsplit("int", 1)[1])
            out.update({f"{n}.first.weight": bits, f"{n}.second.weight": bits})
    return out


@dataclass
class BytePlan:
    """The choice per layer, the budget and what it costs; ``grids`` maps parameter names of the
    rebuilt model to their integer grids (what the export writes)."""

    budget_fraction: float
    budget_bytes: int
    fp32_bytes: int
    fixed_bytes: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # targets kept in float32 outside the plan, and why
    grids: dict[str, Grid] = field(default_factory=dict, repr=False)

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + sum(r["bytes"] for r in self.rows)

    def components(self) -> dict[str, int]:
        """Bytes by component: float weights, quantized codes, scales/zero points, corrections, factors."""
        out: dict[str, int] = {"float": self.fixed_bytes}
        for r in self.rows:
            for k, v in r["components"].items():
                out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"budget_fraction": self.budget_fraction, "budget_bytes": self.budget_bytes,
                "fp32_bytes": self.fp32_bytes, "fixed_bytes": self.fixed_bytes,
                "planned_bytes": self.planned_bytes, "components": self.components(), "layers": self.rows,
                "kept_float": self.kept}

    def table(self) -> str:
        head = f"{'layer':44} {'shape':>11} {'choice':>11} {'bytes':>9} {'of fp32':>7} {'error':>9} {'int4 err':>9} {'optimal':>9}"
        lines = [head, "-" * len(head)]
        def fmt(v: Any) -> str:
            return f"{'-':>9}" if v is None else f"{v:9.2e}"

        for r in self.rows:
            lines.append(f"{r['name'][-44:]:44} {'x'.join(map(str, r['shape'])):>11} {r['choice']:>11} {r['bytes']:9,} "
                         f"{r['fraction']:7.1%} {fmt(r['error'])} {fmt(r['before'])} {fmt(r['optimal'])}")
        for name, why in self.kept.items():
            lines.append(f"{name[-44:]:44} {'':>11} {'fp32':>11}  kept: {why}")
        lines.append("-" * len(head))
        comp = ", ".join(f"{k} {v:,}" for k, v in self.components().items())
        lines.append(f"bytes {self.planned_bytes:,} of {self.budget_bytes:,} budget ({self.planned_bytes / self.fp32_bytes:.1%} "
                     f"of fp32 {self.fp32_bytes:,}); {comp}")
        lines.append("error: relative squared output error in the layer's calibration metric; int4 err / optimal: a "
                     "corrected layer's error before its fix and the optimum for that correction rank")
        return "\n".join(lines)


def _targets(model: nn.Module, config: Any, calib: Calibration) -> tuple[list[str], dict[str, str]]:
    """The layers the plan chooses for, and the other targets with the reason they stay float32."""
    names = select_targets(model, config.targets, config.exclude, config.method.name)
    tied = tied_weights(model, names)
    mods = dict(model.named_modules())
    kept: dict[str, str] = {}
    for n in names:
        if n in tied:
            kept[n] = f"weight tied with {tied[n]}"
        elif type(mods[n]) not in (nn.Linear, nn.Embedding):
            kept[n] = f"{type(mods[n]).__name__}: byte budgets choose for Linear and Embedding layers"
        elif n not in calib:
            kept[n] = "no calibration statistics (the data never reached it)"
    return [n for n in names if n not in kept], kept


def _choices(mod: nn.Module, name: str, calib: Calibration, config: Any) -> list[Choice]:
    st = calib.layers[name]
    if isinstance(mod, nn.Embedding):
        s = getattr(config.method, "embedding_smoothing", 0.1)
        counts = st.counts.to(torch.float64)
        freq = (1.0 - s) * counts / counts.sum().clamp_min(1) + s / counts.numel()
        return embedding_choices(mod.weight, freq, config.block_size, config.symmetric)
    return linear_choices(mod.weight, Metric(gram=st.gram), config.block_size, config.symmetric,
                          config.quant_algorithm)


def _components(choice: Choice) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in choice.parts:
        key = ("correction" if choice.kind == "int4+fix" and p.role in ("first", "second") else
               "factors" if choice.kind == "lowrank" else "weights")
        if p.grid is None:
            out["float"] = out.get("float", 0) + p.bytes
            continue
        r, c = p.weight.shape
        codes = r * c * p.grid.bits // 8
        out[f"{key} int{p.grid.bits}"] = out.get(f"{key} int{p.grid.bits}", 0) + codes
        out["scales"] = out.get("scales", 0) + p.bytes - codes
    return out


def candidates(model: nn.Module, names: list[str], config: Any, calib: Calibration,
               progress: Callable[[str], None] | None = None) -> tuple[dict[str, list[Choice]], dict[str, float]]:
    """Every layer's choices and its measured sensitivity; kept in ``calib.cache`` (they depend on the
    weights, the statistics and the grid options only), so budgets after the first reuse them."""
    key = ("bytes", tuple(names), config.block_size, config.symmetric, config.quant_algorithm,
           getattr(config.method, "embedding_smoothing", 0.1))
    if key in calib.cache:
        return calib.cache[key]
    mods = dict(model.named_modules())
    options = {}
    for n in names:
        options[n] = _choices(mods[n], n, calib, config)
        if progress is not None:
            progress(n)
    probes = {}
    for n, opts in options.items():  # sensitivity probed with the layer's plainest quantization
        probe = next((c for c in opts if c.kind == "int4"), next((c for c in opts if c.kind == "int8"), None))
        if probe is not None and probe.error > 0:
            probes[n] = (probe.parts[0].weight.to(mods[n].weight.dtype), probe.error)
    raw = measure(model, calib.probe, probes) if calib.probe else {n: 1.0 for n in probes}
    positive = sorted(v for v in raw.values() if v > 0)
    floor = 1e-3 * positive[len(positive) // 2] if positive else 1.0
    weight = {n: max(raw.get(n, floor), floor) for n in names}
    calib.cache[key] = (options, weight)
    return options, weight


def plan_bytes(model: nn.Module, config: Any, calib: Calibration,
               progress: Callable[[str], None] | None = None) -> tuple[BytePlan, dict[str, Choice]]:
    """Choose per layer under ``config.bytes`` (fraction of the model's float32 bytes)."""
    if calib is None or not calib.layers:
        raise ConfigError("--budget bytes needs calibration data to weigh the choices; pass --calib FILE")
    names, kept = _targets(model, config, calib)
    if not names:
        raise ConfigError("--budget bytes found no Linear or Embedding target with calibration statistics; widen "
                          "--targets or check --calib")
    mods = dict(model.named_modules())
    params = sum(p.numel() for p in model.parameters())
    fp32 = 4 * params
    target_params = sum(mods[n].weight.numel() for n in names)
    fixed = 4 * (params - target_params) + graph_reserve(model)
    budget = int(config.bytes * fp32)
    options, weight = candidates(model, names, config, calib, progress)
    hulls = {n: hull([(c.bytes, weight[n] * c.error, c) for c in opts]) for n, opts in options.items()}
    least = fixed + sum(h[0][0] for h in hulls.values())
    if least > fp32:
        raise ConfigError(f"--budget bytes={config.bytes:g} cannot be met by any byte budget: the smallest choice for "
                          f"every layer plus the float tensors and the graph need {least:,} bytes, more than the "
                          f"model's {fp32:,} float32 bytes (a model this small gains nothing from a plan); export it "
                          "with --quantize int8 or int4 instead")
    if least > budget:
        raise ConfigError(f"--budget bytes={config.bytes:g} ({budget:,} bytes) cannot be met: the smallest choice for "
                          f"every layer plus the float tensors outside them needs {least:,} bytes "
                          f"({least / fp32:.1%} of float32); raise it to at least bytes={least / fp32 + 0.005:.3f}")
    chosen = hull_greedy(hulls, budget - fixed)
    plan = BytePlan(config.bytes, budget, fp32, fixed, kept=kept)
    for n in names:
        c = chosen[n]
        w = mods[n].weight
        plan.rows.append({"name": n, "shape": list(w.shape), "choice": c.label, "kind": c.kind, "rank": c.rank,
                          "layer": "embedding" if isinstance(mods[n], nn.Embedding) else "linear",
                          "bytes": c.bytes, "fraction": c.bytes / (4.0 * w.numel()), "error": c.error,
                          "before": c.before, "optimal": c.optimal, "sensitivity": weight[n],
                          "components": _components(c)})
    return plan, chosen


def apply_bytes(model: nn.Module, plan: BytePlan, chosen: dict[str, Choice]) -> None:
    """Rebuild the chosen layers in place with their weights as shipped; fill ``plan.grids``."""
    for name, c in chosen.items():
        mod = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        parts = {p.role: p for p in c.parts}
        dtype = mod.weight.dtype
        if c.kind == "dense":
            continue
        if isinstance(mod, nn.Embedding):
            if c.kind == "lowrank":
                new = LowRankEmbedding.from_factors(parts["table"].weight.to(dtype), parts["proj"].weight.to(dtype),
                                                    mod.padding_idx)
                setattr(holder, leaf, new)
                plan.grids[f"{name}.table.weight"] = parts["table"].grid
                plan.grids[f"{name}.proj.weight"] = parts["proj"].grid
            else:
                with torch.no_grad():
                    mod.weight.copy_(parts["table"].weight)
                plan.grids[f"{name}.weight"] = parts["table"].grid
            continue
        bias = None if mod.bias is None else mod.bias.detach()
        if c.kind in ("int8", "int4"):
            with torch.no_grad():
                mod.weight.copy_(parts["weight"].weight)
            plan.grids[f"{name}.weight"] = parts["weight"].grid
        elif c.kind == "int4+fix":
            new = CorrectedLinear.from_parts(parts["weight"].weight.to(dtype), parts["second"].weight.to(dtype),
                                             parts["first"].weight.to(dtype), bias)
            setattr(holder, leaf, new)
            plan.grids[f"{name}.base.weight"] = parts["weight"].grid
            plan.grids[f"{name}.fix.first.weight"] = parts["first"].grid
            plan.grids[f"{name}.fix.second.weight"] = parts["second"].grid
        else:
            new = LowRankLinear.from_factors(parts["second"].weight.to(dtype), parts["first"].weight.to(dtype), bias)
            setattr(holder, leaf, new)
            plan.grids[f"{name}.first.weight"] = parts["first"].grid
            plan.grids[f"{name}.second.weight"] = parts["second"].grid
