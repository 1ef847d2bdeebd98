"""Recovery benchmark: MiniLM compressed to a share of its total params, then distilled.

Training text = sentences 0-999 of the reference split (samples/train.txt; calibration uses
its first 256), held out = sentences 1000-1499 (samples/eval.txt), never trained on.
Prints cosine mean/worst and nn@10 of the sentence embeddings vs the original before
recovery and at the given step counts, for each recovery setting.

    python samples/bench_recover.py                       # the issue's table (~1 h here)
    python samples/bench_recover.py --ratios 0.5 --steps 100 --runs factors
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

RUNS = {  # name -> RecoveryConfig overrides ("_skew": move factors out of the balanced gauge first)
    "factors": {"train": "factors"},
    "all": {"train": "all"},
    "factors+augment": {"train": "factors", "augment": 0.15},
    "both-residual": {"train": "both", "init": "residual"},
    "lora-residual": {"train": "lora", "init": "residual", "fold": "exact", "lr": 1e-3},
    "lora-zero": {"train": "lora", "init": "zero", "fold": "exact", "lr": 1e-3},
    # ablations of the collapse reported in the issue (dropout, gauge, weight decay)
    "factors+dropout": {"train": "factors", "dropout": True},
    "factors+unbalanced": {"train": "factors", "balance": False, "_skew": 100.0},
    "factors+wd0.01": {"train": "factors", "weight_decay": 0.01},
    "issue-script": {"train": "factors", "dropout": True, "weight_decay": 0.01, "lr": 2e-4, "balance": False,
                     "_skew": 100.0},
}


def main() -> None:
    import lrcompress
    from lrcompress.config import RecoveryConfig
    from lrcompress.io.data import TextData, read_lines
    from lrcompress.recovery.train import recover
    from minilm_eval import drift, embed

    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.5,0.75")
    ap.add_argument("--steps", default="100,300,1000", help="report at these step counts (the last is the run length)")
    ap.add_argument("--runs", default="factors,lora-residual,lora-zero")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    marks = [int(s) for s in args.steps.split(",")]
    loaded = lrcompress.resolve("minilm")
    tok, teacher = loaded.tokenizer, loaded.model.eval()
    train_lines = read_lines(HERE / "train.txt")
    held = read_lines(HERE / "eval.txt")
    ref = embed(teacher, tok, held, args.max_length)
    seen = train_lines[:500]  # trained on (except the recovery's own 10 % early-stopping split)
    ref_seen = embed(teacher, tok, seen, args.max_length)

    def train_cos(model) -> float:
        return drift(ref_seen, embed(model, tok, seen, args.max_length))["cos_mean"]
    rows = []
    curves: dict = {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        cfg = lrcompress.CompressConfig(method=lrcompress.method_config("svd-whiten"), ratio=ratio, scope="model")
        t = time.perf_counter()
        base, rep = lrcompress.compress(teacher, cfg, TextData(train_lines[:256], tok, args.max_length))
        print(f"compressed to {rep.ratio:.3f} of params in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        d0 = drift(ref, embed(base, tok, held, args.max_length))
        d0["train_cos"] = train_cos(base)
        rows.append((ratio, "none", 0, d0, 0.0, rep.params_after))
        print(fmt(rows[-1]), flush=True)
        for run in args.runs.split(","):
            over = dict(RUNS[run])
            unbalance = over.pop("_skew", None)
            if args.lr is not None:
                over["lr"] = args.lr
            student = copy.deepcopy(base)
            if unbalance:
                skew(student, unbalance)
            rc = RecoveryConfig(steps=marks[-1], eval_every=max(marks[-1] // 20, 10), batch_size=args.batch_size,
                                max_length=args.max_length, patience=0, **over)
            clock = {"t": time.perf_counter(), "prev": 0}

            def at_mark(step: int, info: dict, student=student, run=run, rc=rc, ratio=ratio) -> None:
                if step not in marks[:-1]:
                    return
                sec = (time.perf_counter() - clock["t"]) / (step - clock["prev"])
                d = drift(ref, embed(student, tok, held, args.max_length))
                d["train_cos"] = train_cos(student)
                student.train(rc.dropout)
                rows.append((ratio, run + " (unfolded)" * rc.uses_lora, step, d, sec, None))
                print(fmt(rows[-1]), flush=True)
                clock["t"], clock["prev"] = time.perf_counter(), step

            rep2 = recover(student, teacher, TextData(train_lines, tok, args.max_length), rc, progress=at_mark)
            sec = (time.perf_counter() - clock["t"]) / max(rep2.steps - clock["prev"], 1)
            d = drift(ref, embed(student, tok, held, args.max_length))
            d["train_cos"] = train_cos(student)
            rows.append((ratio, run, rep2.steps, d, sec, rep2.params_after))
            last = [c for c in rep2.curve if "cos_mean" in c][-1]
            print(fmt(rows[-1]), f"best step {rep2.best_step}; the student at step {last['step']} (before the best "
                  f"state was restored) had held-out cos {last['cos_mean']:.4f} on the recovery's own split, "
                  f"{rep2.before['cos_mean']:.4f} before", flush=True)
            curves[(ratio, run)] = [(c["step"], c["loss"]) for c in rep2.curve if "cos_mean" in c]
    print()
    print(f"{'kept':>5} {'recovery':>30} {'steps':>6} {'cos mean':>9} {'cos worst':>9} {'nn@10':>6} {'train cos':>9} {'s/step':>7} {'params':>11}")
    for row in rows:
        print(fmt(row))
    for (ratio, run), curve in curves.items():  # residual vs zero init on the recovery's own held-out split
        if run.endswith("-residual") and (ratio, run.replace("residual", "zero")) in curves:
            zero = curves[(ratio, run.replace("residual", "zero"))]
            target = min(loss for _, loss in zero)
            hit = next((s for s, loss in curve if loss <= target), None)
            print(f"{ratio:.2f} {run}: reaches zero init's best held-out loss {target:.5f} (step "
                  f"{min(zero, key=lambda c: c[1])[0]}) at step {hit} "
                  f"({'never' if hit is None else f'{hit / zero[-1][0]:.0%} of the steps'})")


def fmt(row: tuple) -> str:
    ratio, run, steps, d, sec, params = row
    return (f"{ratio:5.2f} {run:>30} {steps:6d} {d['cos_mean']:9.4f} {d['cos_worst']:9.4f} {d['nn10']:6.3f} "
            f"{d['train_cos']:9.4f} "
            f"{sec:7.3f} {params or 0:11,}")


def skew(model, factor: float) -> None:
    """Move every two-factor layer out of the balanced gauge: A * f, B / f (same product)."""
    from lrcompress.recovery.lora import MATRIX_LAYERS, factor_params
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MATRIX_LAYERS):
                a, b = factor_params(m)
                a.mul_(factor)
                b.div_(factor)


if __name__ == "__main__":
    main()
