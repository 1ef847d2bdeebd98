"""Sweeps: compress at several ratios x methods (one calibration per target set), export to
ONNX (x int8), validate on ONNX Runtime against the original, mark the Pareto front."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..config import CompressConfig, method_config
from ..edge.artifacts import example_inputs
from ..edge.validate import ReferenceCache, validate
from ..errors import ConfigError
from ..methods import registry
from ..planning.targets import select_targets
from ..scoped import figure
from .pipeline import compress, gather


def quantizations() -> tuple[str, ...]:
    """The sweep's ``--quantize`` values: none, and the exporters' transforms of an ONNX file (int8)."""
    import exporters
    return ("none", *(t for t in exporters.transform_names() if exporters.get_exporter(t).derives_from == "onnx"))


def check_sweep(ratios: str, methods: str, quantize: str) -> tuple[list[float], list[str], list[str]]:
    """Parse and check the comma lists of a sweep."""
    out = _fractions("--ratios", ratios, "fractions of params to keep", "0.9,0.75,0.5",
                     "the fraction of params kept (the original is always measured), e.g. 0.5")
    ms = _choices("--methods", methods, registry.names(), "svd-whiten,svd")
    qs = _choices("--quantize", quantize, quantizations(), "none,int8")
    return out, ms, qs


def check_bytes(text: str | None) -> list[float]:
    """The sweep's ``--bytes`` fractions of the float32 bytes (none when not given)."""
    if text is None:
        return []
    return _fractions("--bytes", text, "fractions of the float32 bytes", "0.12,0.15",
                      "the fraction of the float32 bytes to ship, e.g. 0.15")


def _fractions(flag: str, text: str, what: str, example: str, meaning: str) -> list[float]:
    """A non-empty comma list of numbers in (0, 1), duplicates dropped, largest first."""
    items = [r.strip() for r in (text or "").split(",") if r.strip()]
    if not items:
        raise ConfigError(f"{flag} {text!r} is empty; give {what}, e.g. {flag} {example}")
    out: list[float] = []
    for r in items:
        try:
            v = float(r)
        except ValueError:
            raise ConfigError(f"{flag} entry {r!r} is not a number; e.g. {flag} {example}") from None
        if not 0.0 < v < 1.0:
            raise ConfigError(f"{flag} entry {r} is outside (0, 1); it is {meaning}")
        out.append(v)
    return sorted(set(out), reverse=True)


def _choices(flag: str, text: str, allowed: tuple[str, ...], example: str) -> list[str]:
    """A non-empty comma list of ``allowed`` names, duplicates dropped, order kept."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed] or ([] if items else ["(none)"])
    if bad:
        raise ConfigError(f"{flag} {text!r}: {bad} not among {', '.join(allowed)}; e.g. {flag} {example}")
    return list(dict.fromkeys(items))


def pareto(points: list[dict[str, Any]], size_tol: float = 0.005) -> None:
    """Mark ``pareto=True`` on points that no other point beats: no larger (sizes within
    ``size_tol`` relative count as equal: points of one parameter budget differ by a few kB of
    scales and rounding) and with less drift, or clearly smaller and with no more drift."""
    def beats(q: dict[str, Any], p: dict[str, Any]) -> bool:
        if q["bytes"] > p["bytes"] * (1 + size_tol) or q["drift"] > p["drift"]:
            return False
        return q["drift"] < p["drift"] or q["bytes"] < p["bytes"] * (1 - size_tol)

    for p in points:
        p["pareto"] = not any(beats(q, p) for q in points if q is not p)


def run_sweep(loaded: Any, calib: Any, held: Any, ratios: list[float], methods: list[str], quants: list[str], *,
              fractions: list[float] = (), targets: tuple = (), exclude: tuple = (), batch_size: int = 32, max_length: int = 128,
              threads: int = 1, runs: int = 30, keep: str | None = None,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One point per (ratio, method, quantization) plus the original and int8-only, and one per byte budget in
    ``fractions`` (int4/int8/corrected per layer, exported code for code); each has params, bytes, latency
    p50/p90 (batch 1), cosine mean/worst vs the original, drift."""
    import exporters

    from ..quant.store import export_table


    say = progress or (lambda msg: None)
    points: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:  # without keep, the exports go to a folder removed at the end
        work = Path(keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="lrcompress-sweep-")))
        work.mkdir(parents=True, exist_ok=True)
        model = loaded.model.eval()
        example = example_inputs(loaded.tokenizer, None, max_length=max_length) if loaded.tokenizer is not None else \
            dict(next(held.batches(1)).inputs)
        onnx = exporters.get_exporter("onnx")  # an ONNX sweep: every point runs on ONNX Runtime
        ref_path = onnx.export_with_info(model, example, work / onnx.file_name("original")).path
        reference = ReferenceCache(ref_path)  # the original's outputs and latency are measured once
        params0 = sum(p.numel() for p in model.parameters())

        def measure(label: str, method: str, ratio: float, quant: str, path: Path, params: int,
                    table: dict | None = None) -> None:
            if quant != "none":  # a transform of the ONNX file (int8, int4; a byte budget's own codes)
                transform = exporters.get_exporter(quant)
                opts = {} if table is None else {"table": table}
                try:
                    path = transform.derive(path, path.with_name(transform.file_name(path.stem)), **opts).path
                except exporters.BadInput as e:  # e.g. int4 blocks that divide no rank of a low-rank point
                    say(f"{label:28} skipped: {e}")
                    return
            rep = validate(str(path), model, "original", held, threads=threads, batch_size=1, max_length=max_length,
                           runs=runs, reference_cache=reference)
            out = next(iter(rep.outputs.values()))
            lat_c, lat_r = rep.latency["candidate"], rep.latency["reference"]
            point = {"label": label, "method": method, "ratio": ratio, "quantize": quant, "params": params,
                     "bytes": rep.sizes["candidate"], "p50_ms": lat_c["p50_ms"], "p90_ms": lat_c["p90_ms"],
                     "reference_p50_ms": lat_r["p50_ms"], "cos_mean": out["cos_mean"], "cos_worst": out["cos_worst"],
                     "drift": 1.0 - out["cos_mean"], "path": str(path) if keep else None}
            if "top1_agreement" in out:
                point["top1_agreement"] = out["top1_agreement"]
            points.append(point)
            say(f"{label:28} {point['bytes'] / 1e6:8.2f} MB  p50 {point['p50_ms']:7.2f} ms  cos {point['cos_mean']:.4f}")

        for quant in quants:
            measure("original" + (f" + {quant}" if quant != "none" else ""), "original", 1.0, quant, ref_path, params0)
        stats_by_targets: dict[tuple[str, ...], Any] = {}
        for method in methods:
            mcfg = method_config(method)
            names = tuple(select_targets(model, tuple(targets), tuple(exclude), method))
            for ratio in ratios:
                cfg = CompressConfig(method=mcfg, ratio=ratio, scope="model", targets=names)
                if calib is not None and names not in stats_by_targets:  # calibrate once per target set
                    say(f"calibrating {len(names)} layers")
                    stats_by_targets[names] = gather(model, cfg, calib, batch_size=batch_size)
                student, crep = compress(model, cfg, stats_by_targets.get(names))
                stem = f"{method}-{ratio:g}"
                path = onnx.export_with_info(student.eval(), example, work / onnx.file_name(stem)).path
                for quant in quants:
                    measure(f"{method} {ratio:g}" + (f" + {quant}" if quant != "none" else ""), method, ratio, quant,
                            path, crep.params_after)
        for frac in fractions:
            names = tuple(select_targets(model, tuple(targets), tuple(exclude), registry.DEFAULT))
            cfg = CompressConfig(bytes=frac, targets=names)
            if names not in stats_by_targets:
                say(f"calibrating {len(names)} layers")
                stats_by_targets[names] = gather(model, cfg, calib, batch_size=batch_size)
            student, crep = compress(model, cfg, stats_by_targets[names])
            path = onnx.export_with_info(student.eval(), example, work / onnx.file_name(f"bytes-{frac:g}")).path
            measure(f"bytes {frac:g} (int4/int8/fix)", "bytes", frac, "int4", path, crep.params_after,
                    table=export_table(crep.quant.grids))
    pareto(points)
    return points


def sweep_table(points: list[dict[str, Any]]) -> str:
    """The terminal table; '*' marks the Pareto front (size vs drift)."""
    base = next((p for p in points if p["label"] == "original"), points[0])
    head = (f"  {'point':28} {'params':>11} {'MB':>8} {'bytes':>6} {'p50 ms':>8} {'p90 ms':>8} {'speedup':>7} "
            f"{'cos mean':>9} {'cos worst':>9}")
    lines = [head, "-" * len(head)]
    for p in sorted(points, key=lambda p: -p["bytes"]):
        lines.append(f"{'*' if p['pareto'] else ' '} {p['label']:28} {p['params']:11,} {p['bytes'] / 1e6:8.2f} "
                     f"{p['bytes'] / base['bytes']:6.1%} {p['p50_ms']:8.2f} {p['p90_ms']:8.2f} "
                     f"{base['p50_ms'] / p['p50_ms']:7.2f} {p['cos_mean']:9.5f} {p['cos_worst']:9.5f}")
    lines.append("* = Pareto-optimal in (bytes, 1 - cos mean; sizes within 0.5 % count as equal); latency: ONNX "
                 "Runtime CPU, batch 1")
    return "\n".join(lines)


def pareto_plot(points: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Size vs drift, latency as colour; int8-only and the original as reference markers."""

    fig = figure(figsize=(7, 4.5))
    ax = fig.subplots()
    floor = 1e-5
    xs = [p["bytes"] / 1e6 for p in points]
    ys = [max(p["drift"], floor) for p in points]
    cs = [p["p50_ms"] for p in points]
    shapes = ("s", "o", "^", "v", "P", "X", "<", ">")  # one per registered method, in registry order
    markers = {"original": "*", "bytes": "D", **{m: shapes[i % len(shapes)] for i, m in enumerate(registry.names())}}
    edges = {"int8": "red", "int4": "blue"}
    sc = None
    for p, x, y, c in zip(points, xs, ys, cs):
        m = markers.get(p["method"], "D")
        sc = ax.scatter([x], [y], c=[c], cmap="viridis", vmin=min(cs), vmax=max(cs), marker=m,
                        s=160 if p["method"] == "original" else 60,
                        edgecolors=edges.get(p["quantize"], "black"), linewidths=1.2)
        ax.annotate(p["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((p for p in points if p["pareto"]), key=lambda p: p["bytes"])
    ax.plot([p["bytes"] / 1e6 for p in front], [max(p["drift"], floor) for p in front], "k--", lw=0.8,
            label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("model file (MB)")
    ax.set_ylabel(f"drift: 1 - cosine mean (floor {floor:g})")
    ax.set_title(f"{title}: size vs drift (o whitened SVD, s plain SVD, D byte budget, * original; edge red = int8, "
                 "blue = int4)", fontsize=8)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="ORT p50 latency (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
