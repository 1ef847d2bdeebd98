"""Cross-layer shared bases: layers of the same role in K consecutive blocks share one output
basis U (m x r); each keeps its own coefficients B_i = U^T W_i.

U minimises the group's total output error sum_i ||(W_i - U U^T W_i) X_i||_F^2 on the
calibration data: it is the top-r eigenbasis of sum_i W_i G_i W_i^T (the whitened layers
concatenated side by side), and the group's minimum error is the tail of that spectrum. The
basis is one module registered under every member, so it is stored and counted once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..decompose import Metric, Spectrum
from ..errors import ConfigError
from .kinds import is_linear, layer_matrix


class SharedBasisLinear(nn.Module):
    """y = basis(coeff(x)) + bias; ``basis`` (Linear(r, out), no bias) is shared by a group."""

    def __init__(self, in_features: int, out_features: int, rank: int, basis: nn.Linear | None = None,
                 bias: bool = True, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.coeff = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.basis = basis if basis is not None else nn.Linear(rank, out_features, bias=False, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.basis(self.coeff(x))
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return self.basis.weight @ self.coeff.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} (shared basis)"


@dataclass
class Group:
    """Layers sharing one basis: names in block order, the rank, the joint spectrum."""

    gid: str
    names: list[str]
    rank: int | None = None
    spectrum: Spectrum | None = None


def role_groups(names: list[str], modules: dict[str, nn.Module], k: int) -> list[Group]:
    """Group Linear layers by role (name with the block index replaced) into runs of ``k``
    consecutive blocks with identical weight shapes. Raises when ``k`` does not fit."""
    roles: dict[str, list[tuple[int, str]]] = {}
    blocks: set[int] = set()
    for n in names:
        parts = n.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None or not is_linear(modules[n]):
            continue
        role = ".".join(parts[:idx] + ["*"] + parts[idx + 1:])
        roles.setdefault(role, []).append((int(parts[idx]), n))
        blocks.add(int(parts[idx]))
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ConfigError(f"--share-group {k!r} must be an integer >= 2 (layers of one role in K consecutive "
                          "blocks share a basis); e.g. --share-group 2")
    if not blocks:
        raise ConfigError("--method shared-svd needs repeated blocks (numbered module names such as "
                          "encoder.layer.0...), and the targeted layers have none; use --method svd-whiten")
    if k > len(blocks):
        raise ConfigError(f"--share-group {k} exceeds the {len(blocks)} blocks the targeted layers span; use "
                          f"--share-group between 2 and {len(blocks)}")
    groups = []
    for role, members in sorted(roles.items()):
        members.sort()
        for start in range(0, len(members), k):
            chunk = [n for _, n in members[start:start + k]]
            shapes = {tuple(layer_matrix(modules[n]).shape) for n in chunk}
            if len(chunk) >= 2 and len(shapes) == 1:
                groups.append(Group(f"{role}[{members[start][0]}:{members[start][0] + len(chunk)}]", chunk))
    return groups


def group_spectrum(weights: list[torch.Tensor], metrics: list[Metric]) -> Spectrum:
    """Top output directions of sum_i W_i G_i W_i^T (float64)."""
    c = sum(m.cov(w.detach().to(torch.float64)) for w, m in zip(weights, metrics))
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
    order = torch.argsort(evals, descending=True, stable=True)
    u = evecs[:, order]
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1])])
    sign[sign == 0] = 1
    return Spectrum(u=u * sign[None, :], s2=evals[order].clamp_min(0), total=float(torch.diagonal(c).sum()))


def group_rank(group: Group, shapes: list[tuple[int, int]], config: Any, frac: float | None) -> int | None:
    """The shared rank from the budget; None when sharing cannot save parameters."""
    m = shapes[0][0]
    total_n = sum(n for _, n in shapes)
    dense = sum(m * n for m, n in shapes)
    if config.rank is not None:
        r = config.matrix_rank
    elif config.energy is not None:
        r = group.spectrum.rank_for_energy(config.energy)
    else:
        r = max(1, math.floor(frac * dense / (m + total_n)))
    r = min(r, m, total_n)
    return r if r * (m + total_n) < dense else None


@torch.no_grad()
def build_group(group: Group, modules: dict[str, nn.Module], metrics: list[Metric]) -> tuple[dict[str, nn.Module], dict[str, float], float]:
    """The shared-basis modules of a group, each layer's relative output error, and the
    group's achieved / optimal error ratio."""
    r = group.rank
    u = group.spectrum.u[:, :r]
    first = modules[group.names[0]]
    dtype = first.weight.dtype
    basis = nn.Linear(r, u.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        basis.weight.copy_(u.to(dtype))
    new, errs, num = {}, {}, 0.0
    for name, metric in zip(group.names, metrics):
        mod = modules[name]
        w = layer_matrix(mod).detach().to(torch.float64)
        layer = SharedBasisLinear(w.shape[1], w.shape[0], r, basis, bias=mod.bias is not None, dtype=dtype)
        with torch.no_grad():
            layer.coeff.weight.copy_((u.T @ w).to(dtype))
            if mod.bias is not None:
                layer.bias.copy_(mod.bias)
        d = w - basis.weight.double() @ layer.coeff.weight.double()
        e2 = metric.sqnorm(d)
        tot = metric.sqnorm(w)
        errs[name] = math.sqrt(e2 / tot) if tot > 0 else 0.0
        num += e2
        new[name] = layer
    spec = group.spectrum
    achieved = math.sqrt(num / spec.total) if spec.total > 0 else 0.0
    optimal = spec.relative_error(r)
    floor = 1e-6
    return new, errs, max(achieved, floor) / max(optimal, floor)


def shared_info(mod: SharedBasisLinear, gid: str) -> dict[str, Any]:
    return {"kind": "shared_linear", "in_features": mod.in_features, "out_features": mod.out_features,
            "rank": mod.rank, "bias": mod.bias is not None, "group": gid,
            "dtype": str(mod.coeff.weight.dtype).replace("torch.", "")}


def build_shared_shell(info: dict[str, Any], bases: dict[str, nn.Linear]) -> SharedBasisLinear:
    """A shell whose basis is the group's (created once per group id)."""
    dtype = getattr(torch, info.get("dtype", "float32"))
    gid = info["group"]
    if gid not in bases:
        bases[gid] = nn.Linear(info["rank"], info["out_features"], bias=False, dtype=dtype)
    return SharedBasisLinear(info["in_features"], info["out_features"], info["rank"], bases[gid],
                             bias=bool(info["bias"]), dtype=dtype)


