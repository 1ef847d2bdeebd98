"""Calibration: per-layer float64 input statistics from data, and measured layer sensitivities."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "Calibration": "calibrate",
    "LayerStats": "calibrate",
    "measure": "sensitivity",
    "output_drift": "sensitivity",
})
