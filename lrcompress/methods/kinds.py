"""The one vocabulary for layer kinds, shared by planner, methods and checkpoints: a layer is
"linear" (``nn.Linear``, or transformers' ``Conv1D``, which stores its weight transposed),
"embedding", "conv1x1" (a linear map over channels) or "conv" (a kxk kernel), and each kind has
an (out x in) matrix view. A module of any other type that holds a weight matrix is
"unsupported": planned dense with its type named, never skipped in silence."""

from __future__ import annotations

import torch
from torch import nn

LAYER_KINDS = ("linear", "embedding", "conv1x1", "conv")
MATRIX_KINDS = ("linear", "embedding", "conv1x1")
UNSUPPORTED = "unsupported"


def is_transposed_linear(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2, GPT-J ...): y = x W + b with W of shape (in, out)."""
    t = type(mod)
    return (t.__name__ == "Conv1D" and t.__module__.startswith("transformers")
            and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2)


def is_linear(mod: nn.Module) -> bool:
    """A plain linear map on the last axis: ``nn.Linear`` (or a subclass keeping its forward)
    or transformers' ``Conv1D``."""
    return ((isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward and mod.weight.dim() == 2)
            or is_transposed_linear(mod))


def is_embedding(mod: nn.Module) -> bool:
    """``nn.Embedding`` (or a subclass keeping its forward: a positional embedding whose
    forward computes positions is not a plain lookup)."""
    return isinstance(mod, nn.Embedding) and type(mod).forward is nn.Embedding.forward and mod.weight.dim() == 2


def is_kxk_conv(mod: nn.Module) -> bool:
    """A Conv2d with a kernel larger than 1x1 (Tucker/CP territory)."""
    return isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1)


def is_conv1x1(mod: nn.Module) -> bool:
    """A 1x1, ungrouped, undilated Conv2d: a linear map over channels at every pixel."""
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1
            and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros")


def layer_kind(mod: nn.Module) -> str:
    """The kind of a layer (one of ``LAYER_KINDS``, else ``UNSUPPORTED``)."""
    if is_embedding(mod):
        return "embedding"
    if isinstance(mod, nn.Conv2d):
        return "conv1x1" if is_conv1x1(mod) else "conv"
    return "linear" if is_linear(mod) else UNSUPPORTED


def layer_matrix(mod: nn.Module) -> torch.Tensor:
    """The linear map as (out x in): Linear weight, 1x1 conv kernel, or the transposed
    embedding table (for a kxk conv: the (out x in*kh*kw) unfolding)."""
    if isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1):
        return mod.weight.reshape(mod.weight.shape[0], -1)
    if isinstance(mod, nn.Conv2d):
        return mod.weight[:, :, 0, 0]
    if is_transposed_linear(mod) or isinstance(mod, nn.Embedding):
        return mod.weight.T
    return mod.weight


def module_weight(mod: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of layer_matrix: the (out x in) map back in ``mod``'s weight layout."""
    if isinstance(mod, nn.Embedding) or is_transposed_linear(mod):
        return matrix.T
    if isinstance(mod, nn.Conv2d):
        return matrix[:, :, None, None]
    return matrix


def dtype_name(t: torch.Tensor) -> str:
    """'float32' for a float32 tensor: the dtype as a manifest stores it."""
    return str(t.dtype).replace("torch.", "")
