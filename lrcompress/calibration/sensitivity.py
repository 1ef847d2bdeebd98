"""Measured layer sensitivity: how much of a layer's own output error reaches the model output.

For each layer, truncate it alone to a probe rank, run a few calibration examples and
compare the model's output with the original's. The weight w_l = (output relative squared
error) / (layer relative squared error) turns the per-layer losses of the global allocator
into estimates of their effect on the output (q/k projections behind a softmax matter far
less than a feed-forward output projection; a relative loss treats them alike).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..io.data import Batch


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors a model returns: a tensor, a tuple/list, a dict or a
    ModelOutput (one level deep)."""
    if isinstance(out, torch.Tensor):
        items = [out]
    elif isinstance(out, dict):
        items = list(out.values())
    elif isinstance(out, (list, tuple)):
        items = list(out)
    else:
        items = []
    found = [o for o in items if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if not found:
        raise TypeError(f"the model output of type {type(out).__name__} holds no floating-point tensor")
    return found


def _masked(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    y = y.double()
    if mask is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        return y[mask]
    return y


def _outputs(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    return [_masked(o, batch.mask) for o in output_tensors(batch.run(model))]


@torch.no_grad()
def output_drift(model: nn.Module, probe: list[Batch], reference: list[list[torch.Tensor]]) -> float:
    """Mean over the model's outputs of their relative squared error against ``reference``."""
    num: list[float] = []
    den: list[float] = []
    for batch, refs in zip(probe, reference):
        for i, (y, ref) in enumerate(zip(_outputs(model, batch), refs)):
            if i == len(num):
                num.append(0.0)
                den.append(0.0)
            num[i] += float(((y - ref) ** 2).sum())
            den[i] += float((ref ** 2).sum())
    rel = [a / b for a, b in zip(num, den) if b > 0]
    return sum(rel) / len(rel) if rel else 0.0


@torch.no_grad()
def measure(model: nn.Module, probe: list[Batch], layers: dict[str, tuple[torch.Tensor, float]],
            progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Sensitivity weight per layer. ``layers`` maps a module name to (its weight truncated
    to the probe rank, in the module's own layout; that truncation's relative squared error)."""
    was_training = model.training
    model.eval()
    try:
        reference = [_outputs(model, b) for b in probe]
        weights: dict[str, float] = {}
        for name, (approx, layer_err) in layers.items():
            mod = model.get_submodule(name)
            saved = mod.weight.detach().clone()
            mod.weight.copy_(approx)
            try:
                drift = output_drift(model, probe, reference)
            finally:
                mod.weight.copy_(saved)
            weights[name] = drift / layer_err if layer_err > 1e-12 else 0.0
            if progress is not None:
                progress(name)
    finally:
        model.train(was_training)
    return weights
