"""Forward hooks that accumulate per-layer input statistics in float64, streaming batches.

Linear layers get the input Gram G = sum_t x_t x_t^T over real (non-padding) tokens;
embeddings get token counts. Activations are never stored.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import DataError
from ..io.data import Batch
from ..methods.kinds import is_linear
from ..planning.targets import check_finite


@dataclass
class LayerStats:
    """Statistics of one layer's inputs: ``gram`` (n x n) for linear maps and convolutions
    (input channels), ``counts`` (V,) for embeddings; ``rows`` = input vectors (tokens, pixels)."""

    gram: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    rows: int = 0


@dataclass
class Calibration:
    """Per-layer statistics keyed by module name."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    examples: int = 0
    tokens: int = 0
    probe: list[Batch] = field(default_factory=list, repr=False)
    latency_inputs: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # results derived from these statistics (byte-plan choices)

    def __contains__(self, name: str) -> bool:
        return name in self.layers and self.layers[name].rows > 0


def _select(x: torch.Tensor, mask: torch.Tensor | None, feature_dim: bool) -> torch.Tensor:
    """Drop padding positions when the leading dims line up with the token mask."""
    lead = x.shape[:-1] if feature_dim else x.shape
    if mask is not None and len(lead) == mask.dim():
        if tuple(lead) == tuple(mask.shape):
            return x[mask]
        try:
            shape = torch.broadcast_shapes(tuple(lead), tuple(mask.shape))
        except RuntimeError:
            shape = None
        if shape == tuple(mask.shape):
            full = x.expand(*shape, *x.shape[len(lead):]) if feature_dim else x.expand(*shape)
            return full[mask]
    return x.reshape(-1, x.shape[-1]) if feature_dim else x.reshape(-1)


def conv_channel_gram(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Input-channel Gram of a Conv2d over the pixels it reads (float64), and their count.

    For a 1x1 conv this is exactly the Gram of the linear map it applies per output pixel
    (stride-skipped pixels excluded); for a kxk conv it is the channel covariance over all
    input pixels, the metric of its input-side factor.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if conv.kernel_size == (1, 1) and isinstance(conv.padding, tuple):
        ph, pw = conv.padding
        if ph or pw:
            x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
        x = x[:, :, :: conv.stride[0], :: conv.stride[1]]
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(torch.float64)
    return rows.T @ rows, rows.shape[0]


def calibrate(
    model: nn.Module,
    batches: Iterable[Batch],
    names: Iterable[str],
    *,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Calibration:
    """Run ``batches`` through ``model`` once and collect statistics for modules ``names``.
    NaN/Inf parameters or buffers are refused first (WeightError naming the first one)."""
    check_finite(model)
    modules = dict(model.named_modules())
    calib = Calibration()
    state: dict[str, object] = {"mask": None, "cache": {}}
    handles = []

    def linear_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0]
            # layers fed the same tensor (q, k, v) share one Gram; a weak reference tells a live
            # tensor from a new one that reuses freed memory at the same address
            cache = state["cache"]
            hit = cache.get(id(x))
            if hit is None or hit[0]() is not x:
                rows = _select(x.detach(), state["mask"], True).to(torch.float64)
                if not torch.isfinite(rows).all():
                    raise DataError(f"layer {name!r} received NaN/Inf activations; check the weights "
                                    "and the calibration inputs")
                hit = (weakref.ref(x), rows.T @ rows, rows.shape[0])
                cache[id(x)] = hit
            _, g, n = hit
            st = calib.layers[name]
            st.gram = g.clone() if st.gram is None else st.gram.add_(g)
            st.rows += n
        return hook

    def embedding_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            ids = _select(args[0].detach(), state["mask"], False)
            st = calib.layers[name]
            c = torch.bincount(ids.long().reshape(-1), minlength=mod.num_embeddings).to(torch.float64)
            st.counts = c if st.counts is None else st.counts.add_(c)
            st.rows += int(ids.numel())
        return hook

    def conv_hook(name: str) -> Callable:
        def hook(mod: nn.Conv2d, args: tuple) -> None:
            st = calib.layers[name]
            g, n = conv_channel_gram(mod, args[0].detach())
            if not torch.isfinite(g).all():
                raise DataError(f"layer {name!r} received NaN/Inf activations; check the weights "
                                "and the calibration inputs")
            st.gram = g if st.gram is None else st.gram.add_(g)
            st.rows += n
        return hook

    for name in names:
        mod = modules[name]
        calib.layers[name] = LayerStats()
        if isinstance(mod, nn.Embedding):
            handles.append(mod.register_forward_pre_hook(embedding_hook(name)))
        elif is_linear(mod):  # nn.Linear and transformers' Conv1D both see x of shape (..., in)
            handles.append(mod.register_forward_pre_hook(linear_hook(name)))
        elif isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_pre_hook(conv_hook(name)))
        else:
            raise TypeError(f"cannot calibrate module {name!r} of type {type(mod).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                batch = batch.to(device)
                state["mask"], state["cache"] = batch.mask, {}
                try:
                    batch.run(model)
                except DataError:
                    raise
                except Exception as e:  # shape/dtype mismatch between data and model
                    if i == 0:
                        shapes = {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
                                  for k, v in batch.inputs.items()}
                        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                        raise DataError(f"calibration inputs {shapes} do not fit the model ({msg}); "
                                        "give tensors with the shape and dtype the model's forward "
                                        "expects") from None
                    raise
                n_ex = next(iter(batch.inputs.values())).shape[0]
                calib.examples += n_ex
                calib.tokens += int(batch.mask.sum()) if batch.mask is not None else n_ex
                if progress is not None:
                    progress(n_ex)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calib
