"""Edge exporters: turn any ``torch.nn.Module`` into ONNX / ORT / Core ML artifacts and run them.

One registry (``registry``: :func:`get_exporter`, :func:`exporter_for_path`, :func:`register`) holds the export
targets and the transforms (int8); each returns an :class:`ExportResult`. ``chain`` plans and runs a list of
targets in dependency order (ONNX -> int8 -> ORT). :class:`TorchRunner` runs a torch module like any artifact;
``compare`` measures the drift of one runner's outputs from another's.

Heavy optional packages (onnx, onnxruntime, onnxscript, coremltools) are imported only inside functions.
"""

from __future__ import annotations

from .base import Exporter, ExportResult, Runner
from .chain import ExportStep, StepResult, export_targets, plan_exports
from .compare import OutputComparison, compare_outputs, non_finite_examples
from .coreml_export import CoreMLRunner, export_coreml, inspect_mlpackage
from .coreml_wrap import EncoderForCoreML, coreml_view
from .errors import (
    BadInput,
    CorruptArtifact,
    ExportError,
    MissingDependency,
    PredictionUnavailable,
    UnsupportedOp,
)
from .int4 import quantize_int4
from .latency import run_latency
from .onnx_export import export_onnx, inspect_onnx
from .ort_format import convert_onnx_to_ort, inspect_ort, mobile_usability
from .ort_runtime import OrtRunner, ort_runner
from .quantize import quantize_int8
from .registry import (
    available_exporters,
    exporter_for_path,
    exporter_for_runtime,
    exporter_names,
    get_exporter,
    register,
    runtime_names,
    target_names,
    transform_names,
    unregister,
)
from .torch_runner import TorchRunner

__all__ = [
    "BadInput",
    "CoreMLRunner",
    "CorruptArtifact",
    "EncoderForCoreML",
    "ExportError",
    "ExportResult",
    "ExportStep",
    "Exporter",
    "MissingDependency",
    "OrtRunner",
    "OutputComparison",
    "PredictionUnavailable",
    "Runner",
    "StepResult",
    "TorchRunner",
    "UnsupportedOp",
    "available_exporters",
    "compare_outputs",
    "convert_onnx_to_ort",
    "coreml_view",
    "export_coreml",
    "export_onnx",
    "export_targets",
    "exporter_for_path",
    "exporter_for_runtime",
    "exporter_names",
    "get_exporter",
    "inspect_mlpackage",
    "inspect_onnx",
    "inspect_ort",
    "mobile_usability",
    "non_finite_examples",
    "ort_runner",
    "plan_exports",
    "quantize_int4",
    "quantize_int8",
    "register",
    "run_latency",
    "runtime_names",
    "target_names",
    "transform_names",
    "unregister",
]
