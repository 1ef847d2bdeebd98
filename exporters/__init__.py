"""Edge exporters: turn any ``torch.nn.Module`` into ONNX / ORT / Core ML artifacts and run them.

Heavy optional packages (onnx, onnxruntime, onnxscript, coremltools) are imported only inside functions.
"""

from __future__ import annotations

from .base import Exporter, ExportResult, Runner
from .coreml_export import CoreMLRunner, export_coreml, inspect_mlpackage
from .errors import (
    BadInput,
    CorruptArtifact,
    ExportError,
    MissingDependency,
    PredictionUnavailable,
    UnsupportedOp,
)
from .latency import run_latency
from .onnx_export import export_onnx, inspect_onnx
from .ort_format import convert_onnx_to_ort, inspect_ort, mobile_usability
from .ort_runtime import OrtRunner, ort_runner
from .quantize import quantize_int8
from .registry import (
    available_exporters,
    exporter_for_path,
    exporter_names,
    get_exporter,
    register,
)

__all__ = [
    "BadInput",
    "CoreMLRunner",
    "CorruptArtifact",
    "ExportError",
    "ExportResult",
    "Exporter",
    "MissingDependency",
    "OrtRunner",
    "PredictionUnavailable",
    "Runner",
    "UnsupportedOp",
    "available_exporters",
    "convert_onnx_to_ort",
    "export_coreml",
    "export_onnx",
    "exporter_for_path",
    "exporter_names",
    "get_exporter",
    "inspect_mlpackage",
    "inspect_onnx",
    "inspect_ort",
    "mobile_usability",
    "ort_runner",
    "quantize_int8",
    "register",
    "run_latency",
]
