"""RecoveryReport: what a recovery run did, as a table, JSON or a plot of the curve."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..scoped import figure


@dataclass
class RecoveryReport:
    """What a recovery run did: evaluation curve, before/after, params, timing."""

    config: dict[str, Any]
    steps: int = 0
    best_step: int = 0
    stopped: str = ""
    adapted_layers: int = 0
    trained_params: int = 0
    params_before: int = 0
    params_after: int = 0
    world_size: int = 1
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    start: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    after_fold: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [f"{'':22} {'eval loss':>10} {'cos mean':>9} {'cos worst':>9}"]
        for label, d in (("before", self.before), ("start (adapters init)", self.start if self.adapted_layers else {}),
                         (f"best (step {self.best_step})", self.best),
                         ("after fold", self.after_fold)):
            if d:
                rows.append(f"{label:22} {d['loss']:10.5f} {d['cos_mean']:9.4f} {d['cos_worst']:9.4f}")
        rows.append(f"steps {self.steps} ({self.stopped}), {self.seconds_per_step:.3f} s/step, "
                    f"{self.adapted_layers} adapters, trained params {self.trained_params:,}, "
                    f"params {self.params_before:,} -> {self.params_after:,}")
        return "\n".join(rows)

    def plot(self, path: str | Path) -> None:
        fig = figure(figsize=(9, 3.5))
        ax = fig.subplots(1, 2)
        tr = [c for c in self.curve if "train_loss" in c]
        ev = [c for c in self.curve if "cos_mean" in c]
        ax[0].plot([c["step"] for c in tr], [c["train_loss"] for c in tr], label="train")
        ax[0].plot([c["step"] for c in ev], [c["loss"] for c in ev], "o-", label="held out")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("distillation loss")
        ax[0].legend()
        ax[1].plot([c["step"] for c in ev], [c["cos_mean"] for c in ev], "o-", label="mean")
        ax[1].plot([c["step"] for c in ev], [c["cos_worst"] for c in ev], "o-", label="worst")
        ax[1].set_xlabel("step")
        ax[1].set_ylabel("held-out cosine vs original")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
