"""The int4 transform: block-wise 4-bit weights of an ONNX file (MatMulNBits for matrices, GatherBlockQuantized
for embedding tables), as an exporter of its own so that it chains like int8 (ONNX -> int4 -> ORT)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._files import check_target, publish, require_file, staging_dir
from ._logs import capture_logs
from .base import ExportResult
from .deps import require
from .errors import BadInput, onnx_failure
from .nbits import Codes, check_block, rewrite, rtn_picker, table_picker
from .onnx_transform import OnnxTransform
from .quantize import EXTRA, _size, gemm_to_matmul

ALGORITHMS = ("rtn", "hqq")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def check_int4_options(block_size: int, algorithm: str, accuracy_level: int) -> None:
    """One-line errors for the transform's options, before anything is read or written."""
    if algorithm not in ALGORITHMS:
        raise BadInput(f"int4 algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}; use rtn (round to "
                       "nearest) or hqq (half-quadratic); GPTQ runs at compress time (--quantize-algorithm gptq)")
    check_block(block_size, block_size, "the block itself")
    if accuracy_level not in ACCURACY_LEVELS:
        raise BadInput(f"accuracy_level={accuracy_level!r} is not one of {ACCURACY_LEVELS}; 0 computes in float "
                       "(exact codes), 4 quantizes activations to int8 (fastest on CPU)")


def _hqq(model: Any, block_size: int, symmetric: bool, embeddings: bool, accuracy_level: int) -> dict[str, Any]:
    """onnxruntime's HQQ quantizer (asymmetric, float zero points) on every MatMul; embedding tables by round to
    nearest (GatherBlockQuantized takes integer zero points only, which HQQ does not produce)."""
    q = require("onnxruntime.quantization.matmul_nbits_quantizer", EXTRA)
    config = q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))
    quantizer = q.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    out = quantizer.model.model
    if accuracy_level:
        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(require("onnx", EXTRA).helper.make_attribute("accuracy_level", accuracy_level))
    rtn = rtn_picker(4, block_size, symmetric, embeddings)
    tables = rewrite(out, lambda kind, name, view: rtn(kind, name, view) if kind == "gather" else None)
    counts = {"MatMulNBits": sum(n.op_type == "MatMulNBits" for n in out.graph.node),
              "GatherBlockQuantized": tables["quantized_ops"]["GatherBlockQuantized"]}
    return {"model": out, "quantized_ops": counts}



def quantize_int4(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
    algorithm: str = "rtn",
    embeddings: bool = True,
    table: Mapping[str, Codes] | None = None,
    external_data: bool = False,
) -> ExportResult:
    """Write a 4-bit-weight copy of ``onnx_path`` to ``out_path`` atomically.

    Without ``table``: every constant MatMul weight (and, with ``embeddings``, every Gather table) is
    quantized by ``algorithm`` in blocks of ``block_size`` along the reduction axis; a weight whose
    dimension the block does not divide is refused. With ``table`` (codes by :func:`exporters.nbits.digest`
    of the float weight, 4 or 8 bits): exactly those weights, with those codes, and nothing else.
    """
    onnx = require("onnx", EXTRA)
    check_int4_options(block_size, algorithm, accuracy_level)
    src = require_file(onnx_path, "ONNX file")
    target = check_target(out_path, ".onnx")
    model = onnx.load(str(src))
    gemms = gemm_to_matmul(model)
    with capture_logs("onnxruntime.quantization", "root") as log_lines, staging_dir(target) as tmp:
        staged = tmp / target.name
        if table is not None:
            info = rewrite(model, table_picker(table), accuracy_level=accuracy_level)
            mode = "table"
        elif algorithm == "rtn":
            info = rewrite(model, rtn_picker(4, block_size, symmetric, embeddings), accuracy_level=accuracy_level)
            mode = "rtn"
        else:
            try:
                done = _hqq(model, block_size, symmetric, embeddings, accuracy_level)
            except BadInput:
                raise
            except Exception as exc:
                raise onnx_failure(exc, src, f"HQQ int4 quantisation of '{src.name}'", "use algorithm='rtn'",
                                   marker="parse") from exc
            model, info, mode = done.pop("model"), done, "hqq"
        if not any(info["quantized_ops"].values()):
            raise BadInput(f"'{src.name}' has no constant MatMul or Gather weight to quantize to int4; export the "
                           "model without --quantize int4")
        for node in model.graph.node:  # the exporter's per-node provenance (stack traces): most of a small graph's bytes
            del node.metadata_props[:]
        onnx.save(model, str(staged), save_as_external_data=external_data)
        for f in tmp.iterdir():
            if f != staged:
                publish(f, target.parent / f.name)
        publish(staged, target)
    return ExportResult(path=target, info={
        "source_bytes": _size(src), "bytes": _size(Path(target)), "mode": mode, "algorithm": algorithm,
        "block_size": block_size, "symmetric": symmetric, "accuracy_level": accuracy_level,
        "gemm_rewritten": gemms, "log": log_lines, **info})


class Int4Exporter(OnnxTransform):
    """4-bit block-quantized weights of an ONNX model (``model.int4.onnx``), run with onnxruntime."""

    name = "int4"
    derive_options = ("block_size", "symmetric", "accuracy_level", "algorithm", "embeddings", "table", "external_data")

    def rewrite(self, source: str | os.PathLike[str], path: str | os.PathLike[str], **options: Any) -> ExportResult:
        """Quantize the .onnx file ``source`` into ``path`` (see :func:`quantize_int4`)."""
        return quantize_int4(source, path, **options)
