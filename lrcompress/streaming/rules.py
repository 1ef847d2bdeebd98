"""What a block-by-block run may do and the plan pieces it works with: when closed loop
applies, what streaming refuses, and the parts of a plan one unit (or the allocator) reads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import CompressConfig
from ..decompose import Spectrum
from ..errors import ConfigError
from ..io.data import TensorData, TextData
from ..methods import registry
from ..methods.base import Method
from ..planning.plan_types import Plan
from .units import find_blocks


def closed_applies(model: nn.Module, config: CompressConfig, data: Any) -> bool:
    """Whether a run fits layers in closed loop: always for ``closed`` (which refuses what it
    cannot do), for ``auto`` where it applies (data as text or tensors, a whitened method that
    plans layer by layer, no latency budget, a block list found), never for ``open``."""
    if config.calibration != "auto":
        return config.calibration == "closed"
    method = registry.for_config(config.method)
    if (not isinstance(data, (TextData, TensorData)) or not (method.whitened and method.spectral) or method.grouped
            or config.latency):
        return False
    if type(method).choose is not Method.choose:  # a chooser (auto) compares methods per layer
        return False
    try:
        find_blocks(model, config.blocks)
    except ConfigError:
        if config.blocks is not None:
            raise
        return False
    return True


def check_streamable(config: CompressConfig) -> None:
    method = registry.for_config(config.method)
    if method.grouped:
        raise ConfigError(f"--method {method.name} shares bases across blocks, which block-by-block compression "
                          "cannot see at once; use --calibration open without --stream, or another --method")
    if config.latency is not None:
        raise ConfigError("--budget latency measures the whole model, which block-by-block compression never "
                          "holds; use --ratio, --rank or --energy")
    if config.calibration == "closed" and not (method.whitened and method.spectral):
        raise ConfigError(f"--calibration closed refits the two-factor layers of whitened SVD, which --method "
                          f"{method.name} does not build; use --method svd-whiten or --calibration open")


def lite_spectrum(spec: Spectrum) -> Spectrum:
    """What the allocator reads of a spectrum (its energies), without the directions."""
    return Spectrum(u=torch.empty(0, 0, dtype=torch.float64), s2=spec.s2.clone(), total=spec.total, exact=spec.exact)


def override_ranks(plan: Plan, ranks: dict[str, int | None]) -> None:
    """Replace matrix layers' ranks by the global allocation's."""
    for lp in plan.layers:
        if lp.name not in ranks or lp.name not in plan.spectra:
            continue
        r = ranks[lp.name]
        if r is None or r >= lp.break_even:
            lp.rank, lp.params_after = None, lp.params_before
            lp.add_reason(f"rank {r} >= break-even {lp.break_even}: kept dense" if r is not None
                          else "denser than break-even: kept dense")
        else:
            m, n = lp.shape if lp.kind == "linear" else (lp.shape[1], lp.shape[0])
            lp.rank, lp.params_after = r, r * (m + n)
            lp.predicted_error = plan.spectra[lp.name].relative_error(r)


def subplan(plan: Plan, names: set[str]) -> Plan:
    """The part of a whole model's plan that covers ``names``."""
    pick = lambda d: {k: v for k, v in d.items() if k in names}  # noqa: E731
    return Plan([lp for lp in plan.layers if lp.name in names], plan.params_model, plan.config,
                spectra=pick(plan.spectra), metrics=pick(plan.metrics), eval_spectra=pick(plan.eval_spectra),
                eval_metrics=pick(plan.eval_metrics), grams=pick(plan.grams), groups=plan.groups, probe=plan.probe)
