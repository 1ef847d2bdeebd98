"""Export a torch module to ONNX (torch.export-based exporter, legacy TorchScript exporter as fallback)."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._files import check_target, publish, staging_dir
from ._logs import capture_logs, quiet_logger
from .base import Exporter, ExportResult, Runner
from .deps import require
from .errors import BadInput, ExportError, UnsupportedOp, first_line
from .graph_check import check_follows_torch, check_graph_inputs, check_other_sizes
from .onnx_inspect import inspect_onnx
from .io_spec import ExampleInputs, IOSpec, NamedIOModule, eval_mode, locate_op, prepare

EXTRA = "onnx"
SUFFIX = ".onnx"
DEFAULT_OPSET = 18
MIN_OPSET = 18
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Logs "torchvision is not installed. Skipping torchvision::nms" (and 3 more) on every export.
REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _external_files(path: Path) -> list[Path]:
    """Files next to ``path`` in its folder other than ``path`` itself (external tensor data)."""
    return sorted(p for p in path.parent.iterdir() if p != path and p.is_file())


# ----------------------------------------------------------------------------------------------- export


def _export_dynamo(wrapper: NamedIOModule, spec: IOSpec, out: Path, opset: int, external: bool, optimize: bool, state: dict) -> None:
    args = tuple(spec.inputs.values())
    dims = tuple(
        {axis: torch.export.Dim.AUTO for axis in spec.dynamic_axes[name]} if spec.dynamic_axes.get(name) else None
        for name in spec.input_names
    )
    dynamic_shapes = {"args": dims} if any(d is not None for d in dims) else None
    ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    state["ep"] = ep
    program = torch.onnx.export(
        ep,
        args,
        dynamo=True,
        input_names=spec.input_names,
        output_names=spec.output_names,
        opset_version=opset,
        optimize=optimize,
        verbose=False,
    )
    program.save(str(out), external_data=external)


def _export_legacy(wrapper: NamedIOModule, spec: IOSpec, out: Path, opset: int) -> None:
    torch.onnx.export(
        wrapper,
        tuple(spec.inputs.values()),
        str(out),
        dynamo=False,
        input_names=spec.input_names,
        output_names=spec.output_names,
        opset_version=opset,
        dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()} or None,
    )


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def root_message(exc: BaseException) -> str:
    """First line of the innermost exception in the cause chain, without terminal colour codes."""
    return _ANSI.sub("", first_line(_chain(exc)[-1]))


def unsupported_op(exc: BaseException, ep: Any = None, opset: int = DEFAULT_OPSET) -> UnsupportedOp | None:
    """An :class:`UnsupportedOp` if ``exc`` (from either exporter) says an operator has no ONNX conversion."""
    text = "\n".join(_ANSI.sub("", str(e)) for e in _chain(exc))
    op = node = None
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if m:
        op = m.group(1) if m.group(2) == "default" else f"{m.group(1)}.{m.group(2)}"
        n = re.search(r"translating node %(\w+)", text)
        node = n.group(1) if n else None
    else:
        m = re.search(r"unrecognized namespace ([\w:.]+?)\.?(?:\s|$)", text) or re.search(r"Exporting the operator '([^']+)'", text)
        if m:
            op = m.group(1)
    if op is None:
        return None
    where = locate_op(ep, op, node)
    place = f" in module {where}" if where else ""
    return UnsupportedOp(
        f"operator '{op}'{place} has no ONNX conversion at opset {opset}; "
        "replace that layer, pass a custom translation, or try a newer opset"
    )


def _rename_dynamic_dims(path: Path, spec: IOSpec) -> dict[str, Any]:
    """Give the exporter's symbolic dims (s0, s1...) the axis names of ``spec``; report axes the model fixed."""
    onnx = require("onnx", EXTRA)
    model = onnx.load(str(path), load_external_data=False)
    mapping: dict[str, str] = {}
    fixed: dict[str, dict[int, int]] = {}
    for value in model.graph.input:
        for axis, label in spec.dynamic_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.HasField("dim_param"):
                mapping.setdefault(dim.dim_param, label)
            else:
                fixed.setdefault(value.name, {})[axis] = int(dim.dim_value)
    if mapping:
        pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)) + r")\b")
        for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param"):
                    dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)
        onnx.save(model, str(path))
    return {"fixed_axes": fixed} if fixed else {}


POSITION_KEYS = ("n_positions", "max_position_embeddings")  # where a Hugging Face config keeps its position limit


def model_metadata(model: nn.Module) -> dict[str, str]:
    """Key/value metadata stored in the artifact: for a model with a Hugging Face config, its class
    (``architecture``) and the longest sequence it takes (``max_positions``), which runners of the file read."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    meta = {"architecture": type(model).__name__}
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            meta["max_positions"] = str(value)
            break
    return meta


def _write_metadata(path: Path, meta: Mapping[str, str]) -> None:
    """Add ``meta`` to the ONNX file's ``metadata_props`` (external weights stay where they are)."""
    onnx = require("onnx", EXTRA)
    model = onnx.load(str(path), load_external_data=False)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _fp16_converter() -> Any:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16
    except ImportError:
        pass
    try:
        from onnxconverter_common.float16 import convert_float_to_float16

        return convert_float_to_float16
    except ImportError:
        require("onnxruntime", EXTRA)  # raises MissingDependency naming the extra
        raise


def convert_to_fp16(path: Path, external: bool) -> None:
    """Rewrite the ONNX file at ``path`` with fp16 weights; inputs/outputs stay fp32 (keep_io_types)."""
    onnx = require("onnx", EXTRA)
    convert = _fp16_converter()
    model = onnx.load(str(path))
    model16 = convert(model, keep_io_types=True, disable_shape_infer=external)
    # keep_io_types appends the input Casts at the end of the node list (onnxconverter-common#208): re-sort.
    try:
        from onnxruntime.transformers.onnx_model import OnnxModel

        OnnxModel.graph_topological_sort(model16.graph, is_deterministic=True)
    except ImportError:
        pass
    for stale in _external_files(path):
        stale.unlink()
    save_model(model16, path, external)


def save_model(model: Any, path: Path, external: bool) -> None:
    """Save an ONNX ModelProto, with weights in ``<name>.data`` when ``external``."""
    onnx = require("onnx", EXTRA)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` by path (works for models with external data over 2 GB)."""
    onnx = require("onnx", EXTRA)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the exported model '{path.name}' fails onnx.checker: {first_line(exc)}; report this model") from exc


def _export_graph(
    wrapper: NamedIOModule, spec: IOSpec, staged: Path, opset: int, large: bool, optimize: bool, legacy_fallback: bool
) -> dict[str, Any]:
    """Write ``staged`` with the torch.export-based exporter, or the legacy one if that fails (when allowed)."""
    state: dict[str, Any] = {}
    try:
        _export_dynamo(wrapper, spec, staged, opset, large, optimize, state)
        return {"exporter": "dynamo", "fallback_reason": None, "external_data": large}
    except ExportError:
        raise
    except Exception as dynamo_exc:
        if not legacy_fallback:
            raise unsupported_op(dynamo_exc, state.get("ep"), opset) or ExportError(
                f"ONNX export failed (torch.export-based exporter): {root_message(dynamo_exc)}; "
                "retry with legacy_fallback=True or simplify the model's forward"
            ) from dynamo_exc
        for leftover in staged.parent.iterdir():
            leftover.unlink()
        try:
            _export_legacy(wrapper, spec, staged, opset)
        except Exception as legacy_exc:
            err = unsupported_op(dynamo_exc, state.get("ep"), opset) or unsupported_op(legacy_exc, None, opset)
            raise err or ExportError(
                f"ONNX export failed: torch.export-based exporter: {root_message(dynamo_exc)}; "
                f"legacy exporter: {root_message(legacy_exc)}; simplify the model's forward"
            ) from legacy_exc
        return {
            "exporter": "legacy",
            "fallback_reason": root_message(dynamo_exc),
            "external_data": bool(_external_files(staged)),
        }


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool | Mapping[str, Mapping[int, str]] = True,
    fp16: bool = False,
    int8: bool = False,
    external_data: bool | None = None,
    legacy_fallback: bool = True,
    optimize: bool = True,
) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (atomically) and return the path with export details.

    ``dynamic``: True = batch axis of every input, plus the sequence axis of integer inputs of rank >= 2;
    a mapping ``{input: {axis: name}}`` overrides. ``external_data=None`` stores weights in ``<file>.data``
    only when the model holds over 2 GB. ``fp16`` converts float weights (I/O stays fp32); ``int8`` applies
    dynamic int8 weight quantisation to MatMul/Gemm-like ops.

    A Hugging Face decoder (a forward taking ``use_cache``) is exported with ``use_cache=False``: ``input_ids``
    (+ ``attention_mask``) -> ``logits``, no KV cache. The result is checked with onnxruntime on a second example
    (``info["output_check"]``) and at other sizes along the dynamic axes (``info["dynamic_check"]``: batch + 1,
    sequence - 1, the worst relative L2 error of the outputs). A model with a Hugging Face config stores its class
    and position limit in the file's metadata (``architecture``, ``max_positions``: :func:`model_metadata`).
    """
    require("onnx", EXTRA)
    require("onnxscript", EXTRA)
    if int(opset) < MIN_OPSET:
        raise BadInput(f"opset={opset} is below the supported minimum {MIN_OPSET}; pass opset>={MIN_OPSET}")
    if fp16 and int8:
        raise BadInput("fp16=True and int8=True cannot be combined; choose one")
    target = check_target(path, SUFFIX)
    start = time.perf_counter()
    info: dict[str, Any] = {"format": "onnx", "opset": int(opset), "fp16": bool(fp16), "int8": bool(int8)}
    with (
        eval_mode(model),
        warnings.catch_warnings(record=True) as caught,
        capture_logs("torch.onnx", level=logging.WARNING) as log_lines,
        quiet_logger(REGISTRATION_LOGGER),
        staging_dir(target) as tmp,
    ):
        warnings.simplefilter("always")
        wrapper, spec = prepare(model, example_inputs, dynamic)
        large = model_bytes(model) > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
        info.update(
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
        )
        work = tmp / "work"
        work.mkdir()
        staged = work / target.name
        info.update(_export_graph(wrapper, spec, staged, int(opset), large, optimize, legacy_fallback))
        large = info["external_data"]
        if info["exporter"] == "dynamo":
            info.update(_rename_dynamic_dims(staged, spec))
        meta = model_metadata(model)
        if meta:
            _write_metadata(staged, meta)
            info["metadata"] = meta
        if fp16:
            convert_to_fp16(staged, large)
        check_onnx(staged)
        check_graph_inputs(staged, spec, info)
        info["output_check"] = check_follows_torch(staged, wrapper, spec, info)
        info["dynamic_check"] = check_other_sizes(staged, wrapper, spec, info)
        if int8:
            from .quantize import quantize_int8

            qdir = tmp / "int8"
            qdir.mkdir()
            info["quantization"] = quantize_int8(staged, qdir / target.name, external_data=large).info
            for f in list(work.iterdir()):
                f.unlink()
            for f in qdir.iterdir():
                os.replace(f, work / f.name)
        data_files = _external_files(staged)
        for f in data_files:
            publish(f, target.parent / f.name)
        publish(staged, target)
        stale = target.with_name(target.name + ".data")
        if not data_files and stale.is_file():
            stale.unlink()  # weights of an earlier external-data export of the same name
    info["files"] = [str(target)] + [str(target.parent / f.name) for f in data_files]
    info["bytes"] = sum(Path(f).stat().st_size for f in info["files"])
    info["seconds"] = round(time.perf_counter() - start, 3)
    info["warnings"] = sorted({_ANSI.sub("", first_line(w.message)) for w in caught})[:20]
    info["log"] = log_lines
    return ExportResult(path=target, info=info)


class OnnxExporter(Exporter):
    """``.onnx`` via ``torch.onnx.export(dynamo=True)``; runs with onnxruntime."""

    name = "onnx"
    suffix = SUFFIX
    extra = EXTRA
    runtime = "onnxruntime"
    requires = ("onnx", "onnxscript", "onnxruntime")
    options = ("opset", "dynamic", "fp16", "int8", "external_data", "legacy_fallback", "optimize")

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        self.check_options(options)
        self.ensure_available()
        return export_onnx(model, example_inputs, path, **options)

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        from .ort_runtime import OrtRunner

        return OrtRunner(path, threads=threads, **options)

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return inspect_onnx(path)
