"""Structure of an exported ONNX file without running it: inputs, outputs, opset, op counts,
external data and size; a broken file is a CorruptArtifact."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ._files import require_file
from .deps import require
from .errors import BadInput, CorruptArtifact, first_line

EXTRA = "onnx"



def _value_info(onnx: Any, value: Any) -> dict[str, Any]:
    tt = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, ValueError, TypeError):
        dtype = str(tt.elem_type)
    shape = [d.dim_param if d.HasField("dim_param") else (int(d.dim_value) if d.HasField("dim_value") else None) for d in tt.shape.dim]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def weight_components(onnx: Any, model: Any, file_bytes: int) -> dict[str, int]:
    """Bytes of the initializers by role: n-bit codes of MatMulNBits / GatherBlockQuantized, int8 codes of dynamic
    quantisation, their scales and zero points, float matrices, float vectors; ``graph`` is the rest of the file."""
    roles: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            for i, name in enumerate(node.input[1:], start=1):
                roles.setdefault(name, f"int{bits} codes" if i == 1 else "scales")
        elif node.op_type == "GatherBlockQuantized":
            for i, name in enumerate(node.input):
                if i != 1:
                    roles.setdefault(name, "int4 codes" if i == 0 else "scales")
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        size = len(t.raw_data) if t.raw_data else t.ByteSize()
        role = roles.get(t.name)
        if role is None:
            if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
                role = "int8 codes"
            elif len(t.dims) >= 2:
                role = "float matrices"
            else:
                role = "float vectors"
        out[role] = out.get(role, 0) + size
    out["graph"] = max(file_bytes - sum(out.values()), 0)
    return out


def inspect_onnx(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate an .onnx file with onnx.checker and summarise it: opset, I/O, op counts, bytes."""
    onnx = require("onnx", EXTRA)
    p = require_file(path, "ONNX file")
    if p.is_dir():
        raise BadInput(f"'{p}' is a folder; pass the .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
        onnx.checker.check_model(str(p))
    except Exception as exc:
        raise CorruptArtifact(f"'{p}' is not a valid ONNX model ({type(exc).__name__}: {first_line(exc)}); re-export it") from exc
    locations = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    files = [p] + [p.parent / loc for loc in sorted(locations)]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    file_bytes = sum(f.stat().st_size for f in files if f.exists())
    return {
        "format": "onnx",
        "path": str(p),
        "opset": opset,
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_value_info(onnx, v) for v in model.graph.input],
        "outputs": [_value_info(onnx, v) for v in model.graph.output],
        "ops": dict(Counter(n.op_type for n in model.graph.node)),
        "node_count": len(model.graph.node),
        "external_data": bool(locations),
        "bytes": file_bytes,
        "components": weight_components(onnx, model, file_bytes),
    }
