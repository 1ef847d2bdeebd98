"""TTLinear: a Linear layer whose weight is a tensor train of d cores (standard ops only).

Parameters ``cores.k`` have shape (r_{k-1}, i_k, o_k, r_k): tensorly's TT-matrix layout of W^T,
so each core is, as a plain view, the (r_{k-1} i_k, o_k r_k) matrix of one GEMM. The forward
(left to right) is a fixed chain of d steps, each Reshape -> MatMul(2-D weight) -> Transpose:

    h: (B, i_2..i_d, r_0 i_1)  --GEMM-->  (B, i_2..i_d, o_1 r_1)  --move i_2 last-->
    (B, i_3..i_d, o_1, r_1 i_2)  --GEMM--> ...  (B, o_1..o_d)

Exported that is Reshape/Transpose/MatMul (+ Mul for an input scale, Pad/Slice for padded
modes, Add for the bias) with constant shapes except the leading -1, so batch dims stay dynamic.
Cost per input row: sum_k (prod_{j<k} o_j)(prod_{j>k} i_j) r_{k-1} i_k o_k r_k multiply-adds
(``tt_flops``); with small out modes first and small in modes last (``tt_modes``) this order is
the cheaper one. TT saves parameters far more than FLOPs: check tt_flops against out*in.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..decompose.tt import tt_to_matrix

__all__ = ["TTLinear", "tt_shell_info", "build_tt_shell"]

KIND = "tt_linear"


class TTLinear(nn.Module):
    """y = W' x + b with W'[o, i] = G_1[:, o_1, i_1, :] ... G_d[:, o_d, i_d, :]; x of shape
    (..., in_features). Stored cores ``cores.k`` are G_k transposed to (r_{k-1}, i_k, o_k, r_k).

    ``prod(in_modes)`` / ``prod(out_modes)`` may exceed in/out_features: inputs are zero-padded
    and extra outputs dropped. ``in_scale`` (optional, (in_features,)) multiplies x first.
    """

    def __init__(self, in_features: int, out_features: int, out_modes: Sequence[int],
                 in_modes: Sequence[int], ranks: Sequence[int], bias: bool = True,
                 in_scale: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        out_modes, in_modes, ranks = tuple(map(int, out_modes)), tuple(map(int, in_modes)), tuple(map(int, ranks))
        d = len(out_modes)
        if len(in_modes) != d or len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1:
            raise ValueError(f"TTLinear: need d out modes, d in modes and d+1 ranks with ends 1; got "
                             f"{out_modes}, {in_modes}, {ranks}")
        if math.prod(in_modes) < in_features or math.prod(out_modes) < out_features:
            raise ValueError(f"TTLinear: modes {out_modes} x {in_modes} cannot hold a {out_features} x "
                             f"{in_features} weight")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.out_modes, self.in_modes, self.ranks = out_modes, in_modes, ranks
        kw = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], in_modes[k], out_modes[k], ranks[k + 1], **kw)) for k in range(d))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.in_scale = nn.Parameter(torch.ones(in_features, **kw)) if in_scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random cores whose product has nn.Linear's weight variance 1/(3 in); bias like nn.Linear."""
        inner = math.prod(self.ranks[1:-1])  # var(W') = prod_k var(core_k) * prod(inner ranks)
        std = (1.0 / (3 * self.in_features * inner)) ** (1 / (2 * len(self.cores)))
        with torch.no_grad():
            for c in self.cores:
                c.normal_(0.0, std)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    @property
    def rank(self) -> int:
        """Largest TT-rank."""
        return max(self.ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        if self.in_scale is not None:
            h = h * self.in_scale
        n_pad = math.prod(self.in_modes)
        if n_pad > self.in_features:
            h = F.pad(h, (0, n_pad - self.in_features))
        d = len(self.cores)
        # (B, i_1, i_>1) -> (B, i_>1, i_1): the contracted modes (r_{k-1}, i_k) are always last
        h = h.reshape(-1, self.in_modes[0], n_pad // self.in_modes[0]).transpose(1, 2)
        for k, core in enumerate(self.cores):
            r0, i, o, r1 = self.ranks[k], self.in_modes[k], self.out_modes[k], self.ranks[k + 1]
            h = torch.matmul(h.reshape(-1, r0 * i), core.reshape(r0 * i, o * r1))
            if k + 1 < d:  # (B, i_{k+1}, [i_>k+1, o_<=k], r_k) -> (B, [i_>k+1, o_<=k], r_k, i_{k+1})
                mid = math.prod(self.in_modes[k + 2:]) * math.prod(self.out_modes[: k + 1])
                h = h.reshape(-1, self.in_modes[k + 1], mid, r1).permute(0, 2, 3, 1)
        y = h.reshape(-1, math.prod(self.out_modes))
        if y.shape[-1] > self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this module represents (in_scale folded in)."""
        w = tt_to_matrix([c.transpose(1, 2) for c in self.cores])[: self.out_features, : self.in_features]
        return w if self.in_scale is None else w * self.in_scale[None, :]

    @classmethod
    def from_factors(cls, factors: Any, bias: torch.Tensor | None = None) -> "TTLinear":
        """Build from a ``methods.tt.TTFactors`` (cores, modes, ranks, in_scale) and the original bias."""
        c0 = factors.cores[0]
        out_f, in_f = factors.shape
        mod = cls(in_f, out_f, factors.out_modes, factors.in_modes, factors.ranks, bias=bias is not None,
                  in_scale=factors.in_scale is not None, device=c0.device, dtype=c0.dtype)
        with torch.no_grad():
            for p, c in zip(mod.cores, factors.cores):
                p.copy_(c.transpose(1, 2))
            if bias is not None:
                mod.bias.copy_(bias)
            if factors.in_scale is not None:
                mod.in_scale.copy_(factors.in_scale)
        return mod

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"out_modes={self.out_modes}, in_modes={self.in_modes}, ranks={self.ranks}, "
             f"bias={self.bias is not None}")
        return s + (", in_scale=True" if self.in_scale is not None else "")


def tt_shell_info(module: TTLinear) -> dict[str, Any]:
    """JSON-able description from which ``build_tt_shell`` rebuilds the module (weights not included)."""
    if not isinstance(module, TTLinear):
        raise TypeError(f"tt_shell_info: expected a TTLinear, got {type(module).__name__}")
    return {
        "kind": KIND,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "out_modes": list(module.out_modes),
        "in_modes": list(module.in_modes),
        "ranks": list(module.ranks),
        "bias": module.bias is not None,
        "in_scale": module.in_scale is not None,
        "dtype": str(module.cores[0].dtype).removeprefix("torch."),
    }


def build_tt_shell(info: dict[str, Any]) -> TTLinear:
    """An (arbitrarily initialised) TTLinear from ``tt_shell_info``; load_state_dict fills it."""
    if info.get("kind") != KIND:
        raise ValueError(f"build_tt_shell: kind {info.get('kind')!r} is not {KIND!r}")
    dtype = getattr(torch, str(info.get("dtype", "float32")))
    return TTLinear(info["in_features"], info["out_features"], info["out_modes"], info["in_modes"],
                    info["ranks"], bias=bool(info["bias"]), in_scale=bool(info.get("in_scale", False)),
                    dtype=dtype)
