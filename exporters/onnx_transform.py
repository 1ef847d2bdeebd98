"""The shared shape of the ONNX weight transforms (int8, int4): each rewrites the ONNX step's file into
``<stem>.<name>.onnx`` in a chain (ONNX -> transform -> ORT), or exports a torch module first, and runs
with onnxruntime."""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

from ._files import check_target, staging_dir
from .base import Exporter, ExportResult, Runner
from .onnx_export import export_onnx, inspect_onnx
from .ort_runtime import OrtRunner
from .quantize import EXTRA


class OnnxTransform(Exporter):
    """Subclasses set ``name`` and ``derive_options`` and implement :meth:`rewrite`."""

    suffix = ".onnx"
    extra = EXTRA
    runtime = "onnxruntime"
    derives_from = "onnx"
    transform = True
    requires = ("onnx", "onnxscript", "onnxruntime")
    options = ("opset", "dynamic", "external_data", "legacy_fallback", "optimize")

    @abstractmethod
    def rewrite(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Write the transformed copy of the .onnx file ``source`` to ``path``."""

    def file_name(self, stem: str = "model") -> str:
        """``<stem>.<name>.onnx``."""
        return f"{stem}.{self.name}{self.suffix}"

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """ONNX export into a staging folder next to ``path``, then the rewrite into ``path``."""
        self.check_options(options)
        self.ensure_available()
        target = Path(path)
        with staging_dir(check_target(target, self.suffix)) as tmp:
            plain = export_onnx(model, example_inputs, tmp / "plain.onnx", **options)
            return self.rewrite(plain.path, target)

    def derive(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Rewrite the .onnx file ``source`` into ``path`` (``derive_options`` only)."""
        self.check_options(options, self.derive_options)
        self.ensure_available()
        return self.rewrite(source, path, **options)

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        return OrtRunner(path, threads=threads, **options)

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return inspect_onnx(path)
