"""Closed vs open loop on the trained decoder (samples/train_decoder.py, preset ``full``).

The decoder blocks are compressed to 0.8, 0.6 and 0.4 of their parameters (svd-whiten, global
allocation; the same ranks in every row of a keep: the whole model's plan) and each layer is
fitted open loop (today's default) or closed loop (block by block, to the original outputs from
the inputs the compressed model gives it; blend = weight of the open-loop error in the fit).
Perplexity on held-out text of the calibration's domain (heldout.txt, pydoc sentences) and of
another domain (Python's LICENSE.txt), as samples/bench_decoder.py measures it.

    python samples/bench_closed_decoder.py [--model /tmp/decoder-full] [--keeps 0.8,0.6]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

VARIANTS = (("open", {"calibration": "open"}), ("closed blend 0", {"calibration": "closed", "closed_blend": 0.0}),
            ("closed blend 0.75", {"calibration": "closed", "closed_blend": 0.75}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/lrcompress-decoder-full", help="decoder folder (trained if missing)")
    ap.add_argument("--keeps", default="0.8,0.6,0.4")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import lrcompress as lc
    from lrcompress.edge.perplexity import perplexity, text_tokens
    from lrcompress.io.data import TextData
    from lrcompress.scoped import torch_threads
    from train_decoder import build_decoder

    with torch_threads(args.threads):
        folder = build_decoder("full", args.model)
        src = lc.resolve(str(folder))
        model, tok = src.model.eval(), src.tokenizer
        lines = lambda p: [s for s in Path(p).read_text().splitlines() if s.strip()]  # noqa: E731
        calib = TextData(lines(folder / "calib.txt"), tok, max_length=args.seq_len)
        license_txt = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        streams = {"in": text_tokens(folder / "heldout.txt", tok), "other": text_tokens(license_txt, tok)}
        base = {k: perplexity({"torch": model}, v, seq_len=args.seq_len).models[0].ppl for k, v in streams.items()}
        print(f"decoder {folder}: {sum(p.numel() for p in model.parameters()):,} params; calibration "
              f"{len(calib.lines)} sentences; held-out tokens in domain {len(streams['in']):,}, other domain "
              f"{len(streams['other']):,}")
        head = f"{'keep':>5} {'fit':<18} {'ppl in':>8} {'x orig':>7} {'ppl other':>9} {'x orig':>7} {'seconds':>8}"
        print(head)
        print("-" * len(head))
        print(f"{'1':>5} {'original':<18} {base['in']:>8.3f} {1:>7.3f} {base['other']:>9.3f} {1:>7.3f} {0:>8.1f}")
        for keep in [float(k) for k in args.keeps.split(",")]:
            for name, kw in VARIANTS:
                cfg = lc.CompressConfig(ratio=keep, targets=("transformer.h",), **kw)
                t = time.perf_counter()
                small, rep = lc.compress(model, cfg, calib)
                secs = time.perf_counter() - t
                ppl = {k: perplexity({"torch": small.eval()}, v, seq_len=args.seq_len).models[0].ppl
                       for k, v in streams.items()}
                print(f"{keep:>5.2g} {name:<18} {ppl['in']:>8.3f} {ppl['in'] / base['in']:>7.3f} {ppl['other']:>9.3f} "
                      f"{ppl['other'] / base['other']:>7.3f} {secs:>8.1f}", flush=True)
        print("-" * len(head))
        print("keep: fraction of the decoder blocks' parameters; ppl: perplexity over windows of "
              f"{args.seq_len} tokens; x orig: ratio to the original's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
