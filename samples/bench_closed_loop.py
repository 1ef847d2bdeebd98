"""Benchmark of closed-loop, block-by-block compression against open loop on MiniLM.

Reference work as in samples/bench_core.py: MiniLM calibrated on pydoc sentences 0-255, the
whole model's parameters kept at 50 % and 75 % (svd-whiten, global allocation, scope model,
before recovery). Each row compresses a copy of the original; the drift of the normalized
mean-pooled sentence embeddings is measured on two sets: the 500 held-out pydoc sentences (the
calibration's domain) and up to 500 sentences of another domain (samples/other_text.py:
licence texts and dataset descriptions, no source shared with the calibration). The ranks are
the same in every row of a ratio (the whole model's global plan); only how each layer is fitted
changes: open loop (today's default), closed loop with blend 0 (pure) and with a share of the
open-loop error in the objective (blend), and closed loop calibrated on mixed text.

Run from the repository root:  python samples/bench_closed_loop.py [--ratios 0.5,0.75]
    [--variants open,closed,closed-b0.25,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import lrcompress  # noqa: E402

from minilm_eval import drift, embed  # noqa: E402
from other_text import other_domain_sentences  # noqa: E402
from pydoc_text import reference_split  # noqa: E402

MAX_LENGTH, BATCH_SIZE, SEED = 128, 32, 0
VARIANTS = ("open", "closed-b0", "closed-b0.5", "closed-b0.75")


def config_for(variant: str, ratio: float) -> lrcompress.CompressConfig:
    """``open``; ``closed``; ``closed-bX`` (blend X); ``closed-rX`` (ridge X, a decimal such as 0.01); both: ``closed-bX-rY``."""
    kw: dict = {"calibration": "open"}
    if variant.startswith("closed"):
        kw["calibration"] = "closed"
        for part in variant.split("-")[1:]:
            if part.startswith("b"):
                kw["closed_blend"] = float(part[1:])
            elif part.startswith("r"):
                kw["closed_ridge"] = float(part[1:])
    return lrcompress.CompressConfig(ratio=ratio, scope="model", allocate="global", seed=SEED, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ratios", default="0.5,0.75")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    ratios = [float(x) for x in args.ratios.split(",")]
    variants = args.variants.split(",")
    torch.manual_seed(SEED)
    calib, held = reference_split()
    other = other_domain_sentences(500)
    loaded = lrcompress.resolve("minilm")
    model, tok = loaded.model, loaded.tokenizer
    print(f"lrcompress {lrcompress.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"data: {len(calib)} calibration sentences (pydoc), {len(held)} held-out pydoc sentences, "
          f"{len(other)} other-domain sentences (max length {MAX_LENGTH}, batch {BATCH_SIZE})")
    refs = {"in": embed(model, tok, held, MAX_LENGTH), "other": embed(model, tok, other, MAX_LENGTH)}
    data = lrcompress.TextData(calib, tok, MAX_LENGTH)
    head = (f"{'keep':>5} {'variant':<14} {'achieved':>8} | {'cos':>6} {'worst':>6} {'nn10':>5} | "
            f"{'cos':>6} {'worst':>6} {'nn10':>5} | {'gap':>6} {'last blk':>8} {'seconds':>7}")
    print(f"{'':30}| {'in domain (pydoc)':^20} | {'other domain':^20} |")
    print(head)
    print("-" * len(head))
    rows = []
    for ratio in ratios:
        for variant in variants:
            torch.manual_seed(SEED)
            t0 = time.perf_counter()
            student, report = lrcompress.compress(model, config_for(variant, ratio), data, batch_size=BATCH_SIZE)
            secs = time.perf_counter() - t0
            d_in = drift(refs["in"], embed(student, tok, held, MAX_LENGTH))
            d_out = drift(refs["other"], embed(student, tok, other, MAX_LENGTH))
            units = report.plan.get("stream", {}).get("units", [])
            last = units[-2]["output_error"] if len(units) >= 2 else None
            row = {"keep": ratio, "variant": variant, "achieved": report.ratio, "in": d_in, "other": d_out,
                   "gap": d_in["cos_mean"] - d_out["cos_mean"], "last_block_error": last, "seconds": secs}
            rows.append(row)
            print(f"{ratio:>5.2f} {variant:<14} {report.ratio:>8.4f} | {d_in['cos_mean']:>6.4f} {d_in['cos_worst']:>6.4f} "
                  f"{d_in['nn10']:>5.3f} | {d_out['cos_mean']:>6.4f} {d_out['cos_worst']:>6.4f} {d_out['nn10']:>5.3f} | "
                  f"{row['gap']:>6.4f} {('-' if last is None else f'{last:.4f}'):>8} {secs:>7.1f}", flush=True)
            del student
    print("-" * len(head))
    print("keep/achieved: fraction of the whole model's parameters; cos/worst/nn10: mean and worst cosine of "
          "sentence embeddings to the original's, overlap of 10-nearest-neighbour sets; gap: in-domain minus "
          "other-domain mean cosine; last blk: relative error of the last block's output on calibration "
          "tokens (closed loop only); seconds: whole compression (calibration included)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
