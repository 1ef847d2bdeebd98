"""Validate a candidate (compressed folder, or any artifact the exporters' registry knows: .onnx, .ort,
.mlpackage...) against its reference on real data and on the target runtime: output drift, latency
percentiles, size, and gates. Loading, running and comparing go through ``exporters``; lrcompress adds the
data, the gates and the report."""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

import exporters
from exporters import OutputComparison, Runner, TorchRunner

from ..errors import ConfigError, DataError, SourceError
from ..io.checkpoint import MANIFEST, load, versions
from ..io.data import TensorData, TextData, is_positional
from ..workflow.report import param_bytes
from .artifacts import size_of
from .drift import check_reference, common_outputs, compare, summarize
from .gates import (
    FINITE_GATE,
    GATES,
    ValidationReport,
    apply_gates,
    check_gates,
    check_timing,
)
from .lm import TorchLM, check_causal, max_positions
from .perplexity import data_tokens, perplexity, plan_windows

__all__ = ["FINITE_GATE", "GATES", "TORCH_RUNTIMES", "ReferenceCache", "TorchRunner", "ValidationReport", "apply_gates",
           "check_gates", "check_timing", "feeds", "latency_feed", "model_runner", "runtimes", "select", "validate"]

# Where a torch model (the reference; a compressed folder) runs: in torch, or exported by the registry's exporter
# for that runtime. A candidate artifact on any other runtime is compared with the reference run in torch.
TORCH_RUNTIMES = ("torch", "onnxruntime")


def runtimes() -> tuple[str, ...]:
    """Every runtime ``--runtime`` accepts: torch, then the runtimes of the registered exporters."""
    return tuple(dict.fromkeys(("torch", *exporters.runtime_names())))


def _one_of(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def feeds(data: TextData | TensorData, batch_size: int) -> list[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """The data as numpy feeds (int64 ids, float32 tensors) with their token masks."""
    out = []
    for b in data.batches(batch_size):
        feed, positional = {}, is_positional(b.inputs)
        for k, v in b.inputs.items():
            arr = v.numpy()
            feed[k] = arr.astype(np.int64) if arr.dtype.kind in "iub" and not positional else arr
        out.append((feed, None if b.mask is None else b.mask.numpy()))
    return out


def latency_feed(data: TextData | TensorData, batch_size: int, max_length: int) -> dict[str, np.ndarray]:
    """A fixed batch for timing: text padded to ``max_length`` tokens, tensors as stored."""
    if isinstance(data, TextData):
        lines = (data.lines * batch_size)[:batch_size]
        enc = data.tokenizer(lines, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
        return {k: v.astype(np.int64) for k, v in enc.items()}
    return feeds(data.limit(min(batch_size, len(data))), batch_size)[0][0]


def select(feed: Mapping[str, np.ndarray], names: list[str], who: str) -> dict[str, np.ndarray]:
    """The inputs ``names`` of ``feed`` (all of it when ``names`` is empty); a DataError naming the missing ones."""
    if not names:
        return dict(feed)
    missing = [n for n in names if n not in feed]
    if missing:
        raise DataError(f"the {who} needs inputs {missing} but the data gives {sorted(feed)}; pass data made for "
                        "this model (text for a tokenized model, or tensors with these names)")
    return {n: feed[n] for n in names}


@dataclass
class ReferenceCache:
    """The reference exported once (``onnx``: its artifact, any format the registry loads) and what
    validating against it produced: its runner, outputs per batch and latency, re-used by later calls
    with the same data and settings."""

    onnx: Path
    runner: Any = None
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    latency: dict[str, Any] | None = None


def _input_names(runner: Any) -> list[str]:
    return list(getattr(runner, "input_names", []) or [])


def validate(candidate: str, reference: nn.Module, reference_name: str, data: TextData | TensorData, *,
             runtime: str | None = None, threads: int = 1, batch_size: int = 8, max_length: int = 128,
             runs: int = 50, warmup: int = 5, time_budget: float | None = None, gates: Mapping[str, float] | None = None,
             trust_pickle: bool = False, trust_code: bool = False,
             progress: Callable[[str, int, int], None] | None = None,
             reference_cache: ReferenceCache | None = None, ppl_seq_len: int | None = None,
             ppl_stride: int | None = None) -> ValidationReport:
    """Compare ``candidate`` with ``reference`` on ``data`` in ``runtime`` and apply ``gates``.
    ``reference_cache``: the reference exported once, its outputs and latency kept across calls
    with the same data and settings (a sweep).

    With the ``max_ppl_ratio`` gate the reference must be a causal LM: the text of ``data`` (lines joined by
    newlines) is tokenized once and the candidate, as it runs on ``runtime``, and the reference in torch are
    scored with sliding-window perplexity (``ppl_seq_len``: window, default the model's positions up to 1024;
    ``ppl_stride``: default the window); the gate is candidate / reference perplexity, and the report gives
    both perplexities and the candidate's next-token top-1 agreement with the reference."""
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1; e.g. --threads 1")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 8")
    check_timing(runs, time_budget)
    limits = check_gates(dict(gates or {}))
    limit = max_positions(reference)
    if limit is not None and isinstance(data, TextData) and max(max_length, data.max_length) > limit[0]:
        raise ConfigError(f"--max-length {max(max_length, data.max_length)} is beyond the {limit[0]} positions of the "
                          f"reference (config.{limit[1]}); pass --max-length {limit[0]} or less ([data] max_length in a recipe)")
    ppl = _perplexity_setup(reference, reference_name, data, threads, ppl_seq_len, ppl_stride) \
        if "max_ppl_ratio" in limits else None
    p = Path(candidate)
    if not p.exists():
        suffixes = list(dict.fromkeys(exporters.get_exporter(n).suffix for n in exporters.target_names()))
        raise ConfigError(f"candidate {candidate!r} does not exist; pass {_one_of(['a compressed folder'] + suffixes)}")
    folder = p.is_dir() and (p / MANIFEST).is_file()
    exp = None if folder else exporters.exporter_for_path(str(p))
    kind = "folder" if exp is None else exp.name
    allowed = TORCH_RUNTIMES if exp is None else (exp.runtime,)
    runtime = runtime or allowed[0]
    if runtime not in runtimes():
        raise ConfigError(f"--runtime {runtime!r} is not one of {', '.join(runtimes())}")
    if runtime not in allowed:
        raise ConfigError(f"--runtime {runtime} cannot run a {kind} candidate; use --runtime {' or '.join(allowed)}")
    report = ValidationReport(candidate=candidate, reference=reference_name, runtime=runtime)
    report.setup = {"threads": threads, "batch_size": batch_size, "machine": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "versions": versions(("onnx", "onnxruntime", "coremltools"))}
    batches = feeds(data, batch_size)
    lat_feed = latency_feed(data, batch_size, max_length)
    report.setup["sequence"] = next((v.shape[1] for v in lat_feed.values() if v.ndim >= 2), None)
    report.setup["examples"] = len(data)
    tmp = tempfile.TemporaryDirectory(prefix="lrcompress-validate-")
    try:
        work = Path(tmp.name)
        example = {k: torch.from_numpy(v[:1]) for k, v in batches[0][0].items()}
        cand_runner: Any = None
        if exp is not None:  # check the artifact and its inputs before anything is exported
            report.structure = exp.inspect(p)
            cand_runner = exp.load(p, threads=threads)
            report.sizes["candidate"] = size_of(p)
            select(batches[0][0], _input_names(cand_runner), "candidate")
        ref_runtime = runtime if runtime in TORCH_RUNTIMES else "torch"
        cache = reference_cache if ref_runtime != "torch" else None
        if cache is not None:
            if cache.runner is None:
                cache.runner = exporters.exporter_for_path(str(cache.onnx)).load(cache.onnx, threads=threads)
            ref_runner, report.sizes["reference"] = cache.runner, size_of(Path(cache.onnx))
        else:
            ref_runner, report.sizes["reference"] = model_runner(reference, ref_runtime, example, work, "reference",
                                                                 threads)
        if exp is None:
            model, _ = load(p, trust_pickle=trust_pickle, trust_code=trust_code)
            cand_runner, report.sizes["candidate"] = model_runner(model, runtime, example, work, "candidate", threads)
        if not getattr(cand_runner, "available_for_prediction", True):
            why = getattr(cand_runner, "unavailable_summary", None) or "the candidate cannot predict on this machine"
            report.status = f"skipped: {why}"
            report.latency = {"candidate": {"status": report.status}}
            apply_gates(report, limits)
            return report
        if ppl is not None:
            tokens, seq_len, stride = ppl
            name = candidate if candidate != reference_name else f"{candidate} (candidate)"
            cb = (lambda who, d, n: progress(f"perplexity {who}", d, n)) if progress else None
            report.perplexity = perplexity({reference_name: reference, name: cand_runner}, tokens, seq_len=seq_len,
                                           stride=stride, text="the --data text", threads=threads,
                                           progress=cb).to_dict()
        acc = OutputComparison()
        for i, (feed, mask) in enumerate(batches):
            if cache is not None and i < len(cache.outputs):
                r = cache.outputs[i]
            else:
                r = ref_runner(select(feed, _input_names(ref_runner), "reference"))
                if cache is not None:
                    cache.outputs.append(r)
            c = cand_runner(select(feed, _input_names(cand_runner), "candidate"))
            common = common_outputs(r, c)
            check_reference(common, mask)
            report.non_finite += compare(common, c, mask, acc)
            if progress:
                progress("compare", i + 1, len(batches))
        report.outputs = summarize(acc)
        for who, runner in (("reference", ref_runner), ("candidate", cand_runner)):
            if who == "reference" and cache is not None and cache.latency is not None:
                report.latency[who] = cache.latency
                continue
            cb = (lambda d, n, who=who: progress(f"latency {who}", d, n)) if progress else None
            report.latency[who] = exporters.run_latency(runner, select(lat_feed, _input_names(runner), who),
                                                        warmup=warmup, runs=runs, time_budget_s=time_budget,
                                                        progress=cb)
            if who == "reference" and cache is not None:
                cache.latency = report.latency[who]
        apply_gates(report, limits)
        return report
    finally:
        tmp.cleanup()


def model_runner(model: nn.Module, runtime: str, example: dict[str, torch.Tensor], folder: Path, stem: str,
                 threads: int) -> tuple[Runner, int]:
    """A runner for a torch model on ``runtime`` and its size: in torch, the parameter bytes; otherwise the
    model is exported into ``folder`` (as ``stem`` + suffix) by the registry's exporter for that runtime and
    the runner loads that artifact, whose bytes count."""
    if runtime == "torch":
        return TorchRunner(model, threads), param_bytes(model)
    exp = exporters.exporter_for_runtime(runtime)
    path = exp.export_with_info(model, example, folder / exp.file_name(stem)).path
    return exp.load(path, threads=threads), size_of(path)


def _perplexity_setup(reference: nn.Module, reference_name: str, data: TextData | TensorData, threads: int,
                      seq_len: int | None, stride: int | None) -> tuple[torch.Tensor, int, int]:
    """For the ``max_ppl_ratio`` gate, before anything is exported: the reference must be a causal LM and the data
    must hold one window; returns the token stream, the window and the stride."""
    try:
        lm = TorchLM(reference, reference_name, threads)
    except SourceError as e:
        raise ConfigError(f"--max-ppl-ratio needs a causal language model as the reference, but {e}; drop the gate "
                          "or validate a decoder (*ForCausalLM)") from None
    tokens = data_tokens(data)
    seq_len, stride = plan_windows([lm], len(tokens), seq_len, stride, "the --data text")
    try:
        check_causal(lm, tokens[: min(8, seq_len)].reshape(1, -1))
    except SourceError as e:
        raise ConfigError(f"--max-ppl-ratio needs a causal language model as the reference, but {e}; drop the gate "
                          "or validate a decoder") from None
    return tokens, seq_len, stride
