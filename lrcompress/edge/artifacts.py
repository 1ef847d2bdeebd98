"""Edge artifacts for a model: example inputs from its own adapter, then ONNX / ORT / Core ML
through the ``exporters`` package, written into one folder atomically."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..planning.targets import check_finite

TARGETS = ("onnx", "ort", "coreml")
SAMPLE_SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


class EncoderForCoreML(nn.Module):
    """A Hugging Face BERT-style encoder as embeddings + layers with an explicit additive
    mask: the library's mask helpers use ops coremltools cannot convert (``new_ones``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @staticmethod
    def applies(model: nn.Module) -> bool:
        return hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.model.embeddings(input_ids=input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -1e4  # fits fp16 compute
        for layer in self.model.encoder.layer:
            out = layer(h, attention_mask=mask)
            h = out[0] if isinstance(out, tuple) else out
        return {"last_hidden_state": h}


def coreml_view(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The module and inputs to hand to coremltools (BERT-style encoders get the wrapper)."""
    if EncoderForCoreML.applies(model) and {"input_ids", "attention_mask"} <= set(inputs):
        return EncoderForCoreML(model).eval(), {k: inputs[k] for k in ("input_ids", "attention_mask")}
    return model, inputs


def example_inputs(tokenizer: Any | None, inputs_file: str | None = None, *, sentence: str = SAMPLE_SENTENCE,
                   max_length: int = 128) -> dict[str, torch.Tensor]:
    """Named example inputs: the tokenizer on a sample sentence, or the first example of a
    tensor file (.npy/.npz/.safetensors); one positional array is named ``input``."""
    if inputs_file is not None:
        from ..io.data import read_tensors
        batch = next(read_tensors(inputs_file).batches(1))
        return {(k or "input"): v for k, v in batch.inputs.items()}
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer, so export needs example inputs; pass --inputs FILE "
                          "(.npy/.npz/.safetensors, first dimension = examples)")
    enc = tokenizer([sentence], truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items()}


def export_all(model: nn.Module, inputs: dict[str, torch.Tensor], out: str | Path, targets: list[str], *,
               fp16: bool = False, fp32: bool = False, quantize: str | None = None, opset: int = 18,
               overwrite: bool = False) -> list[dict[str, Any]]:
    """Write ``model.onnx`` (+ ``model.int8.onnx``), ``model.ort`` and ``model.mlpackage`` as
    asked into ``out``; returns one row per artifact (path, bytes, seconds, details)."""
    from ..io.checkpoint import atomic_folder

    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ConfigError(f"--to {','.join(bad) or '(none)'} is not a known target; valid: {', '.join(TARGETS)} "
                          "(repeat --to for several)")
    if fp16 and fp32:
        raise ConfigError("--fp16 and --fp32 contradict each other; give at most one")
    if quantize not in (None, "none", "int8"):
        raise ConfigError(f"--quantize {quantize!r} is not supported; use --quantize int8 (or leave it out)")
    if not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ConfigError(f"--opset {opset!r} is outside [18, 23]; the torch.export-based exporter needs >= 18")
    check_finite(model, "exporting")
    import exporters
    for t in dict.fromkeys(targets):
        exporters.get_exporter(t).ensure_available()
    rows: list[dict[str, Any]] = []
    model = model.eval()
    with atomic_folder(out, overwrite) as tmp:
        onnx_path = None
        if "onnx" in targets or "ort" in targets:
            t0 = time.perf_counter()
            res = exporters.export_onnx(model, inputs, tmp / "model.onnx", opset=opset, fp16=fp16)
            rows.append(_row("onnx", res.path, time.perf_counter() - t0, res.info))
            onnx_path = res.path
            if quantize == "int8":
                t0 = time.perf_counter()
                info = exporters.quantize_int8(res.path, tmp / "model.int8.onnx")
                rows.append(_row("onnx-int8", tmp / "model.int8.onnx", time.perf_counter() - t0, info))
                onnx_path = tmp / "model.int8.onnx"
        if "ort" in targets:
            t0 = time.perf_counter()
            mobile = exporters.mobile_usability(onnx_path)
            info = exporters.convert_onnx_to_ort(onnx_path, tmp / "model.ort")
            rows.append(_row("ort", tmp / "model.ort", time.perf_counter() - t0,
                             {**info, "from": onnx_path.name, "mobile_usability": mobile}))
        if "onnx" not in targets and onnx_path is not None:  # only needed as the .ort's source
            for name in ("model.onnx", "model.int8.onnx"):
                (tmp / name).unlink(missing_ok=True)
            rows = [r for r in rows if r["target"] == "ort"]
        if "coreml" in targets:
            t0 = time.perf_counter()
            cm_model, cm_inputs = coreml_view(model, inputs)
            res = exporters.export_coreml(cm_model, cm_inputs, tmp / "model.mlpackage",
                                          precision="fp32" if fp32 else "fp16")
            rows.append(_row("coreml", res.path, time.perf_counter() - t0, res.info))
    out = Path(out)
    for r in rows:
        r["path"] = str(out / Path(r["path"]).name)
    return rows


def size_of(p: Path) -> int:
    """Bytes of a file, or of every file under a folder (an .mlpackage)."""
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _row(target: str, path: Path, seconds: float, info: dict[str, Any]) -> dict[str, Any]:
    return {"target": target, "path": str(path), "bytes": size_of(Path(path)), "seconds": round(seconds, 3),
            "info": info}


def export_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'target':10} {'MB':>9} {'seconds':>8}  path"]
    for r in rows:
        lines.append(f"{r['target']:10} {r['bytes'] / 1e6:9.2f} {r['seconds']:8.2f}  {r['path']}")
    return "\n".join(lines)
