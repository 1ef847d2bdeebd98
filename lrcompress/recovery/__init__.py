"""Recovery: LoRA residual distillation against the original model, folded back into the factors."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "recover": "train",
    "RecoveryConfig": "config",
    "RecoveryReport": "report",
})
