"""Factorized modules built from standard ops only (Linear, Embedding), so export stays plain."""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = second(first(x)): Linear(in, r, no bias) then Linear(r, out, original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Build from W ~= a @ b (a: out x r, b: r x in)."""
        mod = cls(b.shape[1], a.shape[0], a.shape[1], bias=bias is not None,
                  device=a.device, dtype=a.dtype)
        with torch.no_grad():
            mod.first.weight.copy_(b)
            mod.second.weight.copy_(a)
            if bias is not None:
                mod.second.bias.copy_(bias)
        return mod

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankEmbedding(nn.Module):
    """E ~= table @ proj^T: Embedding(V, r) followed by Linear(r, d, no bias)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int,
                 padding_idx: int | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.table = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx,
                                  device=device, dtype=dtype)
        self.proj = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))

    @property
    def weight(self) -> torch.Tensor:
        """The dense table this module represents (for code that reads ``.weight``)."""
        return self.table.weight @ self.proj.weight.T

    @classmethod
    def from_factors(cls, table: torch.Tensor, proj: torch.Tensor,
                     padding_idx: int | None = None) -> "LowRankEmbedding":
        """table: V x r, proj: d x r (Linear weight)."""
        mod = cls(table.shape[0], proj.shape[0], table.shape[1], padding_idx=padding_idx,
                  device=table.device, dtype=table.dtype)
        with torch.no_grad():
            mod.table.weight.copy_(table)
            mod.proj.weight.copy_(proj)
        return mod

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class LowRankConv1x1(nn.Module):
    """A 1x1 convolution as a rank-r pair: 1x1 conv (in -> r, original stride and padding)
    then 1x1 conv (r -> out, original bias)."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.first = nn.Conv2d(in_channels, rank, 1, stride=stride, padding=padding, bias=False,
                               device=device, dtype=dtype)
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, conv: nn.Conv2d) -> "LowRankConv1x1":
        """W ~= a @ b for the conv's (out x in) matrix; keeps its stride, padding and bias."""
        mod = cls(b.shape[1], a.shape[0], a.shape[1], stride=conv.stride, padding=conv.padding,
                  bias=conv.bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            mod.first.weight.copy_(b[:, :, None, None])
            mod.second.weight.copy_(a[:, :, None, None])
            if conv.bias is not None:
                mod.second.bias.copy_(conv.bias)
        return mod

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, rank={self.rank}"


class CorrectedLinear(nn.Module):
    """y = base(x) + fix(x): a (quantized) Linear plus a low-rank correction of what the
    quantization lost (``fix``: Linear(in, k) then Linear(k, out), no bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fix = LowRankLinear(in_features, out_features, rank, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.fix(x)

    @property
    def weight(self) -> torch.Tensor:
        """The dense matrix this module represents."""
        return self.base.weight + self.fix.second.weight @ self.fix.first.weight

    @classmethod
    def from_parts(cls, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> "CorrectedLinear":
        """base: out x in; correction a @ b (a: out x k, b: k x in)."""
        mod = cls(base.shape[1], base.shape[0], a.shape[1], bias=bias is not None, device=base.device, dtype=base.dtype)
        with torch.no_grad():
            mod.base.weight.copy_(base)
            mod.fix.first.weight.copy_(b)
            mod.fix.second.weight.copy_(a)
            if bias is not None:
                mod.base.bias.copy_(bias)
        return mod

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, correction_rank={self.rank}"


def build_shell(kind: str, shape: list[int], rank: int, bias: bool = False,
                padding_idx: int | None = None, dtype: torch.dtype | None = None,
                info: dict | None = None) -> nn.Module:
    """An uninitialised factorized module of the given kind (used when reloading)."""
    info = info or {}
    if kind == "linear":
        out_f, in_f = shape
        return LowRankLinear(in_f, out_f, rank, bias=bias, dtype=dtype)
    if kind == "embedding":
        v, d = shape
        return LowRankEmbedding(v, d, rank, padding_idx=padding_idx, dtype=dtype)
    if kind == "conv1x1":
        out_c, in_c = shape
        return LowRankConv1x1(in_c, out_c, rank, stride=tuple(info.get("stride", (1, 1))),
                              padding=tuple(info.get("padding", (0, 0))), bias=bias, dtype=dtype)
    if kind == "corrected":
        out_f, in_f = shape
        return CorrectedLinear(in_f, out_f, rank, bias=bias, dtype=dtype)
    raise ValueError(f"unknown factorized layer kind {kind!r}")
