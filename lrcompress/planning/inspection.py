"""Where is a model compressible? Spectra, break-even ranks and suggested ranks per layer."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..calibration.calibrate import Calibration
from ..config import CompressConfig
from ..methods import registry
from ..scoped import figure
from .make_plan import make_plan
from .targets import factorizable, unsupported_layers


@dataclass
class LayerInfo:
    """One layer: ``rank90``/``rank99`` keep 90/99 % of the (whitened) energy; ``ratio_rank`` is
    what a uniform ``--ratio`` assigns (None = would stay dense)."""

    name: str
    kind: str
    shape: tuple[int, int]
    params: int
    break_even: int
    rank90: int
    rank99: int
    ratio_rank: int | None
    whitened: bool
    note: str = ""


@dataclass
class InspectReport:
    layers: list[LayerInfo]
    ratio: float
    params_model: int
    spectra: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "params_model": self.params_model,
                "layers": [dict(asdict(l), shape=list(l.shape)) for l in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = (f"{'layer':44} {'shape':>12} {'params':>10} {'b-even':>6} {'r@90%':>6} {'r@99%':>6} "
                f"{'r@ratio':>7}  energy")
        lines = [head, "-" * len(head)]
        for l in self.layers:
            rr = "-" if l.ratio_rank is None else str(l.ratio_rank)
            lines.append(f"{l.name[-44:]:44} {'x'.join(map(str, l.shape)):>12} {l.params:>10} {l.break_even:>6} "
                         f"{l.rank90:>6} {l.rank99:>6} {rr:>7}  {'whitened' if l.whitened else 'weight'}"
                         + (f"  {l.note}" if l.note else ""))
        lines.append(f"ratio {self.ratio} (uniform); model params {self.params_model:,}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Normalized spectra (energy share per rank, log scale), one line per layer."""
        fig = figure(figsize=(8, 5))
        ax = fig.subplots()
        for name, s in self.spectra.items():
            ax.semilogy(range(1, len(s) + 1), s, lw=0.8, label=name if len(self.spectra) <= 12 else None)
        ax.set_xlabel("rank")
        ax.set_ylabel("normalized energy sigma_i^2 / sum sigma^2")
        ax.set_title("per-layer spectra" + (" (whitened)" if any(l.whitened for l in self.layers) else ""))
        if len(self.spectra) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        p = Path(path)
        fig.savefig(p, dpi=120)
        return p


def inspect(model: nn.Module, calibration: Calibration | None = None, *, ratio: float = 0.5,
            targets: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> InspectReport:
    """Per-layer break-even, energy ranks and the uniform rank a ``ratio`` gives."""

    method = registry.matrix_method(calibration is not None).config()
    if not targets:  # every factorizable layer, convs included
        targets = tuple(factorizable(model)) + tuple(unsupported_layers(model))  # listed, never skipped
    config = CompressConfig(method=method, ratio=ratio, allocate="uniform", targets=targets, exclude=exclude)
    plan = make_plan(model, config, calibration)
    infos, spectra = [], {}
    for lp in plan.layers:
        spec = plan.spectra.get(lp.name)
        if lp.kind == "conv":
            mod = model.get_submodule(lp.name)
            gram = calibration.layers[lp.name].gram if calibration is not None and lp.name in calibration else None
            takers = [m for m in registry.methods() if m.takes(mod, config)]
            said = next((d for d in (m.describe(mod, gram) for m in takers) if d is not None), "no method takes it")
            if isinstance(said, str):
                infos.append(LayerInfo(lp.name, lp.kind, lp.shape, lp.params_before, lp.break_even, 0, 0, None,
                                       False, said))
                continue
            e90, e99, note = said
            infos.append(LayerInfo(lp.name, lp.kind, lp.shape, lp.params_before, lp.break_even, e90, e99, None,
                                   gram is not None, f"{note}; use --method {' or '.join(m.name for m in takers)}"))
            continue
        if spec is None:
            infos.append(LayerInfo(lp.name, lp.kind, lp.shape, lp.params_before, lp.break_even, 0, 0, None,
                                   False, lp.reason))
            continue
        infos.append(LayerInfo(lp.name, lp.kind, lp.shape, lp.params_before, lp.break_even,
                               spec.rank_for_energy(0.90), spec.rank_for_energy(0.99), lp.rank,
                               not plan.metrics[lp.name].is_identity, lp.reason))
        if spec.total > 0:
            spectra[lp.name] = (spec.s2 / spec.total).tolist()
    return InspectReport(infos, ratio, plan.params_model, spectra)
