"""Factorized Conv2d modules built from plain nn.Conv2d only, so export stays plain.

TuckerConv2d: 1x1 (in -> r_in) -> kh x kw core (r_in -> r_out, original stride/padding/
dilation/padding_mode) -> 1x1 (r_out -> out, original bias).
CPConv2d: 1x1 (in -> R) -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (R -> out, bias).

Padding commutes with the pointwise 1x1 maps and a row-only conv commutes with column padding,
so both forms are exact rewrites of the dense conv for every padding_mode (checked in
tests/test_conv_methods.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Method
from .kinds import dtype_name, is_kxk_conv

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Pair = tuple[int, int]


def _pair(v: Any, name: str) -> Pair:
    """Normalise an int or a 2-sequence of ints to a tuple of two ints."""
    if isinstance(v, bool):
        raise ValueError(f"{name}={v!r} must be an int or a pair of ints")
    if isinstance(v, int):
        return (v, v)
    t = tuple(v)
    if len(t) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
        raise ValueError(f"{name}={v!r} must be an int or a pair of ints")
    return (int(t[0]), int(t[1]))


def _int_padding(padding: Any, kernel: Pair, stride: Pair, dilation: Pair) -> Pair:
    """Integer padding equivalent to ``padding``; string 'same' only when it is symmetric."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' with stride {stride} is not defined; give integer padding")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            if any(t % 2 for t in total):
                raise ValueError(
                    f"padding='same' with kernel {kernel} and dilation {dilation} pads asymmetrically "
                    "(one more row/column on the bottom/right), which integer padding cannot express"
                )
            return (total[0] // 2, total[1] // 2)
        raise ValueError(f"padding={padding!r} is not 'same', 'valid', an int or a pair of ints")
    return _pair(padding, "padding")


def conv_hyper(conv: nn.Conv2d) -> dict[str, Any]:
    """Normalised hyper-parameters of a dense conv (kernel, stride, padding as ints, dilation,
    padding_mode); raises ValueError when they cannot be expressed (see ``conv_unsupported``)."""
    kernel = _pair(conv.kernel_size, "kernel_size")
    stride = _pair(conv.stride, "stride")
    dilation = _pair(conv.dilation, "dilation")
    return {
        "kernel_size": kernel,
        "stride": stride,
        "padding": _int_padding(conv.padding, kernel, stride, dilation),
        "dilation": dilation,
        "padding_mode": conv.padding_mode,
    }


def conv_unsupported(conv: nn.Module, method: str = "tucker") -> str | None:
    """None when ``conv`` can be factorized by ``method`` ('tucker' or 'cp'), else a one-line
    reason to keep it dense."""
    if method not in ("tucker", "cp"):
        raise ValueError(f"method {method!r} is not 'tucker' or 'cp'")
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.groups != 1:
        return (f"grouped/depthwise conv kept dense: the factorized form cannot keep groups "
                f"(groups={conv.groups})")
    if tuple(conv.kernel_size) == (1, 1):
        return "1x1 conv is a linear map: use svd-whiten"
    if conv.padding_mode not in PADDING_MODES:
        return f"padding_mode={conv.padding_mode!r} is not one of {PADDING_MODES}"
    if getattr(conv, "weight", None) is None or conv.weight.dim() != 4:
        return "conv has no 4-d weight"
    try:
        conv_hyper(conv)
    except ValueError as exc:
        return f"{exc}; kept dense"
    return None


def _conv(cin: int, cout: int, kernel: Pair, *, stride: Pair = (1, 1), padding: Pair = (0, 0),
          dilation: Pair = (1, 1), groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
          device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)


class TuckerConv2d(nn.Module):
    """Tucker-2 conv: last(core(first(x))); ranks = (r_out, r_in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair,
                 ranks: tuple[int, int], stride: int | Pair = 1, padding: int | Pair | str = 0,
                 dilation: int | Pair = 1, padding_mode: str = "zeros", bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kernel, st, dil = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
        pad = _int_padding(padding, kernel, st, dil)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
        r_out, r_in = (int(r) for r in ranks)
        if not (1 <= r_out <= out_channels and 1 <= r_in <= in_channels):
            raise ValueError(f"ranks (r_out={r_out}, r_in={r_in}) outside [1, {out_channels}] x [1, {in_channels}]")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = kernel, st, pad, dil
        self.padding_mode, self.ranks = padding_mode, (r_out, r_in)
        kw = {"device": device, "dtype": dtype}
        self.first = _conv(in_channels, r_in, (1, 1), **kw)
        self.core = _conv(r_in, r_out, kernel, stride=st, padding=pad, dilation=dil,
                          padding_mode=padding_mode, **kw)
        self.last = _conv(r_out, out_channels, (1, 1), bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    @classmethod
    def from_factors(cls, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor,
                     bias: torch.Tensor | None = None, *, stride: int | Pair = 1,
                     padding: int | Pair | str = 0, dilation: int | Pair = 1,
                     padding_mode: str = "zeros") -> "TuckerConv2d":
        """first: (r_in, in, 1, 1), core: (r_out, r_in, kh, kw), last: (out, r_out, 1, 1)."""
        r_in, cin = first.shape[:2]
        r_out, _, kh, kw = core.shape
        cout = last.shape[0]
        if core.shape[1] != r_in or last.shape[1] != r_out:
            raise ValueError(f"factor shapes do not chain: first {tuple(first.shape)}, core "
                             f"{tuple(core.shape)}, last {tuple(last.shape)}")
        mod = cls(cin, cout, (kh, kw), (r_out, r_in), stride=stride, padding=padding,
                  dilation=dilation, padding_mode=padding_mode, bias=bias is not None,
                  device=core.device, dtype=core.dtype)
        with torch.no_grad():
            mod.first.weight.copy_(first.reshape(r_in, cin, 1, 1))
            mod.core.weight.copy_(core)
            mod.last.weight.copy_(last.reshape(cout, r_out, 1, 1))
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The (out, in, kh, kw) kernel this module represents."""
        f = self.first.weight[:, :, 0, 0]
        l = self.last.weight[:, :, 0, 0]
        return torch.einsum("ab,bcpq,cd->adpq", l, self.core.weight, f)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"ranks(out,in)={self.ranks}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, padding_mode={self.padding_mode!r}, "
                f"bias={self.last.bias is not None}")


class CPConv2d(nn.Module):
    """CP conv: last(horizontal(vertical(first(x)))) with depthwise kh x 1 and 1 x kw convs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Pair, rank: int,
                 stride: int | Pair = 1, padding: int | Pair | str = 0, dilation: int | Pair = 1,
                 padding_mode: str = "zeros", bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kernel, st, dil = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
        pad = _int_padding(padding, kernel, st, dil)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"rank {rank} must be >= 1")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.padding, self.dilation = kernel, st, pad, dil
        self.padding_mode = padding_mode
        kw = {"device": device, "dtype": dtype}
        (kh, kw_), (sh, sw), (ph, pw), (dh, dw) = kernel, st, pad, dil
        self.first = _conv(in_channels, rank, (1, 1), **kw)
        self.vertical = _conv(rank, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                              groups=rank, padding_mode=padding_mode, **kw)
        self.horizontal = _conv(rank, rank, (1, kw_), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                                groups=rank, padding_mode=padding_mode, **kw)
        self.last = _conv(rank, out_channels, (1, 1), bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    @classmethod
    def from_factors(cls, first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor,
                     last: torch.Tensor, bias: torch.Tensor | None = None, *, stride: int | Pair = 1,
                     padding: int | Pair | str = 0, dilation: int | Pair = 1,
                     padding_mode: str = "zeros") -> "CPConv2d":
        """first: (R, in, 1, 1), vertical: (R, 1, kh, 1), horizontal: (R, 1, 1, kw),
        last: (out, R, 1, 1)."""
        rank, cin = first.shape[:2]
        kh, kw = vertical.shape[2], horizontal.shape[3]
        cout = last.shape[0]
        if vertical.shape[0] != rank or horizontal.shape[0] != rank or last.shape[1] != rank:
            raise ValueError(f"factor shapes do not chain: first {tuple(first.shape)}, vertical "
                             f"{tuple(vertical.shape)}, horizontal {tuple(horizontal.shape)}, "
                             f"last {tuple(last.shape)}")
        mod = cls(cin, cout, (kh, kw), rank, stride=stride, padding=padding, dilation=dilation,
                  padding_mode=padding_mode, bias=bias is not None, device=first.device, dtype=first.dtype)
        with torch.no_grad():
            mod.first.weight.copy_(first.reshape(rank, cin, 1, 1))
            mod.vertical.weight.copy_(vertical.reshape(rank, 1, kh, 1))
            mod.horizontal.weight.copy_(horizontal.reshape(rank, 1, 1, kw))
            mod.last.weight.copy_(last.reshape(cout, rank, 1, 1))
            if bias is not None:
                mod.last.bias.copy_(bias)
        return mod

    def dense_weight(self) -> torch.Tensor:
        """The (out, in, kh, kw) kernel this module represents."""
        b = self.first.weight[:, :, 0, 0]          # R x in
        c = self.vertical.weight[:, 0, :, 0]       # R x kh
        d = self.horizontal.weight[:, 0, 0, :]     # R x kw
        a = self.last.weight[:, :, 0, 0]           # out x R
        return torch.einsum("or,ri,rp,rq->oipq", a, b, c, d)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, padding_mode={self.padding_mode!r}, "
                f"bias={self.last.bias is not None}")


def conv_shell_info(module: nn.Module) -> dict[str, Any]:
    """JSON-able description of a TuckerConv2d / CPConv2d, enough for ``build_conv_shell``."""
    if isinstance(module, TuckerConv2d):
        kind, ranks = "tucker", [int(r) for r in module.ranks]
    elif isinstance(module, CPConv2d):
        kind, ranks = "cp", [int(module.rank)]
    else:
        raise ValueError(f"{type(module).__name__} is not a TuckerConv2d or CPConv2d")
    return {
        "kind": kind,
        "in_channels": int(module.in_channels),
        "out_channels": int(module.out_channels),
        "kernel_size": list(module.kernel_size),
        "stride": list(module.stride),
        "padding": list(module.padding),
        "dilation": list(module.dilation),
        "padding_mode": module.padding_mode,
        "bias": module.last.bias is not None,
        "ranks": ranks,
    }


def build_conv_shell(kind: str, info: dict[str, Any], dtype: torch.dtype | None = None) -> nn.Module:
    """An uninitialised TuckerConv2d ('tucker', ranks [r_out, r_in]) or CPConv2d ('cp', ranks
    [R]) from a ``conv_shell_info`` dict; load the state dict into it afterwards."""
    if info.get("kind", kind) != kind:
        raise ValueError(f"shell kind {kind!r} does not match info kind {info.get('kind')!r}")
    padding = info.get("padding", 0)
    common = {
        "stride": _pair(info.get("stride", 1), "stride"),
        "padding": padding if isinstance(padding, str) else _pair(padding, "padding"),
        "dilation": _pair(info.get("dilation", 1), "dilation"),
        "padding_mode": info.get("padding_mode", "zeros"),
        "bias": bool(info.get("bias", True)),
        "dtype": dtype,
    }
    cin, cout = int(info["in_channels"]), int(info["out_channels"])
    kernel = _pair(info["kernel_size"], "kernel_size")
    ranks = [int(r) for r in info["ranks"]]
    if kind == "tucker":
        if len(ranks) != 2:
            raise ValueError(f"tucker shell needs ranks [r_out, r_in], got {ranks}")
        return TuckerConv2d(cin, cout, kernel, (ranks[0], ranks[1]), **common)
    if kind == "cp":
        if len(ranks) != 1:
            raise ValueError(f"cp shell needs ranks [R], got {ranks}")
        return CPConv2d(cin, cout, kernel, ranks[0], **common)
    raise ValueError(f"unknown factorized conv kind {kind!r}; expected 'tucker' or 'cp'")


class ConvMethod(Method):
    """What the kxk Conv2d methods share: the layers they take, why not, and their manifest
    entries (the method's name is the entry's kind)."""

    kinds = ("conv", "conv1x1")
    auto_candidate = True
    whitened = True

    def takes(self, mod: nn.Module, config: Any) -> bool:
        return is_kxk_conv(mod)

    def unsupported(self, mod: nn.Module, config: Any = None) -> str | None:
        return conv_unsupported(mod, self.name)

    def entry(self, mod: nn.Module, groups: dict[int, str]) -> dict[str, Any]:
        return dict(conv_shell_info(mod), dtype=dtype_name(mod.last.weight))

    def shell(self, info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
        return build_conv_shell(self.name, info, dtype=getattr(torch, info.get("dtype", "float32")))
