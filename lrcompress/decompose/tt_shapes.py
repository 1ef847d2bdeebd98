"""Tensor-train shapes: balanced integer modes for a feature count, full and clipped bond ranks,
parameters and multiply-adds of a TT matrix, the largest bond within a parameter budget."""

from __future__ import annotations

import math
from typing import Sequence


def _divisors(n: int) -> list[int]:
    small, large = [], []
    for k in range(1, math.isqrt(n) + 1):
        if n % k == 0:
            small.append(k)
            if k != n // k:
                large.append(n // k)
    return small + large[::-1]


def _splits(n: int, d: int, lo: int) -> list[tuple[int, ...]]:
    """All non-decreasing tuples of d integers >= lo with product n."""
    if d == 1:
        return [(n,)] if n >= lo else []
    out = []
    for f in _divisors(n):
        if f < lo:
            continue
        if f ** d > n:
            break
        out += [(f,) + rest for rest in _splits(n // f, d - 1, f)]
    return out


def _best_split(n: int, d: int) -> tuple[int, ...] | None:
    """The most balanced split into d factors >= 2 (least variance of log-factors)."""
    cands = _splits(n, d, 2)
    if not cands:
        return None
    target = math.log(n) / d
    return min(cands, key=lambda t: (sum((math.log(f) - target) ** 2 for f in t), t))


def balanced_split(n: int, d: int, max_imbalance: float = 4.0) -> tuple[int, ...] | None:
    """The most balanced split of ``n`` into ``d`` ascending modes >= 2 whose largest / smallest
    is <= ``max_imbalance`` (what ``tt_shape`` accepts), or None when there is none."""
    best = _best_split(n, d)
    return best if best is not None and best[-1] / best[0] <= max_imbalance else None


def tt_shape(n: int, d: int = 3, *, pad: bool = False, max_imbalance: float = 4.0) -> tuple[int, ...]:
    """Split a feature count into d balanced integer modes, ascending (384 -> (6, 8, 8),
    1536 -> (8, 12, 16), 4096 -> (16, 16, 16)).

    A split is accepted when every mode is >= 2 and largest / smallest <= ``max_imbalance``.
    Prime or awkward sizes (997, 2 * 499, ...) raise ValueError unless ``pad=True``: then the
    smallest n' >= n with an acceptable split is used, and the product of the returned modes is
    n' > n. TTLinear handles such modes exactly: inputs are zero-padded to n' (the padded weight
    columns only ever meet zeros) and padded outputs are sliced off, so the padded layer computes
    exactly W'[:out, :in] x + b.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"tt_shape: n={n!r} must be a positive int (a feature count)")
    if not isinstance(d, int) or d < 2:
        raise ValueError(f"tt_shape: d={d!r} must be an int >= 2 (number of TT cores); e.g. d=3")
    if max_imbalance < 1:
        raise ValueError(f"tt_shape: max_imbalance={max_imbalance!r} must be >= 1")
    best = _best_split(n, d)
    if best is not None and best[-1] / best[0] <= max_imbalance:
        return best
    if pad:
        m = n + 1
        while True:
            cand = _best_split(m, d)
            if cand is not None and cand[-1] / cand[0] <= max_imbalance:
                return cand
            m += 1
    why = (f"{n} is prime" if n > 1 and _divisors(n) == [1, n] else
           f"it has too few factors for {d} modes >= 2" if best is None else
           f"its most balanced split {best} is too lopsided (ratio {best[-1] / best[0]:.1f} > "
           f"max_imbalance {max_imbalance:g})")
    nxt = tt_shape(n, d, pad=True, max_imbalance=max_imbalance)
    raise ValueError(f"tt_shape: cannot split {n} features into {d} balanced integer modes: {why}; "
                     f"pass explicit modes, use pad=True (pads to {math.prod(nxt)} = "
                     f"{' x '.join(map(str, nxt))}), a different d, or leave this layer to low-rank SVD")


def tt_modes(out_features: int, in_features: int, d: int = 3, *, pad: bool = False,
             max_imbalance: float = 4.0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_modes, in_modes) for a Linear: out ascending, in descending, so the core sizes
    o_k * i_k are as even as possible (1536 x 384 -> (8, 12, 16), (8, 8, 6))."""
    out_m = tt_shape(out_features, d, pad=pad, max_imbalance=max_imbalance)
    in_m = tt_shape(in_features, d, pad=pad, max_imbalance=max_imbalance)
    return out_m, tuple(sorted(in_m, reverse=True))


def tt_full_ranks(out_modes: Sequence[int], in_modes: Sequence[int]) -> tuple[int, ...]:
    """The TT-ranks (1, r_1, ..., 1) at which TT-SVD is exact: min of the unfolding sizes."""
    n = [o * i for o, i in zip(out_modes, in_modes)]
    return (1,) + tuple(min(math.prod(n[:k]), math.prod(n[k:])) for k in range(1, len(n))) + (1,)


def tt_params(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of core entries for full ranks (1, r_1, ..., 1)."""
    return sum(ranks[k] * o * i * ranks[k + 1] for k, (o, i) in enumerate(zip(out_modes, in_modes)))


def tt_flops(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds per input row of TTLinear's left-to-right forward (dense: out * in)."""
    d = len(out_modes)
    return sum(math.prod(out_modes[:k]) * math.prod(in_modes[k + 1:]) * ranks[k] * in_modes[k]
               * out_modes[k] * ranks[k + 1] for k in range(d))


def _clip_ranks(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    full = tt_full_ranks(out_modes, in_modes)
    return tuple(min(r, f) for r, f in zip(ranks, full))


def tt_max_rank_for_params(out_modes: Sequence[int], in_modes: Sequence[int], budget: int) -> int:
    """Largest uniform max_rank whose (clipped) TT-ranks keep at most ``budget`` core entries
    (0 when even rank 1 does not fit)."""
    d = len(out_modes)
    best, r = 0, 1
    top = max(tt_full_ranks(out_modes, in_modes))
    while r <= top:
        ranks = _clip_ranks(out_modes, in_modes, (1,) + (r,) * (d - 1) + (1,))
        if tt_params(out_modes, in_modes, ranks) > budget:
            break
        best, r = r, r + 1
    return best
