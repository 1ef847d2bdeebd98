"""Workflow benchmark (issue 6) on MiniLM, ONNX Runtime CPU, 1 thread, batch 1, seq 128:

1. the sweep (ratios x {svd-whiten, svd} x {none, int8}) with its Pareto front, the plot
   written to samples/minilm/pareto.png;
2. --budget latency=F: plan, compress, export, validate; its measured latency vs F x the
   original's, and its cosine vs the best sweep point at or below that latency;
3. wall time of a full `lrcompress run samples/minilm/recipe.toml` (no recovery).

    python samples/bench_workflow.py [--samples 200] [--latency 0.6] [--skip-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    import torch

    import lrcompress
    from lrcompress.config import CompressConfig
    from lrcompress.io.data import TextData, read_lines
    from lrcompress.workflow.pipeline import compress, gather
    from lrcompress.workflow.sweep import pareto_plot, run_sweep, sweep_table
    from lrcompress.edge.validate import validate

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200, help="held-out sentences (samples/eval.txt)")
    ap.add_argument("--ratios", type=str, default="0.9,0.75,0.5,0.35")
    ap.add_argument("--latency", type=float, default=0.6)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument("--reuse-sweep", action="store_true", help="read samples/minilm/sweep.json instead of sweeping")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = lrcompress.resolve("minilm")
    tok = loaded.tokenizer
    calib = TextData(read_lines(HERE / "calib.txt"), tok, 128)
    held = TextData(read_lines(HERE / "eval.txt", args.samples), tok, 128)
    ratios = [float(r) for r in args.ratios.split(",")]
    t = time.perf_counter()
    if args.reuse_sweep:
        points = json.loads((HERE / "minilm" / "sweep.json").read_text())
    else:
        points = run_sweep(loaded, calib, held, ratios, ["svd-whiten", "svd"], ["none", "int8"], runs=args.runs,
                           progress=lambda m: print(m, file=sys.stderr, flush=True))
        (HERE / "minilm" / "sweep.json").write_text(json.dumps(points, indent=2) + "\n")
        pareto_plot(points, str(HERE / "minilm" / "pareto.png"), title="MiniLM, ORT CPU 1 thread")
    sweep_s = time.perf_counter() - t
    print(sweep_table(points))
    print(f"sweep: {len(points)} points in {sweep_s:.0f} s" + (" (read from sweep.json)" if args.reuse_sweep else ""))
    for quant in ("none", "int8"):
        others = [p for p in points if p["method"] == "svd" and p["quantize"] == quant] + \
            [p for p in points if p["label"] == "original + int8"]
        front = [p for p in points if p["pareto"]]
        beaten = [o["label"] for o in others if not o["pareto"] or any(
            f["bytes"] <= o["bytes"] and f["drift"] <= o["drift"] and f is not o for f in front)]
        print(f"  {quant}: dominated by the front: {len(set(beaten))} of {len(others)} int8-only / plain-SVD points")

    # latency-aware planning, for the fp32 export and for the int8 export
    for int8 in (False, True):
        cfg = CompressConfig(latency=args.latency, latency_threads=1, latency_batch=1, latency_seq=128,
                             latency_int8=int8)
        t = time.perf_counter()
        stats = gather(loaded.model, cfg, calib)
        student, rep = compress(loaded.model, cfg, stats)
        plan_s = time.perf_counter() - t
        lat = rep.plan.get("latency", {})
        with tempfile.TemporaryDirectory() as tmp:
            import exporters
            from lrcompress.edge.artifacts import example_inputs
            path = exporters.export_onnx(student.eval(), example_inputs(tok), Path(tmp) / "lat.onnx").path
            if int8:
                exporters.quantize_int8(path, Path(tmp) / "lat.int8.onnx")
                path = Path(tmp) / "lat.int8.onnx"
            v = validate(str(path), loaded.model, "minilm", held, threads=1, batch_size=1, runs=args.runs)
        out = next(iter(v.outputs.values()))
        ratio = v.latency["candidate"]["p50_ms"] / v.latency["reference"]["p50_ms"]
        quant = "int8" if int8 else "none"
        print(f"\n--budget latency={args.latency}{' --latency-int8' if int8 else ''}: params {rep.params_after:,} "
              f"({rep.ratio:.1%}); plan {plan_s:.0f} s; predicted {lat.get('predicted_ms')} ms, budget "
              f"{lat.get('budget_ms')} ms of {lat.get('original_ms')} ms")
        print(f"  validated p50 {v.latency['candidate']['p50_ms']:.2f} ms vs original {v.latency['reference']['p50_ms']:.2f} "
              f"ms = {ratio:.3f} (goal <= {args.latency}); cos mean {out['cos_mean']:.4f} worst {out['cos_worst']:.4f}")
        base = next(p for p in points if p["label"] == "original")
        fast = [p for p in points if p["quantize"] == quant and p["label"] != "original"
                and p["p50_ms"] <= args.latency * base["p50_ms"]]
        best = max(fast, key=lambda p: p["cos_mean"]) if fast else None
        print(f"  best sweep point ({quant}) at <= {args.latency} x original: "
              + (f"{best['label']} p50 {best['p50_ms']:.2f} ms cos {best['cos_mean']:.4f}" if best else "none"))

    if not args.skip_run:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "lrcompress", "run", str(HERE / "minilm" / "recipe.toml"),
                                "-o", str(Path(tmp) / "run"), "-q"], capture_output=True, text=True)
            run_s = time.perf_counter() - t
            print(f"\nlrcompress run samples/minilm/recipe.toml: exit {r.returncode} in {run_s:.0f} s (goal <= 180 s)")
            if r.returncode not in (0, 1):
                print(r.stderr[-2000:])


if __name__ == "__main__":
    main()
