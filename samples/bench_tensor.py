"""Benchmark of the tensor decompositions: Tucker-2 / CP for kxk convs, tensor-train for Linear.

Part 1 -- digits CNN (samples/digits_cnn.py, trained here for 15 epochs, 1 thread): the three
3x3 convs (scope "targets" = ``features``) are compressed with tucker, cp and, for reference,
svd-whiten (which cannot factorize kxk convs and keeps them dense) at 75 % and 50 % of the conv
weights, calibrated on 256 training images. Per row: conv weights before -> after, held-out
accuracy (500 images), compression seconds and the model's forward time at batch 1 / 32 vs the
dense model. Per layer: ranks, weights, multiply-accumulates (MACs, from shapes: dense
out_h*out_w*out*in*kh*kw, factorized via ``tucker_macs`` / ``cp_macs``) and the layer's own
forward time on its captured input vs its dense original. A factorized layer with MACs <= 50 %
of dense that is still slower than dense at batch 32 is flagged.

Part 2 -- MiniLM feed-forward layers only (``encoder.layer.N.intermediate.dense`` 1536x384 and
``encoder.layer.N.output.dense`` 384x1536; the attention output projections are NOT selected),
svd-whiten vs tt at 50 % and 25 % of the targeted weights. Calibration: the first 64 sentences
of the reference split (samples/pydoc_text.py), gathered once per method and reused by both
ratios (its time is added to every row's seconds); held out: 200 sentences of the held-out
split. Per row: cosine of the normalized mean-pooled embeddings vs the original (mean, worst;
samples/minilm_eval.py), the mean relative output error of the targeted layers (report), and the
forward time of ``encoder.layer.0.intermediate.dense`` on 1 and 32 real held-out tokens.

Part 3 -- tensorly-torch (``tltorch``, when importable), reference only: ``FactorizedConv.from_conv``
(rank=0.5; tucker and cp; its default 'reconstructed' and its 'factorized' implementation) on the
same trained convs, and ``FactorizedLinear.from_linear`` (rank=0.5; blocktt = TT-matrix, tucker) on
the 1536x384 MiniLM layer, against our layers at the same 50 % per layer (uniform allocation):
factorization seconds, weights, relative weight error, relative output error on the captured
input (ours are data-aware: they minimise the latter, not the former), forward time batch 1 / 32.

Timing: torch.no_grad, a fixed thread count (--threads, default 1, applied to all compression
and timing after training), warm-up, then the median over --runs samples; each sample times
enough back-to-back calls to last >= 2 ms, and the candidates are interleaved sample by sample
so that load on the machine hits them alike. Ratios are candidate / dense (< 1 = faster).

Run from the repository root:  python samples/bench_tensor.py [--parts 1,2,3] [--json FILE]
    [--threads N] [--runs N] [--held N]
Takes ~6.5 min on a 2-core CPU at 1 thread, ~4.5 of them embedding the held-out sentences with the
tt-compressed MiniLMs (use --held 50 for a quick look).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import lrcompress  # noqa: E402
from lrcompress.errors import LrcompressError  # noqa: E402
from lrcompress.workflow.pipeline import gather  # noqa: E402

SEED = 0
EPOCHS = 15
CALIB_IMAGES = 256
CONV_RATIOS = (0.75, 0.5)
CONV_METHODS = ("tucker", "cp", "svd-whiten")
FF_RATIOS = (0.5, 0.25)
FF_METHODS = ("svd-whiten", "tt")
FF_TARGETS = (r"re:encoder\.layer\.\d+\.intermediate\.dense", r"re:encoder\.layer\.\d+\.output\.dense")
FF_LAYER = "encoder.layer.0.intermediate.dense"  # the 1536x384 layer that is timed
MINILM_CALIB = 64
MINILM_HELD = 200
MAX_LENGTH = 128
BATCH_SIZE = 32
MIN_SAMPLE_S = 2e-3
SLOW_FLOPS = 0.5   # a factorized layer with MACs <= this share of dense ...
TL_TIMEOUT_S = 60  # seconds allowed for one tltorch factorization + forward check
TL_CP_TIMEOUT_S = 20  # tltorch CP of the tensorized 1536x384 weight (CP rank in the thousands) is cut here


# ----------------------------------------------------------------------------- helpers

def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:.3f}"


def seed_all(seed: int = SEED) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _per_call(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


@torch.no_grad()
def bench(fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds per call of each fn; samples interleaved (order alternating) across fns."""
    inner: dict[str, int] = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            fn()
        one = max(_per_call(fn, 3), 1e-7)
        inner[key] = max(1, min(10_000, math.ceil(MIN_SAMPLE_S / one)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(runs):
        for key in (keys if i % 2 == 0 else keys[::-1]):
            samples[key].append(_per_call(fns[key], inner[key]))
    return {k: statistics.median(v) for k, v in samples.items()}


def time_pair(dense: nn.Module, cand: nn.Module, x: torch.Tensor, runs: int) -> tuple[float, float]:
    dense.eval()
    cand.eval()
    t = bench({"dense": lambda: dense(x), "cand": lambda: cand(x)}, runs)
    return t["dense"], t["cand"]


def weight_params(mod: nn.Module) -> int:
    """Parameters of a module without its bias(es): what the planner's budgets count."""
    return sum(p.numel() for n, p in mod.named_parameters() if not n.endswith("bias"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    a, b = a.detach().double(), b.detach().double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float("nan")


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], run: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """First positional input of each named module during ``run()``."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        def hook(_m: nn.Module, args: tuple, _n: str = name) -> None:
            got.setdefault(_n, args[0].detach().clone())
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return got


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after ``seconds`` (main thread, POSIX; no-op elsewhere)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(_sig: int, _frame: Any) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


# ----------------------------------------------------------------------------- conv MACs

def conv_geometry(conv: nn.Module, x: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    with torch.no_grad():
        y = conv(x[:1])
    return (int(x.shape[-2]), int(x.shape[-1])), (int(y.shape[-2]), int(y.shape[-1]))


def conv_macs(mod: nn.Module, dense: nn.Conv2d, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """MACs of the (possibly factorized) conv ``mod`` replacing ``dense`` (bias adds not counted)."""
    from lrcompress.methods.conv_layers import CPConv2d, TuckerConv2d
    from lrcompress.decompose.cp import cp_macs
    from lrcompress.decompose.tucker import tucker_macs

    o, i, kh, kw = (int(s) for s in dense.weight.shape)
    if isinstance(mod, TuckerConv2d):
        return tucker_macs(o, i, kh, kw, int(mod.ranks[0]), int(mod.ranks[1]), in_hw, out_hw)
    if isinstance(mod, CPConv2d):
        return cp_macs(o, i, kh, kw, int(mod.rank), in_hw, out_hw)
    if isinstance(mod, nn.Conv2d):
        return out_hw[0] * out_hw[1] * o * (i // mod.groups) * kh * kw
    # anything else (e.g. a low-rank 1x1 pair): its convs, each counted at the output resolution
    total = 0
    for sub in mod.modules():
        if isinstance(sub, nn.Conv2d):
            so, si, sh, sw = sub.weight.shape
            total += out_hw[0] * out_hw[1] * so * si * sh * sw
    return total


def linear_macs(mod: nn.Module) -> int:
    """MACs per input row of a dense Linear, LowRankLinear or TTLinear."""
    from lrcompress.decompose.tt import tt_flops
    from lrcompress.methods.tt_layers import TTLinear

    if isinstance(mod, TTLinear):
        return tt_flops(mod.out_modes, mod.in_modes, mod.ranks)
    if isinstance(mod, nn.Linear):
        return mod.in_features * mod.out_features
    return sum(s.in_features * s.out_features for s in mod.modules() if isinstance(s, nn.Linear))


def ranks_of(layer: Any) -> str:
    if layer.rank is None:
        return "-"
    if layer.ranks and layer.method in ("tucker",):
        return "/".join(map(str, layer.ranks))
    if layer.ranks and layer.method == "tt":  # [out modes, in modes, (1, r_1, .., 1)]: the inner bonds
        bonds = layer.ranks[-1] if isinstance(layer.ranks[-1], (list, tuple)) else layer.ranks
        return "/".join(map(str, bonds[1:-1] or bonds))
    return str(layer.rank)


# ----------------------------------------------------------------------------- part 1

def part1(runs: int) -> dict[str, Any]:
    import digits_cnn

    print("=" * 100)
    print("Part 1: digits CNN, Tucker-2 / CP on the 3x3 convs (targets=('features',), global allocation)")
    print("=" * 100)
    threads = torch.get_num_threads()
    data = digits_cnn.load_data(SEED)
    t0 = time.perf_counter()
    model = digits_cnn.train(epochs=EPOCHS, seed=SEED, data=data, threads=1)
    t_train = time.perf_counter() - t0
    torch.set_num_threads(threads)  # train() restores it; be explicit
    x_tr, _, x_te, y_te = data
    dense_acc = digits_cnn.accuracy(model, x_te, y_te)
    calib = lrcompress.TensorData({"": x_tr[:CALIB_IMAGES].numpy()})
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x1, x32 = x_te[:1].contiguous(), x_te[:32].contiguous()
    in1 = capture_inputs(model, conv_names, lambda: model(x1))
    in32 = capture_inputs(model, conv_names, lambda: model(x32))
    geom = {n: conv_geometry(model.get_submodule(n), in1[n]) for n in conv_names}
    dense_macs = {n: conv_macs(model.get_submodule(n), model.get_submodule(n), *geom[n]) for n in conv_names}
    conv_w = sum(weight_params(model.get_submodule(n)) for n in conv_names)
    print(f"trained {EPOCHS} epochs in {t_train:.1f} s (1 thread); dense held-out accuracy {dense_acc:.4f} "
          f"on {len(y_te)} images; calibration {CALIB_IMAGES} training images; conv weights {conv_w:,} "
          f"(biases not counted); model {sum(p.numel() for p in model.parameters()):,} params")
    print(f"timing: torch threads {torch.get_num_threads()}, median of {runs} samples, held-out images")
    print()

    rows: list[dict[str, Any]] = []
    for method in CONV_METHODS:
        for ratio in CONV_RATIOS:
            seed_all()
            cfg = lrcompress.CompressConfig(method=lrcompress.method_config(method), ratio=ratio,
                                            targets=("features",), seed=SEED)
            row: dict[str, Any] = {"method": method, "target_ratio": ratio}
            try:
                small, report = lrcompress.compress(model, cfg, calib)
            except LrcompressError as e:
                row["error"] = one_line(e)
                rows.append(row)
                continue
            acc = digits_cnn.accuracy(small, x_te, y_te)
            after_w = sum(weight_params(small.get_submodule(n)) for n in conv_names)
            d1, c1 = time_pair(model, small, x1, runs)
            d32, c32 = time_pair(model, small, x32, runs)
            by = {l.name: l for l in report.layers}
            layers = []
            for n in conv_names:
                lay = by.get(n)
                dmod, cmod = model.get_submodule(n), small.get_submodule(n)
                macs = conv_macs(cmod, dmod, *geom[n])
                ld1, lc1 = time_pair(dmod, cmod, in1[n], runs)
                ld32, lc32 = time_pair(dmod, cmod, in32[n], runs)
                factorized = lay is not None and lay.rank is not None
                flops_ratio = macs / dense_macs[n]
                layers.append({
                    "layer": n, "method": lay.method if lay else "untargeted", "ranks": ranks_of(lay) if lay else "-",
                    "params_before": weight_params(dmod), "params_after": weight_params(cmod),
                    "macs_dense": dense_macs[n], "macs": macs, "flops_ratio": flops_ratio,
                    "relative_error": lay.relative_error if factorized else None,
                    "b1_dense_s": ld1, "b1_s": lc1, "b32_dense_s": ld32, "b32_s": lc32,
                    "flag_slow": bool(factorized and flops_ratio <= SLOW_FLOPS and lc32 > ld32),
                    "reason": lay.reason if lay else "",
                })
            row.update(conv_params_before=conv_w, conv_params_after=after_w, conv_ratio=after_w / conv_w,
                       acc_dense=dense_acc, acc=acc, drop_points=100 * (dense_acc - acc),
                       seconds=report.seconds["total"], b1_dense_s=d1, b1_s=c1, b32_dense_s=d32, b32_s=c32,
                       layers=layers, model_params_after=report.params_after)
            rows.append(row)
            del small

    head = (f"{'method':<11} {'target':>6} {'conv weights':>15} {'kept':>6} {'acc dense':>9} {'acc':>6} "
            f"{'drop pt':>7} {'comp s':>6} {'b1 ms dense->comp':>19} {'x':>5} {'b32 ms dense->comp':>19} {'x':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<11} {r['target_ratio']:>6.2f}  error: {r['error']}")
            continue
        print(f"{r['method']:<11} {r['target_ratio']:>6.2f} {r['conv_params_before']:>7}->{r['conv_params_after']:<7} "
              f"{r['conv_ratio']:>6.3f} {r['acc_dense']:>9.4f} {r['acc']:>6.4f} {r['drop_points']:>7.1f} "
              f"{r['seconds']:>6.2f} {ms(r['b1_dense_s']):>8}->{ms(r['b1_s']):<8}  {r['b1_s'] / r['b1_dense_s']:>5.2f} "
              f"{ms(r['b32_dense_s']):>8}->{ms(r['b32_s']):<8}  {r['b32_s'] / r['b32_dense_s']:>5.2f}")
    print("-" * len(head))
    print("conv weights: the three convs' weights (no biases) before->after; kept: after/before; drop pt: "
          "accuracy points lost; comp s: calibrate + plan + factorize; x: compressed/dense time")

    for r in rows:
        if "error" in r:
            continue
        print()
        print(f"per layer: {r['method']} at {r['target_ratio']:.2f}")
        h2 = (f"  {'layer':<11} {'method':<10} {'ranks':>7} {'weights':>13} {'MACs dense->fact':>17} {'MACs x':>6} "
              f"{'rel.err':>7} {'b1 x':>5} {'b32 ms dense->layer':>19} {'b32 x':>6}  note")
        print(h2)
        for l in r["layers"]:
            note = "SLOWER THAN DENSE at <=50 % MACs" if l["flag_slow"] else l["reason"][:70]
            print(f"  {l['layer']:<11} {l['method']:<10} {l['ranks']:>7} {l['params_before']:>6}->{l['params_after']:<6} "
                  f"{l['macs_dense']:>8}->{l['macs']:<8} {l['flops_ratio']:>6.3f} {fmt(l['relative_error'], '7.4f'):>7} "
                  f"{l['b1_s'] / l['b1_dense_s']:>5.2f} {ms(l['b32_dense_s']):>8}->{ms(l['b32_s']):<8}  "
                  f"{l['b32_s'] / l['b32_dense_s']:>6.2f}  {note}")
    print()
    print("per layer: weights without bias; MACs at the layers' real input sizes (8x8 images, 4x4 after the stride-2 conv); rel.err: relative "
          "output error on the 16 probe calibration images (report); b1/b32 x: the single module's forward time on its captured "
          "held-out input vs its dense original (dense rows time two identical convs: the noise floor)")
    flagged = [(r["method"], r["target_ratio"], l["layer"]) for r in rows if "layers" in r for l in r["layers"]
               if l["flag_slow"]]
    cheap = [l for r in rows if "layers" in r for l in r["layers"]
             if l["method"] in ("tucker", "cp") and l["flops_ratio"] <= SLOW_FLOPS]
    costlier = [(r["method"], r["target_ratio"], l["layer"], l["flops_ratio"], l["b32_s"] / l["b32_dense_s"])
                for r in rows if "layers" in r for l in r["layers"]
                if l["relative_error"] is not None and l["flops_ratio"] > 1.0]
    return {"threads": torch.get_num_threads(), "train_seconds": t_train, "dense_accuracy": dense_acc,
            "conv_weights": conv_w, "rows": rows, "flagged": flagged, "cheap_layers": len(cheap),
            "more_macs_than_dense": costlier}


# ----------------------------------------------------------------------------- part 2

def _token_rows(model: nn.Module, tok: Any, sentences: list[str], name: str) -> torch.Tensor:
    """Inputs of module ``name`` at the real (non-padding) tokens of ``sentences``."""
    enc = tok(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    got = capture_inputs(model, [name], lambda: model(**enc))
    h = got[name]
    return h[enc["attention_mask"].bool()].contiguous()


def part2(runs: int, held_n: int = MINILM_HELD) -> dict[str, Any]:
    from minilm_eval import drift, embed
    from pydoc_text import reference_split

    print()
    print("=" * 100)
    print("Part 2: MiniLM feed-forward layers (intermediate.dense 1536x384 + output.dense 384x1536, 6 layers each)")
    print("=" * 100)
    seed_all()
    loaded = lrcompress.resolve("minilm")
    model, tok = loaded.model.eval(), loaded.tokenizer
    calib_all, held_all = reference_split()
    calib_lines, held = calib_all[:MINILM_CALIB], held_all[:held_n]
    data = lrcompress.TextData(calib_lines, tok, MAX_LENGTH)
    from lrcompress.planning.targets import select_targets
    names = select_targets(model, FF_TARGETS, (), "svd-whiten")
    wrong = [n for n in names if "attention" in n]
    if wrong:
        raise SystemExit(f"target patterns {FF_TARGETS} also select {wrong}")
    ff_w = sum(weight_params(model.get_submodule(n)) for n in names)
    params_model = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    ref = embed(model, tok, held, MAX_LENGTH)
    t_ref = time.perf_counter() - t0
    rows_in = _token_rows(model, tok, held[:16], FF_LAYER)
    x1, x32 = rows_in[:1].clone(), rows_in[:32].clone()
    dense_layer = model.get_submodule(FF_LAYER)
    print(f"MiniLM {params_model:,} params; targets: {len(names)} layers ({names[0]}, {names[1]}, ...), "
          f"{ff_w:,} weights; attention.output.dense not selected")
    print(f"calibration {len(calib_lines)} sentences, held out {len(held)} sentences (max length {MAX_LENGTH}); "
          f"reference embeddings {t_ref:.1f}s; timed layer {FF_LAYER} "
          f"({dense_layer.out_features}x{dense_layer.in_features}) on 1 / 32 held-out tokens, "
          f"torch threads {torch.get_num_threads()}")
    print()

    rows: list[dict[str, Any]] = []
    for method in FF_METHODS:
        base = lrcompress.CompressConfig(method=lrcompress.method_config(method), ratio=FF_RATIOS[0],
                                         targets=FF_TARGETS, seed=SEED)
        seed_all()
        t0 = time.perf_counter()
        try:
            stats = gather(model, base, data, batch_size=BATCH_SIZE)
        except LrcompressError as e:
            for ratio in FF_RATIOS:
                rows.append({"method": method, "target_ratio": ratio, "error": f"calibration: {one_line(e)}"})
            continue
        t_calib = time.perf_counter() - t0
        for ratio in FF_RATIOS:
            seed_all()
            cfg = lrcompress.CompressConfig(method=lrcompress.method_config(method), ratio=ratio,
                                            targets=FF_TARGETS, seed=SEED)
            row: dict[str, Any] = {"method": method, "target_ratio": ratio}
            try:
                small, report = lrcompress.compress(model, cfg, stats, batch_size=BATCH_SIZE)
            except LrcompressError as e:
                row["error"] = one_line(e)
                rows.append(row)
                continue
            except Exception as e:  # a method bug must not stop the benchmark
                row["error"] = one_line(e)
                traceback.print_exc()
                rows.append(row)
                continue
            t0 = time.perf_counter()
            emb = embed(small, tok, held, MAX_LENGTH)
            t_embed = time.perf_counter() - t0
            d = drift(ref, emb)
            after_w = sum(weight_params(small.get_submodule(n)) for n in names)
            fact = [l for l in report.layers if l.rank is not None]
            errs = [l.relative_error for l in report.layers]
            lay_c = small.get_submodule(FF_LAYER)
            d1, c1 = time_pair(dense_layer, lay_c, x1, runs)
            d32, c32 = time_pair(dense_layer, lay_c, x32, runs)
            timed = next((l for l in report.layers if l.name == FF_LAYER), None)
            row.update(ff_params_before=ff_w, ff_params_after=after_w, ff_ratio=after_w / ff_w,
                       params_after=report.params_after, model_ratio=report.ratio, **d,
                       mean_rel_err=sum(errs) / len(errs) if errs else None,
                       max_rel_err=max(errs) if errs else None,
                       factorized=len(fact), dense=len(report.layers) - len(fact),
                       dense_reasons=[f"{l.name}: {l.reason}" for l in report.layers if l.rank is None],
                       seconds=t_calib + report.seconds["plan"] + report.seconds["factorize"],
                       seconds_detail={"calibrate": t_calib, "plan": report.seconds["plan"],
                                       "factorize": report.seconds["factorize"]},
                       embed_s=t_embed, embed_dense_s=t_ref,
                       layer_ranks=ranks_of(timed) if timed else "-",
                       layer_flops_ratio=linear_macs(lay_c) / linear_macs(dense_layer),
                       b1_dense_s=d1, b1_s=c1, b32_dense_s=d32, b32_s=c32)
            rows.append(row)
            del small

    head = (f"{'method':<11} {'target':>6} {'FF weights after':>17} {'kept':>6} {'model params':>12} {'cos mean':>8} "
            f"{'cos worst':>9} {'nn10':>5} {'mean err':>8} {'comp s':>6} {'embed s':>7} {'L0 ranks':>9} {'MACs x':>6} "
            f"{'b1 us dense->L0':>17} {'x':>5} {'b32 us dense->L0':>17} {'x':>5}")
    print(head)
    print("-" * len(head))
    us = lambda t: f"{t * 1e6:.1f}"  # noqa: E731
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<11} {r['target_ratio']:>6.2f}  error: {r['error']}")
            continue
        print(f"{r['method']:<11} {r['target_ratio']:>6.2f} {r['ff_params_after']:>17,} {r['ff_ratio']:>6.3f} "
              f"{r['params_after']:>12,} {r['cos_mean']:>8.4f} {r['cos_worst']:>9.4f} {r['nn10']:>5.3f} "
              f"{fmt(r['mean_rel_err'], '8.4f'):>8} {r['seconds']:>6.1f} {r['embed_s']:>7.1f} {r['layer_ranks']:>9} "
              f"{r['layer_flops_ratio']:>6.3f} {us(r['b1_dense_s']):>8}->{us(r['b1_s']):<8} "
              f"{r['b1_s'] / r['b1_dense_s']:>5.2f} {us(r['b32_dense_s']):>8}->{us(r['b32_s']):<8} "
              f"{r['b32_s'] / r['b32_dense_s']:>5.2f}")
        for line in r["dense_reasons"]:
            print(f"{'':19}kept dense: {line}")
    print("-" * len(head))
    print(f"FF weights: the 12 targeted layers' weights (no biases; before {ff_w:,}); mean err: mean relative "
          f"output error of the targeted layers (report: svd-whiten on the calibration Gram, tt on the 16 probe "
          f"sentences; dense-kept layers count 0); comp s: "
          f"calibrate (once per method) + plan + factorize; embed s: embedding the {len(held)} held-out sentences "
          f"with the compressed model (dense: {t_ref:.1f} s); L0 = {FF_LAYER}: its ranks (svd-whiten: rank; tt: inner TT-ranks, modes out (8,12,16) x in (8,8,6)), "
          f"MACs vs dense and forward time on 1 / 32 tokens; x: compressed/dense")
    return {"threads": torch.get_num_threads(), "params_model": params_model, "ff_weights": ff_w,
            "targets": names, "rows": rows}


# ----------------------------------------------------------------------------- part 3

def part3(runs: int) -> dict[str, Any]:
    print()
    print("=" * 100)
    print("Part 3: tensorly-torch (tltorch) reference at rank=0.5 vs ours at 50 % per layer (uniform allocation)")
    print("=" * 100)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorly
            import tltorch
    except Exception as e:  # noqa: BLE001 - any import failure means "skip"
        line = f"tltorch not usable, part 3 skipped: {one_line(e)} (install: pip install --no-deps tensorly-torch)"
        print(line)
        return {"skipped": line}
    print(f"tltorch {getattr(tltorch, '__version__', '?')}, tensorly {tensorly.__version__}, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}")
    out: dict[str, Any] = {"tltorch": getattr(tltorch, "__version__", "?"), "tensorly": tensorly.__version__}
    out["conv"] = _part3_conv(tltorch, runs)
    out["linear"] = _part3_linear(tltorch, runs)
    return out


def _tl_row(label: str, build: Callable[[], nn.Module], weight_of: Callable[[nn.Module], torch.Tensor],
            dense: nn.Module, x1: torch.Tensor, x32: torch.Tensor, runs: int,
            timeout: int = TL_TIMEOUT_S) -> dict[str, Any]:
    """Factorize with ``build`` (timed, at most ``timeout`` s including one forward), then weight /
    output error and forward times vs ``dense``."""
    import warnings
    row: dict[str, Any] = {"impl": label}
    try:
        seed_all()
        with warnings.catch_warnings(), time_limit(timeout):
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            mod = build()
            row["seconds"] = time.perf_counter() - t0
            mod.eval()
            with torch.no_grad():
                y = mod(x32)
                y_ref = dense(x32)
                w = weight_of(mod)
        row.update(params=weight_params(mod), weight_err=rel(w.reshape(dense.weight.shape), dense.weight),
                   output_err=rel(y, y_ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d1, c1 = time_pair(dense, mod, x1, runs)
            d32, c32 = time_pair(dense, mod, x32, runs)
        row.update(b1_dense_s=d1, b1_s=c1, b32_dense_s=d32, b32_s=c32)
    except Exception as e:  # noqa: BLE001 - report, keep going
        row["error"] = one_line(e)
    return row


def _print_tl(rows: list[dict[str, Any]], unit: str = "ms") -> None:
    conv = (lambda t: ms(t)) if unit == "ms" else (lambda t: f"{t * 1e6:.1f}")
    head = (f"  {'layer':<11} {'who':<34} {'weights':>13} {'fact s':>6} {'w.err':>6} {'out.err':>7} "
            f"{'b1 ' + unit + ' dense->fact':>19} {'x':>6} {'b32 ' + unit + ' dense->fact':>20} {'x':>6}")
    print(head)
    for r in rows:
        who = f"{r['who']} {r['impl']}".strip()
        if "error" in r:
            print(f"  {r['layer']:<11} {who:<34} error: {r['error']}")
            continue
        print(f"  {r['layer']:<11} {who:<34} {r['params_before']:>6}->{r['params']:<6} {fmt(r.get('seconds'), '6.2f'):>6} "
              f"{r['weight_err']:>6.3f} {r['output_err']:>7.4f} {conv(r['b1_dense_s']):>8}->{conv(r['b1_s']):<9} "
              f"{r['b1_s'] / r['b1_dense_s']:>6.2f} {conv(r['b32_dense_s']):>8}->{conv(r['b32_s']):<10} "
              f"{r['b32_s'] / r['b32_dense_s']:>6.2f}")


def _part3_conv(tltorch: Any, runs: int) -> list[dict[str, Any]]:
    import digits_cnn

    data = digits_cnn.load_data(SEED)
    model = digits_cnn.train(epochs=EPOCHS, seed=SEED, data=data, threads=1)
    x_tr, _, x_te, _ = data
    calib = lrcompress.TensorData({"": x_tr[:CALIB_IMAGES].numpy()})
    conv_names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    in1 = capture_inputs(model, conv_names, lambda: model(x_te[:1]))
    in32 = capture_inputs(model, conv_names, lambda: model(x_te[:32]))
    ours: dict[str, Any] = {}
    for method in ("tucker", "cp"):
        seed_all()
        cfg = lrcompress.CompressConfig(method=lrcompress.method_config(method), ratio=0.5, allocate="uniform",
                                        targets=("features",), seed=SEED)
        try:
            small, rep = lrcompress.compress(model, cfg, calib)
            ours[method] = (small, rep)
        except LrcompressError as e:
            ours[method] = one_line(e)
    rows: list[dict[str, Any]] = []
    for n in conv_names:
        dense = model.get_submodule(n)
        for fac in ("tucker", "cp"):
            got = ours[fac]
            if isinstance(got, str):
                rows.append({"layer": n, "who": f"ours {fac}", "impl": "", "error": got})
            else:
                small, rep = got
                lay = next(l for l in rep.layers if l.name == n)
                mod = small.get_submodule(n)
                if lay.rank is None:
                    rows.append({"layer": n, "who": f"ours {fac}", "impl": "",
                                 "error": f"kept dense: {lay.reason}"})
                else:
                    r = _tl_row("", lambda m=mod: m, lambda m: m.dense_weight(), dense, in1[n], in32[n], runs)
                    r.pop("seconds", None)
                    r.update(layer=n, who=f"ours {fac} r={ranks_of(lay)}", params_before=weight_params(dense))
                    rows.append(r)
            for impl in ("reconstructed", "factorized"):
                r = _tl_row(impl, lambda c=dense, f=fac, i=impl: tltorch.FactorizedConv.from_conv(
                    copy.deepcopy(c), rank=0.5, factorization=f, implementation=i),
                    lambda m: m.weight.to_tensor(), dense, in1[n], in32[n], runs)
                r.update(layer=n, who=f"tltorch {fac}", params_before=weight_params(dense))
                rows.append(r)
    print()
    print("digits convs (inputs captured on held-out images; rel. errors on the batch-32 input):")
    _print_tl(rows, "ms")
    print("  ours: data-aware (minimises the output error on calibration data), so its weight error is higher "
          "by design; tltorch 'reconstructed' rebuilds the dense kernel every forward")
    return rows


def _part3_linear(tltorch: Any, runs: int) -> list[dict[str, Any]]:
    from pydoc_text import reference_split

    seed_all()
    loaded = lrcompress.resolve("minilm")
    model, tok = loaded.model.eval(), loaded.tokenizer
    calib_all, held_all = reference_split()
    rows_in = _token_rows(model, tok, held_all[:16], FF_LAYER)
    x1, x32 = rows_in[:1].clone(), rows_in[:32].clone()
    dense = model.get_submodule(FF_LAYER)
    data = lrcompress.TextData(calib_all[:MINILM_CALIB], tok, MAX_LENGTH)
    rows: list[dict[str, Any]] = []
    pb = weight_params(dense)
    for method in ("tt", "svd-whiten"):
        seed_all()
        cfg = lrcompress.CompressConfig(method=lrcompress.method_config(method), ratio=0.5, allocate="uniform",
                                        targets=(FF_LAYER,), seed=SEED)
        try:
            small, rep = lrcompress.compress(model, cfg, data, batch_size=BATCH_SIZE)
        except LrcompressError as e:
            rows.append({"layer": "L0", "who": f"ours {method}", "impl": "", "error": one_line(e)})
            continue
        lay = rep.layers[0]
        mod = small.get_submodule(FF_LAYER)
        if lay.rank is None:
            rows.append({"layer": "L0", "who": f"ours {method}", "impl": "", "error": f"kept dense: {lay.reason}"})
            continue
        weight_of = (lambda m: m.dense_weight()) if hasattr(mod, "dense_weight") else \
            (lambda m: m.second.weight @ m.first.weight)
        r = _tl_row("", lambda m=mod: m, weight_of, dense, x1, x32, runs)
        r.pop("seconds", None)
        r.update(layer="L0", who=f"ours {method} r={ranks_of(lay)}", params_before=pb)
        rows.append(r)
        del small
    for fac, impls in (("blocktt", ("reconstructed", "factorized")), ("tucker", ("reconstructed",))):
        for impl in impls:
            r = _tl_row(impl, lambda f=fac, i=impl: tltorch.FactorizedLinear.from_linear(
                copy.deepcopy(dense), rank=0.5, factorization=f, implementation=i),
                lambda m: m.weight.to_matrix(), dense, x1, x32, runs)
            r.update(layer="L0", who=f"tltorch {fac}", params_before=pb)
            rows.append(r)
    rows.append({"layer": "L0", "who": "tltorch tucker", "impl": "factorized",
                 "error": "not run: its forward on the 6-mode tensorized weight was OOM-killed (> 20 GB) in a trial"})
    r = _tl_row("reconstructed", lambda: tltorch.FactorizedLinear.from_linear(
        copy.deepcopy(dense), rank=0.5, factorization="cp", implementation="reconstructed"),
        lambda m: m.weight.to_matrix(), dense, x1, x32, runs, timeout=TL_CP_TIMEOUT_S)
    r.update(layer="L0", who="tltorch cp", params_before=pb)
    rows.append(r)
    print()
    print(f"MiniLM {FF_LAYER} ({dense.out_features}x{dense.in_features}, L0; 1 / 32 held-out tokens; "
          f"ours calibrated on {MINILM_CALIB} sentences):")
    _print_tl(rows, "us")
    return rows


# ----------------------------------------------------------------------------- main

def parse_parts(text: str) -> list[int]:
    try:
        parts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--parts {text!r}: give comma-separated part numbers, e.g. 1,2,3")
    if not parts or any(p not in (1, 2, 3) for p in parts):
        raise argparse.ArgumentTypeError(f"--parts {text!r}: parts are 1, 2 and 3")
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=parse_parts, default=[1, 2, 3], help="comma-separated subset of 1,2,3 (default: all)")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON to FILE")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads(N) for compression and timing (default 1, for stable timings)")
    ap.add_argument("--runs", type=int, default=50, help="timing samples per measurement (default 50)")
    ap.add_argument("--held", type=int, default=MINILM_HELD,
                    help=f"part 2: held-out sentences to embed (default {MINILM_HELD}; the tt rows spend most of the "
                         "run time here, their models being ~15x slower than dense)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    if not 11 <= args.held <= 500:
        ap.error("--held must be in [11, 500] (nn10 needs more than 10 sentences)")
    torch.set_num_threads(args.threads)
    seed_all()
    print(f"lrcompress {lrcompress.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()} (--threads), timing: median of "
          f"{args.runs} interleaved samples of >= {MIN_SAMPLE_S * 1e3:.0f} ms each")
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    elapsed: dict[str, float] = {}
    parts: dict[int, Callable[[], dict[str, Any]]] = {1: lambda: part1(args.runs),
                                                      2: lambda: part2(args.runs, args.held),
                                                      3: lambda: part3(args.runs)}
    for part, fn in parts.items():
        if part in args.parts:
            t0 = time.perf_counter()
            results[f"part{part}"] = fn()
            elapsed[f"part{part}"] = time.perf_counter() - t0
            print(f"(part {part}: {elapsed[f'part{part}']:.1f} s)")

    print()
    print("goals:")
    if "part1" in results:
        p1 = results["part1"]
        flagged = p1["flagged"]
        detail = ("none" if not flagged else "; ".join(f"{m} {r:.2f} {n}" for m, r, n in flagged))
        print(f"  [{'PASS' if not flagged else 'FAIL'}] no factorized conv with MACs <= 50 % of dense is slower than "
              f"dense at batch 32 ({p1['cheap_layers']} such layers measured; slower: {detail})")
        tuck = [r for r in p1["rows"] if r["method"] == "tucker" and "acc" in r and abs(r["target_ratio"] - 0.5) < 1e-9]
        for r in tuck:
            ok = r["drop_points"] <= 2.0
            print(f"  [{'PASS' if ok else 'FAIL'}] tucker at 50 % of the conv weights loses <= 2 accuracy points: "
                  f"{r['drop_points']:.1f} (kept {r['conv_ratio']:.3f})")
        for r in p1["rows"]:
            if "conv_ratio" not in r or r["conv_ratio"] <= r["target_ratio"] + 1e-9:
                continue
            if not any(l["relative_error"] is not None for l in r["layers"]):
                print(f"  [info] {r['method']} {r['target_ratio']:.2f}: no conv factorized, all kept dense (expected)")
            else:
                print(f"  [FAIL] {r['method']} {r['target_ratio']:.2f} keeps {r['conv_ratio']:.4f} of the conv weights "
                      f"(over the {r['target_ratio']:.2f} budget)")
        for m, ratio, n, fr, tx in p1["more_macs_than_dense"]:
            print(f"  [info] {m} {ratio:.2f} {n}: factorized with {fr:.2f}x the dense MACs ({tx:.2f}x the time at batch 32)")
    if "part2" in results:
        for r in results["part2"]["rows"]:
            if "error" in r:
                continue
            if r["layer_flops_ratio"] > 1.0:
                print(f"  [info] {r['method']} {r['target_ratio']:.2f}: {FF_LAYER} needs {r['layer_flops_ratio']:.1f}x the "
                      f"dense MACs per token ({r['b32_s'] / r['b32_dense_s']:.1f}x the time at 32 tokens)")
            over = r["ff_ratio"] > r["target_ratio"] + 1e-9
            if over:
                print(f"  [FAIL] {r['method']} {r['target_ratio']:.2f} keeps {r['ff_ratio']:.4f} of the FF weights "
                      "(over budget)")
    print(f"total {time.perf_counter() - t_start:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in elapsed.items()) + ")")

    if args.json:
        out = {"env": {"lrcompress": lrcompress.__version__, "torch": torch.__version__,
                       "python": platform.python_version(), "cpus": os.cpu_count(),
                       "threads": torch.get_num_threads(), "runs": args.runs}, "seconds": elapsed, **results}
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
