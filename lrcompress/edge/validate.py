"""Validate a candidate (compressed folder, .onnx, .ort, .mlpackage) against its reference on
real data and on the target runtime: output drift, latency percentiles, size, and gates."""

from __future__ import annotations

import math
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..io.data import TensorData, TextData
from .drift import check_reference, compare, summarize
from .artifacts import size_of
from ..errors import ConfigError, DataError
from ..scoped import torch_threads

RUNTIMES = ("torch", "onnxruntime", "coreml")
GATES = {  # name -> (report key, direction, allowed range of the limit)
    "max_cosine_drift": ("cosine_drift", "max", (0.0, 2.0)),
    "max_abs_error": ("max_abs", "max", (0.0, math.inf)),
    "min_top1_agreement": ("top1_agreement", "min", (0.0, 1.0)),
    "max_latency_ratio": ("latency_ratio", "max", (0.0, math.inf)),
    "max_size_ratio": ("size_ratio", "max", (0.0, math.inf)),
}
SKIP_COREML = "skipped: Core ML prediction needs macOS"
FINITE_GATE = "non_finite_examples"  # always checked: examples whose candidate output has NaN/Inf


class TorchRunner:
    """A torch module as a runner: named numpy inputs -> named numpy outputs (exporters' names)."""

    available_for_prediction = True

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        self.model = model.eval()
        self.threads = threads
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from exporters.io_spec import flatten_outputs
        feed = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
        with torch_threads(self.threads), torch.no_grad():  # process-wide count, restored after
            out = self.model(feed["input"]) if list(feed) == ["input"] else self.model(**feed)
        res = {k: v.detach().float().numpy() for k, v in flatten_outputs(out)}
        self.output_names = list(res)
        return res


def check_gates(gates: Mapping[str, float | None]) -> dict[str, float]:
    """Gate limits given (None = not set), validated against their ranges."""
    out = {}
    for name, value in gates.items():
        if value is None:
            continue
        if name not in GATES:
            raise ConfigError(f"unknown gate {name!r}; valid: {', '.join(GATES)}")
        lo, hi = GATES[name][2]
        flag = "--" + name.replace("_", "-")
        example = {"max_cosine_drift": 0.02, "max_abs_error": 0.05, "min_top1_agreement": 0.99}.get(name, 1.5)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{flag} {value!r} is not a finite number; give e.g. {flag} {example}")
        if not lo <= value <= hi:
            rng = f"in [{lo:g}, {hi:g}]" if math.isfinite(hi) else f">= {lo:g}"
            raise ConfigError(f"{flag} {value!r} must be {rng}; give e.g. {flag} {example}")
        out[name] = float(value)
    return out


def check_timing(runs: int, time_budget: float | None) -> None:
    """Refuse a latency ``runs`` count below 1 and a ``time_budget`` (seconds) that is not a
    finite number > 0, before anything is exported or run."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"--runs {runs!r} must be an integer >= 1; e.g. --runs 50")
    if time_budget is None:
        return
    if (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float)) or not math.isfinite(time_budget)
            or time_budget <= 0):
        raise ConfigError(f"--time-budget {time_budget!r} must be a finite number of seconds > 0 (or left out for "
                          "no limit); e.g. --time-budget 10")


def feeds(data: TextData | TensorData, batch_size: int) -> list[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """The data as numpy feeds (int64 ids, float32 tensors) with their token masks."""
    out = []
    for b in data.batches(batch_size):
        feed = {}
        for k, v in b.inputs.items():
            arr = v.numpy()
            feed[k or "input"] = arr.astype(np.int64) if arr.dtype.kind in "iub" and k else arr
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
    if not names:
        return dict(feed)
    missing = [n for n in names if n not in feed]
    if missing:
        raise DataError(f"the {who} needs inputs {missing} but the data gives {sorted(feed)}; pass data made for "
                        "this model (text for a tokenized model, or tensors with these names)")
    return {n: feed[n] for n in names}


@dataclass
class ValidationReport:
    candidate: str
    reference: str
    runtime: str
    status: str = "validated"
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    non_finite: int = 0  # examples whose candidate output has a NaN/Inf value (any output)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [g for g in self.gates if g["status"] == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"passed": not self.failed}

    def table(self) -> str:
        lines = [f"candidate {self.candidate} vs reference {self.reference} on {self.runtime}: {self.status}"]
        if self.outputs:
            lines.append(f"{'output':24} {'max abs':>10} {'mean abs':>10} {'rel L2':>9} {'cos mean':>9} "
                         f"{'cos worst':>9} {'top1':>6} {'NaN/Inf':>7}")
            for n, o in self.outputs.items():
                t1 = f"{o['top1_agreement']:.4f}" if "top1_agreement" in o else "-"
                lines.append(f"{n:24} {o['max_abs']:10.3g} {o['mean_abs']:10.3g} {o['rel_l2']:9.4g} "
                             f"{o['cos_mean']:9.5f} {o['cos_worst']:9.5f} {t1:>6} {o.get('non_finite', 0):>7}")
            if self.non_finite:
                lines.append(f"{self.non_finite} of {self.setup.get('examples', '?')} examples have NaN/Inf in a "
                             "candidate output: the candidate is broken whatever the other figures say")
        for who, lat in self.latency.items():
            if "p50_ms" in lat:
                lines.append(f"latency {who:10} p50 {lat['p50_ms']:8.2f} ms  p90 {lat['p90_ms']:8.2f}  p99 "
                             f"{lat['p99_ms']:8.2f}  ({lat['runs']} runs, batch {self.setup.get('batch_size')}, "
                             f"seq {self.setup.get('sequence')}, {self.setup.get('threads')} threads)")
            else:
                lines.append(f"latency {who:10} {lat.get('status', '')}")
        if self.structure:
            st = self.structure
            ops = st.get("ops") or st.get("op_counts") or {}
            lines.append(f"structure: inputs {[i.get('name') for i in st.get('inputs', [])]}, outputs "
                         f"{[o.get('name') for o in st.get('outputs', [])]}, {sum(ops.values()) if ops else '?'} ops"
                         + (f", weights {st['weight_bytes'] / 1e6:.2f} MB" if st.get("weight_bytes") else ""))
        if self.sizes:
            lines.append("size " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in self.sizes.items()))
        for g in self.gates:
            val = "-" if g["value"] is None else f"{g['value']:.5g}"
            lines.append(f"gate {g['gate']:20} {g['status']:8} value {val} limit {g['limit']:g}"
                         + (f" (over by {g['by']:.4g})" if g["status"] == "failed" else ""))
        return "\n".join(lines)


def apply_gates(report: ValidationReport, gates: dict[str, float]) -> None:
    """Record each gate's value and status. A NaN/Inf candidate output always adds the failed
    ``non_finite_examples`` check (limit 0), and a NaN statistic fails its gate."""
    if report.non_finite:
        report.gates.append({"gate": FINITE_GATE, "limit": 0, "value": report.non_finite, "status": "failed",
                             "by": report.non_finite, "why": "the candidate outputs NaN/Inf on these examples"})
    values: dict[str, float | None] = {"cosine_drift": None, "max_abs": None, "top1_agreement": None,
                                       "latency_ratio": None, "size_ratio": None}
    if report.outputs:
        values["cosine_drift"] = max(1 - o["cos_mean"] for o in report.outputs.values())
        values["max_abs"] = max(o["max_abs"] for o in report.outputs.values())
        tops = [o["top1_agreement"] for o in report.outputs.values() if "top1_agreement" in o]
        values["top1_agreement"] = min(tops) if tops else None
    lat = report.latency
    if "p50_ms" in lat.get("candidate", {}) and "p50_ms" in lat.get("reference", {}):
        values["latency_ratio"] = lat["candidate"]["p50_ms"] / lat["reference"]["p50_ms"]
    if report.sizes.get("reference"):
        values["size_ratio"] = report.sizes["candidate"] / report.sizes["reference"]
    for name, limit in gates.items():
        key, direction, _ = GATES[name]
        v = values[key]
        if v is None:
            why = SKIP_COREML if report.status.startswith("skipped") else f"no {key.replace('_', ' ')} measured"
            report.gates.append({"gate": name, "limit": limit, "value": None, "status": "skipped", "why": why})
            continue
        ok = not math.isnan(v) and (v <= limit if direction == "max" else v >= limit)
        report.gates.append({"gate": name, "limit": limit, "value": v, "status": "passed" if ok else "failed",
                             "by": (v - limit) if direction == "max" else (limit - v)})


@dataclass
class ReferenceCache:
    """The reference exported once (``onnx``) and what validating against it produced: its
    runner, outputs per batch and latency, re-used by later calls with the same data and settings."""

    onnx: Path
    runner: Any = None
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    latency: dict[str, Any] | None = None


def validate(candidate: str, reference: nn.Module, reference_name: str, data: TextData | TensorData, *,
             runtime: str | None = None, threads: int = 1, batch_size: int = 8, max_length: int = 128,
             runs: int = 50, warmup: int = 5, time_budget: float | None = None, gates: Mapping[str, float] | None = None,
             trust_pickle: bool = False, trust_code: bool = False,
             progress: Callable[[str, int, int], None] | None = None,
             reference_cache: ReferenceCache | None = None) -> ValidationReport:
    """Compare ``candidate`` with ``reference`` on ``data`` in ``runtime`` and apply ``gates``.
    ``reference_cache``: the reference exported once, its outputs and latency kept across calls
    with the same data and settings (a sweep)."""
    import exporters

    from ..io.checkpoint import MANIFEST, load, versions
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be >= 1; e.g. --threads 1")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1; e.g. --batch-size 8")
    check_timing(runs, time_budget)
    limits = check_gates(dict(gates or {}))
    p = Path(candidate)
    if not p.exists():
        raise ConfigError(f"candidate {candidate!r} does not exist; pass a compressed folder, .onnx, .ort or .mlpackage")
    folder = p.is_dir() and (p / MANIFEST).is_file()
    kind = "folder" if folder else exporters.exporter_for_path(str(p)).name
    allowed = {"folder": ("torch", "onnxruntime"), "onnx": ("onnxruntime",), "ort": ("onnxruntime",),
               "coreml": ("coreml",)}[kind]
    runtime = runtime or allowed[0]
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
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
        example = {k: torch.from_numpy(v[:1]) for k, v in batches[0][0].items()}
        cand_runner: Any = None
        if kind != "folder":  # check the artifact and its inputs before anything is exported
            exp = exporters.get_exporter(kind)
            report.structure = exp.inspect(p)
            cand_runner = exp.load(p, threads=threads) if kind != "coreml" else exp.load(p)
            report.sizes["candidate"] = size_of(p)
            select(batches[0][0], list(getattr(cand_runner, "input_names", []) or []), "candidate")
        cache = reference_cache if runtime == "onnxruntime" else None
        if cache is not None:
            if cache.runner is None:
                cache.runner = exporters.ort_runner(cache.onnx, threads=threads)
            ref_runner, report.sizes["reference"] = cache.runner, size_of(Path(cache.onnx))
        else:
            ref_runner, report.sizes["reference"] = _model_runner(reference, runtime, example,
                                                                  Path(tmp.name) / "reference.onnx", threads)
        if kind == "folder":
            model, _ = load(p, trust_pickle=trust_pickle, trust_code=trust_code)
            cand_runner, report.sizes["candidate"] = _model_runner(model, runtime, example,
                                                                   Path(tmp.name) / "candidate.onnx", threads)
        if not getattr(cand_runner, "available_for_prediction", True):
            report.status = SKIP_COREML
            report.latency = {"candidate": {"status": SKIP_COREML}}
            apply_gates(report, limits)
            return report
        acc: dict[str, dict[str, Any]] = {}
        for i, (feed, mask) in enumerate(batches):
            if cache is not None and i < len(cache.outputs):
                r = cache.outputs[i]
            else:
                r = ref_runner(select(feed, list(getattr(ref_runner, "input_names", []) or []), "reference"))
                if cache is not None:
                    cache.outputs.append(r)
            c = cand_runner(select(feed, list(getattr(cand_runner, "input_names", []) or []), "candidate"))
            common = [n for n in r if n in c]
            if not common:
                raise DataError(f"candidate outputs {sorted(c)} and reference outputs {sorted(r)} share no name; "
                                "export both from the same architecture")
            check_reference({n: r[n] for n in common}, mask)
            report.non_finite += compare({n: r[n] for n in common}, c, mask, acc)
            if progress:
                progress("compare", i + 1, len(batches))
        report.outputs = summarize(acc)
        for who, runner in (("reference", ref_runner), ("candidate", cand_runner)):
            if who == "reference" and cache is not None and cache.latency is not None:
                report.latency[who] = cache.latency
                continue
            names = list(getattr(runner, "input_names", []) or [])
            cb = (lambda d, n, who=who: progress(f"latency {who}", d, n)) if progress else None
            report.latency[who] = exporters.run_latency(runner, select(lat_feed, names, who), warmup=warmup, runs=runs,
                                                        time_budget_s=time_budget, progress=cb)
            if who == "reference" and cache is not None:
                cache.latency = report.latency[who]
        apply_gates(report, limits)
        return report
    finally:
        tmp.cleanup()


def _model_runner(model: nn.Module, runtime: str, example: dict[str, torch.Tensor], onnx_path: Path,
                  threads: int) -> tuple[Any, int]:
    """A runner for a torch model in ``runtime`` (exported to ``onnx_path`` for onnxruntime)
    and its size: the .onnx bytes, or the parameter bytes in torch."""
    import exporters
    if runtime == "onnxruntime":
        exporters.export_onnx(model, example, onnx_path)
        return exporters.ort_runner(onnx_path, threads=threads), size_of(onnx_path)
    from ..workflow.report import param_bytes
    return TorchRunner(model, threads), param_bytes(model)
