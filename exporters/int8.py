"""The int8 transform: dynamic int8 weight quantisation of an ONNX file as an exporter of its own, so that it
returns an :class:`ExportResult` like the others and takes its place in a chain (ONNX -> int8 -> ORT)."""

from __future__ import annotations

import os
from typing import Any

from .base import ExportResult
from .onnx_export import export_onnx
from .onnx_transform import OnnxTransform
from .quantize import quantize_int8


class Int8Exporter(OnnxTransform):
    """int8 weights of an ONNX model (``model.int8.onnx``): a transform of the ONNX step's file in a chain, or an
    ONNX export with ``int8=True`` from a torch module; runs with onnxruntime."""

    name = "int8"
    derive_options = ("op_types", "per_channel", "external_data")

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """ONNX export, then int8 quantisation (``info["quantization"]`` holds the quantiser's details)."""
        self.check_options(options)
        self.ensure_available()
        return export_onnx(model, example_inputs, path, int8=True, **options)

    def rewrite(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Quantise the .onnx file ``source`` into ``path`` (see :func:`quantize_int8`)."""
        return quantize_int8(source, path, **options)
