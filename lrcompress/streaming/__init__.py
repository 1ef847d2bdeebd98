"""Block-sequential compression: one block at a time, open or closed loop, streamed from a
checkpoint's safetensors shards to a sharded output when the model does not fit in memory."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "ActivationStore": "store",
    "Engine": "engine",
    "LazyCheckpoint": "weights",
    "StreamResult": "record",
    "find_blocks": "units",
    "parse_size": "memory",
})
