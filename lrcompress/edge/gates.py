"""Validation gates and the validation report: limits checked before anything runs, drift / latency / size
turned into passed, failed or skipped gates, and the report as a table or a dict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError

GATES = {  # name -> (report key, direction, allowed range of the limit)
    "max_cosine_drift": ("cosine_drift", "max", (0.0, 2.0)),
    "max_abs_error": ("max_abs", "max", (0.0, math.inf)),
    "min_top1_agreement": ("top1_agreement", "min", (0.0, 1.0)),
    "max_latency_ratio": ("latency_ratio", "max", (0.0, math.inf)),
    "max_size_ratio": ("size_ratio", "max", (0.0, math.inf)),
    "max_ppl_ratio": ("ppl_ratio", "max", (0.0, math.inf)),  # causal LMs: candidate / reference perplexity
}
FINITE_GATE = "non_finite_examples"  # always checked: examples whose candidate output has NaN/Inf


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
        example = {"max_cosine_drift": 0.02, "max_abs_error": 0.05, "min_top1_agreement": 0.99,
                   "max_ppl_ratio": 1.1}.get(name, 1.5)
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
    perplexity: dict[str, Any] = field(default_factory=dict)  # causal LMs with max_ppl_ratio: PerplexityReport dict

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
            if st.get("components"):
                lines.append("bytes by component: " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in
                                                                 sorted(st["components"].items(), key=lambda kv: -kv[1])))
        if self.perplexity.get("models"):
            p = self.perplexity
            ref, cand = p["models"][0], p["models"][-1]
            top1 = cand.get("top1_agreement")
            lines.append(f"perplexity reference {ref['ppl']:.4f} ({ref['runtime']}), candidate {cand['ppl']:.4f} "
                         f"({cand['runtime']}): ratio {cand['ratio']:.4f}, next-token top-1 agreement "
                         f"{'-' if top1 is None else f'{top1:.4f}'} over {p['scored']:,} tokens (windows of "
                         f"{p['seq_len']}, stride {p['stride']})")
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
                                       "latency_ratio": None, "size_ratio": None, "ppl_ratio": None}
    if report.outputs:
        values["cosine_drift"] = max(1 - o["cos_mean"] for o in report.outputs.values())
        values["max_abs"] = max(o["max_abs"] for o in report.outputs.values())
        tops = [o["top1_agreement"] for o in report.outputs.values() if "top1_agreement" in o]
        values["top1_agreement"] = min(tops) if tops else None
    lat = report.latency
    if "p50_ms" in lat.get("candidate", {}) and "p50_ms" in lat.get("reference", {}):
        values["latency_ratio"] = lat["candidate"]["p50_ms"] / lat["reference"]["p50_ms"]
    if len(report.perplexity.get("models", [])) > 1:
        values["ppl_ratio"] = report.perplexity["models"][-1]["ratio"]
    if report.sizes.get("reference"):
        values["size_ratio"] = report.sizes["candidate"] / report.sizes["reference"]
    for name, limit in gates.items():
        key, direction, _ = GATES[name]
        v = values[key]
        if v is None:
            why = report.status if report.status.startswith("skipped") else f"no {key.replace('_', ' ')} measured"
            report.gates.append({"gate": name, "limit": limit, "value": None, "status": "skipped", "why": why})
            continue
        ok = not math.isnan(v) and (v <= limit if direction == "max" else v >= limit)
        report.gates.append({"gate": name, "limit": limit, "value": v, "status": "passed" if ok else "failed",
                             "by": (v - limit) if direction == "max" else (limit - v)})
