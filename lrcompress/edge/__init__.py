"""Edge: example inputs and export through the ``exporters`` registry (artifacts), validation on the runtime
(validate), lrcompress"s drift rules (drift) and gates with the report (gates)."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "export_all": "artifacts",
    "example_inputs": "artifacts",
    "ValidationReport": "gates",
    "check_gates": "gates",
})
