"""After an ONNX export: the graph must take the example's inputs, follow torch on a second, different example
(a graph traced to constants, e.g. by a numpy round trip, is an error) and, where it has dynamic axes, follow
torch at other sizes along them (a graph that baked the example's batch or sequence length is an error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .deps import require
from .errors import ExportError, first_line
from .io_spec import IOSpec, NamedIOModule, resized_example, second_example

EXTRA = "onnx"
# ORT may differ from torch by this much (relative L2 error of an output) before the export counts as broken:
# loose enough for fp16 weights, far below what a graph with example-dependent constants gives.
FOLLOW_TOLERANCE = 0.1


def _exporter_phrase(info: Mapping[str, Any]) -> tuple[str, str]:
    """Who wrote the graph and, for the legacy exporter, why it was used (for error messages)."""
    if info.get("exporter") != "legacy":
        return "the exporter", ""
    reason = str(info.get("fallback_reason") or "").rstrip(". ")
    return "the legacy exporter", f"; it ran because the torch.export-based exporter failed with '{reason}'"


FIX = "keep the forward in torch ops (no numpy round trip, .item() or .tolist() on tensors)"


def check_graph_inputs(path: Path, spec: IOSpec, info: Mapping[str, Any]) -> None:
    """Raise :class:`ExportError` unless the graph's inputs are the example inputs: same names, order and ranks."""
    onnx = require("onnx", EXTRA)
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    values = [v for v in graph.input if v.name not in weights]
    names = [v.name for v in values]
    who, why = _exporter_phrase(info)
    if names != spec.input_names:
        if names:
            has, cause = f"inputs {names}", "lost or renamed inputs: the forward does not use them through torch ops"
        else:
            has, cause = "0 inputs", "traced the model to a constant: its forward leaves torch, e.g. a numpy round trip"
        raise ExportError(f"the exported graph has {has} but the model takes {spec.input_names} ({who} {cause}{why}); {FIX}")
    for value in values:
        tt = value.type.tensor_type
        want = spec.inputs[value.name].dim()
        if tt.HasField("shape") and len(tt.shape.dim) != want:
            raise ExportError(
                f"exported graph input '{value.name}' has rank {len(tt.shape.dim)} but the example input has rank "
                f"{want} (written by {who}{why}); {FIX}"
            )


def _numpy(t: torch.Tensor) -> Any:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _relative_error(got: Any, want: Any) -> float:

    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf")
    keep = np.isfinite(want)
    if not keep.any():
        return 0.0
    diff = np.where(keep, got - want, 0.0)
    if not np.isfinite(diff).all():
        return float("inf")
    return float(np.linalg.norm(diff) / max(np.linalg.norm(np.where(keep, want, 0.0)), 1e-12))


def check_follows_torch(path: Path, wrapper: NamedIOModule, spec: IOSpec, info: Mapping[str, Any]) -> str:
    """Run torch and onnxruntime on the example and on a second one derived from it; raise
    :class:`ExportError` if ORT's outputs stay the same while torch's change, or do not follow torch.

    Returns "passed", or "skipped (reason)" when onnxruntime is missing or cannot run the file.
    """

    try:
        from .ort_runtime import OrtRunner

        runner = OrtRunner(path, threads=1)
    except ImportError:
        return "skipped (onnxruntime is not installed)"
    except ExportError as exc:
        return f"skipped (onnxruntime cannot load the file: {first_line(exc)})"
    first = spec.inputs
    second = second_example(first)
    torch_out = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for example in (first, second):
                torch.manual_seed(0)
                torch_out.append([_numpy(t) for t in wrapper(*example.values())])
    except Exception as exc:  # noqa: BLE001 - a model that rejects the derived example cannot be compared
        return f"skipped (the model rejects the second example: {first_line(exc)})"
    ort_out = []
    try:
        for example in (first, second):
            got = runner({k: _numpy(v) for k, v in example.items()})
            ort_out.append([got[n] for n in runner.output_names])
    except Exception as exc:  # noqa: BLE001 - ORT's own failures are reported where the file is run
        return f"skipped (onnxruntime cannot run the file: {first_line(exc)})"
    names = runner.output_names
    torch_moves = [not np.array_equal(a, b, equal_nan=True) for a, b in zip(*torch_out)]
    ort_moves = [not np.array_equal(a, b, equal_nan=True) for a, b in zip(*ort_out)]
    who, why = _exporter_phrase(info)
    if any(torch_moves) and not any(ort_moves):
        name = names[torch_moves.index(True)] if len(names) == len(torch_moves) else "output"
        raise ExportError(
            f"the exported graph ignores its inputs {spec.input_names}: on a second example torch's output '{name}' "
            f"changes but onnxruntime's outputs stay identical ({who} traced part of the forward to constants{why}); {FIX}"
        )
    for name, want, got in zip(names, torch_out[1], ort_out[1]):
        if not (np.issubdtype(np.asarray(want).dtype, np.floating) or np.issubdtype(np.asarray(got).dtype, np.floating)):
            continue
        err = _relative_error(got, want)
        if err > FOLLOW_TOLERANCE:
            raise ExportError(
                f"the exported graph does not follow the model on a second example: output '{name}' differs from "
                f"torch by relative error {err:.3g} > {FOLLOW_TOLERANCE} ({who} baked values of the example into the graph"
                f"{why}); {FIX}"
            )
    return "passed"


def check_other_sizes(path: Path, wrapper: NamedIOModule, spec: IOSpec, info: Mapping[str, Any]) -> dict[str, Any]:
    """Run torch and onnxruntime on an example of other sizes along the graph's dynamic axes (batch + 1, sequence
    - 1: :func:`~exporters.io_spec.resized_example`); raise :class:`ExportError` when onnxruntime cannot run the
    graph there or its outputs do not follow torch's (relative L2 error above ``FOLLOW_TOLERANCE``).

    Returns ``{"status": "passed", "sizes": {axis: size}, "rel_l2": worst error}``, or ``{"status": "skipped (why)"}``
    when there is no dynamic axis, onnxruntime is missing or the model itself rejects the other sizes.
    """
    fixed = info.get("fixed_axes") or {}
    example, sizes = resized_example(spec.inputs, spec.dynamic_axes, fixed)
    if not sizes:
        return {"status": "skipped (no dynamic axis in the graph)"}
    try:
        from .ort_runtime import OrtRunner

        runner = OrtRunner(path, threads=1)
    except ImportError:
        return {"status": "skipped (onnxruntime is not installed)"}
    except ExportError as exc:
        return {"status": f"skipped (onnxruntime cannot load the file: {first_line(exc)})"}
    shown = ", ".join(f"{label} {n}" for label, n in sizes.items())
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            want = [_numpy(t) for t in wrapper(*example.values())]
    except Exception as exc:  # noqa: BLE001 - the model's own limit (e.g. a fixed reshape): nothing to compare
        return {"status": f"skipped (the model rejects {shown}: {first_line(exc)})"}
    who, why = _exporter_phrase(info)
    try:
        got = runner({k: _numpy(v) for k, v in example.items()})
    except Exception as exc:  # onnxruntime's own error types: the graph cannot run there
        raise ExportError(
            f"the exported graph does not run at other sizes along its dynamic axes ({shown}): {first_line(exc)} "
            f"({who} fixed a size of the example{why}); keep shape arithmetic in torch ops (no int(), .item() or "
            "Python loops over sizes), or export with dynamic=False for fixed sizes"
        ) from exc
    worst = 0.0
    for name, w in zip(runner.output_names, want):
        g = got[name]
        if not (np.issubdtype(np.asarray(w).dtype, np.floating) or np.issubdtype(np.asarray(g).dtype, np.floating)):
            continue
        err = _relative_error(g, w)
        worst = max(worst, err)
        if err > FOLLOW_TOLERANCE:
            raise ExportError(
                f"the exported graph does not follow the model at other sizes along its dynamic axes ({shown}): output "
                f"'{name}' differs from torch by relative error {err:.3g} > {FOLLOW_TOLERANCE} ({who} baked a size of the "
                f"example into the graph{why}); keep shape arithmetic in torch ops, or export with dynamic=False"
            )
    return {"status": "passed", "sizes": sizes, "rel_l2": worst}
