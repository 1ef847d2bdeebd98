"""Size frontier on MiniLM: every way to ship the reference model small, as ONNX files run by ONNX Runtime CPU,
side by side in one table: bytes, embedding drift in and out of the calibration's domain, and latency.

Reference work as in samples/bench_closed_loop.py: MiniLM (``lrcompress.resolve("minilm")``), calibrated on pydoc
sentences 0-255 (``pydoc_text.reference_split``); drift = cosine of the normalized mean-pooled sentence embeddings
of the ONNX file on ORT vs the torch fp32 original, on the 500 held-out pydoc sentences (in domain) and on the 428
sentences of another domain (``other_text.other_domain_sentences``), plus the overlap of the 10-nearest-neighbour
sets (``minilm_eval.drift``). Latency: ORT CPU, 1 thread, batch 1, sequence 128 (padded), warm-up then ``--runs``.

Rows (each an ONNX file; ``--only`` picks some by key, the fp32 row always runs: it is the reference):
  fp32                 the original, exported to ONNX (``exporters.get_exporter("onnx")``)
  ort-int4-b32/-b128   onnxruntime's own MatMulNBitsQuantizer (default config: symmetric, accuracy level 4,
                       MatMul axis 0 + Gather axis 1) on the fp32 file after gemm_to_matmul
  ort-hqq-b32          onnxruntime's HQQ quantizer (4 bits, block 32; MatMul only, its default)
  int4-rtn/-hqq        lrcompress's int4 transform of the fp32 file (``exporters.quantize_int4``, block 32; hqq:
                       ORT's HQQ for the MatMuls, round to nearest for the embedding tables)
  int8                 ``exporters.quantize_int8`` (per channel, embeddings too)
  lr0.75+int8 ...      low rank (ratio 0.75 / 0.40 of the params, svd-whiten, open loop) then int8;
  svd0.75+int8         plain SVD at 0.75 then int8
  bytes0.10 ...        ``CompressConfig(bytes=F, quant_algorithm="gptq")`` then the int4 export with the plan's
                       codes table (``exporters.quantize_int4(table=...)``); bytes0.15-rtn: the same with rtn

The calibration statistics are gathered once (``lrcompress.gather``) and passed to every compress (each
config targets the same layers); row seconds exclude that.

Run from the repository root (about 15 min on 2 cores):
    python samples/bench_size_frontier.py [--only fp32,int8,bytes0.15] [--sentences 100] [--runs 30]
        [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from minilm_eval import drift, embed
from other_text import other_domain_sentences
from pydoc_text import reference_split

import exporters
import lrcompress

MAX_LENGTH, SEED = 128, 0
BUDGETS = ("0.10", "0.12", "0.135", "0.15", "0.169", "0.20")
ROWS = ("fp32", "ort-int4-b32", "ort-int4-b128", "ort-hqq-b32", "int4-rtn", "int4-hqq", "int8",
        "lr0.75+int8", "lr0.40+int8", "svd0.75+int8", *(f"bytes{f}" for f in BUDGETS), "bytes0.15-rtn")
GOALS = ((0.12, 0.96), (0.169, 0.99))  # (fraction of the fp32 ONNX bytes, in-domain cos mean to reach)


def file_bytes(path: Path) -> int:
    """Bytes of an ONNX file plus its ``.data`` external weights, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def embed_ort(runner: Any, tok: Any, sentences: list[str], batch: int = 32) -> torch.Tensor:
    """Normalized mean-pooled last hidden states of an ORT runner (as ``minilm_eval.embed`` does in torch)."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in runner.input_names}
        h = runner(feed)["last_hidden_state"].astype(np.float32)
        m = enc["attention_mask"][..., None].astype(np.float32)
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1)
        out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return torch.from_numpy(np.concatenate(out))


def ort_nbits(src: Path, dst: Path, algo: str, block: int) -> dict[str, Any]:
    """onnxruntime's own 4-bit weight-only quantizer on ``src`` (after gemm_to_matmul) into ``dst``."""
    import logging

    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    logging.getLogger(q.__name__).setLevel(logging.WARNING)  # one INFO line per node otherwise
    logging.getLogger().setLevel(logging.WARNING)  # its import's basicConfig(INFO) floods later exports

    from exporters.quantize import gemm_to_matmul

    model = onnx.load(str(src))
    gemm_to_matmul(model)
    if algo == "default":
        config = q.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4,
                                                op_types_to_quantize=("MatMul", "Gather"),
                                                quant_axes=(("MatMul", 0), ("Gather", 1)))
    else:
        config = q.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    quantizer = q.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    ops: dict[str, int] = {}
    for n in quantizer.model.model.graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"quantized_ops": ops}


class Bench:
    """Shared state: the original, its tokenizer, the data, the fp32 file, the references."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        calib, held = reference_split()
        other = other_domain_sentences(500)
        if args.sentences:
            held, other = held[:args.sentences], other[:args.sentences]
        self.calib, self.held, self.other = calib, held, other
        loaded = lrcompress.resolve("minilm")
        self.model, self.tok = loaded.model.eval(), loaded.tokenizer
        self.params = sum(p.numel() for p in self.model.parameters())
        from lrcompress.edge.artifacts import example_inputs
        self.example = example_inputs(self.tok)
        # calibrated once: every row's config targets the same layers (svd-whiten), so compress() takes the
        # statistics as they are (what passing the TextData would gather again in each row)
        t0 = time.perf_counter()
        self.data = lrcompress.gather(self.model, lrcompress.CompressConfig(ratio=0.5, scope="model"),
                                      lrcompress.TextData(calib, self.tok, MAX_LENGTH))
        self.calib_seconds = time.perf_counter() - t0
        self.refs = {"in": embed(self.model, self.tok, held, MAX_LENGTH),
                     "other": embed(self.model, self.tok, other, MAX_LENGTH)}
        enc = self.tok(held[:1], padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np")
        self.fixed = {k: v.astype(np.int64) for k, v in enc.items()}
        self.fp32: Path | None = None

    def export(self, model: torch.nn.Module, name: str) -> Path:
        return exporters.get_exporter("onnx").export_with_info(model, self.example, self.work / f"{name}.onnx").path

    def compress(self, cfg: lrcompress.CompressConfig, data: Any) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(SEED)
        return lrcompress.compress(self.model, cfg, data)

    # -- row builders: each returns (the ONNX file to measure, details) ------------------------------------------
    def build(self, key: str) -> tuple[Path, dict[str, Any]]:
        w, src = self.work, self.fp32
        if key == "fp32":
            self.fp32 = self.export(self.model, "fp32")
            return self.fp32, {}
        if key.startswith("ort-"):
            algo = "hqq" if key.startswith("ort-hqq") else "default"
            block = int(key.rsplit("-b", 1)[1])
            dst = w / f"{key}.onnx"
            return dst, ort_nbits(src, dst, algo, block)
        if key.startswith("int4-"):
            r = exporters.quantize_int4(src, w / f"{key}.onnx", block_size=32, accuracy_level=4,
                                        algorithm=key.split("-")[1])
            return r.path, {"quantized_ops": r.info["quantized_ops"]}
        if key == "int8":
            r = exporters.quantize_int8(src, w / "int8.onnx")
            return r.path, {"quantized_ops": r.info["quantized_ops"]}
        if key.endswith("+int8"):
            ratio = float(key[len("svd") if key.startswith("svd") else len("lr"):-len("+int8")])
            if key.startswith("svd"):
                cfg = lrcompress.CompressConfig(ratio=ratio, scope="model", method=lrcompress.method_config("svd"))
                student, report = self.compress(cfg, None)
            else:
                cfg = lrcompress.CompressConfig(ratio=ratio, scope="model", calibration="open")
                student, report = self.compress(cfg, self.data)
            plain = self.export(student, key.replace("+", "-"))
            r = exporters.quantize_int8(plain, w / f"{key.replace('+', '-')}.int8.onnx")
            plain.unlink()
            return r.path, {"achieved_ratio": report.ratio, "quantized_ops": r.info["quantized_ops"],
                            "compress_seconds": report.seconds}
        if key.startswith("bytes"):
            from lrcompress.quant.store import export_table
            algo = "rtn" if key.endswith("-rtn") else "gptq"
            frac = float(key[len("bytes"):].removesuffix("-rtn"))
            cfg = lrcompress.CompressConfig(bytes=frac, quant_algorithm=algo, block_size=self.args.block_size)
            student, report = self.compress(cfg, self.data)
            table = export_table(report.quant.grids)
            plain = self.export(student, key)
            r = exporters.quantize_int4(plain, w / f"{key}.int4.onnx", table=table, accuracy_level=4)
            plain.unlink()
            ops = r.info["quantized_ops"]
            budget = frac * 4 * self.params
            return r.path, {"budget_fraction": frac, "budget_bytes": int(budget),
                            "planned_bytes": report.quant.planned_bytes, "table_entries": len(table),
                            "table_used": sum(ops.values()), "quantized_ops": ops,
                            "budget_ok": file_bytes(r.path) <= budget, "compress_seconds": report.seconds}
        raise ValueError(f"unknown row {key!r}; valid: {', '.join(ROWS)}")

    def measure(self, path: Path) -> dict[str, Any]:
        r1 = exporters.ort_runner(path, threads=1)
        lat = exporters.run_latency(r1, {k: v for k, v in self.fixed.items() if k in r1.input_names},
                                    warmup=self.args.warmup, runs=self.args.runs)
        r2 = exporters.ort_runner(path, threads=2)
        d_in = drift(self.refs["in"], embed_ort(r2, self.tok, self.held))
        d_out = drift(self.refs["other"], embed_ort(r2, self.tok, self.other))
        return {"bytes": file_bytes(path), "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "in": d_in,
                "other": d_out}


def pareto(rows: list[dict[str, Any]]) -> None:
    """Mark rows that no other row beats: no larger and a higher in-domain cos mean (or smaller, same cos)."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["bytes"] <= r["bytes"] and o["in"]["cos_mean"] >= r["in"]["cos_mean"]
            and (o["bytes"] < r["bytes"] or o["in"]["cos_mean"] > r["in"]["cos_mean"]) for o in rows)


HEAD = (f"{'row':<14} {'MB':>6} {'% fp32':>6} | {'cos':>6} {'worst':>6} {'nn10':>5} | {'cos':>6} {'worst':>6} "
        f"{'nn10':>5} | {'p50 ms':>7} {'x fp32':>6} | {'front':>5} {'budget':>6} {'sec':>5}")


def line(r: dict[str, Any], base: dict[str, Any]) -> str:
    i, o = r["in"], r["other"]
    budget = "-" if "budget_ok" not in r["details"] else ("ok" if r["details"]["budget_ok"] else "OVER")
    front = "*" if r.get("pareto") else ""
    return (f"{r['key']:<14} {r['bytes'] / 1e6:6.2f} {r['bytes'] / base['bytes']:6.1%} | {i['cos_mean']:6.4f} "
            f"{i['cos_worst']:6.4f} {i['nn10']:5.3f} | {o['cos_mean']:6.4f} {o['cos_worst']:6.4f} {o['nn10']:5.3f} | "
            f"{r['p50_ms']:7.2f} {r['p50_ms'] / base['p50_ms']:6.2f} | {front:>5} {budget:>6} {r['seconds']:5.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help=f"comma-separated row keys (fp32 always runs): {', '.join(ROWS)}")
    ap.add_argument("--sentences", type=int, default=0, help="evaluate on the first N sentences of each set (0 = all)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--block-size", type=int, default=128, help="int4 block of the byte-budget rows (--block-size)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, help="keep the ONNX files in this folder")
    args = ap.parse_args(argv)
    keys = list(ROWS) if args.only is None else ["fp32"] + [k for k in args.only.split(",") if k and k != "fp32"]
    bad = [k for k in keys if k not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; valid: {', '.join(ROWS)}")
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    import onnxruntime
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-frontier-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        bench = Bench(args, work)
        print(f"lrcompress {lrcompress.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
              f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        print(f"data: {len(bench.calib)} calibration sentences (pydoc), {len(bench.held)} held-out pydoc sentences, "
              f"{len(bench.other)} other-domain sentences (max length {MAX_LENGTH}); model {bench.params:,} params "
              f"({4 * bench.params / 1e6:.2f} MB fp32); latency: ORT CPU 1 thread, batch 1, seq {MAX_LENGTH} padded, "
              f"{args.warmup} warm-up + {args.runs} runs; embeddings: ORT 2 threads, batch 32; calibration "
              f"gathered once in {bench.calib_seconds:.0f} s; load average {os.getloadavg()[0]:.1f}")
        print(f"{'':29}| {'in domain (pydoc)':^20} | {'other domain':^20} |")
        print(HEAD)
        print("-" * len(HEAD), flush=True)
        rows: list[dict[str, Any]] = []
        failures: list[tuple[str, str]] = []
        for key in keys:
            t0 = time.perf_counter()
            try:
                path, details = bench.build(key)
                row = {"key": key, **bench.measure(path), "details": details}
            except Exception:
                tb = traceback.format_exc()
                failures.append((key, tb))
                print(f"{key:<14} FAILED: {tb.strip().splitlines()[-1]}", flush=True)
                if key == "fp32":
                    raise
                continue
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(line(row, rows[0]), flush=True)
            if key != "fp32" and not args.keep:
                path.unlink(missing_ok=True)
        pareto(rows)
        report(rows, failures, keys)
        print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "failures": [{"row": k, "traceback": t}
                                                                           for k, t in failures]}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def report(rows: list[dict[str, Any]], failures: list[tuple[str, str]], keys: list[str]) -> None:
    base = rows[0]
    print("\nall rows, front marked (bytes vs in-domain cos mean):")
    print(f"{'':29}| {'in domain (pydoc)':^20} | {'other domain':^20} |")
    print(HEAD)
    print("-" * len(HEAD))
    for r in rows:
        print(line(r, base))
    print("-" * len(HEAD))
    print("MB: ONNX file (10^6 bytes); % fp32: of the fp32 ONNX file; cos/worst/nn10: mean and worst cosine of the "
          "sentence embeddings (ORT) to the torch fp32 original's, overlap of the 10-nearest-neighbour sets; p50 ms: "
          "ORT 1 thread batch 1 seq 128; x fp32: p50 / fp32 p50 (< 1 = faster); front: * = no other row is both "
          "no larger and better in-domain; budget: ONNX bytes <= F x 4 x params; sec: wall seconds of the row "
          "(compress + export + quantize + eval; rows on the original reuse the fp32 export, timed in its row)")
    budget_rows = [r for r in rows if "budget_ok" in r["details"]]
    if budget_rows:
        print("\nbyte budgets: F, budget bytes (F x 4 x params), planned bytes, ONNX bytes, table entries used")
        for r in budget_rows:
            d = r["details"]
            print(f"  {r['key']:<14} F={d['budget_fraction']:<6g} budget {d['budget_bytes']:>10,}  planned "
                  f"{d['planned_bytes']:>10,}  onnx {r['bytes']:>10,}  ({r['bytes'] / d['budget_bytes']:.1%} of "
                  f"budget, {'ok' if d['budget_ok'] else 'OVER'})  table {d['table_used']}/{d['table_entries']} "
                  f"{d['quantized_ops']}; compress {d['compress_seconds']['total']:.0f} s")
    print("\ngoals (fraction of the fp32 ONNX file's bytes, in-domain cos mean):")
    for frac, goal in GOALS:
        fit = [r for r in rows if r["bytes"] <= frac * base["bytes"]]
        if not fit:
            print(f"  <= {frac:.1%}: no row fits; goal cos >= {goal} NOT MET")
            continue
        best = max(fit, key=lambda r: r["in"]["cos_mean"])
        met = best["in"]["cos_mean"] >= goal
        print(f"  <= {frac:.1%}: best {best['key']} cos {best['in']['cos_mean']:.4f} at "
              f"{best['bytes'] / base['bytes']:.1%} (other domain {best['other']['cos_mean']:.4f}); goal >= {goal}: "
              f"{'MET' if met else 'NOT MET'}")
    if budget_rows:
        slow = [r["key"] for r in budget_rows if r["p50_ms"] >= base["p50_ms"]]
        print(f"  every byte-budget row faster than fp32 at p50 ({base['p50_ms']:.2f} ms): "
              f"{'yes' if not slow else 'NO: ' + ', '.join(slow)} (ratios "
              f"{', '.join(format(r['p50_ms'] / base['p50_ms'], '.2f') for r in budget_rows)})")
    done = {r["key"] for r in rows}
    missing = [k for k in keys if k not in done]
    if failures:
        print(f"\nfailed rows: {', '.join(missing)}")
        for key, tb in failures:
            print(f"--- {key} ---\n{tb.rstrip()}")


if __name__ == "__main__":
    raise SystemExit(main())
