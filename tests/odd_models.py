"""A model with an op no exporter knows (a custom torch.library op), for export error tests."""

from __future__ import annotations

import torch
from torch import nn


def _op() -> object:
    """Register lrtest::cli_no_export_op once (on first use, not at import)."""
    if not hasattr(_op, "fn"):
        @torch.library.custom_op("lrtest::cli_no_export_op", mutates_args=())
        def fn(x: torch.Tensor) -> torch.Tensor:
            return x.sin()

        @fn.register_fake
        def _(x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)
        _op.fn = fn  # type: ignore[attr-defined]
    return _op.fn  # type: ignore[attr-defined]


class StrangeBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _op()(x)


def odd_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), StrangeBlock()))
