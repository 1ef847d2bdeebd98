"""Benchmark of the core feature: low-rank compression of MiniLM at whole-model budgets.

Reference work: the embedded MiniLM checkpoint (``lrcompress.resolve("minilm")``) with the
reference split of samples/pydoc_text.py (first 256 sentences calibrate, sentences
1000-1499 are held out). For every row (method x allocation x ratio of the WHOLE model's
parameters, embeddings included) the script compresses a copy of the original and measures
the drift of the normalized mean-pooled sentence embeddings on the held-out sentences
(samples/minilm_eval.py): cosine to the original (mean, worst) and the overlap of the
10-nearest-neighbour sets (nn10).

Calibration statistics are gathered once and reused by every row; their time is added to
each row's seconds, so a row's time is what a single CLI compression would cost. One extra
end-to-end run (load, calibrate, compress at 50 % svd-whiten global, save) is timed on its
own against the goal "compressing MiniLM takes <= 60 s on this 2-core machine".

Run from the repository root:  python samples/bench_core.py [--ratios 0.9,0.75,0.5]
    [--rows svd/uniform,svd-whiten/uniform,svd-whiten/global] [--json FILE] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import lrcompress  # noqa: E402
from lrcompress.errors import LrcompressError  # noqa: E402
from lrcompress.workflow.pipeline import gather  # noqa: E402

from minilm_eval import drift, embed  # noqa: E402
from pydoc_text import reference_split  # noqa: E402

# "global-flat" is global allocation without measured sensitivities (probe_passes=0)
ROWS = (("svd", "uniform"), ("svd-whiten", "uniform"), ("svd-whiten", "global-flat"), ("svd-whiten", "global"))
MAX_LENGTH = 128
BATCH_SIZE = 32
SEED = 0

GOAL_ERROR_RATIO = 1.005
GOAL_COS_MEAN_AT_50 = 0.90
GOAL_SECONDS = 60.0


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios {text!r}: give comma-separated numbers, e.g. 0.9,0.75,0.5")
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise argparse.ArgumentTypeError(f"--ratios {text!r}: every ratio must be in (0, 1]")
    return ratios


def parse_rows(text: str) -> list[tuple[str, str]]:
    known = {f"{m}/{a}": (m, a) for m, a in ROWS}
    out = []
    for item in (x.strip().replace(":", "/") for x in text.split(",") if x.strip()):
        if item not in known:
            raise argparse.ArgumentTypeError(f"--rows: unknown row {item!r}; pick from {', '.join(known)}")
        if known[item] not in out:
            out.append(known[item])
    if not out:
        raise argparse.ArgumentTypeError("--rows: give at least one row")
    return out


def make_config(method: str, allocate: str, ratio: float) -> lrcompress.CompressConfig:
    passes = 0 if allocate == "global-flat" else 2
    return lrcompress.CompressConfig(method=lrcompress.method_config(method), ratio=ratio, scope="model",
                                     allocate=allocate.replace("-flat", ""), seed=SEED, probe_passes=passes)


def end_to_end(lines: list[str]) -> dict[str, float]:
    """What `lrcompress compress minilm --calib FILE --ratio 0.5 --scope model --allocate global
    -o OUT` costs: load, calibrate, plan, factorize, save (timed separately)."""
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    loaded = lrcompress.resolve("minilm")
    t_load = time.perf_counter() - t0
    config = make_config("svd-whiten", "global", 0.5)
    data = lrcompress.TextData(lines, loaded.tokenizer, MAX_LENGTH)
    report = lrcompress.compress_(loaded.model, config, data, batch_size=BATCH_SIZE)
    with tempfile.TemporaryDirectory(prefix="bench_core-") as tmp:
        t1 = time.perf_counter()
        lrcompress.save(loaded.model, Path(tmp) / "out", loaded.spec, plan=report.plan,
                        side_files=loaded.side_files, extra_files={"report.json": report.to_json() + "\n"})
        t_save = time.perf_counter() - t1
    s = report.seconds
    return {"load": t_load, "calibrate": s["calibrate"], "plan": s["plan"], "factorize": s["factorize"],
            "compress": s["total"], "save": t_save, "total": t_load + s["total"] + t_save,
            "params_ratio": report.ratio, "worst_error_ratio": report.worst_error_ratio}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=parse_ratios, default=parse_ratios("0.9,0.75,0.5"),
                    help="comma-separated fractions of the whole model's parameters to keep (default 0.9,0.75,0.5)")
    ap.add_argument("--rows", type=parse_rows, default=list(ROWS),
                    help="comma-separated subset of " + ",".join(f"{m}/{a}" for m, a in ROWS) + " (default: all)")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON to FILE")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: leave as is)")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end timing run")
    args = ap.parse_args(argv)

    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)

    calib_lines, held = reference_split()
    print(f"lrcompress {lrcompress.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"data: {len(calib_lines)} calibration sentences, {len(held)} held-out sentences "
          f"(max length {MAX_LENGTH}, batch {BATCH_SIZE})")

    e2e = None
    if not args.no_e2e:  # first, so it sees a process as cold as the CLI's (bar imports)
        e2e = end_to_end(calib_lines)

    torch.manual_seed(SEED)
    loaded = lrcompress.resolve("minilm")
    model, tok = loaded.model, loaded.tokenizer
    params_model = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    ref = embed(model, tok, held, MAX_LENGTH)
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = gather(model, make_config("svd-whiten", "global", 0.5),
                   lrcompress.TextData(calib_lines, tok, MAX_LENGTH), batch_size=BATCH_SIZE)
    t_calib = time.perf_counter() - t0
    print(f"model: MiniLM, {params_model:,} params; reference embeddings {t_ref:.1f}s; "
          f"calibration ({stats.examples} examples, {stats.tokens} tokens) {t_calib:.2f}s "
          "(gathered once, added to every row's seconds)")
    print()

    head = (f"{'method':<11} {'alloc':<11} {'target':>6} {'achieved':>8} {'cos mean':>8} {'cos worst':>9} "
            f"{'nn10':>6} {'err ratio':>9} {'seconds':>7}")
    print(head)
    print("-" * len(head))
    results = []
    for method, allocate in args.rows:
        for ratio in args.ratios:
            torch.manual_seed(SEED)
            row = {"method": method, "allocate": allocate, "target_ratio": ratio}
            try:
                student, report = lrcompress.compress(model, make_config(method, allocate, ratio), stats,
                                                      batch_size=BATCH_SIZE)
            except LrcompressError as e:
                row["error"] = str(e)
                results.append(row)
                print(f"{method:<11} {allocate:<11} {ratio:>6.2f}  error: {e}")
                continue
            d = drift(ref, embed(student, tok, held, MAX_LENGTH))
            seconds = t_calib + report.seconds["plan"] + report.seconds["factorize"]
            err = report.worst_error_ratio if method == "svd-whiten" else None
            row.update(params_ratio=report.ratio, params_after=report.params_after, **d,
                       worst_error_ratio=err, seconds=seconds,
                       seconds_detail={"calibrate": t_calib, "plan": report.seconds["plan"],
                                       "factorize": report.seconds["factorize"]},
                       factorized_layers=sum(1 for l in report.layers if l.rank is not None),
                       dense_layers=sum(1 for l in report.layers if l.rank is None))
            results.append(row)
            print(f"{method:<11} {allocate:<11} {ratio:>6.2f} {report.ratio:>8.4f} {d['cos_mean']:>8.4f} "
                  f"{d['cos_worst']:>9.4f} {d['nn10']:>6.3f} {fmt(err, '9.4f'):>9} {seconds:>7.2f}")
            del student
    print("-" * len(head))
    print("target/achieved: fraction of the whole model's parameters kept; err ratio: worst achieved/optimal "
          "output error over factorized svd-whiten layers; seconds: calibration + plan + factorization")

    if e2e is not None:
        print()
        print(f"end-to-end (svd-whiten, global, 50 %): calibrate {e2e['calibrate']:.2f}s + plan {e2e['plan']:.2f}s "
              f"+ factorize {e2e['factorize']:.2f}s = {e2e['compress']:.2f}s; with load {e2e['load']:.2f}s and "
              f"save {e2e['save']:.2f}s: {e2e['total']:.2f}s (achieved {e2e['params_ratio']:.4f})")

    goals = []
    whiten = [r for r in results if r["method"] == "svd-whiten" and r.get("worst_error_ratio") is not None]
    if whiten:
        worst = max(r["worst_error_ratio"] for r in whiten)
        goals.append(("every svd-whiten layer's achieved/optimal error ratio <= 1.005",
                      worst <= GOAL_ERROR_RATIO, f"worst {worst:.4f}"))
    at50 = [r for r in results if abs(r["target_ratio"] - 0.5) < 1e-9 and "cos_mean" in r]
    if at50:
        best = max(at50, key=lambda r: r["cos_mean"])
        goals.append(("best row at 50 % reaches cosine mean >= 0.90", best["cos_mean"] >= GOAL_COS_MEAN_AT_50,
                      f"{best['method']} {best['allocate']}: {best['cos_mean']:.4f}"))
    if e2e is not None:
        goals.append(("compressing MiniLM (calibrate + compress, 50 %) takes <= 60 s",
                      e2e["compress"] <= GOAL_SECONDS,
                      f"{e2e['compress']:.2f}s ({e2e['total']:.2f}s with load and save)"))
    print()
    print("goals:")
    for text, ok, detail in goals:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}: {detail}")

    if args.json:
        out = {"env": {"lrcompress": lrcompress.__version__, "torch": torch.__version__,
                       "python": platform.python_version(), "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads()},
               "data": {"calibration": len(calib_lines), "held_out": len(held), "max_length": MAX_LENGTH,
                        "batch_size": BATCH_SIZE},
               "params_model": params_model, "calibration_seconds": t_calib, "rows": results,
               "end_to_end": e2e,
               "goals": [{"goal": t, "pass": ok, "detail": d} for t, ok, d in goals]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
