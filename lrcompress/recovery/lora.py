"""LoRA adapters beside factorized layers: residual initialisation, rank growth and folding.

Every two-factor layer is a map W = A B (A: out x r, B: r x in) in its "matrix view": a
Linear's weight, a 1x1 conv's kernel, or an embedding table transposed (d x V, acting on
one-hot token vectors). An adapter adds U D (U: out x l, D: l x in) beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..decompose.lowrank import Metric, factorize, spectrum
from ..methods.apply import set_module
from ..methods.layers import LowRankConv1x1, LowRankEmbedding, LowRankLinear

MATRIX_LAYERS = (LowRankLinear, LowRankConv1x1, LowRankEmbedding)


def factor_params(mod: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The two parameters holding A and B (in their module layouts)."""
    if isinstance(mod, LowRankEmbedding):
        return mod.proj.weight, mod.table.weight
    return mod.second.weight, mod.first.weight


def factors(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the matrix view W = A B, as float64 copies."""
    a, b = factor_params(mod)
    if isinstance(mod, LowRankEmbedding):
        return a.detach().double(), b.detach().double().T
    if isinstance(mod, LowRankConv1x1):
        return a.detach()[:, :, 0, 0].double(), b.detach()[:, :, 0, 0].double()
    return a.detach().double(), b.detach().double()


def set_factors(mod: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """A new module of ``mod``'s kind holding W = a b (the rank may change); keeps bias,
    stride, padding and padding_idx."""
    dtype = factor_params(mod)[0].dtype
    a, b = a.to(dtype), b.to(dtype)
    if isinstance(mod, LowRankEmbedding):
        return LowRankEmbedding.from_factors(b.T.contiguous(), a.contiguous(), padding_idx=mod.padding_idx)
    bias = mod.second.bias.detach() if mod.second.bias is not None else None
    if isinstance(mod, LowRankConv1x1):
        shell = nn.Conv2d(b.shape[1], a.shape[0], 1, stride=mod.first.stride, padding=mod.first.padding,
                          bias=bias is not None)
        if bias is not None:
            shell.bias.data.copy_(bias)
        return LowRankConv1x1.from_factors(a, b, shell)
    return LowRankLinear.from_factors(a.contiguous(), b.contiguous(), bias)


class LoRA(nn.Module):
    """``base(x) + sum_k U_k D_k x``: rank grows by appending chunks (see :meth:`grow`)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not isinstance(base, MATRIX_LAYERS):
            raise TypeError(f"LoRA needs a two-factor layer, got {type(base).__name__}")
        self.base = base
        self.ups = nn.ParameterList()
        self.downs = nn.ParameterList()

    @property
    def rank(self) -> int:
        return sum(u.shape[1] for u in self.ups)

    def grow(self, up: torch.Tensor, down: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        """Append a chunk (up: out x k, down: k x in); returns the new parameters."""
        dtype = factor_params(self.base)[0].dtype
        device = factor_params(self.base)[0].device
        u = nn.Parameter(up.to(device=device, dtype=dtype).contiguous())
        d = nn.Parameter(down.to(device=device, dtype=dtype).contiguous())
        self.ups.append(u)
        self.downs.append(d)
        return u, d

    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All chunks stacked: (U: out x l, D: l x in)."""
        return torch.cat(list(self.ups), 1), torch.cat(list(self.downs), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for u, d in zip(self.ups, self.downs):
            if isinstance(self.base, LowRankEmbedding):
                y = y + F.linear(F.embedding(x, d.T), u)
            elif isinstance(self.base, LowRankConv1x1):
                h = F.conv2d(x, d[:, :, None, None], stride=self.base.first.stride, padding=self.base.first.padding)
                y = y + F.conv2d(h, u[:, :, None, None])
            else:
                y = y + F.linear(F.linear(x, d), u)
        return y


def residual_chunk(residual: torch.Tensor, rank: int, metric: Metric | None,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` directions of ``residual`` (out x in) in the input metric: the best rank-l
    correction of what truncation threw away, as balanced factors times ``scale``."""
    metric = metric or Metric()
    rank = min(rank, *residual.shape)
    spec = spectrum(residual, metric)
    f = factorize(residual, spec, rank, metric)
    s = abs(scale) ** 0.5
    return f.a.double() * s * (1 if scale >= 0 else -1), f.b.double() * s


def zero_chunk(out_f: int, in_f: int, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Classic LoRA: U = 0, D ~ Kaiming-uniform (so the student starts exactly at W')."""
    bound = 1.0 / in_f ** 0.5
    d = (torch.rand(rank, in_f, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return torch.zeros(out_f, rank, dtype=torch.float64), d


def fold(lora: LoRA, rank: int | None = None, metric: Metric | None = None) -> nn.Module:
    """Fold the adapter into the factors: exactly (rank r + l) when ``rank`` is None, else
    re-truncated to ``rank`` in ``metric`` without forming the dense weight:
    A_s = [A, U] = Q R (QR), K = R (B_s G B_s^T) R^T is (r+l) x (r+l); its top eigenvectors V
    give W' = (Q V)(V^T R B_s), the metric-optimal rank-``rank`` approximation of A_s B_s."""
    a, b = factors(lora.base)
    if lora.rank == 0:
        a_s, b_s = a, b
    else:
        u, d = lora.delta()
        a_s = torch.cat([a, u.detach().double()], 1)
        b_s = torch.cat([b, d.detach().double()], 0)
    if rank is None or rank >= a_s.shape[1]:
        return set_factors(lora.base, *balance(a_s, b_s))
    q, r = torch.linalg.qr(a_s)
    metric = metric or Metric()
    k = r @ metric.cov(b_s) @ r.T
    evals, evecs = torch.linalg.eigh(0.5 * (k + k.T))
    v = evecs[:, torch.argsort(evals, descending=True, stable=True)[:rank]]
    return set_factors(lora.base, *balance(q @ v, v.T @ r @ b_s))


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product a b, balanced gauge (A^T A = B B^T = diag(sigma)), deterministic signs."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    p, s, vt = torch.linalg.svd(ra @ rb.T)
    root = s.sqrt()
    a2, b2 = (qa @ p) * root[None, :], root[:, None] * (vt @ qb.T)
    idx = a2.abs().argmax(dim=0)
    sign = torch.sign(a2[idx, torch.arange(a2.shape[1])])
    sign[sign == 0] = 1
    return a2 * sign[None, :], b2 * sign[:, None]


def attach(model: nn.Module, names: list[str]) -> dict[str, LoRA]:
    """Wrap the named two-factor layers in empty adapters (in place)."""
    out = {}
    for name in names:
        lora = LoRA(model.get_submodule(name))
        set_module(model, name, lora)
        out[name] = lora
    return out


def detach_all(model: nn.Module, ranks: dict[str, int | None], metrics: dict[str, Metric | None]) -> None:
    """Fold every adapter in ``model`` (in place); ``ranks[name]`` None = exact fold."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRA):
            set_module(model, name, fold(mod, ranks.get(name), metrics.get(name)))
