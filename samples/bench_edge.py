"""Edge benchmark: MiniLM original / int8 / low rank (75 %, 50 % of params) / low rank + int8
as ONNX on ONNX Runtime CPU: file size, latency, and embedding drift vs the original.

Calibration = samples/calib.txt (256 sentences), held out = samples/eval.txt (500).
Latency: 1 thread batch 1 seq 128, and 2 threads batch 8 seq 128 (padded), 5 warm-up + 50 runs.
Cosine: normalized mean-pooled last hidden state (the sentence embedding) vs torch fp32 original.
int8 = dynamic quantization, per-channel weight scales, MatMul + Gather (embedding tables).
--recover-steps N adds rows for each low-rank model after N steps of recovery (default settings,
training text = samples/train.txt, disjoint from eval.txt).

    python samples/bench_edge.py [--runs 50] [--keep DIR] [--ratios 0.75,0.5] [--recover-steps 1000]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def linear_macs(model: torch.nn.Module, tokens: int, layers: int, hidden: int) -> float:
    """Multiply-adds per sequence of ``tokens``: every Linear-like weight (embeddings are
    lookups, the embedding factor's projection counts) plus attention's two T x T products."""
    macs = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            macs += m.in_features * m.out_features * tokens
    return macs + 2 * layers * tokens * tokens * hidden


def embed_ort(runner, tok, sentences: list[str], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="np")
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in runner.input_names}
        h = runner(feed)["last_hidden_state"]
        m = enc["attention_mask"][..., None].astype(np.float32)
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1)
        out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    return np.concatenate(out)


def main() -> None:
    import exporters
    import lrcompress
    from lrcompress.io.data import TextData, read_lines
    from minilm_eval import embed

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--keep", type=str, default=None, help="keep the artifacts in this folder")
    ap.add_argument("--ratios", type=str, default="0.75,0.5", help="fractions of params kept")
    ap.add_argument("--recover-steps", type=int, default=0, help="also recover each low-rank model")
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = lrcompress.resolve("minilm")
    tok, orig = loaded.tokenizer, loaded.model.eval()
    calib = TextData(read_lines(HERE / "calib.txt"), tok, 128)
    held = read_lines(HERE / "eval.txt")
    ref = embed(orig, tok, held).numpy()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    example = {k: v for k, v in tok(["a sample sentence for export"], return_tensors="pt").items()}
    models = {"original": orig}
    stats = lrcompress.gather(orig, lrcompress.CompressConfig(ratio=0.5, scope="model"), calib)
    ratios = [float(r) for r in args.ratios.split(",")]
    for ratio in ratios:
        cfg = lrcompress.CompressConfig(ratio=ratio, scope="model")
        models[f"lowrank {ratio:.2f}"], _ = lrcompress.compress(orig, cfg, stats)
    if args.recover_steps:
        from lrcompress.config import RecoveryConfig
        from lrcompress.recovery.train import recover
        train = TextData(read_lines(HERE / "train.txt"), tok, 128)
        for ratio in ratios:
            student = copy.deepcopy(models[f"lowrank {ratio:.2f}"])
            t = time.perf_counter()
            recover(student, orig, train, RecoveryConfig(steps=args.recover_steps, patience=0))
            print(f"recovered {ratio:.2f} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            models[f"lowrank {ratio:.2f} rec"] = student.eval()
    cfg_l, cfg_h = orig.config.num_hidden_layers, orig.config.hidden_size
    rows = []
    fixed1 = {k: v.astype(np.int64) for k, v in tok(held[:1], padding="max_length", max_length=128,
                                                    truncation=True, return_tensors="np").items()}
    fixed8 = {k: v.astype(np.int64) for k, v in tok(held[:8], padding="max_length", max_length=128,
                                                    truncation=True, return_tensors="np").items()}
    for name, model in models.items():
        t = time.perf_counter()
        path = exporters.export_onnx(model, example, work / f"{name.replace(' ', '-')}.onnx").path
        export_s = time.perf_counter() - t
        macs = linear_macs(model, 128, cfg_l, cfg_h)
        params = sum(p.numel() for p in model.parameters())
        for quant in (False, True):
            p = path
            if quant:
                p = work / f"{path.stem}.int8.onnx"
                exporters.quantize_int8(path, p)
            label = f"{name}{' + int8' if quant else ''}"
            r1 = exporters.ort_runner(p, threads=1)
            r2 = exporters.ort_runner(p, threads=2)
            pick = lambda feed, r: {k: v for k, v in feed.items() if k in r.input_names}  # noqa: E731
            lat1 = exporters.run_latency(r1, pick(fixed1, r1), warmup=5, runs=args.runs)
            lat8 = exporters.run_latency(r2, pick(fixed8, r2), warmup=5, runs=args.runs)
            emb = embed_ort(r2, tok, held)
            cos = (emb * ref).sum(1)
            rows.append({"model": label, "params": params, "bytes": p.stat().st_size, "macs": macs,
                         "p50_1": lat1["p50_ms"], "p90_1": lat1["p90_ms"], "p50_8": lat8["p50_ms"],
                         "p90_8": lat8["p90_ms"], "cos_mean": float(cos.mean()), "cos_worst": float(cos.min()),
                         "export_s": export_s})
            print(fmt(rows[-1], rows[0]), flush=True)
    print()
    print(f"{'model':22} {'params':>11} {'MB':>7} {'bytes':>6} {'MACs':>6} {'p50 1t':>8} {'p90 1t':>8} "
          f"{'speedup':>7} {'vs MACs':>7} {'p50 2t b8':>9} {'p90 2t b8':>9} {'cos mean':>8} {'cos worst':>9}")
    for r in rows:
        print(fmt(r, rows[0]))
    print(f"\nartifacts in {work}; bytes/MACs relative to the fp32 original; speedup = original p50 / p50 "
          "(1 thread, batch 1, seq 128); 'vs MACs' = speedup / MAC reduction")


def fmt(r: dict, base: dict) -> str:
    speed = base["p50_1"] / r["p50_1"]
    mac_red = base["macs"] / r["macs"]
    return (f"{r['model']:22} {r['params']:11,} {r['bytes'] / 1e6:7.1f} {r['bytes'] / base['bytes']:6.1%} "
            f"{r['macs'] / base['macs']:6.1%} {r['p50_1']:8.2f} {r['p90_1']:8.2f} {speed:7.2f} "
            f"{speed / mac_red:7.1%} {r['p50_8']:9.2f} {r['p90_8']:9.2f} {r['cos_mean']:8.4f} {r['cos_worst']:9.4f}")


if __name__ == "__main__":
    main()
