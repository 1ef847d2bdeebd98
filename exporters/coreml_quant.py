"""Core ML weight compression (coremltools.optimize.coreml): int8 / int4 linear quantization and k-means
palettization of an ML Program, the deployment target each format needs, and a structure check that counts
the compression ops of a program spec (works on Linux, no prediction needed).

coremltools is imported only inside functions (``import exporters`` stays light).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from .errors import BadInput, ExportError, first_line

QUANTIZE = ("int8", "int4")
PALETTE_BITS = (2, 4, 6, 8)
WEIGHT_THRESHOLD = 2048  # coremltools' default: weights of <= this many elements stay float
COMPRESSION_OPS = (
    "constexpr_affine_dequantize",  # iOS16/17 linear quantization
    "constexpr_blockwise_shift_scale",  # iOS18 linear quantization (per channel or per block)
    "constexpr_lut_to_dense",  # palettization (look-up table + indices)
    "constexpr_sparse_to_dense",
    "constexpr_lut_to_sparse",
    "constexpr_sparse_blockwise_shift_scale",
)
# deployment targets by OS release level: iOS16 ~ macOS13 (ML Program opset 16), iOS18 ~ macOS15
_LEVELS = {"iOS16": 16, "iOS17": 17, "iOS18": 18, "macOS13": 16, "macOS14": 17, "macOS15": 18}


@dataclass(frozen=True)
class QuantPlan:
    """What to do to the weights: ``kind`` "linear" (``dtype``, ``granularity``, ``block_size``) or
    "palettize" (``nbits``); ``needs``: the lowest iOS level (16, 18) whose ML Program opset has the ops."""

    kind: str
    mode: str
    granularity: str
    needs: int
    dtype: str | None = None
    block_size: int | None = None
    nbits: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "palettize":
            return f"{self.nbits}-bit palettization ({self.granularity})"
        return f"{self.dtype} {self.granularity.replace('_', '-')} weight quantization"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "granularity": self.granularity}
        if self.kind == "palettize":
            out["nbits"] = self.nbits
        else:
            out["dtype"] = self.dtype
        out["block_size"] = self.block_size
        out["weight_threshold"] = WEIGHT_THRESHOLD
        return out


def plan_quantization(quantize: str | None, block_size: int, palettize: int | None) -> QuantPlan | None:
    """Validate the compression options of :func:`export_coreml`; None when the weights stay float.

    Raises :class:`BadInput` (one line: the value, the rule, the fix) before anything is written.
    """
    if quantize == "none":
        quantize = None
    if quantize is not None and palettize is not None:
        raise BadInput(
            f"quantize={quantize!r} and palettize={palettize!r} were both given; they are alternative weight "
            "compressions, pass only one"
        )
    if quantize is not None and quantize not in QUANTIZE:
        raise BadInput(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE)}; pick one (or None for float weights)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size & (block_size - 1):
        raise BadInput(f"block_size={block_size!r} must be a positive power of two; use e.g. 32 (the default) or 64")
    if palettize is not None:
        if isinstance(palettize, bool) or not isinstance(palettize, int) or palettize not in PALETTE_BITS:
            raise BadInput(
                f"palettize={palettize!r} bits is not supported; use one of {', '.join(map(str, PALETTE_BITS))}"
            )
        return QuantPlan(kind="palettize", mode="kmeans", granularity="per_tensor", needs=16, nbits=palettize)
    if quantize == "int8":
        return QuantPlan(kind="linear", mode="linear_symmetric", granularity="per_channel", needs=16, dtype="int8")
    if quantize == "int4":
        return QuantPlan(kind="linear", mode="linear_symmetric", granularity="per_block", needs=18, dtype="int4",
                         block_size=block_size)
    return None


def deployment_target(requested: str, plan: QuantPlan | None) -> tuple[str, str | None]:
    """The target to convert with: ``requested``, or the same OS family raised to what ``plan`` needs
    (with the reason, one line); ``requested`` must be a known target."""
    level = _LEVELS[requested]
    if plan is None or level >= plan.needs:
        return requested, None
    target = f"iOS{plan.needs}" if requested.startswith("iOS") else f"macOS{plan.needs - 3}"
    return target, f"{plan.label} needs {target}; raised from the requested {requested}"


def apply_quantization(mlmodel: Any, plan: QuantPlan) -> Any:
    """Compress the weights of a converted ML Program with coremltools.optimize.coreml; returns the new model.

    Raises :class:`ExportError` when coremltools fails.
    """
    import coremltools.optimize.coreml as cto

    try:
        if plan.kind == "palettize":
            op_config = cto.OpPalettizerConfig(mode=plan.mode, nbits=plan.nbits, granularity=plan.granularity,
                                               weight_threshold=WEIGHT_THRESHOLD)
            return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=op_config))
        extra = {"block_size": plan.block_size} if plan.block_size is not None else {}
        op_config = cto.OpLinearQuantizerConfig(mode=plan.mode, dtype=plan.dtype, granularity=plan.granularity,
                                                weight_threshold=WEIGHT_THRESHOLD, **extra)
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=op_config))
    except (BadInput, MemoryError):
        raise
    except Exception as exc:  # any coremltools failure becomes one ExportError line
        raise ExportError(
            f"Core ML {plan.label} failed: {first_line(exc)}; export without quantize/palettize or try another format"
        ) from exc


# ------------------------------------------------------------------------------------ structure check


def _left_float_why(plan: QuantPlan) -> str:
    why = f"coremltools leaves float the weights of <= {WEIGHT_THRESHOLD} elements (weight_threshold)"
    if plan.block_size:
        why += f" and those whose input channels are not a multiple of block_size={plan.block_size}"
    return why


def walk_ops(block: Any, visit: Any) -> None:
    """Call ``visit`` on every op of a MIL block, nested blocks included."""
    for op in block.operations:
        visit(op)
        for inner in op.blocks:
            walk_ops(inner, visit)


def compression_summary(spec: Any) -> dict[str, Any]:
    """Count the compression ops of an ML Program spec (protobuf) and the float weights left in it.

    ``compressed_ops``: {op type: count}; ``weights_quantized``: compressed weights (ops that read no other
    op's output, so a chain of two constexpr ops counts once); ``weights_left_float``: float consts of rank >= 2
    stored in the weight file; ``vectors_left_float``: 1-D ones (biases, norms: never compressed).
    """
    from coremltools.proto import MIL_pb2

    floats = {value for name, value in MIL_pb2.DataType.items() if "FLOAT" in name}
    ops: Counter = Counter()
    counts = {"weights_quantized": 0, "weights_left_float": 0, "vectors_left_float": 0, "large_left_float": 0}

    def visit(op: Any) -> None:
        if op.type in COMPRESSION_OPS:
            ops[op.type] += 1
            chained = any(arg.WhichOneof("binding") == "name" for inp in op.inputs.values() for arg in inp.arguments)
            counts["weights_quantized"] += not chained
        elif op.type == "const" and "val" in op.attributes and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            tensor = op.outputs[0].type.tensorType if op.outputs else None
            if tensor is not None and tensor.dataType in floats:
                counts["weights_left_float" if tensor.rank >= 2 else "vectors_left_float"] += 1
                size = 1
                for d in tensor.dimensions:
                    size *= max(int(d.constant.size), 1)
                counts["large_left_float"] += tensor.rank >= 2 and size > WEIGHT_THRESHOLD

    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            block = function.block_specializations.get(function.opset)
            if block is not None:
                walk_ops(block, visit)
    return {"compressed_ops": dict(ops), **counts}


def quantization_info(plan: QuantPlan, spec: Any) -> dict[str, Any]:
    """``info["quantization"]`` for the compressed program ``spec``; raises :class:`ExportError` when the
    program has no compression op (coremltools silently compressed nothing)."""
    summary = compression_summary(spec)
    if not summary["compressed_ops"] and not summary["large_left_float"]:  # every weight under the threshold
        return {**plan.describe(), **summary, "left_float_reason": _left_float_why(plan),
                "note": "no weight is large enough to compress: the package stays float"}
    if not summary["compressed_ops"]:
        raise ExportError(
            f"Core ML {plan.label} compressed no weight ({summary['weights_left_float']} float weight matrices left; "
            f"{_left_float_why(plan)}); export without quantize/palettize"
            + (" or pick a block_size that divides the input channels" if plan.block_size else "")
        )
    out = {**plan.describe(), **summary}
    if summary["weights_left_float"]:
        out["left_float_reason"] = _left_float_why(plan)
    return out
