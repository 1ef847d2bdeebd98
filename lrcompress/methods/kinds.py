"""The one vocabulary for layer kinds, shared by planner, methods and checkpoints: a layer is
"linear", "embedding", "conv1x1" (a linear map over channels) or "conv" (a kxk kernel), and
each kind has an (out x in) matrix view."""

from __future__ import annotations

import torch
from torch import nn

LAYER_KINDS = ("linear", "embedding", "conv1x1", "conv")
MATRIX_KINDS = ("linear", "embedding", "conv1x1")


def is_kxk_conv(mod: nn.Module) -> bool:
    """A Conv2d with a kernel larger than 1x1 (Tucker/CP territory)."""
    return isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1)


def is_conv1x1(mod: nn.Module) -> bool:
    """A 1x1, ungrouped, undilated Conv2d: a linear map over channels at every pixel."""
    return (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1
            and isinstance(mod.padding, tuple) and mod.padding_mode == "zeros")


def layer_kind(mod: nn.Module) -> str:
    """The kind of a dense layer (one of ``LAYER_KINDS``)."""
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, nn.Conv2d):
        return "conv1x1" if is_conv1x1(mod) else "conv"
    return "linear"


def layer_matrix(mod: nn.Module) -> torch.Tensor:
    """The linear map as (out x in): Linear weight, 1x1 conv kernel, or the transposed
    embedding table (for a kxk conv: the (out x in*kh*kw) unfolding)."""
    if isinstance(mod, nn.Conv2d) and mod.kernel_size != (1, 1):
        return mod.weight.reshape(mod.weight.shape[0], -1)
    if isinstance(mod, nn.Conv2d):
        return mod.weight[:, :, 0, 0]
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.T


def module_weight(kind: str, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of layer_matrix: the (out x in) map back in the module's weight layout."""
    if kind == "embedding":
        return matrix.T
    if kind == "conv1x1":
        return matrix[:, :, None, None]
    return matrix


def dtype_name(t: torch.Tensor) -> str:
    """'float32' for a float32 tensor: the dtype as a manifest stores it."""
    return str(t.dtype).replace("torch.", "")
