"""Fast spectrum of W L for large layers: float32 products and eigensolvers, float64 bases.

The slow parts of the float64 path are the dense products over the large dimension and the
SVD / eigh of big matrices. Here everything reduces to a symmetric PSD matrix of the small
side s = min(m, n), built with float32 GEMMs (about 2x the float64 rate on CPU):

* m <= n: C = W G W^T (m x m); its eigenvectors are the output directions.
* m > n:  M = (W L)^T (W L) (k x k, k = columns of L); the output directions are
  u_i = W L v_i / sigma_i, lifted for the kept components only.

Energies come from ``torch.linalg.eigh`` (exact solver) or from a block subspace iteration
with Rayleigh-Ritz (randomized solver; applied to the explicit matrix or, when cheaper, to
the implicit operator). The kept directions are re-orthonormalized in float64 by an ordered
QR, which keeps the span of every leading block, so the rank-r truncation of each r stays
the one the solver found. Float32 only perturbs the subspace at second order; the caller
proves optimality by the achieved/optimal error ratio computed in float64 (see
``factorize``).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["FastSpectrum", "fast_spectrum", "orthonormalize", "subspace_eigh", "sym_product", "top_eigh", "tri_product"]


def sym_product(a: torch.Tensor, b: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """a @ b^T for a product known to be symmetric, computing the lower block triangle only
    (about (blocks + 1) / (2 blocks) of the GEMM work) and mirroring it."""
    s = a.shape[0]
    edges = [s * i // blocks for i in range(blocks + 1)]
    out = torch.empty(s, s, dtype=a.dtype, device=a.device)
    for i in range(blocks):
        r0, r1 = edges[i], edges[i + 1]
        if r1 > r0:
            out[r0:r1, :r1] = a[r0:r1] @ b[:r1].T
    out = torch.tril(out)  # drops the blocks never written
    return out + torch.tril(out, -1).T


def tri_product(w: torch.Tensor, root: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """w @ root, skipping the zero blocks when root is square lower triangular (a Cholesky
    factor: about (blocks + 1) / (2 blocks) of the GEMM work)."""
    n, k = root.shape
    if n != k or bool(torch.triu(root, 1).any()):
        return w @ root
    edges = [n * i // blocks for i in range(blocks + 1)]
    out = torch.empty(w.shape[0], k, dtype=w.dtype, device=w.device)
    for i in range(blocks):
        c0, c1 = edges[i], edges[i + 1]
        if c1 > c0:
            out[:, c0:c1] = w[:, c0:] @ root[c0:, c0:c1]
    return out


def orthonormalize(x: torch.Tensor, passes: int = 2) -> torch.Tensor:
    """Orthonormal float64 columns spanning every leading block of ``x`` as ``x`` does.

    Cholesky QR (Q = X R^-1, R upper triangular: GEMM work, no panel factorization), twice
    for full float64 orthogonality (once when X is orthonormal to float32 already); a Householder QR when X is too ill-conditioned for it
    (lifted directions of near-zero energy). Signs follow the input's columns."""
    q = x.to(torch.float64)
    for _ in range(passes):
        r, info = torch.linalg.cholesky_ex(q.T @ q, upper=True)
        if int(info) != 0 or not bool(torch.isfinite(r).all()):
            q, r = torch.linalg.qr(x.to(torch.float64))
            sign = torch.sign(torch.diagonal(r))
            sign[sign == 0] = 1
            return q * sign[None, :]
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q


def _normalize(y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of range(y) (y U^-1 from a pivoted LU of y: unit lower
    trapezoidal up to a row permutation); cheaper than a QR between power iterations."""
    lu, _ = torch.linalg.lu_factor(y)
    u = torch.triu(lu[: y.shape[1]])
    if not bool((torch.diagonal(u) != 0).all()):  # rank-deficient block: QR copes
        return torch.linalg.qr(y)[0]
    return torch.linalg.solve_triangular(u, y, upper=True, left=False)


def top_eigh(a: torch.Tensor, a64: torch.Tensor, keep: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All eigenvalues of a symmetric float32 matrix ``a`` (``a64``: the same in float64;
    descending, float64), its top ``keep``
    eigenvectors (float64, orthonormal) and, per rank r <= keep, a bound on how far the top-r
    energies sum short of the true ones.

    A float32 eigh errs by ~eps32 * lambda_1 on every eigenvalue and mixes close vectors
    alike, too much for the tails of spectra with a dominant direction (outlier channels).
    So its top ``block`` >= keep vectors are refined by a float64 Rayleigh-Ritz step (the
    margin keeps the kept vectors away from the block's edge, which the step cannot
    repair). The residuals r_i = A x_i - theta_i x_i are orthogonal to the block, so the
    quadratic residual bound sum_{i<=r} |r_i|^2 / (theta_r - lambda_out), lambda_out the
    largest eigenvalue outside the block, covers what is left (inf where theta_r is not
    above it: energies at float32's noise level). When the block is over half the matrix,
    a float64 eigh costs less and leaves nothing to bound."""
    s = a.shape[0]
    if 2 * block > s:
        evals, evecs = torch.linalg.eigh(a64)
        return evals.flip(0), evecs.flip(1)[:, :keep], torch.zeros(keep, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(a)
    evals = evals.flip(0).to(torch.float64)
    x = orthonormalize(evecs.flip(1)[:, :block], passes=1)  # orthonormal to ~1e-6 already
    ax = a64 @ x
    h = x.T @ ax
    theta, z = torch.linalg.eigh(0.5 * (h + h.T))
    theta, z = theta.flip(0), z.flip(1)[:, :keep]
    v = x @ z
    resid = ax @ z - v * theta[:keep]
    out = float(evals[block]) + torch.finfo(torch.float32).eps * float(evals[0])  # + float32 eigh's error
    gap = theta[:keep] - out
    err = torch.cumsum((resid * resid).sum(0), 0) / gap.clamp_min(1e-300)
    err[gap <= 0] = math.inf
    evals[:block] = theta
    evals[block:] = evals[block:].clamp_max(theta[-1])
    return evals, v, err


def subspace_eigh(apply: Operator, s: int, q: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``q`` Ritz pairs of a PSD float32 operator of size s by block subspace iteration:
    a seeded Gaussian start (no global RNG state touched), ``iters`` products each followed
    by an LU normalization, one more product and a QR, then Rayleigh-Ritz in float64 (the
    Ritz values are the energies the planner sums, so they get float64 eigh and sums).
    Returns (values descending, float64; vectors s x q, float32)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s, q, generator=gen, dtype=torch.float32)
    for _ in range(iters):
        x = _normalize(apply(x))
    x = torch.linalg.qr(apply(x))[0]
    h = x.T.to(torch.float64) @ apply(x).to(torch.float64)
    theta, v = torch.linalg.eigh(0.5 * (h + h.T))
    theta, v = theta.flip(0), v.flip(1)
    return theta.clamp_min(0), x @ v.to(torch.float32)


# Work of the kernels in multiply-adds, relative to a GEMM of the same count (measured on a
# 2-core AVX-512 CPU with MKL): eigh of an s x s float32 matrix ~ EIGH_WORK s^3; the lower
# block triangle of an s x s product over a long dimension L ~ SYM_WORK s^2 L.
EIGH_WORK = 5.0
SYM_WORK = 0.5625


def _plan(s: int, long: int, keep: int, solver: str, oversample: int, power_iters: int) -> tuple[str, int]:
    """("eigh" | "explicit" | "implicit", block size): how to get the top ``keep`` pairs.

    The randomized solver iterates on a block of keep + max(oversample, keep / 4) columns
    (a margin of a quarter makes the truncation error converge within a few iterations
    even for slowly decaying spectra), on the formed s x s matrix or on the implicit
    product, whichever is cheaper, and yields to a dense eigh when that is cheaper still.
    """
    q = keep + max(oversample, keep // 4)
    form = SYM_WORK * s * s * long
    costs = {"eigh": form + EIGH_WORK * s**3}
    if solver == "randomized" and q < s:
        passes = power_iters + 2
        orth = (3 * power_iters + 6) * s * q * q + EIGH_WORK * q**3
        costs["explicit"] = form + passes * s * s * q + orth
        costs["implicit"] = passes * 2 * s * long * q + orth
    return min(costs, key=costs.__getitem__), q


def _complete(w32: torch.Tensor, u: torch.Tensor, full: int) -> torch.Tensor:
    """Extend float64 ``u`` to ``full`` columns with the top output directions of
    W - U U^T W (the data cannot tell them apart: zero calibration energy)."""
    uf = u.to(torch.float32)
    resid = w32 - uf @ (uf.T @ w32)
    extra = fast_spectrum(resid, keep=full - u.shape[1]).u
    return orthonormalize(torch.cat([u, extra], 1))


class FastSpectrum(NamedTuple):
    """What ``fast_spectrum`` returns (energies in the units of ``total`` = ||W L||_F^2)."""

    u: torch.Tensor  # m x keep, float64, orthonormal columns
    s2: torch.Tensor  # energies, descending, float64: all min(m, n) when exact, else the top block
    total: float
    exact: bool
    noise: torch.Tensor  # per rank 1..keep: energy float32 may cost or misplace there (float64)


# Float32 error budget: with eigenpairs accurate to float64 (top_eigh, subspace_eigh), what
# is left is the rounding of the formed matrix, E = A32 - A. It moves a tail by about the
# trace of E over the tail's directions and costs the kept subspace O(|E|^2 / gap); both
# stayed below 0.05 ||E||_F on 4096 x 11008 layers (both orientations, full Grams with
# outlier channels). ``noise`` is NOISE_FACTOR ||E||_F.
NOISE_FACTOR = 1.0
PROBES = 4


def _noise(formed: Operator, exact: Operator, s: int, seed: int) -> float:
    """NOISE_FACTOR * ||E||_F, estimated from ``PROBES`` Gaussian vectors x:
    E|E x|^2 = ||E||_F^2 |x|^2 / s. Both products are float64, ``formed`` with the float32
    matrix the solver used and ``exact`` with the float64 data, so that E x is the error of
    the formed matrix, not the rounding of the probe product."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(s, PROBES, generator=gen, dtype=torch.float64)
    err = formed(x) - exact(x)
    ratio = (err * err).sum() / (x * x).sum()
    return NOISE_FACTOR * float((ratio * s).sqrt())


def fast_spectrum(
    w: torch.Tensor,
    *,
    gram: torch.Tensor | None = None,
    diag: torch.Tensor | None = None,
    root: torch.Tensor | None = None,
    keep: int | None = None,
    solver: str = "exact",
    oversample: int = 16,
    power_iters: int = 4,
    seed: int = 0,
) -> FastSpectrum:
    """Spectrum of W L (L L^T = G) with float32 products and eigensolvers, float64 outputs.

    Metric: ``gram`` (n x n, read when m <= n) and ``root`` (n x k, read when m > n) for a
    full Gram, ``diag`` (n,), or none (identity). ``keep``: columns of u (None: min(m, n)).
    ``solver="exact"`` returns every energy (eigh); ``"randomized"`` the top block only
    (exact=False) when a subspace iteration is cheaper than eigh.
    """
    w = w.detach()
    w64 = w.to(torch.float64)
    if diag is not None:
        w64 = w64 * diag.to(torch.float64).clamp_min(0).sqrt()[None, :]
    w32 = w64.to(torch.float32)
    m, n = w32.shape
    keep = min(m, n) if keep is None else max(1, min(keep, min(m, n)))
    # A = left @ right^T is the s x s PSD matrix whose eigenpairs give the spectrum;
    # exact(x) applies A in float64 for the rounding probe.
    if m <= n:  # C = (W G) W^T
        left, right, tall = (w32 @ gram.to(torch.float32) if gram is not None else w32), w32, False

        def exact(x: torch.Tensor) -> torch.Tensor:
            y = w64.T @ x
            return w64 @ (gram.to(torch.float64) @ y if gram is not None else y)
    else:  # M = (W L)^T (W L); u = W L v / sigma
        p = tri_product(w32, root.to(torch.float32)) if gram is not None else w32
        left, right, tall = p.T, p.T, True
        r64 = None if gram is None else root.to(torch.float64)

        def exact(x: torch.Tensor) -> torch.Tensor:
            y = w64.T @ (w64 @ (r64 @ x if r64 is not None else x))
            return r64.T @ y if r64 is not None else y
    s, long = left.shape
    how, q = _plan(s, long, keep, solver, oversample, power_iters)
    a = sym_product(left, right) if how != "implicit" else None
    a64 = None if a is None else a.to(torch.float64)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return a @ x if a is not None else left @ (right.T @ x)

    if how == "eigh":
        s2, v, err = top_eigh(a, a64, keep, min(s, keep + max(oversample, keep // 8)))
        s2 = s2.clamp_min(0)
    else:
        s2, v = subspace_eigh(apply, s, q, power_iters, seed)
        v, err = v[:, :keep], torch.zeros(keep, dtype=torch.float64)
    total = float(torch.diagonal(a).sum(dtype=torch.float64)) if a is not None else \
        float((left * right).sum(dtype=torch.float64))
    f64 = torch.float64
    noise = err + _noise((lambda x: a64 @ x) if a64 is not None else (lambda x: left.to(f64) @ (right.to(f64).T @ x)),
                         exact, s, seed)
    if tall:
        v = right.T @ v.to(torch.float32)
        norms = torch.linalg.vector_norm(v, dim=0)
        v = v / torch.where(norms > 0, norms, torch.ones_like(norms))[None, :]
    u = v if v.dtype == torch.float64 else orthonormalize(v)  # eigh's are orthonormal float64
    if u.shape[1] < keep:  # metric of low rank (fewer tokens than features): complete the basis
        u = _complete(w.to(torch.float32), u, keep)
    return FastSpectrum(u, s2, total, how == "eigh", noise)
