"""The choices for one layer under a byte budget: dense float32, int8, int4, int4 plus a low-rank
correction of its quantization residual (LQER / QERA), and low rank with quantized factors.
Each choice carries its bytes as the runtime stores them and its relative output error in the
layer's calibration metric, ||(W - W') L||^2 / ||W L||^2 (L L^T = G), measured on the weights
as shipped (after every rounding)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..decompose import Metric, factorize, spectrum
from .gptq import gptq
from .grid import Grid, grid_bytes, quantize

CORRECTION_RANKS = (16, 32, 64)
RANK_STEP = 32  # low-rank choices: ranks in steps of this (a multiple of every int4/int8 block used here)


@dataclass
class Part:
    """One stored matrix of a choice: its role ("weight", "first", "second", "table", "proj"),
    the float32 weight it ships as and its grid (None: float32)."""

    role: str
    weight: torch.Tensor
    grid: Grid | None = None

    @property
    def bytes(self) -> int:
        r, c = self.weight.shape
        g = self.grid
        return 4 * r * c if g is None else grid_bytes(r, c, g.bits, g.block, g.symmetric)


@dataclass
class Choice:
    """A way to ship one layer: ``kind`` (dense | int8 | int4 | int4+fix | lowrank), ``rank``
    (correction or factor rank), ``parts`` in module order, ``error`` (relative squared output
    error), and for corrections the error before the fix and the optimum at that rank."""

    label: str
    kind: str
    rank: int
    parts: list[Part]
    error: float
    before: float | None = None
    optimal: float | None = None
    bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.bytes = sum(p.bytes for p in self.parts)


def fit_block(cols: int, preferred: int) -> int:
    """The largest power-of-two block <= ``preferred`` (>= 16) that divides ``cols``; 0 if none."""
    b = preferred
    while b >= 16:
        if cols % b == 0:
            return b
        b //= 2
    return 0


def grid_of(w: torch.Tensor, bits: int, block: int, symmetric: bool, gram: torch.Tensor | None,
            algorithm: str) -> Grid:
    """Quantize ``w`` (blocks along its columns): GPTQ in the layer's metric when asked and a full Gram
    is known, else round to nearest."""
    if algorithm == "gptq" and gram is not None:
        return gptq(w, gram, bits=bits, block=block, symmetric=symmetric)
    return quantize(w, bits=bits, block=block, symmetric=symmetric)


def _refit_left(target: torch.Tensor, b: torch.Tensor, metric: Metric) -> torch.Tensor:
    """argmin_A ||(T - A B) L||: A = T G B^T (B G B^T)^-1, with a small ridge."""
    t, b64 = target.to(torch.float64), b.to(torch.float64)
    if metric.gram is not None:
        tg, bg = t @ metric.gram, b64 @ metric.gram
    elif metric.diag is not None:
        tg, bg = t * metric.diag[None, :], b64 * metric.diag[None, :]
    else:
        tg, bg = t, b64
    m = bg @ b64.T
    m = m + 1e-9 * (torch.trace(m) / m.shape[0] + 1e-30) * torch.eye(m.shape[0], dtype=m.dtype)
    return torch.linalg.solve(m, (tg @ b64.T).T).T.to(torch.float32)


def quantized_pair(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, metric: Metric, bits: int,
                   block: int, symmetric: bool) -> tuple[Part, Part]:
    """Quantize the right factor ``b`` (k x n), refit the left one to what it became, quantize it:
    the pair (first = b, second = a) as shipped."""
    bb = fit_block(b.shape[1], block)
    gb = quantize(b.to(torch.float32), bits, bb, symmetric)
    qb = gb.dequantize()
    a2 = _refit_left(target, qb, metric)
    ga = quantize(a2, bits, fit_block(a2.shape[1], block), symmetric)
    return Part("first", qb, gb), Part("second", ga.dequantize(), ga)


def linear_choices(w: torch.Tensor, metric: Metric, block: int, symmetric: bool, algorithm: str,
                   ranks: bool = True) -> list[Choice]:
    """Every choice for a Linear weight ``w`` (out x in) in ``metric``."""
    m, n = w.shape
    w = w.detach().to(torch.float32)
    total = metric.sqnorm(w.to(torch.float64))
    rel = (lambda d: metric.sqnorm(d.to(torch.float64)) / total) if total > 0 else (lambda d: 0.0)
    out = [Choice("fp32", "dense", 0, [Part("weight", w)], 0.0)]
    b8 = fit_block(n, 128)
    if b8:
        g8 = grid_of(w, 8, b8, symmetric, metric.gram, algorithm)
        out.append(Choice("int8", "int8", 0, [Part("weight", g8.dequantize(), g8)], rel(w - g8.dequantize())))
    block = fit_block(n, block)
    if not block:
        return out
    g4 = grid_of(w, 4, block, symmetric, metric.gram, algorithm)
    q4 = g4.dequantize()
    e4 = rel(w - q4)
    out.append(Choice("int4", "int4", 0, [Part("weight", q4, g4)], e4))
    resid = (w - q4).to(torch.float64)
    spec = spectrum(resid, metric, max_rank=max(CORRECTION_RANKS))
    for k in CORRECTION_RANKS:
        if k * (m + n) >= m * n // 4 or k > spec.u.shape[1]:
            break
        f = factorize(resid, spec, k, metric)
        first, second = quantized_pair(resid.to(torch.float32), f.a.to(torch.float32), f.b.to(torch.float32), metric,
                                       8, 128, symmetric)
        fixed = q4 + second.weight @ first.weight
        out.append(Choice(f"int4+fix{k}", "int4+fix", k, [Part("weight", q4, g4), first, second], rel(w - fixed),
                          before=e4, optimal=spec.tail(k) / total if total > 0 else 0.0))
    if not ranks:
        return out
    wspec = spectrum(w.to(torch.float64), metric)
    for r in range(RANK_STEP, min(m, n), RANK_STEP):
        if r * (m + n) >= m * n:
            break
        f = factorize(w, wspec, r, metric)
        for bits in (8, 4):
            first, second = quantized_pair(w, f.a, f.b, metric, bits, block if bits == 4 else 128, symmetric)
            approx = second.weight @ first.weight
            out.append(Choice(f"lr{r}+int{bits}", "lowrank", r, [first, second], rel(w - approx)))
    return out


def embedding_choices(table: torch.Tensor, freq: torch.Tensor, block: int, symmetric: bool) -> list[Choice]:
    """Choices for an embedding table (V x d) weighted by token frequency ``freq`` (V,): float32,
    int4 rows (GatherBlockQuantized), and low rank (V x r int4 table, d x r int8 projection)."""
    v, d = table.shape
    w = table.detach().to(torch.float32)
    metric = Metric(diag=freq)
    wt = w.T.contiguous()  # d x V: the layer's matrix, inputs are one-hot ids
    total = metric.sqnorm(wt.to(torch.float64))
    rel = (lambda dd: metric.sqnorm(dd.T.to(torch.float64)) / total) if total > 0 else (lambda dd: 0.0)
    out = [Choice("fp32", "dense", 0, [Part("table", w)], 0.0)]
    block = fit_block(d, block)
    if not block:
        return out
    g4 = quantize(w, 4, block, symmetric)
    out.append(Choice("int4", "int4", 0, [Part("table", g4.dequantize(), g4)], rel(w - g4.dequantize())))
    spec = spectrum(wt.to(torch.float64), metric)
    for r in range(RANK_STEP, d, RANK_STEP):
        if r * (v + d) >= v * d or fit_block(r, block) == 0:
            break
        f = factorize(wt, spec, r, metric)  # W^T ~ a b: a (d x r) = proj, b (r x V) -> table = b^T
        gt = quantize(f.b.T.contiguous().to(torch.float32), 4, fit_block(r, block), symmetric)
        tq = gt.dequantize()
        proj = _refit_left(wt, tq.T.contiguous(), metric)
        gp = quantize(proj, 8, fit_block(r, 128), symmetric)
        approx = tq @ gp.dequantize().T
        out.append(Choice(f"lr{r}+int4", "lowrank", r, [Part("table", tq, gt), Part("proj", gp.dequantize(), gp)],
                          rel(w - approx)))
    return out


def relative_bytes(choice: Choice, rows: int, cols: int) -> float:
    """Bytes of a choice as a fraction of the float32 layer."""
    return choice.bytes / (4.0 * rows * cols) if rows * cols else math.nan
