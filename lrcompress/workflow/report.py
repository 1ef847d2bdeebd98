"""CompressionReport: per-layer results and totals, as JSON or a terminal table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..methods import registry
from ..methods.apply import LayerResult


@dataclass
class CompressionReport:
    """Everything a compress run did; the CLI only renders it."""

    layers: list[LayerResult]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    output: str = ""
    plan: dict[str, Any] = field(default_factory=dict, repr=False)
    recovery: dict[str, Any] | None = None
    stats: Any = field(default=None, repr=False)  # the Calibration used (not serialised)
    quant: Any = field(default=None, repr=False)  # a --budget bytes plan (its dict is in ``plan``)

    def add_recovery(self, recovery: Any, model: Any) -> None:
        """Record a recovery run (its report) and the recovered model's size."""
        self.recovery = recovery.to_dict()
        self.params_after = sum(p.numel() for p in model.parameters())
        self.bytes_after = param_bytes(model)

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def worst_error_ratio(self) -> float | None:
        """Worst achieved/optimal over layers with a proven optimum (whitened SVD, shared
        bases); None when no such layer was factorized."""
        vals = [l.error_ratio for l in self.layers if l.rank is not None and l.error_metric == "output"
                and registry.get(l.method).proven_optimal and not math.isnan(l.error_ratio)]
        return max(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "config": self.config,
            "calibration": self.calibration,
            "totals": {"params_before": self.params_before, "params_after": self.params_after,
                       "ratio": self.ratio, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                       "factorized_layers": sum(1 for l in self.layers if l.rank is not None),
                       "dense_layers": sum(1 for l in self.layers if l.rank is None),
                       "worst_error_ratio": self.worst_error_ratio},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "layers": [l.to_dict() for l in self.layers],
            **({"recovery": self.recovery} if self.recovery is not None else {}),
            **({"bytes": self.quant.to_dict()} if self.quant is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_finite)

    def table(self) -> str:
        if self.quant is not None:
            return self.quant.table() + (("\ntime " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
                                         if self.seconds else "")
        head = f"{'layer':44} {'shape':>12} {'method':>10} {'rank':>5} {'params':>17} {'rel.err':>8} {'optimal':>8} {'ratio':>6}"
        lines = [head, "-" * len(head)]
        for l in self.layers:
            shape = "x".join(map(str, l.shape))
            params = f"{l.params_before}->{l.params_after}"
            if l.rank is None:
                lines.append(f"{l.name[-44:]:44} {shape:>12} {'dense':>10} {'-':>5} {params:>17}  {l.reason}")
            else:
                opt = "-" if math.isnan(l.optimal_error) else f"{l.optimal_error:8.4f}"
                ratio = "-" if math.isnan(l.error_ratio) else f"{l.error_ratio:6.3f}"
                rank = (l.choice.label() if l.choice is not None else "") or l.rank
                lines.append(f"{l.name[-44:]:44} {shape:>12} {l.method:>10} {str(rank):>5} {params:>17} "
                             f"{l.relative_error:8.4f} {opt:>8} {ratio:>6}"
                             + ("" if l.error_metric == "output" else " (weight)")
                             + (f"  {l.reason}" if l.reason else ""))
        lines.append("-" * len(head))
        lines.append(f"params {self.params_before:,} -> {self.params_after:,} ({self.ratio:.1%}); "
                     f"bytes {self.bytes_before:,} -> {self.bytes_after:,}; worst achieved/optimal "
                     + ("-" if self.worst_error_ratio is None else f"{self.worst_error_ratio:.4f}"))
        if self.seconds:
            lines.append("time " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def param_bytes(model: Any) -> int:
    """Bytes of the model's (unique) parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)
