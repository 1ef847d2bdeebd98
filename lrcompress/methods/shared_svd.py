"""Method ``shared-svd``: cross-layer shared bases. Linear layers of the same role in
``share_group`` consecutive blocks share one whitened output basis (``SharedBasisLinear``,
the basis stored and counted once); each keeps its own coefficients. The group's error is the
tail of its joint spectrum, so achieved/optimal stays provable."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import ConfigError
from .base import Choice, Factorized, Method
from .kinds import layer_matrix
from .shared import (
    SharedBasisLinear,
    build_group,
    build_shared_shell,
    group_rank,
    group_spectrum,
    role_groups,
    shared_info,
)
from .svd_whiten import WhitenedSVDConfig

if TYPE_CHECKING:
    from ..config import CompressConfig
    from ..planning.plan_types import LayerPlan, Plan

NAME = "shared-svd"


@dataclass(frozen=True)
class SharedBasisConfig(WhitenedSVDConfig):
    """Cross-layer shared bases: Linear layers of the same role in ``share_group`` consecutive
    blocks share one whitened output basis; each keeps its own coefficients."""

    share_group: int = 2
    name: str = field(default=NAME, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.share_group, bool) or not isinstance(self.share_group, int) or self.share_group < 2:
            raise ConfigError(f"--share-group {self.share_group!r} must be an integer >= 2; e.g. --share-group 2")


@dataclass(frozen=True)
class SharedChoice(Choice):
    """The group (its id) whose basis this layer shares; ``owner``: the basis is counted here."""

    group: str
    owner: bool

    def label(self) -> str:
        return ""


class SharedSVDMethod(Method):
    name = NAME
    config = SharedBasisConfig
    summary = "cross-layer shared whitened bases (--share-group K blocks)"
    modules = (SharedBasisLinear,)
    entry_kinds = ("shared_linear",)
    spectral = True
    proven_optimal = True
    whitened = True
    grouped = True

    def plan_groups(self, plan: "Plan", active: list["LayerPlan"], modules: dict[str, nn.Module],
                    config: "CompressConfig", frac: float | None) -> list["LayerPlan"]:
        """Group same-role layers of K consecutive blocks; plan each group's shared rank."""
        calibrated = [l.name for l in active if l.kind == "linear"]  # identity metric when uncalibrated
        groups = role_groups(calibrated, modules, self.sub_config(config).share_group)
        by_name = {l.name: l for l in active}
        out = []
        for g in groups:
            lps = [by_name[n] for n in g.names]
            g.spectrum = group_spectrum([layer_matrix(modules[n]) for n in g.names], [plan.metrics[n] for n in g.names])
            g.rank = group_rank(g, [lp.shape for lp in lps], config, frac)
            for i, lp in enumerate(lps):
                lp.method = self.name
                if g.rank is None:
                    lp.reason = f"sharing a basis across {g.gid} saves nothing at this budget: kept dense"
                    continue
                m, n = lp.shape
                lp.rank, lp.choice = g.rank, SharedChoice(g.gid, i == 0)
                lp.params_after = g.rank * n + (m * g.rank if i == 0 else 0)
                lp.predicted_error = g.spectrum.relative_error(g.rank)
                lp.reason = f"basis shared by {len(lps)} layers ({g.gid})" + ("; basis counted here" if i == 0 else "")
            plan.groups[g.gid] = {"group": g}
            out.extend(lps)
        return out

    def factorize(self, model: nn.Module, lp: "LayerPlan", plan: "Plan") -> Factorized:
        """The group is built on its first member (all members swapped in at once); every
        member reports its own output error and the group's achieved/optimal ratio."""
        state = plan.groups[lp.choice.group]
        swap: dict[str, nn.Module] = {}
        if "errors" not in state:
            group = state["group"]
            dense = {n: model.get_submodule(n) for n in group.names}
            new, errs, ratio = build_group(group, dense, [plan.metrics[n] for n in group.names])
            for n, m in new.items():
                m.train(dense[n].training)
            swap, state["errors"], state["ratio"] = new, errs, ratio
        return Factorized(swap, state["errors"][lp.name], math.nan, state["ratio"], "output")

    def entry(self, mod: nn.Module, groups: dict[int, str]) -> dict[str, Any]:
        gid = groups.setdefault(id(mod.basis), f"g{len(groups)}")
        return shared_info(mod, gid)

    def shell(self, info: dict[str, Any], shared: dict[str, nn.Module]) -> nn.Module:
        return build_shared_shell(info, shared)


METHOD = SharedSVDMethod()
