"""lrcompress: post-training low-rank compression for PyTorch models.

The names below load on first use: ``import lrcompress`` imports nothing heavy."""

from __future__ import annotations

from .faces import lazy_face

__version__ = "0.1.0"

__getattr__, __all__ = lazy_face(__name__, {
    "Calibration": "calibration.calibrate",
    "calibrate": "calibration.calibrate",
    "load": "io.checkpoint",
    "save": "io.checkpoint",
    "CompressConfig": "config",
    "RecoveryConfig": "config",
    "SVDConfig": "config",
    "WhitenedSVDConfig": "config",
    "method_config": "config",
    "TensorData": "io.data",
    "TextData": "io.data",
    "open_data": "io.data",
    "LrcompressError": "errors",
    "inspect": "planning.inspection",
    "compress": "workflow.pipeline",
    "compress_": "workflow.pipeline",
    "gather": "workflow.pipeline",
    "plan": "workflow.pipeline",
    "recover": "recovery.train",
    "RecoveryReport": "recovery.report",
    "CompressionReport": "workflow.report",
    "resolve": "io.sources",
    "perplexity": "edge.perplexity",
})
