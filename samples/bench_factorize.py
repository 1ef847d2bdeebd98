"""Benchmark: one whitened-SVD factorization of a large layer, float64 path vs fast path.

For a 4096 x 11008 weight and its 11008 x 4096 orientation (an MLP up / down projection),
each with a full input Gram over its input dimension, it times ``spectrum`` at rank 1024
with three solvers and judges the factors ``factorize`` ships:

* exact-float64: the float64 path of ``spectrum`` forced (``fast=False``): eigh of
  C = W G W^T (wide) or the SVD of W L (tall), as before the fast path existed;
* exact-fast: the float32 path (``fast=True``), dense eigh: every energy;
* randomized-fast: the float32 path, subspace iteration where it is cheaper than eigh.

Synthetic, seeded data with realistic decaying spectra:

* weight W = (Z1 diag(d)) Z2 / sqrt(n) + 2% Gaussian noise, Z1 (m x k) and Z2 (k x n)
  Gaussian, k = min(m, n), d_j = (1 + j / 32)^-0.8: a slowly decaying singular spectrum
  like trained projections;
* Gram G = D F F^T D / n + ridge, F = n x n Gaussian with column scales (1 + j / 16)^-0.5
  (activation spectrum decaying like 1 / j), D per-channel lognormal scales with 8 outlier
  channels x 20 (the massive activations of LLMs), ridge = 1e-4 of the mean diagonal.

Columns: seconds for ``spectrum`` (a fresh Metric each time, so the Cholesky root the tall
case needs is included) and for ``factorize``; the achieved relative error of the shipped
factors, sqrt(||(W - A B) L||^2 / ||W L||^2), computed here in float64 with the float64
total; the optimal relative error at that rank from the float64 exact spectrum; their
ratio; and the ratio ``Factorization.error_ratio`` reports (achieved / the optimum of the
spectrum it was given, float64 arithmetic on the shipped factors).

Run: ``.venv/bin/python samples/bench_factorize.py`` (full size, a few minutes: the float64
path is slow; writes samples/bench_factorize_results.txt) or ``--small`` (1024 x 2752,
rank 256, seconds; prints only).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrcompress.decompose.lowrank import Metric, factorize, spectrum  # noqa: E402

RESULTS = Path(__file__).with_name("bench_factorize_results.txt")


def make_weight(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded weight with a slowly decaying singular spectrum (see the module docstring)."""
    k = min(m, n)
    d = (1 + torch.arange(k, dtype=torch.float32) / 32) ** -0.8
    w = (torch.randn(m, k, generator=gen) * d) @ torch.randn(k, n, generator=gen) / math.sqrt(n)
    return w + 0.02 * w.std() * torch.randn(m, n, generator=gen)


def make_gram(n: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded SPD input Gram with a 1/j spectrum and outlier channels (module docstring)."""
    f = torch.randn(n, n, generator=gen) * ((1 + torch.arange(n, dtype=torch.float32) / 16) ** -0.5)
    scale = torch.exp(0.5 * torch.randn(n, generator=gen))
    scale[torch.randperm(n, generator=gen)[:8]] *= 20
    f = f * scale[:, None]
    g = f @ f.T / n
    return g + 1e-4 * g.diagonal().mean() * torch.eye(n)


def achieved(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, metric: Metric, total: float) -> float:
    """Relative error of the shipped factors in the metric, float64."""
    d = w.to(torch.float64) - a.to(torch.float64) @ b.to(torch.float64)
    return math.sqrt(max(metric.sqnorm(d), 0.0) / total)


def run_case(label: str, w: torch.Tensor, gram: torch.Tensor, rank: int, out: list[str]) -> None:
    base = Metric(gram=gram)  # float64 and symmetrized once, as the pipeline holds it
    rows, ref = [], None
    for solver, name, fast in (("exact", "exact-float64", False), ("exact", "exact-fast", True),
                               ("randomized", "randomized-fast", True)):
        metric = Metric()
        metric.gram = base.gram  # fresh root cache: the tall case pays its Cholesky here
        t0 = time.perf_counter()
        spec = spectrum(w, metric, max_rank=rank, solver=solver, fast=fast)
        t_spec = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = factorize(w, spec, rank, metric)
        t_fact = time.perf_counter() - t0
        if ref is None:
            ref = spec
        opt = ref.relative_error(rank)
        ach = achieved(w, f.a, f.b, base, ref.total)
        rows.append(f"{label:<12} {name:<16} {t_spec:9.2f} {t_fact:9.2f} {ach:10.5f} {opt:10.5f} "
                    f"{ach / opt:9.5f} {f.error_ratio:9.5f}")
        print(rows[-1], flush=True)
    out.extend(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="1024 x 2752 at rank 256 (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    m, n, rank = (1024, 2752, 256) if args.small else (4096, 11008, 1024)
    gen = torch.Generator().manual_seed(args.seed)
    head = [f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
            f"{platform.processor() or platform.machine()}; load average at start "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"rank {rank}; seconds: spectrum / factorize; errors relative, in the whitened metric",
            f"{'layer':<12} {'solver':<16} {'spectrum':>9} {'factorize':>9} {'achieved':>10} {'optimal':>10} "
            f"{'ratio':>9} {'reported':>9}"]
    print("\n".join(head), flush=True)
    out = list(head)
    t0 = time.perf_counter()
    w = make_weight(m, n, gen)
    g_in, g_out = make_gram(n, gen), make_gram(m, gen)
    print(f"(data built in {time.perf_counter() - t0:.1f} s)", flush=True)
    run_case(f"{m}x{n}", w, g_in, rank, out)
    run_case(f"{n}x{m}", w.T.contiguous(), g_out, rank, out)
    out.append(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(out[-1])
    if not args.small:
        RESULTS.write_text("\n".join(out) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
