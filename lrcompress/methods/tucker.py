"""Method ``tucker``: Tucker-2 of kxk Conv2d kernels on their (out, in) modes (data-aware on
the input-channel mode when calibrated) into ``TuckerConv2d``; other selected layers use
whitened SVD. ``--rank`` takes N or a pair R_OUT,R_IN; ``--energy`` is per mode; a global
``--ratio`` spends parameters over the mode-truncation hulls of all Tucker layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..decompose import Metric, spectrum
from ..decompose.tucker import tucker2, tucker_params
from ..errors import ConfigError
from .base import Choice, Factorized
from .conv_layers import ConvMethod, TuckerConv2d, conv_hyper, conv_unsupported
from .svd_whiten import WhitenedSVDConfig

if TYPE_CHECKING:
    from ..config import CompressConfig
    from ..planning.plan_types import LayerPlan, Plan

NAME = "tucker"


@dataclass(frozen=True)
class TuckerConfig(WhitenedSVDConfig):
    """Tucker-2 for kxk Conv2d (data-aware on the input-channel mode when calibrated); other
    selected layers use whitened SVD. ``max_iter``: HOOI sweeps."""

    max_iter: int = 50
    name: str = field(default=NAME, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ConfigError(f"max_iter={self.max_iter!r} must be an int >= 0; e.g. 50")


@dataclass(frozen=True)
class TuckerChoice(Choice):
    """Mode ranks (r_out, r_in)."""

    r_out: int
    r_in: int

    def label(self) -> str:
        return f"{self.r_out}/{self.r_in}"


def supported(conv: nn.Module) -> str | None:
    """None when ``conv`` can be Tucker-2 factorized, else a one-line reason to keep it dense."""
    return conv_unsupported(conv, NAME)


def tucker_module(conv: nn.Conv2d, ranks: tuple[int, int], in_gram: torch.Tensor | None = None,
                  **kwargs: float | int) -> tuple[TuckerConv2d, Any]:
    """Factorize a dense conv into a TuckerConv2d with the same hyper-parameters and bias.

    Raises ConfigError with the reason when ``supported(conv)`` refuses it."""
    reason = supported(conv)
    if reason is not None:
        raise ConfigError(f"cannot Tucker-factorize this conv: {reason}")
    f = tucker2(conv.weight, ranks, in_gram=in_gram, **kwargs)  # type: ignore[arg-type]
    h = conv_hyper(conv)
    bias = None if conv.bias is None else conv.bias.detach()
    mod = TuckerConv2d.from_factors(f.first, f.core, f.last, bias, stride=h["stride"],
                                    padding=h["padding"], dilation=h["dilation"],
                                    padding_mode=h["padding_mode"])
    return mod, f


def tucker_mode_spectra(weight: torch.Tensor, gram: torch.Tensor | None) -> tuple[Any, Any]:
    """Spectra of the output-mode unfolding and of the (whitened when calibrated) input-mode one."""
    w = weight.detach().double()
    out_c, in_c = w.shape[:2]
    s_out = spectrum(w.reshape(out_c, -1), Metric())
    s_in = spectrum(w.permute(0, 2, 3, 1).reshape(-1, in_c), Metric(gram=gram) if gram is not None else Metric())
    return s_out, s_in


def _loss(spec: Any, r: int) -> float:
    return spec.tail(r) / spec.total if spec.total > 0 else 0.0


def ranks_for_budget(s_out: Any, s_in: Any, shape: tuple[int, int, int, int], budget: float) -> tuple[int, int] | None:
    """The (r_out, r_in) within ``budget`` params that minimises the sum of the two modes'
    normalized truncation losses (the HOSVD error bound); None if nothing fits."""
    out_c, in_c, kh, kw = shape
    best: tuple[float, int, int] | None = None
    for r_out in range(1, out_c + 1):
        lo, hi = 0, in_c  # largest r_in that fits with this r_out
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tucker_params(out_c, in_c, kh, kw, r_out, mid, bias=False) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1:
            break
        cand = (_loss(s_out, r_out) + _loss(s_in, lo), r_out, lo)
        if best is None or cand[0] < best[0] - 1e-15:
            best = cand
    return None if best is None else (best[1], best[2])


class TuckerMethod(ConvMethod):
    name = NAME
    config = TuckerConfig
    summary = "Tucker-2 of kxk Conv2d (rank N or R_OUT,R_IN)"
    modules = (TuckerConv2d,)
    entry_kinds = (NAME,)
    rank_pair = True

    def plan_layer(self, lp: "LayerPlan", mod: nn.Module, config: "CompressConfig", frac: float | None,
                   gram: torch.Tensor | None, preset: Any = False) -> None:
        out_c, in_c, kh, kw = mod.weight.shape
        if isinstance(config.rank, tuple):
            r_out, r_in = config.rank
            if r_out > out_c or r_in > in_c:
                raise ConfigError(f"--rank {r_out},{r_in} exceeds the channels of conv {lp.name!r} (out {out_c}, "
                                  f"in {in_c}); use R_OUT <= {out_c} and R_IN <= {in_c}")
            ranks = (r_out, r_in)
        elif config.rank is not None:
            r = config.rank
            if r > max(out_c, in_c):
                raise ConfigError(f"--rank {r} exceeds both channel counts of conv {lp.name!r} (out {out_c}, in "
                                  f"{in_c}); use --rank <= {max(out_c, in_c)} (each mode is capped at its channels)")
            ranks = (min(r, out_c), min(r, in_c))
        else:
            s_out, s_in = tucker_mode_spectra(mod.weight, gram)
            if config.energy is not None:
                ranks = (min(s_out.rank_for_energy(config.energy), out_c),
                         min(s_in.rank_for_energy(config.energy), in_c))
            else:
                if preset is None:
                    lp.reason = "global Tucker allocation keeps this layer dense (cheapest loss per parameter)"
                    return
                ranks = ((preset.r_out, preset.r_in) if preset is not False
                         else ranks_for_budget(s_out, s_in, (out_c, in_c, kh, kw), frac * lp.params_before))
                if ranks is None:
                    lp.reason = f"Tucker rank (1, 1) already needs more than {frac:.0%} of the layer: kept dense"
                    return
        after = tucker_params(out_c, in_c, kh, kw, ranks[0], ranks[1], bias=False)
        lp.choice = TuckerChoice(*ranks)
        lp.set_rank(max(ranks), after, self.name)

    def options(self, lp: "LayerPlan", mod: nn.Module, gram: torch.Tensor | None) -> list[tuple[int, float, Any]]:
        """Every (r_out, r_in) below the dense size, with the sum of the modes' normalized losses."""
        out_c, in_c, kh, kw = mod.weight.shape
        s_out, s_in = tucker_mode_spectra(mod.weight, gram)
        lo = [_loss(s_out, r) for r in range(out_c + 1)]
        li = [_loss(s_in, r) for r in range(in_c + 1)]
        opts: list[tuple[int, float, Any]] = [(lp.params_before, 0.0, None)]
        for ro in range(1, out_c + 1):
            for ri in range(1, in_c + 1):
                n = tucker_params(out_c, in_c, kh, kw, ro, ri, bias=False)
                if n < lp.params_before:
                    opts.append((n, lo[ro] + li[ri], TuckerChoice(ro, ri)))
        return opts

    def predicted_error(self, mod: nn.Module, budget: float, gram: torch.Tensor | None) -> float:
        s_out, s_in = tucker_mode_spectra(mod.weight, gram)
        ranks = ranks_for_budget(s_out, s_in, tuple(mod.weight.shape), budget)
        return math.inf if ranks is None else tucker2(mod.weight, ranks, in_gram=gram).relative_error

    def describe(self, mod: nn.Module, gram: torch.Tensor | None) -> tuple[int, int, str] | str | None:
        reason = supported(mod)
        if reason is not None:
            return reason
        s_out, s_in = tucker_mode_spectra(mod.weight, gram)
        e90, e99 = (s_out.rank_for_energy(0.90), s_in.rank_for_energy(0.90)), (s_out.rank_for_energy(0.99), s_in.rank_for_energy(0.99))
        return e90[0], e99[0], f"Tucker mode ranks out/in: 90% {e90[0]}/{e90[1]}, 99% {e99[0]}/{e99[1]}"

    def factorize(self, model: nn.Module, lp: "LayerPlan", plan: "Plan") -> Factorized:
        mod = model.get_submodule(lp.name)
        c = lp.choice
        new, _ = tucker_module(mod, (c.r_out, c.r_in), in_gram=plan.grams.get(lp.name),
                               max_iter=self.sub_config(plan.config).max_iter)
        return Factorized({lp.name: new})


METHOD = TuckerMethod()
