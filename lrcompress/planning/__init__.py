"""Planning: which layers, at which rank or choice, under which budget (parameters, energy, latency);
uniform and global allocation, the hull greedy, the ONNX Runtime latency model. Touches no weight."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "Plan": "plan_types",
    "LayerPlan": "plan_types",
    "plan_table": "plan_types",
    "break_even_rank": "plan_types",
    "select_targets": "targets",
    "inspect": "inspection",
    "hull_greedy": "hull",
})
