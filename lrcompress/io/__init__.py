"""Loading and saving: SOURCE specs without the network, architectures without weights (with the
trust checks), compressed checkpoints (safetensors + manifest), calibration and evaluation inputs."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "resolve": "sources",
    "Loaded": "sources",
    "save": "checkpoint",
    "load": "checkpoint",
    "read_manifest": "checkpoint",
    "open_data": "data",
    "TextData": "data",
    "TensorData": "data",
    "Batch": "data",
    "POSITIONAL": "data",
})
