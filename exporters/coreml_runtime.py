"""Reading a Core ML package without converting anything: its structure (inputs, outputs, MIL op counts,
compression ops, bytes) and a runner that predicts on macOS and says why it cannot elsewhere."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._files import require_file
from ._logs import quiet_logger
from .coreml_quant import compression_summary, walk_ops
from .deps import require
from .errors import BadInput, CorruptArtifact, PredictionUnavailable, first_line

EXTRA = "coreml"


def import_coremltools() -> Any:
    """Import coremltools with its Linux-only 'Failed to load ...' start-up warnings silenced."""
    with quiet_logger("coremltools"):
        return require("coremltools", EXTRA)


def _feature(ct: Any, feature: Any) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    entry: dict[str, Any] = {"name": feature.name, "type": kind}
    if kind == "multiArrayType":
        arr = feature.type.multiArrayType
        names = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
        entry["dtype"] = names.Name(arr.dataType).lower() if arr.dataType in names.values() else str(arr.dataType)
        entry["shape"] = [int(s) for s in arr.shape]
        ranges = arr.shapeRange.sizeRanges
        if ranges:
            entry["shape_range"] = [(int(r.lowerBound), int(r.upperBound)) for r in ranges]
    return entry


def inspect_mlpackage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an .mlpackage without predicting: spec loads, I/O names/shapes, MIL op counts, weight bytes.

    Raises :class:`CorruptArtifact` if the package or its spec is unreadable.
    """
    ct = import_coremltools()
    p = require_file(path, "Core ML package")
    manifest = p / "Manifest.json"
    if not p.is_dir() or not manifest.is_file():
        raise CorruptArtifact(f"'{p}' is not an .mlpackage folder (no Manifest.json); re-export it")
    try:
        json.loads(manifest.read_text())
        spec = ct.models.MLModel(str(p), skip_model_load=True).get_spec()
    except Exception as exc:
        raise CorruptArtifact(f"'{p}' has an unreadable Core ML spec ({type(exc).__name__}: {first_line(exc)}); re-export it") from exc
    kind = spec.WhichOneof("Type")
    counts: Counter = Counter()
    opset = None
    if kind == "mlProgram":
        for function in spec.mlProgram.functions.values():
            opset = function.opset
            block = function.block_specializations.get(function.opset)
            if block is not None:
                walk_ops(block, lambda op: counts.update([op.type]))
    if not spec.description.input or not spec.description.output:
        raise CorruptArtifact(f"'{p}' declares no inputs or outputs; re-export it")
    weights = p / "Data" / "com.apple.CoreML" / "weights"
    weight_bytes = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
    return {
        "format": "mlpackage",
        "path": str(p),
        "model_type": kind,
        "spec_version": int(spec.specificationVersion),
        "mil_opset": opset,
        "inputs": [_feature(ct, f) for f in spec.description.input],
        "outputs": [_feature(ct, f) for f in spec.description.output],
        "ops": dict(counts),
        "op_count": sum(counts.values()),
        "compression": compression_summary(spec),
        "weight_bytes": weight_bytes,
        "bytes": sum(f.stat().st_size for f in p.rglob("*") if f.is_file()),
    }


def _prediction_blocker() -> str | None:
    if sys.platform != "darwin":
        return f"Core ML prediction needs macOS 13+, this is {sys.platform}; use inspect_mlpackage() to check structure"
    try:
        from coremltools.libcoremlpython import _MLModelProxy  # noqa: F401
    except ImportError as exc:
        return f"coremltools has no native Core ML bindings here ({exc}); reinstall coremltools on macOS"
    return None


class CoreMLRunner:
    """Runner for an .mlpackage; ``available_for_prediction`` is False off macOS and calls raise
    (``unavailable_reason`` says why in full, ``unavailable_summary`` in a few words for a report)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.info = inspect_mlpackage(self.path)
        self.input_names = [i["name"] for i in self.info["inputs"]]
        self.output_names = [o["name"] for o in self.info["outputs"]]
        self.unavailable_reason = _prediction_blocker()
        self.available_for_prediction = self.unavailable_reason is None
        self.unavailable_summary = None if self.available_for_prediction else "Core ML prediction needs macOS"
        self._model = None

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.available_for_prediction:
            raise PredictionUnavailable(self.unavailable_reason)
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise BadInput(f"missing Core ML inputs {missing}; the model expects {self.input_names}")
        if self._model is None:
            ct = import_coremltools()
            self._model = ct.models.MLModel(str(self.path))
        feed = {}
        for item in self.info["inputs"]:
            arr = np.asarray(inputs[item["name"]])
            feed[item["name"]] = arr.astype(np.int32) if item.get("dtype") == "int32" else arr.astype(np.float32)
        out = self._model.predict(feed)
        return {n: np.asarray(out[n]) for n in self.output_names}

    run = __call__
