"""Recovery on more text: MiniLM at 40 % of params, recovered on the large training text
(samples/pydoc_text.py: pydoc sentences outside the held-out range + standard library
docstrings, about 12,000 sentences) and measured on the 500 held-out sentences
(samples/eval.txt) in torch fp32 and as int8 ONNX on ONNX Runtime (per-channel, MatMul + Gather).
Compare with bench_edge.py's "lowrank 0.40 rec" rows (samples/train.txt, 1,000 sentences).

    python samples/bench_recover_data.py [--ratio 0.4] [--steps 1000,2500]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import exporters
    import lrcompress
    from bench_edge import embed_ort
    from lrcompress.config import RecoveryConfig
    from lrcompress.io.data import TextData, read_lines
    from lrcompress.recovery.train import recover
    from minilm_eval import embed
    from pydoc_text import large_training_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.4, help="fraction of params kept")
    ap.add_argument("--steps", type=str, default="1000,2500", help="one recovery run per step count")
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = lrcompress.resolve("minilm")
    tok, orig = loaded.tokenizer, loaded.model.eval()
    held = read_lines(HERE / "eval.txt")
    train = large_training_text()
    print(f"training sentences: {len(train)}", flush=True)
    ref = embed(orig, tok, held).numpy()
    calib = TextData(read_lines(HERE / "calib.txt"), tok, 128)
    student0, _ = lrcompress.compress(orig, lrcompress.CompressConfig(ratio=args.ratio, scope="model"), calib)
    example = {k: v for k, v in tok(["a sample sentence for export"], return_tensors="pt").items()}
    work = Path(tempfile.mkdtemp(prefix="bench-recover-data-"))
    for steps in (int(s) for s in args.steps.split(",")):
        student = copy.deepcopy(student0)
        t = time.perf_counter()
        recover(student, orig, TextData(train, tok, 128), RecoveryConfig(steps=steps, patience=0))
        seconds = time.perf_counter() - t
        student.eval()
        cos = float((embed(student, tok, held).numpy() * ref).sum(1).mean())
        path = exporters.export_onnx(student, example, work / f"r{steps}.onnx").path
        q = work / f"r{steps}.int8.onnx"
        exporters.quantize_int8(path, q)
        c = (embed_ort(exporters.ort_runner(q, threads=2), tok, held) * ref).sum(1)
        print(f"ratio {args.ratio} steps {steps} corpus {len(train)}: {seconds:.0f}s  fp32 cos {cos:.4f}  "
              f"int8 cos {c.mean():.4f} worst {c.min():.4f}  int8 MB {q.stat().st_size / 1e6:.1f}", flush=True)


if __name__ == "__main__":
    main()
