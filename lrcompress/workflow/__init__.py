"""Workflow: the one orchestrator (``pipeline.run`` of a ``Job``), recipes (schema generated from the
config dataclasses) and their rules, ``run``, sweeps, and the compression report."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "Job": "pipeline",
    "run": "pipeline",
    "compress": "pipeline",
    "gather": "pipeline",
    "load_recipe": "recipe",
    "run_recipe": "runner",
    "run_sweep": "sweep",
    "CompressionReport": "report",
    "compress_blocks": "blocks",
    "stream_compress": "blocks",
})
