"""Method ``cp``: CP (canonical polyadic) factorization of kxk Conv2d kernels by ALS from
HOSVD factors into ``CPConv2d`` (1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1); a layer
whose fit stays below ``min_fit`` is kept dense and the report says so. Other selected layers
use whitened SVD. Each layer gets its uniform share of a ``--ratio`` (no nested spectrum)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..checks import _check_number
from ..decompose.cp import cp_conv, cp_params
from ..errors import ConfigError
from .base import Choice, Factorized
from .conv_layers import ConvMethod, CPConv2d, conv_hyper, conv_unsupported
from .svd_whiten import WhitenedSVDConfig

if TYPE_CHECKING:
    from ..config import CompressConfig
    from ..planning.plan_types import LayerPlan, Plan

NAME = "cp"


@dataclass(frozen=True)
class CPConfig(WhitenedSVDConfig):
    """CP for kxk Conv2d by ALS from HOSVD factors; a layer whose fit stays below ``min_fit``
    is kept dense (and the report says so). Other selected layers use whitened SVD."""

    max_iter: int = 100
    tol: float = 1e-6
    min_fit: float = 0.8
    name: str = field(default=NAME, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"max_iter={self.max_iter!r} must be an int >= 1; e.g. 100")
        if not 0.0 <= _check_number("min_fit", self.min_fit) < 1.0:
            raise ConfigError(f"min_fit={self.min_fit} must be in [0, 1); e.g. 0.8")
        if not _check_number("tol", self.tol) > 0:
            raise ConfigError(f"tol={self.tol} must be > 0; e.g. 1e-6")


@dataclass(frozen=True)
class CPChoice(Choice):
    """The CP rank R."""

    rank: int


def supported(conv: nn.Module) -> str | None:
    """None when ``conv`` can be CP factorized, else a one-line reason to keep it dense."""
    return conv_unsupported(conv, NAME)


def cp_module(conv: nn.Conv2d, rank: int, **kwargs: object) -> tuple[CPConv2d, Any]:
    """Factorize a dense conv into a CPConv2d with the same hyper-parameters and bias
    (``kwargs`` go to ``cp_conv``). Check ``factors.usable`` before swapping it in.

    Raises ConfigError with the reason when ``supported(conv)`` refuses it."""
    reason = supported(conv)
    if reason is not None:
        raise ConfigError(f"cannot CP-factorize this conv: {reason}")
    f = cp_conv(conv.weight, rank, **kwargs)  # type: ignore[arg-type]
    h = conv_hyper(conv)
    bias = None if conv.bias is None else conv.bias.detach()
    mod = CPConv2d.from_factors(f.first, f.vertical, f.horizontal, f.last, bias, stride=h["stride"],
                                padding=h["padding"], dilation=h["dilation"],
                                padding_mode=h["padding_mode"])
    return mod, f


class CPMethod(ConvMethod):
    name = NAME
    config = CPConfig
    summary = "CP of kxk Conv2d (rank R)"
    modules = (CPConv2d,)
    entry_kinds = (NAME,)
    energy_budget = "--energy has no meaning for CP (no nested spectrum); use --rank or --ratio"

    def plan_layer(self, lp: "LayerPlan", mod: nn.Module, config: "CompressConfig", frac: float | None,
                   gram: torch.Tensor | None, preset: Any = False) -> None:
        out_c, in_c, kh, kw = mod.weight.shape
        rank = (config.rank if config.rank is not None
                else max(1, math.floor(frac * lp.params_before / (in_c + out_c + kh + kw))))
        lp.choice = CPChoice(rank)
        lp.set_rank(rank, cp_params(out_c, in_c, kh, kw, rank, bias=False), self.name)

    def predicted_error(self, mod: nn.Module, budget: float, gram: torch.Tensor | None) -> float:
        out_c, in_c, kh, kw = mod.weight.shape
        r = math.floor(budget / (in_c + out_c + kh + kw))
        if r < 1:
            return math.inf
        f = cp_conv(mod.weight, r, in_gram=gram)
        return f.relative_error if f.usable else math.inf

    def factorize(self, model: nn.Module, lp: "LayerPlan", plan: "Plan") -> Factorized:
        mod = model.get_submodule(lp.name)
        m, rank = self.sub_config(plan.config), lp.choice.rank
        new, f = cp_module(mod, rank, max_iter=m.max_iter, tol=m.tol, seed=plan.config.seed,
                           in_gram=plan.grams.get(lp.name), min_fit=m.min_fit)
        if not f.usable:
            return Factorized(note=f"CP rank {rank} not usable ({f.reason}): kept dense", dense=True)
        return Factorized({lp.name: new}, note=f"CP fit {f.fit:.3f}"
                          + ("" if f.converged else f" (stopped after {f.iterations} sweeps)"))


METHOD = CPMethod()
