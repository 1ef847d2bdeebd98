"""Edge: example inputs and export through the ``exporters`` registry (artifacts), validation on the runtime
(validate), lrcompress"s drift rules (drift), gates with the report (gates), and sliding-window perplexity of
causal LMs in torch or on ONNX Runtime (perplexity.perplexity, over the model adapters of lm)."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "export_all": "artifacts",
    "example_inputs": "artifacts",
    "ValidationReport": "gates",
    "check_gates": "gates",
    "PerplexityReport": "perplexity",
    "text_tokens": "perplexity",
})
