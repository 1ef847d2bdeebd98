"""What a block-sequential run keeps of each unit: the result it reports (``StreamResult``), the unit's
tensors and figures written to the partial folder as soon as it is done, the results of units an
interrupted run finished (read back on resume), and the layers no unit planned (tied, unsupported)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..methods.apply import LayerResult
from ..planning.plan_types import LayerPlan, Plan, break_even_rank
from ..planning.targets import layer_matrix
from .units import view
from .writer import ShardWriter


@dataclass
class StreamResult:
    """What a block-sequential run did: per-layer results (as the in-memory path reports them),
    the plan, closed-loop figures by layer, and per unit its seconds, peak memory and the
    relative error of its output against the original model's."""

    layers: list[LayerResult]
    plan: Plan
    loop: dict[str, dict[str, float]] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss: int = 0
    examples: int = 0
    tokens: int = 0
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)


def record_unit(result: StreamResult, model: nn.Module, modules: list[str], results: list[LayerResult],
                figures: dict, entry: dict, writer: ShardWriter | None, boundary: dict[str, list[torch.Tensor]],
                out_dtype: torch.dtype | None) -> None:
    """Add a finished unit (its ``modules``) to ``result`` and, with a writer, write its tensors (in
    ``out_dtype``), its figures and the activations at its far boundary to the partial folder."""
    from ..io.checkpoint import factorized_layers
    v = view(model, modules)
    entries = factorized_layers(v)
    result.entries.update(entries)
    if writer is None:
        return
    tensors = v.state_dict()
    if out_dtype is not None:
        tensors = {k: t.to(out_dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        for e in entries.values():
            e["dtype"] = str(out_dtype).replace("torch.", "")
    writer.save_boundary(boundary)
    names = {r.name for r in results}
    writer.write_unit(entry["unit"], tensors, {"results": [r.to_dict() for r in results], "loop": figures,
                                               "unit": entry, "entries": entries,
                                               "plan": [lp.to_dict() for lp in result.plan.layers if lp.name in names]})


def restore_units(result: StreamResult, state: dict[str, Any], done: list[str]) -> None:
    """Results of the units a previous, interrupted run finished (``state``: the partial folder's)."""
    for unit in done:
        data = state["data"][unit]
        result.units.append(data["unit"])
        result.loop.update(data["loop"])
        result.entries.update(data["entries"])
        for d in data["plan"]:
            result.plan.layers.append(LayerPlan(**dict(d, shape=tuple(d["shape"]), choice=None)))
        by = {lp.name: lp for lp in result.plan.layers}
        for r in data["results"]:
            result.layers.append(LayerResult(by[r["name"]], r["relative_error"], r["optimal_error"],
                                             r["error_ratio"], r["error_metric"]))


def add_untouched(result: StreamResult, model: nn.Module, full_plan: Plan | None, tied: dict[str, str],
                  method: str) -> None:
    """Report the layers no unit planned: tied weights, and what the whole model's plan lists
    besides its targets (unsupported modules)."""
    seen = {lp.name for lp in result.plan.layers}
    extra = [lp for lp in (full_plan.layers if full_plan is not None else []) if lp.name not in seen]
    if full_plan is None:
        for name, other in tied.items():
            mod = model.get_submodule(name)
            m, n = layer_matrix(mod).shape
            extra.append(LayerPlan(name, "embedding" if isinstance(mod, nn.Embedding) else "linear",
                                   tuple(mod.weight.shape), method, None, m * n, m * n, 0.0,
                                   break_even_rank(m, n), f"weight tied with {other}: kept dense"))
    for lp in extra:
        result.plan.layers.append(lp)
        result.layers.append(LayerResult(lp))
