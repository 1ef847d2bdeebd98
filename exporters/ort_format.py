"""ORT mobile format (.ort) conversion and the ORT-mobile usability report."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ._files import check_target, publish, require_file, staging_dir
from ._logs import capture_logs
from .base import Exporter, ExportResult, Runner
from .deps import require
from .errors import BadInput, CorruptArtifact, ExportError, first_line, onnx_failure

EXTRA = "onnx"
SUFFIX = ".ort"
STYLES = ("Fixed", "Runtime")


def convert_onnx_to_ort(
    onnx_path: str | os.PathLike[str],
    ort_path: str | os.PathLike[str],
    *,
    optimization_style: str = "Fixed",
    target_platform: str | None = None,
) -> dict[str, Any]:
    """Convert an .onnx file to .ort with onnxruntime's converter, atomically; return converter details.

    ``optimization_style``: "Fixed" (optimisations baked in for this ORT version) or "Runtime".
    ``target_platform``: None, "arm" or "amd64" (as in ``python -m onnxruntime.tools.convert_onnx_models_to_ort``).
    """
    require("onnx", EXTRA)
    tool = require("onnxruntime.tools.convert_onnx_models_to_ort", EXTRA)
    if optimization_style not in STYLES:
        raise BadInput(f"optimization_style={optimization_style!r} is not one of {', '.join(STYLES)}; pick one")
    if target_platform not in (None, "arm", "amd64"):
        raise BadInput(f"target_platform={target_platform!r} must be None, 'arm' or 'amd64'")
    src = require_file(onnx_path, "ONNX file")
    if src.is_dir() or src.suffix.lower() != ".onnx":
        raise BadInput(f"'{src}' must be an .onnx file; export one first")
    target = check_target(ort_path, SUFFIX)
    _reject_external_data(src)
    start = time.perf_counter()
    log = io.StringIO()
    with staging_dir(target) as tmp:
        model_dir = tmp / "in"
        out_dir = tmp / "out"
        model_dir.mkdir()
        staged_onnx = model_dir / "model.onnx"
        try:
            os.link(src, staged_onnx)  # no copy when on the same filesystem
        except OSError:
            shutil.copyfile(src, staged_onnx)
        try:
            with contextlib.redirect_stdout(log), capture_logs("ort_format_model", "ort_format_model.utils") as records:
                tool.convert_onnx_models_to_ort(
                    staged_onnx,
                    output_dir=out_dir,
                    optimization_styles=[tool.OptimizationStyle[optimization_style]],
                    target_platform=target_platform,
                )
        except Exception as exc:
            raise onnx_failure(exc, src, f"ORT-format conversion of '{src.name}'",
                               "check the model with onnxruntime first") from exc
        produced = sorted(out_dir.glob("*.ort"))
        if not produced:
            raise ExportError(f"the ORT converter wrote no .ort file for '{src.name}'; its log: {log.getvalue().strip()[-300:]}")
        configs = sorted(out_dir.glob("*.config"))
        required_ops = configs[0].read_text() if configs else ""
        publish(produced[0], target)
    return {
        "format": "ort",
        "optimization_style": optimization_style,
        "target_platform": target_platform,
        "required_operators": required_ops,
        "log": log.getvalue() + "".join(line + "\n" for line in records),
        "bytes": target.stat().st_size,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _reject_external_data(src: Path) -> None:
    onnx = require("onnx", EXTRA)
    try:
        model = onnx.load(str(src), load_external_data=False)
    except Exception as exc:
        raise CorruptArtifact(f"'{src}' is not a valid ONNX model ({type(exc).__name__}: {first_line(exc)}); re-export it") from exc
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer):
        raise BadInput(f"'{src.name}' keeps weights in external data; the ORT format holds at most 2 GB in one file, use .onnx")


def _partition_summary(info: Any) -> dict[str, Any]:
    return {
        "nodes": int(info.num_nodes),
        "supported_nodes": int(info.num_supported_nodes),
        "partitions": int(info.num_partitions),
        "unsupported_ops": sorted(info.unsupported_ops),
        "nodes_unsupported_due_to_dynamic_shape": int(info.nodes_unsupported_due_to_dynamic_input),
        "suitability": info.suitability().name,
    }


def mobile_usability(onnx_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Summarise ``onnxruntime.tools.check_onnx_model_mobile_usability`` for an .onnx file.

    Returns ``try_nnapi_or_coreml`` (whether NNAPI/CoreML EPs may help), per-EP partition summaries as the
    model is and with fixed input shapes (``suitability`` is NO/MAYBE/YES), and the checker's captured log.
    """
    require("onnx", EXTRA)
    checker = require("onnxruntime.tools.mobile_helpers.usability_checker", EXTRA)
    model_utils = require("onnxruntime.tools.onnx_model_utils", EXTRA)
    src = require_file(onnx_path, "ONNX file")
    logger = logging.getLogger("exporters.mobile_usability")
    eps = {
        "NNAPI": checker.check_nnapi_partitions,
        "CoreML NeuralNetwork": lambda m, fixed: checker.check_coreml_partitions(m, fixed, "coreml_supported_neuralnetwork_ops.md"),
        "CoreML MLProgram": lambda m, fixed: checker.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md"),
    }
    with capture_logs("exporters.mobile_usability") as lines, tempfile.TemporaryDirectory(prefix="lrc-mobile-") as tmpdir:
        optimized = Path(tmpdir) / "model.onnx"
        try:
            model_utils.optimize_model(src, optimized, use_external_initializers=True)
        except Exception as exc:
            raise CorruptArtifact(f"'{src}' is not a loadable ONNX model ({type(exc).__name__}: {first_line(exc)}); re-export it") from exc
        try_eps = bool(checker.checker(optimized.resolve(strict=True), logger))
        shaped = model_utils.ModelProtoWithShapeInfo(optimized.resolve()).model_with_shape_info
        dynamic_inputs, _ = checker.check_shapes(shaped.graph)
        summary = {}
        for name, fn in eps.items():
            entry = _partition_summary(fn(shaped, True))
            if dynamic_inputs:
                entry["if_fixed_shapes"] = _partition_summary(fn(shaped, False))
            summary[name] = entry
    return {
        "try_nnapi_or_coreml": try_eps,
        "dynamic_inputs": [i.name for i in dynamic_inputs],
        "execution_providers": summary,
        "log": "\n".join(line.split(": ", 1)[-1] for line in lines),
    }


def inspect_ort(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an .ort file in onnxruntime (raising :class:`CorruptArtifact` if it is broken) and list its I/O."""
    from .ort_runtime import OrtRunner

    p = require_file(path, "ORT file")
    runner = OrtRunner(p, threads=1)
    session = runner.session
    return {
        "format": "ort",
        "path": str(p),
        "inputs": [{"name": i.name, "dtype": i.type, "shape": list(i.shape)} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "dtype": o.type, "shape": list(o.shape)} for o in session.get_outputs()],
        "bytes": p.stat().st_size,
    }


class OrtFormatExporter(Exporter):
    """``.ort`` (ONNX Runtime mobile format): ONNX export, then onnxruntime's ORT-format converter; in a chain it
    converts the ONNX step's file (the int8 one when quantizing)."""

    name = "ort"
    suffix = SUFFIX
    extra = EXTRA
    runtime = "onnxruntime"
    derives_from = "onnx"
    requires = ("onnx", "onnxscript", "onnxruntime")
    options = (
        "opset", "dynamic", "fp16", "int8", "legacy_fallback", "optimize",
        "optimization_style", "target_platform", "check_mobile",
    )
    derive_options = ("optimization_style", "target_platform", "check_mobile")

    def derive(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Convert the .onnx file ``source`` to .ort at ``path``; ``info`` adds ``from`` (the source's file name)
        and, unless ``check_mobile=False``, the ORT-mobile usability report."""
        self.check_options(options, self.derive_options)
        self.ensure_available()
        check_mobile = options.pop("check_mobile", True)
        src = Path(source)
        mobile = mobile_usability(src) if check_mobile else None
        info = convert_onnx_to_ort(src, path, optimization_style=options.get("optimization_style", "Fixed"),
                                   target_platform=options.get("target_platform"))
        info["from"] = src.name
        if mobile is not None:
            info["mobile_usability"] = mobile
        return ExportResult(path=Path(path), info=info)

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        from .onnx_export import export_onnx

        self.check_options(options)
        self.ensure_available()
        style = options.pop("optimization_style", "Fixed")
        platform = options.pop("target_platform", None)
        check_mobile = options.pop("check_mobile", True)
        target = check_target(path, SUFFIX)
        with staging_dir(target) as tmp:
            onnx_result = export_onnx(model, example_inputs, tmp / "model.onnx", external_data=False, **options)
            info = dict(onnx_result.info)
            info["onnx_bytes"] = info.pop("bytes")
            info.pop("files", None)
            if check_mobile:
                info["mobile_usability"] = mobile_usability(onnx_result.path)
            info.update(convert_onnx_to_ort(onnx_result.path, target, optimization_style=style, target_platform=platform))
        return ExportResult(path=target, info=info)

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        from .ort_runtime import OrtRunner

        return OrtRunner(path, threads=threads, **options)

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return inspect_ort(path)
