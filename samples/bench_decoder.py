"""Decoder benchmark: the trained GPT-2-style decoder (samples/train_decoder.py, preset
``full``) compressed to 0.9 / 0.8 / 0.6 of its decoder blocks' parameters.

Rows, side by side in one run:
- the original, and its ONNX Runtime int8 (dynamic, per channel) as the alternative a user has;
- plain ``svd`` (uniform), ``svd-whiten`` uniform and ``svd-whiten`` global (measured sensitivities);
- the ``svd-whiten`` global rows again after recovery (distillation against the original on the
  first ``--recover-lines`` training sentences, KL on the next-token distribution).

Each row: perplexity on held-out text of the calibration's domain (the decoder folder's
heldout.txt: pydoc language-reference sentences, never trained or calibrated on; see
samples/decoder_text.py) and on text of another domain (Python's LICENSE.txt: the history and
licence terms, legal prose the decoder never saw), the ratio to the original, next-token top-1
agreement with the original (in domain), parameters and compression seconds. Last, the end-to-end check on ONNX Runtime: the
perplexity of one compressed model exported to ONNX must equal torch's within 0.5 %.

    python samples/bench_decoder.py                 # trains (or reuses) the decoder, then the table
    python samples/bench_decoder.py --keeps 0.8 --recover-steps 100
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/lrcompress-decoder-full", help="decoder folder (trained if missing)")
    ap.add_argument("--keeps", default="0.9,0.8,0.6", help="fractions of the decoder blocks' parameters to keep")
    ap.add_argument("--recover-steps", type=int, default=200)
    ap.add_argument("--recover-lines", type=int, default=2000, help="training sentences used for recovery")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import exporters
    import lrcompress as lc
    from lrcompress.edge.perplexity import perplexity, text_tokens
    from lrcompress.io.data import TextData
    from lrcompress.scoped import torch_threads
    from train_decoder import build_decoder

    keeps = [float(k) for k in args.keeps.split(",")]
    with torch_threads(args.threads):
        t0 = time.perf_counter()
        folder = build_decoder("full", args.model)
        print(f"decoder: {folder} ({time.perf_counter() - t0:.1f}s to build or reuse)")
        src = lc.resolve(str(folder))
        model, tok = src.model.eval(), src.tokenizer
        blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h."))
        total = sum(p.numel() for p in model.parameters())
        lines = lambda p: [s for s in Path(p).read_text().splitlines() if s.strip()]  # noqa: E731
        calib = TextData(lines(folder / "calib.txt"), tok, max_length=args.seq_len)
        train = TextData(lines(folder / "train.txt")[: args.recover_lines], tok, max_length=args.seq_len)
        license_txt = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        streams = {"in-domain": text_tokens(folder / "heldout.txt", tok),
                   "other-domain": text_tokens(license_txt, tok)}
        print(f"params {total:,} (decoder blocks {blocks:,}); held-out tokens: "
              + ", ".join(f"{k} {len(v):,}" for k, v in streams.items()) + f"; windows of {args.seq_len}")

        rows: list[tuple[str, float, float, float | None, int, float]] = []
        stats = lc.gather(model, lc.CompressConfig(ratio=0.5, targets=("transformer.h",)), calib)

        def measure(name: str, cand: object, params: int, seconds: float) -> None:
            ppl = {}
            top1 = None
            for dom, toks in streams.items():
                rep = perplexity({"original": model, name: cand}, toks, seq_len=args.seq_len, text=dom)
                ppl[dom] = rep.models[1]
                top1 = rep.models[1].top1_agreement if dom == "in-domain" else top1
            rows.append((name, ppl["in-domain"].ppl, ppl["other-domain"].ppl, top1, params, seconds))
            print(f"  {name:34} ppl {ppl['in-domain'].ppl:9.3f} / {ppl['other-domain'].ppl:9.3f}  top1 "
                  f"{'-' if top1 is None else f'{top1:.4f}'}  {seconds:6.1f}s", flush=True)

        base = {dom: perplexity({"original": model}, toks, seq_len=args.seq_len, text=dom).models[0].ppl
                for dom, toks in streams.items()}
        rows.append(("original", base["in-domain"], base["other-domain"], 1.0, total, 0.0))
        with tempfile.TemporaryDirectory(prefix="lrcompress-bench-decoder-") as tmp:
            example = {"input_ids": streams["in-domain"][: args.seq_len].clone().reshape(1, -1)}
            onnx = exporters.export_onnx(model, example, Path(tmp) / "original.onnx").path
            int8 = exporters.quantize_int8(onnx, Path(tmp) / "original.int8.onnx").path
            measure("original, ORT int8 (dynamic)", str(int8), total, 0.0)

            settings = [("svd", "uniform", None), ("svd-whiten", "uniform", None), ("svd-whiten", "global", None)]
            if args.recover_steps:
                settings += [("svd-whiten", "global", args.recover_steps)]
            keep_model = None
            for keep in keeps:
                for method, alloc, steps in settings:
                    cfg = lc.CompressConfig(method=lc.method_config(method), ratio=keep, allocate=alloc,
                                            targets=("transformer.h",))
                    rc = (lc.RecoveryConfig(steps=steps, loss=("kl",), lr=3e-4, batch_size=16,
                                            max_length=args.seq_len, eval_every=100) if steps else None)
                    t = time.perf_counter()
                    data = calib if method == "svd" else stats
                    small, rep = lc.compress(model, cfg, data, recovery=rc, recovery_data=train if rc else None)
                    name = f"{method} {alloc} {keep:.2g}" + (f" + {steps} recovery steps" if steps else "")
                    if rep.recovery is not None:  # the state recovery kept: its best held-out step (0 = unchanged)
                        name += f" (best step {rep.recovery['best_step']})"
                    measure(name, small.eval(), rep.params_after, time.perf_counter() - t)
                    if abs(keep - 0.8) < 1e-9 and method == "svd-whiten" and alloc == "global" and not steps:
                        keep_model = small
            if keep_model is not None:
                path = exporters.export_onnx(keep_model, example, Path(tmp) / "small.onnx").path
                rep = perplexity({"torch": keep_model, "onnxruntime": str(path)}, streams["in-domain"],
                                 seq_len=args.seq_len, text="in-domain")
                diff = abs(rep.models[1].ppl / rep.models[0].ppl - 1)
                print(f"\nend to end (svd-whiten global 0.8): ppl torch {rep.models[0].ppl:.4f}, ONNX Runtime "
                      f"{rep.models[1].ppl:.4f}: {diff:.3%} apart -> {'PASS' if diff <= 0.005 else 'FAIL'} (<= 0.5 %)")

    head = (f"{'model':58} {'params':>10} {'blocks kept':>11} {'ppl in':>9} {'x orig':>7} {'ppl other':>10} "
            f"{'x orig':>7} {'top1':>7} {'seconds':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for name, p_in, p_out, top1, params, secs in rows:
        kept = (params - (total - blocks)) / blocks
        print(f"{name:58} {params:10,} {kept:11.1%} {p_in:9.3f} {p_in / base['in-domain']:7.3f} {p_out:10.3f} "
              f"{p_out / base['other-domain']:7.3f} {'-' if top1 is None else f'{top1:.4f}':>7} {secs:8.1f}")
    goal = {r[0]: r[1] / base["in-domain"] for r in rows}
    g1 = next((v for k, v in goal.items() if k == "svd-whiten global 0.8"), None)
    g2 = next((v for k, v in goal.items() if k.startswith(f"svd-whiten global 0.8 + {args.recover_steps} recovery")), None)
    print("\ngoals (keep 0.8, in-domain perplexity vs the original):")
    if g1 is not None:
        print(f"  [{'PASS' if g1 <= 1.25 else 'FAIL'}] svd-whiten global before recovery <= 1.25x: {g1:.3f}x")
    if g2 is not None:
        print(f"  [{'PASS' if g2 <= 1.05 else 'FAIL'}] svd-whiten global after recovery <= 1.05x: {g2:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
