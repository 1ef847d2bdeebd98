"""Own numerics vs tensorly (PyTorch backend) for Tucker-2 / CP of Conv2d kernels and TT-matrix of Linear.

Measurement only: it answers "does tensorly reproduce lrcompress/decompose/{tucker,cp}.py and the
library's former hand-written TT-SVD at the same ranks, in the same data-aware metric, and how
fast?". (decompose/tt.py now calls tensorly's tensor_train_matrix itself; its former TT-SVD is kept
below as ``ref_tt_svd``, only for this comparison.) Every tensorly call runs inside
``with tensorly.backend_context("pytorch"):`` (never a global ``set_backend``), float64.

Metric (what tucker.py / cp.py optimise): with the channel Gram G = L L^T of the conv input
(normalised to mean diagonal 1; the minimiser does not depend on the scale) the error of a
reconstructed kernel W' is   err = sqrt( sum_pq ||(W_pq - W'_pq) L||^2 / sum_pq ||W_pq L||^2 ),
computed by ``metric_error`` below from the DENSE reconstructed kernel of each method (never from
a library's internal number). fit = 1 - err.

How tensorly gets the metric (it has no metric argument): L = cholesky(G) (G is positive definite
here), Z = W x_in L^T (slices Z_pq = W_pq L), decompose Z, then map the input-mode factor back:
  Tucker-2: partial_tucker(Z, rank=[r_out, r_in], modes=[0, 1]) -> core, [U, V];  the 1x1 input
            factor is A = V^T L^{-1} (triangular solve), so W'_pq L = U C_pq V^T exactly.
  CP:       parafac(Z, R) -> (w, [A, B~, C, D]);  B = L^{-T} B~ (triangular solve), so
            W'_pq L = A diag(w c_p d_q) B~^T exactly.
With an invertible L both maps are exact, so tensorly minimises the same objective as the library.
The Cholesky, whitening and back-map are included in tensorly's time.

Iterations (fixed, no early stop, so both do the same number of sweeps):
  Tucker-2: SWEEPS_TUCKER HOOI sweeps. Own: tucker2(..., max_iter=N, tol=-1) (a negative tol
            disables the stop test); tensorly: partial_tucker(..., n_iter_max=N, tol=0, init='svd').
            Both start from the HOSVD of Z. A second row per layer runs both at their DEFAULTS
            (own max_iter=50, tol=1e-9 relative energy; tensorly n_iter_max=100, tol=1e-4 absolute
            change of the relative error).
  CP:       SWEEPS_CP ALS sweeps. Own: cp_conv(..., max_iter=N, tol=0, in_gram=G) (HOSVD init of
            the UNwhitened kernel, Gaussian padding, seed 0); tensorly: parafac(Z, R, n_iter_max=N,
            init='svd', tol=0, random_state=0) (HOSVD init of Z, uniform [0,1) padding for the
            3-long spatial modes).
  TT:       closed-form TT-SVD (no iterations). Own: ``ref_tt_svd`` below, the library's
            hand-written float64 TT-SVD before the port (sequential SVDs, sign fix, cores) + its
            dense matrix; tensorly: tensor_train_matrix(W.reshape(*out_modes, *in_modes), rank=r)
            + tt_matrix_to_tensor. The note gives the library's tt_matrix(W, ..., max_rank=r) as
            shipped now (tensorly inside, plus the balanced gauge and its three error figures, i.e.
            end to end) and how far its cores are from the reference's. Error is the plain relative
            Frobenius error (TT is weight-space in the library).

Layers. Conv kernels are synthetic but structured like trained ones (no pretrained CNN with these
shapes is available offline): W = sum_r s_r a_r o b_r o k_r with s_r ~ 1/r over 2*max(O, I) terms,
3x3 filters k_r centre-weighted, plus 5 % i.i.d. noise, so every unfolding has a decaying spectrum.
The conv input Gram comes from correlated tokens X = Z A + 0.1 noise (latent dim I/4) with per-channel
scales over one decade: G is far from the identity (condition number printed). Linear weights are the
real all-MiniLM-L6-v2 layer-0 feed-forward weights (``lrcompress.resolve("minilm")``), falling back to
a synthetic decaying-spectrum matrix if that package is missing.

Threads: torch.set_num_threads(--threads, default THREADS) for the whole run, restored afterwards. Note the library's
own Tucker/CP drop to ONE thread internally for small work (decompose/tucker.py ``few_threads``,
< 2**26 MACs per sweep); tensorly always uses the THREADS threads. Time = median of REPEATS runs,
own and tensorly interleaved run by run.

tensorly 0.10 API notes for a port (checked against the installed source):
  * partial_tucker(tensor, rank, modes=...) returns ((core, factors), rec_errors) -- a pair, not
    (core, factors); ``rank`` is indexed like ``modes``; tol is an ABSOLUTE change of the relative
    error (default 1e-4) and is only tested from the 3rd sweep on; tol=0 disables it. Its ``svd=``
    argument is used for the initialisation only: the HOOI sweeps always call the default
    truncated (full thin) SVD of the wide unfolding, which is where its time goes.
  * parafac(...) returns a CPTensor (weights, factors); tol=0 (falsy) disables the stop test AND
    the per-sweep error computation. init='svd' with rank > a mode's size (3 for a 3x3 kernel)
    warns and pads that factor with uniform [0, 1) columns from ``random_state``. Its MTTKRP
    (tenalg backend 'core') materialises the Khatri-Rao product: for the spatial modes that is an
    (O*I*k) x R matrix. The 'einsum' tenalg backend (tl.tenalg.backend_context('einsum')) was
    slower still here (torch.einsum without opt_einsum).
  * tensor_train_matrix(tensor, rank): the tensor is the matrix reshaped to (row modes..., column
    modes...) -- i.e. W.reshape(*out_modes, *in_modes) for a (out, in) weight; tensorly's own
    docstring calls the first half "in_shape", but the cores come out (r, o_k, i_k, r), the
    library's layout (checked: tt_to_matrix(tensorly cores) == tensorly's dense). An int rank is
    the max bond (clipped to the exact ranks); a FLOAT rank means a parameter FRACTION (16.0 is
    not 16); a tuple needs the boundary 1s (length d+1).
  * No metric argument anywhere: whiten with L (G = L L^T) before, map the input factor back with
    a triangular solve after (see above). Nothing of this needs set_backend.

Run from the repository root:  .venv/bin/python samples/bench_tensorly.py [--quick] [--no-512] [--threads N]
[--only tucker|cp|tt ...]
Takes ~2-3 min on an idle 2-core CPU. Multi-threaded timings are meaningless while other processes load
the CPUs (OpenMP regions wait for descheduled workers): check the load averages printed at start/end.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker, tensor_train_matrix

from lrcompress.decompose.cp import cp_break_even, cp_conv
from lrcompress.decompose.tt import tt_matrix, tt_modes, tt_params, tt_to_matrix
from lrcompress.decompose.tucker import SMALL_WORK, few_threads, tucker2

THREADS = 2
SWEEPS_TUCKER = 10
SWEEPS_CP = 100
DT = torch.float64


# ----------------------------------------------------------------------------- data

def synth_kernel(o: int, i: int, k: int, seed: int) -> torch.Tensor:
    """Structured conv kernel (out, in, k, k): decaying CP-like sum + 5 % noise."""
    g = torch.Generator().manual_seed(seed)
    r0 = 2 * max(o, i)
    a = torch.randn(o, r0, generator=g, dtype=DT)
    b = torch.randn(i, r0, generator=g, dtype=DT)
    yy, xx = torch.meshgrid(torch.arange(k, dtype=DT) - (k - 1) / 2, torch.arange(k, dtype=DT) - (k - 1) / 2,
                            indexing="ij")
    centre = torch.exp(-(xx ** 2 + yy ** 2) / 2.0).reshape(-1)
    sp = centre[:, None] * torch.randn(1, r0, generator=g, dtype=DT) + 0.5 * torch.randn(k * k, r0, generator=g,
                                                                                         dtype=DT)
    a, b, sp = a / a.norm(dim=0), b / b.norm(dim=0), sp / sp.norm(dim=0)
    s = 1.0 / torch.arange(1, r0 + 1, dtype=DT)
    w = torch.einsum("r,or,ir,sr->ois", s, a, b, sp).reshape(o, i, k, k)
    noise = torch.randn(o, i, k, k, generator=g, dtype=DT)
    w = w + 0.05 * noise * (w.norm() / noise.norm())
    return w / w.std()  # scale of a typical trained kernel does not matter; keep it O(1)


def synth_gram(n: int, seed: int, tokens: int = 8192) -> torch.Tensor:
    """Channel Gram X^T X of correlated inputs X = Z A + 0.1 noise with per-channel scales."""
    g = torch.Generator().manual_seed(seed)
    lat = max(n // 4, 1)
    z = torch.randn(tokens, lat, generator=g, dtype=DT)
    a = torch.randn(lat, n, generator=g, dtype=DT) / math.sqrt(lat)
    x = z @ a + 0.1 * torch.randn(tokens, n, generator=g, dtype=DT)
    x = x * torch.logspace(-0.5, 0.5, n, dtype=DT)[torch.randperm(n, generator=g)]
    return x.T @ x


def norm_gram(g: torch.Tensor) -> torch.Tensor:
    g = 0.5 * (g + g.T)
    return g / torch.diagonal(g).mean()


def metric_error(w: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """sqrt(sum_pq ||(W_pq - W'_pq) L||^2 / sum_pq ||W_pq L||^2), L L^T = gram (same for both)."""
    g = norm_gram(gram)
    d = w - approx
    num = float(torch.einsum("oipq,ij,ojpq->", d, g, d))
    den = float(torch.einsum("oipq,ij,ojpq->", w, g, w))
    return math.sqrt(max(num, 0.0) / den)


def fro_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx).norm() / w.norm())


# ----------------------------------------------------------------------------- methods

def own_tucker(w, gram, ranks, sweeps):
    if sweeps is None:
        f = tucker2(w, ranks, in_gram=gram)  # library defaults: max_iter=50, tol=1e-9
    else:
        f = tucker2(w, ranks, in_gram=gram, max_iter=sweeps, tol=-1.0)
    a = f.first.reshape(f.first.shape[0], -1)
    u = f.last.reshape(f.last.shape[0], -1)
    return torch.einsum("oa,abpq,bi->oipq", u, f.core, a), f.iterations


def tl_tucker(w, gram, ranks, sweeps):
    g = norm_gram(gram)
    l = torch.linalg.cholesky(g)                               # G = L L^T
    z = torch.einsum("oipq,ik->okpq", w, l)                    # Z_pq = W_pq L
    with tl.backend_context("pytorch"):
        if sweeps is None:   # tensorly defaults: n_iter_max=100, tol=1e-4
            (core, (u, v)), errs = partial_tucker(z, rank=list(ranks), modes=[0, 1], init="svd")
        else:
            (core, (u, v)), errs = partial_tucker(z, rank=list(ranks), modes=[0, 1], n_iter_max=sweeps,
                                                  tol=0, init="svd")
    a = torch.linalg.solve_triangular(l, v.T, upper=False, left=False)  # A = V^T L^{-1}  (A L = V^T)
    return torch.einsum("oa,abpq,bi->oipq", u, core, a), len(errs)


def own_cp(w, gram, rank, sweeps):
    f = cp_conv(w, rank, max_iter=sweeps, tol=0.0, seed=0, in_gram=gram)
    a = f.last.reshape(f.last.shape[0], -1)
    b = f.first.reshape(rank, -1).T
    c = f.vertical.reshape(rank, -1).T
    d = f.horizontal.reshape(rank, -1).T
    return torch.einsum("or,ir,pr,qr->oipq", a, b, c, d), (f.usable, f.cancellation, f.iterations)


def tl_cp(w, gram, rank, sweeps):
    g = norm_gram(gram)
    l = torch.linalg.cholesky(g)
    z = torch.einsum("oipq,ik->okpq", w, l)
    with tl.backend_context("pytorch"):
        weights, (a, bt, c, d) = parafac(z, rank, n_iter_max=sweeps, init="svd", tol=0, random_state=0)
    b = torch.linalg.solve_triangular(l.T, bt, upper=True)    # B = L^{-T} B~
    approx = torch.einsum("r,or,ir,pr,qr->oipq", weights, a, b, c, d)
    comp = weights.abs() * a.norm(dim=0) * b.norm(dim=0) * c.norm(dim=0) * d.norm(dim=0)
    return approx, (None, float(comp.square().sum().sqrt() / w.norm()), sweeps)


def ref_tt_svd(w, om, im, r):
    """The library's own TT-SVD before the tensorly port (reference for this comparison only):
    float64 cores (r_{k-1}, o_k, i_k, r_k), each bond <= r, largest-|u| entry of each left singular
    vector made > 0."""
    d = len(om)
    dims = [o * i for o, i in zip(om, im)]
    c = w.reshape(*om, *im).permute([p for k in range(d) for p in (k, d + k)]).reshape(-1)
    cores, r_prev = [], 1
    for k in range(d - 1):
        u, s, vt = torch.linalg.svd(c.reshape(r_prev * dims[k], -1), full_matrices=False)
        rk = min(r, len(s))
        u, vt = u[:, :rk], vt[:rk]
        sign = torch.sign(u[u.abs().argmax(dim=0), torch.arange(rk)])
        sign[sign == 0] = 1
        u, vt = u * sign[None, :], vt * sign[:, None]
        cores.append(u.reshape(r_prev, om[k], im[k], rk))
        c, r_prev = s[:rk, None] * vt, rk
    cores.append(c.reshape(r_prev, om[-1], im[-1], 1))
    return cores


def own_tt(w, om, im, r):
    cores = ref_tt_svd(w, om, im, r)
    return tt_to_matrix(cores), cores


def lib_tt(w, om, im, r):
    f = tt_matrix(w, om, im, max_rank=r)  # tensorly's tensor_train_matrix inside (the port)
    return tt_to_matrix([c.double() for c in f.cores])[: w.shape[0], : w.shape[1]], f


def tl_tt(w, om, im, r):
    t = w.reshape(*om, *im)                                    # (o_1..o_d, i_1..i_d): rows first
    with tl.backend_context("pytorch"):
        ttm = tensor_train_matrix(t, rank=r)                   # int -> [1, r, ..., r, 1], clipped
        dense = tl.tt_matrix_to_tensor(ttm).reshape(w.shape)
    return dense, ttm


# ----------------------------------------------------------------------------- timing

def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(fa: Callable[[], object], fb: Callable[[], object], repeats: int, work: int | None = None):
    """Interleaved runs of own (A) and tensorly (B); returns (median s A, median s B, median s of B
    under the library's thread policy or None, last result A, last result B).

    ``work``: the MACs figure the library passes to ``few_threads``; when it is below SMALL_WORK
    the library runs on one thread, so B is also timed inside the same ``few_threads(work)``."""
    same = work is not None and work < SMALL_WORK and torch.get_num_threads() > 1
    ta, tb, tc, ra, rb = [], [], [], None, None
    for _ in range(repeats):
        t, ra = timed(fa)
        ta.append(t)
        t, rb = timed(fb)
        tb.append(t)
        if same:
            with few_threads(work):
                t, _ = timed(fb)
            tc.append(t)
    tc_med = statistics.median(tc) if same else None
    return statistics.median(ta), statistics.median(tb), tc_med, ra, rb


ROWS: list[tuple[str, ...]] = []


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def row(layer, method, rank, own, tly, ts_own, ts_tl, ts_same=None, note=""):
    ratio = ts_tl / ts_own if ts_own > 0 else float("nan")
    same = "=" if ts_same is None else f"{ts_same:.3f} ({ts_same / ts_own:.2f})"
    note = f"{note}; load {load().split()[0]}"  # 1-min load average right after the row's runs
    ROWS.append((layer, method, rank, own, tly, f"{ts_own:.3f}", f"{ts_tl:.3f}", f"{ratio:.2f}", same, note))
    print(f"  {layer:<22} {method:<18} {rank:<12} own {own:<9} tl {tly:<9} {ts_own:8.3f}s {ts_tl:8.3f}s "
          f"x{ratio:.2f} [1-thr policy: {same}] {note}", flush=True)


# ----------------------------------------------------------------------------- benches

def conv_cases(convs):
    """Per conv size: its shape, ranks and repeats, with the synthetic kernel, input Gram and label."""
    for (o, i, k), rank_list, reps in convs:
        yield (o, i, k), rank_list, reps, synth_kernel(o, i, k, seed=o * 1000 + i), synth_gram(i, seed=i), \
            f"conv {i}->{o} {k}x{k}"


def bench_tucker(convs, quick: bool) -> None:
    print(f"Tucker-2 (data metric; {SWEEPS_TUCKER} HOOI sweeps fixed, and library defaults)", flush=True)
    for (o, i, k), rank_list, reps, w, gram, layer in conv_cases(convs):
        for ranks in rank_list:
            for sweeps in (SWEEPS_TUCKER, None):
                if quick and sweeps is None:
                    continue
                t_own, t_tl, t_same, (ap_own, it_own), (ap_tl, it_tl) = compare(
                    lambda w=w, g=gram, r=ranks, n=sweeps: own_tucker(w, g, r, n),
                    lambda w=w, g=gram, r=ranks, n=sweeps: tl_tucker(w, g, r, n), reps,
                    work=o * i * k * k * max(o, i))
                e_own, e_tl = metric_error(w, ap_own, gram), metric_error(w, ap_tl, gram)
                label = "tucker2 fixed" if sweeps is not None else "tucker2 defaults"
                row(layer, label, f"({ranks[0]},{ranks[1]})", f"{e_own:.5f}", f"{e_tl:.5f}", t_own, t_tl, t_same,
                    f"err; sweeps own {it_own} / tl {it_tl}")


def bench_cp(convs, quick: bool) -> None:
    print(f"CP (data metric; {SWEEPS_CP} ALS sweeps fixed)", flush=True)
    for (o, i, k), rank_list, reps, w, gram, layer in conv_cases(convs):
        for rank in rank_list:
            t_own, t_tl, t_same, (ap_own, info_own), (ap_tl, info_tl) = compare(
                lambda w=w, g=gram, r=rank: own_cp(w, g, r, SWEEPS_CP),
                lambda w=w, g=gram, r=rank: tl_cp(w, g, r, SWEEPS_CP), reps,
                work=o * i * k * k * rank)
            f_own, f_tl = 1 - metric_error(w, ap_own, gram), 1 - metric_error(w, ap_tl, gram)
            kr_mb = o * i * k * rank * 8 / 2 ** 20  # tensorly's explicit Khatri-Rao for a spatial-mode MTTKRP
            note = (f"fit; own usable={info_own[0]}, cancellation own {info_own[1]:.2f} / tl {info_tl[1]:.2f} "
                    f"(library refuses > 10 or fit < 0.8); break-even {cp_break_even(o, i, k, k)}; "
                    f"tl Khatri-Rao {kr_mb:.0f} MB per spatial MTTKRP")
            row(layer, "cp", str(rank), f"{f_own:.4f}", f"{f_tl:.4f}", t_own, t_tl, t_same, note)


def minilm_weights() -> tuple[dict[str, torch.Tensor], str]:
    try:
        import lrcompress
        loaded = lrcompress.resolve("minilm")
        model = getattr(loaded, "model", loaded)
        sd = dict(model.named_parameters())
        out = {"minilm L0 interm 1536x384": sd["encoder.layer.0.intermediate.dense.weight"].detach().to(DT),
               "minilm L0 output 384x1536": sd["encoder.layer.0.output.dense.weight"].detach().to(DT)}
        return out, "real all-MiniLM-L6-v2 layer-0 FF weights"
    except Exception as e:  # noqa: BLE001 -- fall back to synthetic
        g = torch.Generator().manual_seed(7)
        mats = {}
        for m, n in ((1536, 384), (384, 1536)):
            u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=DT))
            v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=DT))
            s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=DT) ** 0.5
            mats[f"synthetic {m}x{n}"] = (u * s) @ v.T
        return mats, f"synthetic (MiniLM unavailable: {type(e).__name__})"


def bench_tt(ranks, reps: int) -> None:
    mats, origin = minilm_weights()
    print(f"TT-matrix ({origin}; TT-SVD, relative Frobenius error; own = the library's TT-SVD before "
          "the port, kept in this sample)", flush=True)
    for name, w in mats.items():
        om, im = tt_modes(*w.shape)
        for r in ranks:
            ta, tb, tc = [], [], []
            for _ in range(reps):  # interleaved: reference, tensorly, library (the port)
                t, (ap_own, cores_own) = timed(lambda w=w, om=om, im=im, r=r: own_tt(w, om, im, r))
                ta.append(t)
                t, (ap_tl, ttm) = timed(lambda w=w, om=om, im=im, r=r: tl_tt(w, om, im, r))
                tb.append(t)
                t, (ap_lib, f) = timed(lambda w=w, om=om, im=im, r=r: lib_tt(w, om, im, r))
                tc.append(t)
            t_own, t_tl, t_l = statistics.median(ta), statistics.median(tb), statistics.median(tc)
            e_own, e_tl, e_lib = fro_error(w, ap_own), fro_error(w, ap_tl), fro_error(w, ap_lib)
            # layout check: tensorly's cores (r, o_k, i_k, r) fed to the library's tt_to_matrix
            cross = fro_error(ap_tl, tt_to_matrix(list(ttm.factors)))
            # the port's cores vs the reference's (the gauge rescales each core by a scalar: undo it)
            dcore = max(float((a / a.norm() - b / b.norm()).abs().max()) for a, b in zip(f.cores, cores_own))
            tl_ranks = tuple(int(c.shape[0]) for c in ttm.factors) + (1,)
            own_ranks = tuple(int(c.shape[0]) for c in cores_own) + (1,)
            note = (f"err; modes {om}x{im}; ranks own {own_ranks} tl {tl_ranks} library {f.ranks}; params "
                    f"{tt_params(om, im, f.ranks)}; layout check {cross:.1e}; library tt_matrix (port) err "
                    f"{e_lib:.5f} in {t_l:.3f}s (x{t_l / t_own:.2f} own), cores vs own max diff {dcore:.1e}")
            row(name, "tt_matrix", f"max {r}", f"{e_own:.5f}", f"{e_tl:.5f}", t_own, t_tl, None, note)


def main() -> None:
    # parafac(init='svd') warns for every spatial mode shorter than the CP rank (3 < R) and then pads
    # that factor with uniform random columns; expected here, so silence it (see the module notes).
    warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs=")
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small layers only (smoke test)")
    ap.add_argument("--no-512", action="store_true", help="skip the 512->512 conv")
    ap.add_argument("--threads", type=int, default=THREADS, help=f"torch intra-op threads (default {THREADS})")
    ap.add_argument("--only", choices=("tucker", "cp", "tt"), action="append",
                    help="run only these parts (repeatable; default all)")
    args = ap.parse_args()
    parts = set(args.only or ("tucker", "cp", "tt"))

    before = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    try:
        exe = Path(sys.executable)
        try:
            exe = exe.relative_to(Path.cwd())
        except ValueError:
            pass
        print(f"command: {' '.join([str(exe)] + sys.argv)}   (cwd = repository root)")
        print(f"tensorly {tl.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
              f"{platform.machine()}, torch threads {torch.get_num_threads()} (was {before}), float64")
        print(f"global tensorly backend stays {tl.get_backend()!r}; tensorly calls run in "
              "backend_context('pytorch')")
        print(f"load average at start {load()} (other processes on this {os.cpu_count()}-CPU machine inflate "
              "multi-threaded timings; runs are interleaved and the median is reported)")
        for n in (64, 256, 512) if parts & {"tucker", "cp"} else ():
            ev = torch.linalg.eigvalsh(norm_gram(synth_gram(n, seed=n)))
            print(f"  input Gram {n}x{n}: condition number {float(ev[-1] / ev[0]):.1e}, "
                  f"top {n // 4} eigenvalues hold {float(ev[-(n // 4):].sum() / ev.sum()):.1%} of the trace")
        t_start = time.perf_counter()
        tucker_convs = [((128, 64, 3), [(64, 32), (32, 16)], 5),
                        ((256, 256, 3), [(128, 128), (64, 64)], 3)]
        cp_convs = [((128, 64, 3), [64, 128], 3),
                    ((256, 256, 3), [128, 256], 1)]
        if args.quick:
            tucker_convs, cp_convs = tucker_convs[:1], [((128, 64, 3), [64], 1)]
        elif not args.no_512:
            tucker_convs.append(((512, 512, 3), [(256, 256)], 1))
        if "tucker" in parts:
            bench_tucker(tucker_convs, args.quick)
        if "cp" in parts:
            bench_cp(cp_convs, args.quick)
        if "tt" in parts:
            bench_tt([16] if args.quick else [16, 32, 64], 3 if args.quick else 7)
        elapsed = time.perf_counter() - t_start
        assert tl.get_backend() == "numpy", "backend_context leaked"

        print()
        print("| layer | method | rank | own err/fit | tensorly err/fit | own s | tensorly s | tl/own time "
              "| tensorly s, own thread policy (tl/own) | notes |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in ROWS:
            print("| " + " | ".join(r) + " |")
        print()
        print("err = metric-weighted relative error (Tucker; lower is better), fit = 1 - err (CP; higher is "
              "better), TT err = relative Frobenius error. tl/own time > 1: tensorly slower.")
        print("'tensorly s, own thread policy': tensorly timed inside the library's few_threads(work), i.e. on one "
              "thread where the library itself drops to one thread (work < 2**26 MACs); '=' where the library "
              "keeps all threads (same as 'tensorly s'). TT has no thread policy.")
        print(f"total {elapsed:.1f} s; load average at end {load()}")
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    main()
