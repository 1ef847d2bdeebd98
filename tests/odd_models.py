"""Models that exporters cannot export faithfully, for export error tests: an op no exporter
knows (a custom torch.library op) and a forward that leaves torch (numpy round trip)."""

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


class NumpyRoundTrip(nn.Module):
    """A forward that leaves torch (numpy round trip): exporters trace it to a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.from_numpy(x.detach().cpu().numpy() * 2.0)
        return self.fc(y)


def numpy_net() -> nn.Module:
    torch.manual_seed(0)
    return NumpyRoundTrip()
