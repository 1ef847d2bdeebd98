"""Method ``tt``: tensor-train matrices for Linear layers (``TTLinear``). In/out features
factor into ``modes`` balanced integer modes (fewer when they do not split), or the explicit
``tt_shape`` for every layer; ``--rank`` is the largest TT bond; a ``--ratio`` gives each layer
its uniform share; a bond whose multiply-adds exceed the dense layer's keeps it dense."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..decompose.tt import (
    balanced_split,
    tt_flops,
    tt_full_ranks,
    tt_matrix,
    tt_max_rank_for_params,
    tt_params,
)
from ..errors import ConfigError
from .base import Choice, Factorized, Method
from .kinds import is_linear, layer_matrix
from .svd_whiten import WhitenedSVDConfig
from .tt_layers import TTLinear, build_tt_shell, tt_shell_info

if TYPE_CHECKING:
    from ..config import CompressConfig
    from ..planning.plan_types import LayerPlan, Plan

NAME = "tt"
Modes = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class TTConfig(WhitenedSVDConfig):
    """Tensor-train matrices for Linear layers; in/out features factor into ``modes`` balanced
    integer modes, or the explicit ``tt_shape`` ((out modes), (in modes)) for every layer."""

    modes: int = 3
    tt_shape: Modes | None = None
    name: str = field(default=NAME, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.modes, bool) or not isinstance(self.modes, int) or not 2 <= self.modes <= 6:
            raise ConfigError(f"modes={self.modes!r} must be an int in [2, 6]; e.g. 3")
        if self.tt_shape is not None:
            shape = tuple(tuple(int(v) for v in part) for part in self.tt_shape)
            if len(shape) != 2 or len(shape[0]) != len(shape[1]) or len(shape[0]) < 2 or min(min(shape[0]), min(shape[1])) < 1:
                raise ConfigError(f"--tt-shape {self.tt_shape!r} must be two equally long lists of >= 2 "
                                  "positive modes, e.g. 8x6x8:8x6x8 (out:in)")
            object.__setattr__(self, "tt_shape", shape)


@dataclass(frozen=True)
class TTChoice(Choice):
    """Out modes, in modes and the d+1 bond ranks (ends 1)."""

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]


def shape_text(shape: Modes) -> str:
    return ":".join("x".join(map(str, part)) for part in shape)


def _factors_text(n: int) -> str:
    """Why ``n`` splits into no modes: '13 is prime', '22 = 2 x 11', '1 is too small'."""
    if n < 2:
        return f"{n} is too small"
    factors, k, rest = [], 2, n
    while k * k <= rest:
        while rest % k == 0:
            factors.append(k)
            rest //= k
        k += 1
    factors += [rest] if rest > 1 else []
    return f"{n} is prime" if factors == [n] else f"{n} = {' x '.join(map(str, factors))}"


def tt_layer_modes(mod: nn.Module, config: TTConfig, *, fallback: bool = True
                   ) -> tuple[tuple[int, ...], tuple[int, ...], str] | str:
    """(out modes, in modes, note) of Linear ``mod``, or a one-line reason (str) why no
    tensor-train fits it. Modes: ``config.tt_shape`` when set, else ``config.modes`` balanced
    modes per feature count, else (``fallback``) the most modes >= 2 below that which split both
    counts (``note`` says so)."""
    if not is_linear(mod):
        return f"{type(mod).__name__} is not an nn.Linear: tensor-train takes Linear layers only"
    out_f, in_f = layer_matrix(mod).shape
    if config.tt_shape is not None:
        out_m, in_m = config.tt_shape
        if math.prod(out_m) != out_f or math.prod(in_m) != in_f:
            return (f"--tt-shape {shape_text(config.tt_shape)} has products {math.prod(out_m)}:{math.prod(in_m)} "
                    f"but the layer is {out_f}x{in_f} (out x in)")
        return tuple(out_m), tuple(in_m), ""
    counts = list(range(config.modes, 1 if fallback else config.modes - 1, -1))
    for d in counts:
        out_m, in_m = balanced_split(out_f, d), balanced_split(in_f, d)
        if out_m is not None and in_m is not None:
            note = "" if d == config.modes else (f"{d} TT modes: {out_f}x{in_f} (out x in) does not split into "
                                                 f"{config.modes} balanced modes")
            return out_m, tuple(sorted(in_m, reverse=True)), note
    whys = [_factors_text(n) for n in dict.fromkeys((out_f, in_f))
            if all(balanced_split(n, d) is None for d in counts)]
    span = f"2 to {config.modes}" if len(counts) > 1 else f"{config.modes}"
    return (f"{out_f}x{in_f} (out x in) has no tensor-train split into {span} balanced integer modes per side "
            f"({', '.join(whys) or 'no common number of modes'})")


class TTMethod(Method):
    name = NAME
    config = TTConfig
    summary = "tensor-train matrices of Linear layers (rank = largest bond)"
    kinds = ("linear",)
    modules = (TTLinear,)
    entry_kinds = ("tt_linear",)
    energy_budget = "--energy is not supported for --method tt; use --rank (largest TT bond) or --ratio"
    auto_candidate = True
    whitened = True

    def takes(self, mod: nn.Module, config: "CompressConfig") -> bool:
        return is_linear(mod)

    def unsupported(self, mod: nn.Module, config: "CompressConfig | None" = None) -> str | None:
        modes = tt_layer_modes(mod, self.sub_config(config) if config is not None else TTConfig())
        return modes if isinstance(modes, str) else None

    def refusal(self, mod: nn.Module, config: "CompressConfig") -> str | None:
        """An exactly named layer gets the configured modes only; the reason names a
        --tt-shape that fits."""
        reason = self.unsupported(mod, config)
        if reason is not None:
            return reason
        strict = tt_layer_modes(mod, self.sub_config(config), fallback=False)
        if not isinstance(strict, str):
            return None
        fewer = tt_layer_modes(mod, self.sub_config(config))
        return f"{strict}; --tt-shape {shape_text((fewer[0], fewer[1]))} ({len(fewer[0])} modes) would fit it"

    def finish(self, config: "CompressConfig", planned: list["LayerPlan"], refused: list[tuple[str, nn.Module]]) -> None:
        """Refuse a ``--tt-shape`` that fits none of the Linear layers tt would take."""
        shape = getattr(config.method, "tt_shape", None)
        if shape is None or planned or not refused:
            return
        name, mod = refused[0]
        raise ConfigError(f"--tt-shape {shape_text(shape)} fits no targeted Linear layer (products "
                          f"{math.prod(shape[0])}:{math.prod(shape[1])}; {name!r} is {'x'.join(map(str, layer_matrix(mod).shape))}, "
                          "out x in); give modes whose products match a layer, or --targets only layers of that shape")

    def plan_layer(self, lp: "LayerPlan", mod: nn.Module, config: "CompressConfig", frac: float | None,
                   gram: torch.Tensor | None, preset: Any = False) -> None:
        modes = tt_layer_modes(mod, self.sub_config(config))
        if isinstance(modes, str):
            lp.add_reason(modes)
            return
        out_m, in_m, note = modes
        lp.add_reason(note)
        rank = config.rank if config.rank is not None else tt_max_rank_for_params(out_m, in_m, int(frac * lp.params_before))
        if rank < 1:
            lp.add_reason(f"TT rank 1 already needs more than {frac:.0%} of the layer: kept dense")
            return
        ranks = tuple(min(rank, f) for f in tt_full_ranks(out_m, in_m))
        after = tt_params(out_m, in_m, ranks) + (layer_matrix(mod).shape[1] if gram is not None else 0)
        lp.choice = TTChoice(tuple(out_m), tuple(in_m), ranks)
        flops = tt_flops(out_m, in_m, ranks)
        if flops > lp.params_before:  # dense MACs per input row = out * in = its parameter count
            lp.add_reason(f"TT bond {rank} costs {flops / lp.params_before:.1f}x the dense multiply-adds per input: "
                          "kept dense (lower --ratio/--rank, or use svd-whiten)")
            lp.choice = None
            return
        lp.set_rank(rank, after, self.name)

    def predicted_error(self, mod: nn.Module, budget: float, gram: torch.Tensor | None) -> float:
        modes = tt_layer_modes(mod, TTConfig())
        if isinstance(modes, str):
            return math.inf
        out_m, in_m, _ = modes
        r = tt_max_rank_for_params(out_m, in_m, int(budget))
        if r < 1:
            return math.inf
        f = tt_matrix(layer_matrix(mod).detach(), out_m, in_m, max_rank=r, in_gram=gram)
        return f.output_error if f.output_error is not None else f.relative_error

    def factorize(self, model: nn.Module, lp: "LayerPlan", plan: "Plan") -> Factorized:
        mod = model.get_submodule(lp.name)
        c, gram = lp.choice, plan.grams.get(lp.name)
        f = tt_matrix(layer_matrix(mod).detach(), list(c.out_modes), list(c.in_modes), list(c.ranks), in_gram=gram,
                      scale_inputs=gram is not None)
        return Factorized({lp.name: TTLinear.from_factors(f, None if mod.bias is None else mod.bias.detach())})

    def entry(self, mod: nn.Module, groups: dict[int, str]) -> dict[str, Any]:
        return tt_shell_info(mod)

    def shell(self, info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
        return build_tt_shell(info)


METHOD = TTMethod()
