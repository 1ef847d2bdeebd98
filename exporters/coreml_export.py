"""Core ML (.mlpackage, ML Program) export via coremltools, and structure checks that need no macOS."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ._files import check_target, publish, staging_dir
from ._logs import capture_logs
from .base import Exporter, ExportResult, Runner
from .coreml_quant import (
    apply_quantization,
    deployment_target,
    plan_quantization,
    quantization_info,
)
from .coreml_runtime import CoreMLRunner, import_coremltools, inspect_mlpackage  # noqa: F401  (re-exported)
from .coreml_wrap import coreml_view
from .errors import (
    BadInput,
    ExportError,
    UnsupportedOp,
    first_line,
)
from .io_spec import ExampleInputs, eval_mode, locate_op, prepare, second_example, widen_examples

EXTRA = "coreml"
SUFFIX = ".mlpackage"
PRECISIONS = ("fp16", "fp32")
TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
CAPTURES = ("auto", "trace", "export")


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence coremltools' tqdm progress bars for the duration of a conversion."""
    patched: list[tuple[Any, str, Any]] = []
    for module_name, attr in (
        ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),
        ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),
        ("coremltools.optimize.coreml._quantization_passes", "tqdm"),
    ):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            patched.append((module, attr, getattr(module, attr)))
            setattr(module, attr, lambda iterable=None, *a, **k: iterable)
    try:
        yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)


def _input_types(ct: Any, spec: Any, max_batch: int, max_sequence: int, flexible: bool) -> list[Any]:
    types = []
    for name, t in spec.inputs.items():
        if t.is_floating_point():
            dtype = np.float32
        elif t.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            dtype = np.int32
        else:
            raise BadInput(f"input '{name}' has dtype {t.dtype}; Core ML inputs must be float or integer, cast it")
        shape: list[Any] = list(t.shape)
        if flexible:
            for axis, label in spec.dynamic_axes.get(name, {}).items():
                upper = max_sequence if label == "sequence" else max_batch
                if shape[axis] > upper:
                    raise BadInput(f"input '{name}' axis {axis} has size {shape[axis]} > max {upper}; raise max_{label}")
                shape[axis] = ct.RangeDim(lower_bound=1, upper_bound=upper, default=int(t.shape[axis]))
        types.append(ct.TensorType(name=name, shape=ct.Shape(shape=shape), dtype=dtype))
    return types


def _classify(exc: BaseException, ep: Any = None) -> ExportError:
    msg = first_line(exc)
    text = str(exc)
    if isinstance(exc, NotImplementedError) or "not implemented" in text.lower():
        m = re.search(r"op[^']*'([^']+)'", text)
        op = m.group(1) if m else msg
        where = locate_op(ep, op) if m else None
        place = f" in module {where}" if where else ""
        return UnsupportedOp(f"operator '{op}'{place} has no Core ML conversion in coremltools; replace that layer or use ONNX")
    return ExportError(f"Core ML conversion failed: {msg}; try capture='export' or the ONNX exporter")


def export_coreml(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    precision: str = "fp16",
    minimum_target: str = "iOS16",
    flexible: bool = True,
    max_batch: int = 64,
    max_sequence: int = 512,
    capture: str = "auto",
    quantize: str | None = None,
    block_size: int = 32,
    palettize: int | None = None,
) -> ExportResult:
    """Convert ``model`` to an ML Program ``.mlpackage`` at ``path`` (atomically).

    ``precision``: "fp16" (default) or "fp32" compute precision; I/O stays fp32/int32.
    ``flexible``: batch (and sequence, for integer token inputs) become ``ct.RangeDim`` up to ``max_batch`` /
    ``max_sequence``. ``capture``: "trace" (torch.jit.trace), "export" (torch.export) or "auto" (trace, then export).
    ``quantize``: "int8" (symmetric, per output channel; iOS16+) or "int4" (symmetric, per block of ``block_size``
    input channels; iOS18+) weights; ``palettize``: instead, N-bit (2, 4, 6, 8) k-means look-up tables per tensor
    (iOS16+). A ``minimum_target`` below what the format needs is raised (``info["minimum_target_reason"]``);
    ``info["quantization"]`` counts the compression ops and the weights left float.
    """
    ct = import_coremltools()
    if precision not in PRECISIONS:
        raise BadInput(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}; pick one")
    if minimum_target not in TARGETS:
        raise BadInput(f"minimum_target={minimum_target!r} is not one of {', '.join(TARGETS)}; pick one")
    if capture not in CAPTURES:
        raise BadInput(f"capture={capture!r} is not one of {', '.join(CAPTURES)}; pick one")
    plan = plan_quantization(quantize, block_size, palettize)
    minimum_target, target_reason = deployment_target(minimum_target, plan)
    target = check_target(path, SUFFIX)
    start = time.perf_counter()
    info: dict[str, Any] = {"format": "mlpackage", "precision": precision, "minimum_target": minimum_target}
    if target_reason:
        info["minimum_target_reason"] = target_reason
    compute = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
    with eval_mode(model), warnings.catch_warnings(record=True) as caught, staging_dir(target) as tmp:
        warnings.simplefilter("always")
        wrapper, spec = prepare(model, example_inputs, dynamic=flexible, widen=False)
        outputs = [
            ct.TensorType(name=n, dtype=np.float32) if dtype.is_floating_point else ct.TensorType(name=n)
            for n, dtype in zip(spec.output_names, spec.output_dtypes)
        ]
        info.update(input_names=spec.input_names, output_names=spec.output_names,
                    flexible_axes={k: dict(v) for k, v in spec.dynamic_axes.items()} if flexible else {})
        common = {
            "outputs": outputs,
            "convert_to": "mlprogram",
            "compute_precision": compute,
            "minimum_deployment_target": getattr(ct.target, minimum_target),
        }
        errors: list[tuple[str, BaseException]] = []
        state: dict[str, Any] = {}
        mlmodel = None
        for method in (("trace", "export") if capture == "auto" else (capture,)):
            try:
                with _quiet_progress(), capture_logs("coremltools", level=logging.WARNING) as records:
                    if method == "trace":
                        traced = torch.jit.trace(wrapper, tuple(spec.inputs.values()), check_trace=False)
                        mlmodel = ct.convert(traced, inputs=_input_types(ct, spec, max_batch, max_sequence, flexible), **common)
                    else:
                        mlmodel = _convert_exported(ct, wrapper, spec, flexible, max_batch, max_sequence, common, state)
                info["capture"] = method
                info["log"] = records
                break
            except (BadInput, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - any converter failure moves on to the next capture method
                errors.append((method, exc))
        if mlmodel is None:
            raise _classify(errors[0][1], state.get("ep")) from errors[0][1]
        if errors:
            info["fallback_reason"] = f"{errors[0][0]}: {first_line(errors[0][1])}"
        check_program_inputs(mlmodel, spec.input_names, info["capture"])
        check_program_reads_inputs(mlmodel, wrapper, spec.inputs, info["capture"])
        if plan is not None:
            with _quiet_progress(), capture_logs("coremltools", level=logging.WARNING) as records:
                mlmodel = apply_quantization(mlmodel, plan)
            info["quantization"] = quantization_info(plan, mlmodel.get_spec())
            info["quantization"]["log"] = records
        staged = tmp / target.name
        mlmodel.save(str(staged))
        publish(staged, target)
    info["coremltools_version"] = ct.__version__
    info["bytes"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    info["seconds"] = round(time.perf_counter() - start, 3)
    info["warnings"] = sorted({first_line(w.message) for w in caught})[:20]
    return ExportResult(path=target, info=info)


def check_program_inputs(mlmodel: Any, expected: list[str], capture: str) -> None:
    """Raise :class:`ExportError` unless the converted program's inputs are exactly ``expected`` (names and order)."""
    names = [feature.name for feature in mlmodel.get_spec().description.input]
    if names != list(expected):
        has = f"inputs {names}" if names else "0 inputs"
        raise ExportError(
            f"the converted Core ML program has {has} but the model takes {list(expected)} "
            f"(capture '{capture}' lost inputs: the forward leaves torch, e.g. a numpy round trip); "
            "keep the forward in torch ops"
        )


def _outputs_read_inputs(mlmodel: Any) -> bool | None:
    """Whether any output of the converted MIL program depends on a program input (None: cannot tell).

    Conservative: an input reaching an op with nested blocks (cond, loops) counts as read.
    """
    program = getattr(mlmodel, "_mil_program", None)
    if program is None:
        return None
    try:
        for function in program.functions.values():
            outputs = {id(v) for v in function.outputs}
            stack, seen = list(function.inputs.values()), set()
            while stack:
                var = stack.pop()
                if id(var) in outputs:
                    return True
                if id(var) in seen:
                    continue
                seen.add(id(var))
                for op in var.child_ops:
                    if op.blocks or op.enclosing_block is not function:
                        return True
                    stack.extend(op.outputs)
        return False
    except Exception:  # noqa: BLE001 - private coremltools API: when it changes, skip the check
        return None


def check_program_reads_inputs(mlmodel: Any, wrapper: nn.Module, inputs: Mapping[str, torch.Tensor], capture: str) -> None:
    """Raise :class:`ExportError` if no output of the program depends on its inputs while torch's outputs
    change on a second example derived from ``inputs`` (the capture traced the model to a constant)."""
    if _outputs_read_inputs(mlmodel) is not False:
        return
    try:
        with torch.no_grad():
            first = wrapper(*inputs.values())
            second = wrapper(*second_example(inputs).values())
    except Exception:  # noqa: BLE001 - a model that rejects the derived example cannot be compared
        return
    if all(torch.equal(a, b) for a, b in zip(first, second)):
        return
    raise ExportError(
        f"the converted Core ML program ignores its inputs {list(inputs)} but the model's output depends on them "
        f"(capture '{capture}' traced the model to a constant: its forward leaves torch, e.g. a numpy round trip); "
        "keep the forward in torch ops"
    )


def _convert_exported(
    ct: Any, wrapper: nn.Module, spec: Any, flexible: bool, max_batch: int, max_sequence: int, common: dict, state: dict
) -> Any:
    args = tuple(widen_examples(spec.inputs, spec.dynamic_axes).values()) if flexible else tuple(spec.inputs.values())
    dims = None
    if flexible and spec.dynamic_axes:
        made: dict[str, Any] = {}
        dims = {"args": tuple(
            {a: made.setdefault(label, torch.export.Dim(label, min=1, max=max_sequence if label == "sequence" else max_batch))
             for a, label in spec.dynamic_axes.get(n, {}).items()} or None
            for n in spec.input_names
        )}
    state["ep"] = torch.export.export(wrapper, args, dynamic_shapes=dims, strict=False)
    program = state["ep"].run_decompositions({})
    inputs = [ct.TensorType(name=n, dtype=np.float32 if t.is_floating_point() else np.int32) for n, t in spec.inputs.items()]
    return ct.convert(program, inputs=inputs, **common)


class CoreMLExporter(Exporter):
    """``.mlpackage`` (Core ML ML Program) via coremltools; prediction only on macOS."""

    name = "coreml"
    suffix = SUFFIX
    extra = EXTRA
    requires = ("coremltools",)
    options = ("precision", "minimum_target", "flexible", "max_batch", "max_sequence", "capture",
               "quantize", "block_size", "palettize")

    def export_with_info(self, model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Convert ``model`` (a BERT-style encoder through :func:`coreml_view`) with :func:`export_coreml`."""
        self.check_options(options)
        self.ensure_available()
        return export_coreml(*coreml_view(model, example_inputs), path, **options)

    def load(self, path: str | os.PathLike[str], threads: int | None = None, **options: Any) -> Runner:
        """Load an .mlpackage; ``threads`` is accepted for a uniform interface and ignored (Core ML schedules itself)."""
        if options:
            raise BadInput(f"unknown load option(s) {', '.join(sorted(options))} for exporter 'coreml'; valid: threads")
        return CoreMLRunner(path)

    def inspect(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return inspect_mlpackage(path)
