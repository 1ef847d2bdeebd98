"""Edge artifacts for a model: example inputs from its own adapter, then the targets the user named, exported
through the ``exporters`` registry (which orders the chain: ONNX -> int8 -> ORT) into one folder atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import exporters
from exporters import EncoderForCoreML, coreml_view

from ..errors import ConfigError
from ..io.checkpoint import atomic_folder
from ..io.data import read_tensors
from ..planning.targets import check_finite
from .lm import is_hf_causal_lm

__all__ = ["EncoderForCoreML", "SAMPLE_SENTENCE", "coreml_view", "example_inputs", "export_all",
           "export_table", "quantizations", "size_of", "target_names"]

CAUSAL_INPUTS = ("input_ids", "attention_mask")  # what a causal LM is exported with (no token types, no KV cache)
SAMPLE_SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def target_names() -> tuple[str, ...]:
    """The export targets ``--to`` accepts: the registry's, in registration order (onnx, ort, coreml...)."""
    return tuple(exporters.target_names())


def quantizations() -> tuple[str, ...]:
    """The ``--quantize`` values: the registry's transforms (int8)."""
    return tuple(exporters.transform_names())


def __getattr__(name: str) -> Any:
    if name == "TARGETS":  # the old constant, now read from the registry when asked for
        return target_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def example_inputs(tokenizer: Any | None, inputs_file: str | None = None, *, sentence: str = SAMPLE_SENTENCE,
                   max_length: int = 128) -> dict[str, torch.Tensor]:
    """Named example inputs: the tokenizer on a sample sentence, or the first example of a
    tensor file (.npy/.npz/.safetensors); one positional array is named ``input``."""
    if inputs_file is not None:
        batch = next(read_tensors(inputs_file).batches(1))
        return dict(batch.inputs)
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer, so export needs example inputs; pass --inputs FILE "
                          "(.npy/.npz/.safetensors, first dimension = examples)")
    enc = tokenizer([sentence], truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items()}


def export_all(model: nn.Module, inputs: dict[str, torch.Tensor], out: str | Path, targets: list[str], *,
               fp16: bool = False, fp32: bool = False, quantize: str | None = None, opset: int = 18,
               overwrite: bool = False, block_size: int = 32, accuracy_level: int = 4, algorithm: str = "rtn",
               symmetric: bool = True, table: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write the artifacts of ``targets`` (``model.onnx``, ``model.ort``, ``model.mlpackage``...; with
    ``quantize`` also ``model.int8.onnx``, from which the .ort is then converted) into ``out``; returns one
    row per artifact (target, path, bytes, seconds, the exporter's details) in the registry's chain order.
    int4 (ONNX): ``block_size``, ``accuracy_level``, ``algorithm``, ``symmetric``; ``table``: the codes of a
    ``--budget bytes`` checkpoint, written as they are (the plan's int4/int8 choices, nothing else); Core ML
    quantizes with coremltools (int8 per channel, int4 per block). A Hugging Face causal LM is exported as
    ``input_ids`` (+ ``attention_mask``) -> ``logits`` (no KV cache)."""

    valid = target_names()
    bad = [t for t in targets if t not in valid]
    if bad or not targets:
        raise ConfigError(f"--to {','.join(bad) or '(none)'} is not a known target; valid: {', '.join(valid)} "
                          "(repeat --to for several)")
    if fp16 and fp32:
        raise ConfigError("--fp16 and --fp32 contradict each other; give at most one")
    if quantize not in (None, "none", *quantizations()):
        use = " or ".join(f"--quantize {q}" for q in quantizations())
        raise ConfigError(f"--quantize {quantize!r} is not supported; use {use} (or leave it out)")
    if not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ConfigError(f"--opset {opset!r} is outside [18, 23]; the torch.export-based exporter needs >= 18")
    check_finite(model, "exporting")
    if is_hf_causal_lm(model) and "input_ids" in inputs:
        inputs = {k: v for k, v in inputs.items() if k in CAUSAL_INPUTS}  # a decoder: ids (+ mask) -> logits
    steps = exporters.plan_exports(targets, () if quantize in (None, "none") else (quantize,))
    for step in steps:  # before anything is written
        step.exporter.ensure_available()
    options = {"opset": opset, "fp16": fp16, "precision": "fp32" if fp32 else "fp16"}  # each exporter takes its own
    if quantize == "int4":
        from exporters.int4 import check_int4_options
        check_int4_options(block_size, algorithm, accuracy_level)
        options.update(block_size=block_size, accuracy_level=accuracy_level, algorithm=algorithm, symmetric=symmetric)
        if table is not None:
            options["table"] = table
    if quantize in ("int8", "int4") and "coreml" in targets and table is None:  # a plan's codes stay ONNX-only
        options["quantize"] = quantize
    with atomic_folder(out, overwrite) as tmp:
        done = exporters.export_targets(model.eval(), inputs, tmp, steps, options)
    out = Path(out)
    return [_row(r.step.label, out / r.result.path.name, r.seconds, r.result.info) for r in done]


def size_of(p: Path) -> int:
    """Bytes of a file, or of every file under a folder (an .mlpackage)."""
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _row(target: str, path: Path, seconds: float, info: dict[str, Any]) -> dict[str, Any]:
    return {"target": target, "path": str(path), "bytes": size_of(path), "seconds": round(seconds, 3), "info": info}


def export_table(rows: list[dict[str, Any]]) -> str:
    """The terminal table of :func:`export_all`'s rows: target, MB, seconds, path."""
    lines = [f"{'target':10} {'MB':>9} {'seconds':>8}  path"]
    for r in rows:
        lines.append(f"{r['target']:10} {r['bytes'] / 1e6:9.2f} {r['seconds']:8.2f}  {r['path']}")
    return "\n".join(lines)
