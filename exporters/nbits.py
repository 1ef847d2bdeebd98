"""Block-wise 4/8-bit weights in an ONNX graph: MatMul -> com.microsoft ``MatMulNBits`` and Gather of an
embedding table -> ``GatherBlockQuantized``, written from integer codes (ours, or given by the caller).

A weight is viewed as ``rows x cols`` with blocks of ``block`` consecutive columns per row: for MatMul(X, B)
with constant B (K x N) that is W = B^T (N x K, blocks along K, the runtime's layout); for a Gather table
(V x d) the table itself (blocks along d). Round to nearest follows onnxruntime's reference quantizer
(``quant_slice_symmetric`` / ``quant_slice_asymmetric``, numpy rounding). Callers that quantized a weight
themselves (GPTQ, a correction plan) pass its codes in a table keyed by :func:`digest` of the float32
weight they stand for, so the file holds exactly their codes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadInput
from .quantize import replace_nodes

MS_DOMAIN = "com.microsoft"
BITS = (4, 8)


@dataclass(frozen=True)
class Codes:
    """Integer codes of one weight view (rows x cols, blocks along cols): signed codes when symmetric
    (stored shifted by 2^(bits-1)), unsigned with zero points otherwise."""

    codes: np.ndarray  # int, rows x cols
    scales: np.ndarray  # float32, rows x blocks
    zeros: np.ndarray | None  # int, rows x blocks (None: symmetric)
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        q = self.codes.astype(np.float32).reshape(rows, cols // self.block, self.block)
        z = 0.0 if self.zeros is None else self.zeros.astype(np.float32)[..., None]
        return ((q - z) * self.scales[..., None]).reshape(rows, cols).astype(np.float32)


def digest(view: np.ndarray) -> str:
    """Key of a float32 weight view (rows x cols, C order) in a codes table."""
    a = np.ascontiguousarray(view, dtype=np.float32)
    return hashlib.sha1(repr(a.shape).encode() + a.tobytes()).hexdigest()


def check_block(block: int, cols: int, what: str, bits: int = 4) -> None:
    """MatMulNBits rules: ``bits`` in (4, 8), a power-of-two block >= 16 that divides the blocked dimension."""
    if bits not in BITS:
        raise BadInput(f"bits={bits!r} is not one of {BITS}; use 4 or 8")
    if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block & (block - 1):
        raise BadInput(f"block size {block!r} is not a power of two >= 16 (MatMulNBits' rule); use 16, 32, 64 or 128")
    if cols % block:
        fit = max((b for b in (16, 32, 64, 128) if cols % b == 0), default=None)
        fix = (f"use block size {fit}" if fit else
               f"no int{bits} block (16-128) divides {cols}: use int8 instead (a low-rank model: compress with "
               "--budget bytes, whose ranks are multiples of 32)")
        raise BadInput(f"block size {block} does not divide dimension {cols} of {what}: int{bits} blocks run along "
                       f"it; {fix}")


def rtn(view: np.ndarray, bits: int = 4, block: int = 32, symmetric: bool = True) -> Codes:
    """Round-to-nearest codes of a float weight view (rows x cols), block-wise along cols."""
    w = np.asarray(view, dtype=np.float32)
    rows, cols = w.shape
    b = w.reshape(rows, cols // block, block)
    if symmetric:
        hi, lo = b.max(axis=-1), b.min(axis=-1)
        scale = (np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-(2 ** (bits - 1)))).astype(np.float32)
        half = 2 ** (bits - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale[..., None] == 0, 0, b / scale[..., None]).round().clip(-half, half - 1)
        return Codes(q.reshape(rows, cols).astype(np.int16), scale, None, bits, block)
    top = 2 ** bits - 1
    lo = np.minimum(b.min(axis=-1), 0)
    hi = np.maximum(b.max(axis=-1), 0)
    scale = ((hi - lo) / np.float32(top)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale == 0, 2 ** (bits - 1), -lo / scale).round().clip(0, top)
        q = np.where(scale[..., None] == 0, zero[..., None], b / scale[..., None] + zero[..., None]).round().clip(0, top)
    return Codes(q.reshape(rows, cols).astype(np.int16), scale, zero.astype(np.int16), bits, block)


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (last axis even for 4 bits) -> bytes, two per byte low nibble first for 4 bits."""
    v = values.astype(np.uint8)
    if bits == 8:
        return v
    return (v[..., 0::2] & 0xF) | ((v[..., 1::2] & 0xF) << 4)


def _unsigned(c: Codes) -> np.ndarray:
    return c.codes + (2 ** (c.bits - 1) if c.zeros is None else 0)


def matmul_nbits(helper: Any, numpy_helper: Any, node: Any, name: str, c: Codes, accuracy_level: int) -> tuple[Any, list[Any]]:
    """The MatMulNBits node replacing ``node`` (MatMul(X, B), W = B^T as codes ``c``) and its initializers."""
    n, k = c.codes.shape
    blocks = k // c.block
    packed = _pack(_unsigned(c), c.bits).reshape(n, blocks, c.block * c.bits // 8)
    inits = [numpy_helper.from_array(packed, f"{name}_Q{c.bits}"),
             numpy_helper.from_array(c.scales.astype(np.float32), f"{name}_scales")]
    if c.zeros is not None:
        z = c.zeros
        if c.bits == 4 and blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), dtype=z.dtype)], axis=1)
        inits.append(numpy_helper.from_array(_pack(z, c.bits).reshape(n, -1), f"{name}_zero_points"))
    attrs = {"K": k, "N": n, "bits": c.bits, "block_size": c.block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    new = helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in inits)], list(node.output),
                           name=(node.name or name) + f"_Q{c.bits}", domain=MS_DOMAIN, **attrs)
    return new, inits


def gather_block_quantized(helper: Any, numpy_helper: Any, TensorProto: Any, node: Any, name: str, c: Codes) -> tuple[Any, list[Any]]:
    """The GatherBlockQuantized node replacing Gather(table, ids) (table as codes ``c``, blocks along d)."""
    if c.bits != 4:
        raise BadInput(f"an embedding table takes 4-bit blocks here, not {c.bits}; keep it in float or use bits=4")
    v, d = c.codes.shape
    symmetric = c.zeros is None
    qtype = TensorProto.INT4 if symmetric else TensorProto.UINT4
    raw = _pack(c.codes if not symmetric else c.codes.astype(np.int8), 4).tobytes()
    data = helper.make_tensor(f"{name}_Q4", qtype, [v, d], raw, True)
    inits = [data, numpy_helper.from_array(c.scales.astype(np.float32), f"{name}_scales")]
    if not symmetric:
        inits.append(helper.make_tensor(f"{name}_zero_points", qtype, list(c.zeros.shape), _pack(c.zeros, 4).tobytes(), True))
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    inputs = [data.name, node.input[1], inits[1].name, *([inits[2].name] if not symmetric else [])]
    new = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=(node.name or name) + "_Q4",
                           domain=MS_DOMAIN, gather_axis=axis, quantize_axis=1, block_size=c.block)
    return new, inits


Picker = Callable[[str, str, np.ndarray], "Codes | None"]


def rewrite(model: Any, pick: Picker, *, accuracy_level: int = 4) -> dict[str, Any]:
    """Replace in place every MatMul / Gather whose constant weight ``pick(kind, name, view)`` returns codes for
    (kind "matmul": view = B^T; "gather": the table). Returns counts and the bytes of the new initializers."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, added, done = [], [], {"MatMulNBits": 0, "GatherBlockQuantized": 0}
    by_bits: dict[str, int] = {}
    for node in graph.node:
        kind = {"MatMul": "matmul", "Gather": "gather"}.get(node.op_type)
        wname = node.input[1 if kind == "matmul" else 0] if kind else None
        t = inits.get(wname) if wname else None
        if t is None or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        arr = numpy_helper.to_array(t)
        view = arr.T if kind == "matmul" else arr
        c = pick(kind, wname, view)
        if c is None:
            nodes.append(node)
            continue
        safe = f"{wname}_{len(added)}"
        if kind == "matmul":
            new, extra = matmul_nbits(helper, numpy_helper, node, safe, c, accuracy_level)
        else:
            new, extra = gather_block_quantized(helper, numpy_helper, TensorProto, node, safe, c)
        nodes.append(new)
        added.extend(extra)
        done[new.op_type] += 1
        key = f"int{c.bits}"
        by_bits[key] = by_bits.get(key, 0) + sum(len(e.raw_data) for e in extra[:1])
        by_bits["scales"] = by_bits.get("scales", 0) + sum(len(e.raw_data) for e in extra[1:])
    if not added:
        return {"quantized_ops": done, "bytes": by_bits}
    replace_nodes(graph, nodes, added)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return {"quantized_ops": done, "bytes": by_bits}


def table_picker(table: Mapping[str, Codes]) -> Picker:
    """Quantize exactly the weights whose views are in ``table`` (by :func:`digest`), with their codes."""
    def pick(kind: str, name: str, view: np.ndarray) -> Codes | None:
        return table.get(digest(view))
    return pick


def rtn_picker(bits: int, block: int, symmetric: bool, embeddings: bool, min_elements: int = 0) -> Picker:
    """Round to nearest for every constant MatMul weight (and embedding table when ``embeddings``); a weight
    whose blocked dimension ``block`` does not divide is refused (:func:`check_block`)."""
    def pick(kind: str, name: str, view: np.ndarray) -> Codes | None:
        if view.size < min_elements or (kind == "gather" and (not embeddings or bits != 4)):
            return None
        check_block(block, view.shape[1], f"weight {name!r} {tuple(view.shape)}", bits)
        return rtn(view, bits, block, symmetric)
    return pick
