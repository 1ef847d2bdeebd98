"""What a method is. Every factorization method is one module under ``methods/`` that defines
its config dataclass, the factorized ``nn.Module``(s) it builds with their manifest entries,
which layers it takes (and why not), the options it offers the allocator, and ``factorize``;
``registry.register`` adds it. Planner, allocator, apply, checkpoints, report and CLI only
talk to this interface.

Three planning families share it: matrix methods (``spectral``: one spectrum per layer, the
planner's rank allocation decides), per-layer structured methods (``takes`` a layer: Tucker,
CP, TT decide their own choice in ``plan_layer``) and group methods (``plan_groups``: layers
that share a basis). A chooser (``choose``) picks among the others per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import CompressConfig
    from ..planning.plan_types import LayerPlan, Plan


@dataclass(frozen=True)
class Choice:
    """A method's decision for one layer beyond its rank (subclasses add typed fields)."""

    def label(self) -> str:
        """The rank column of the plan and report tables."""
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Factorized:
    """What ``Method.factorize`` built for one planned layer: the modules to swap in (name ->
    module; empty when a group already swapped this layer in), and the measured quality.
    ``module`` None means the layer stays dense (``note`` says why). ``relative_error`` None:
    apply measures the output error on the probe inputs (or the weight error without them)."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    relative_error: float | None = None
    optimal_error: float = float("nan")
    error_ratio: float = float("nan")
    error_metric: str = "output"
    note: str = ""
    dense: bool = False


class Method:
    """One factorization method. Class attributes describe it; methods are hooks the planner,
    apply, checkpoints and reports call. Defaults describe a method that takes nothing."""

    name: ClassVar[str]
    config: ClassVar[type]  # its frozen config dataclass (with a ``name`` field equal to ``name``)
    summary: ClassVar[str] = ""  # one line for the CLI help and the docs
    kinds: ClassVar[tuple[str, ...]] = ("linear", "embedding", "conv1x1")  # default targets
    modules: ClassVar[tuple[type[nn.Module], ...]] = ()  # the factorized modules it builds
    entry_kinds: ClassVar[tuple[str, ...]] = ()  # manifest "kind" values its shells read
    needs_calibration: ClassVar[bool] = False  # refuse to run without calibration data
    spectral: ClassVar[bool] = False  # the plan's predicted error comes from one spectrum
    proven_optimal: ClassVar[bool] = False  # achieved/optimal is provable (report's worst ratio)
    latency_budget: ClassVar[bool] = False  # may plan under --budget latency
    rank_pair: ClassVar[bool] = False  # --rank R_OUT,R_IN means something to it
    energy_budget: ClassVar[str | None] = None  # why --energy is refused (None: accepted)
    auto_candidate: ClassVar[bool] = False  # a chooser may pick it per layer
    whitened: ClassVar[bool] = False  # matrix layers under it use the calibration metric
    grouped: ClassVar[bool] = False  # plans groups of layers (``plan_groups``)

    def check(self, config: "CompressConfig") -> None:
        """Refuse budgets this method has no meaning for, before any layer is looked at."""
        if config.energy is not None and self.energy_budget is not None:
            raise ConfigError(self.energy_budget)

    def takes(self, mod: nn.Module, config: "CompressConfig") -> bool:
        """Whether this method plans ``mod`` itself (structured methods); others go the matrix path."""
        return False

    def unsupported(self, mod: nn.Module, config: "CompressConfig | None" = None) -> str | None:
        """A one-line reason when ``mod`` cannot take this method (kept dense), else None."""
        return None

    def refusal(self, mod: nn.Module, config: "CompressConfig") -> str | None:
        """Why a layer named exactly in --targets cannot take this method (None: it can)."""
        return self.unsupported(mod, config)

    def plan_layer(self, lp: "LayerPlan", mod: nn.Module, config: "CompressConfig", frac: float | None,
                   gram: torch.Tensor | None, preset: Any = False) -> None:
        """Fill ``lp`` (rank, choice, params after) or say why it stays dense (structured methods).
        ``preset``: the choice a global allocation made (None = keep dense; False = none made)."""
        raise NotImplementedError(f"method {self.name!r} plans no layer itself")

    def options(self, lp: "LayerPlan", mod: nn.Module, gram: torch.Tensor | None) -> list[tuple[int, float, Any]] | None:
        """(params, predicted loss, choice) points this layer offers a global allocation; the
        dense point has choice None. None: this method is planned per layer only."""
        return None

    def predicted_error(self, mod: nn.Module, budget: float, gram: torch.Tensor | None) -> float:
        """Relative output error within ``budget`` parameters (inf when nothing fits); for choosers."""
        return float("inf")

    def describe(self, mod: nn.Module, gram: torch.Tensor | None) -> tuple[int, int, str] | str | None:
        """For ``inspect``: (rank for 90 % energy, for 99 %, a note) of a layer this method takes,
        a reason string when it cannot take it, or None when it has nothing to say."""
        return None

    def finish(self, config: "CompressConfig", planned: list["LayerPlan"], refused: list[tuple[str, nn.Module]]) -> None:
        """After planning: refuse options that fitted none of the layers (``refused``)."""

    def plan_groups(self, plan: "Plan", active: list["LayerPlan"], modules: dict[str, nn.Module],
                    config: "CompressConfig", frac: float | None) -> list["LayerPlan"]:
        """Group methods: plan shared factors over matrix layers; returns the grouped plans."""
        return []

    def choose(self, mod: nn.Module, config: "CompressConfig", frac: float, gram: torch.Tensor | None,
               matrix_error: float | None, candidates: list["Method"]) -> tuple["Method | None", str]:
        """Choosers: the method for ``mod`` among ``candidates`` (None: the matrix path), and why."""
        return None, ""

    def factorize(self, model: nn.Module, lp: "LayerPlan", plan: "Plan") -> Factorized:
        """Build the factorized module(s) for planned layer ``lp`` of ``model`` (not swapped in)."""
        raise NotImplementedError(f"method {self.name!r} cannot factorize")

    def entry(self, mod: nn.Module, groups: dict[int, str]) -> dict[str, Any]:
        """The manifest entry of a module this method built (``groups``: shared-part ids)."""
        raise NotImplementedError

    def shell(self, info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
        """An uninitialised module from its manifest entry (``shared``: parts built so far)."""
        raise NotImplementedError

    def sub_config(self, config: "CompressConfig") -> Any:
        """The config this method runs a layer with under ``config`` (a chooser's defaults)."""
        return config.method if isinstance(config.method, self.config) else self.config()
