"""Drift of a candidate's named outputs from a reference's, accumulated batch by batch: max/mean absolute error
over real tokens, relative L2, cosine per example, top-1 agreement for logits, and the examples whose candidate
output is not finite (never counted as agreement). Plain numpy: it compares any two runners' outputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadInput


def bad_examples(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per example (first axis): whether any value it counts (real tokens under ``mask``) is NaN/Inf."""
    if x.ndim == 0:
        return np.array([not np.isfinite(x)])
    bad = ~np.isfinite(x)
    if mask is not None:
        bad = bad & mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    return bad.reshape(len(x), -1).any(axis=1)


def token_mask(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """``mask`` as booleans when it covers the output's first two axes (batch x sequence), else None."""
    if mask is not None and output.ndim >= 3 and output.shape[:2] == mask.shape:
        return mask.astype(bool)
    return None


def non_finite_examples(outputs: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, int]:
    """Per output, how many examples hold a NaN/Inf among the values that count."""
    return {name: int(bad_examples(np.asarray(o), token_mask(np.asarray(o), mask)).sum()) for name, o in outputs.items()}


def is_logits(name: str, output: np.ndarray) -> bool:
    """Whether top-1 agreement makes sense for an output: its name says logits, or a plain (batch, classes) output."""
    return "logit" in name.lower() or (output.ndim == 2 and output.shape[1] > 1 and name == "output")


@dataclass
class OutputStats:
    """Running sums for one output."""

    max_abs: float = 0.0
    abs_sum: float = 0.0
    n: int = 0
    d2: float = 0.0
    r2: float = 0.0
    cos: list[float] = field(default_factory=list)
    top1: list[int] = field(default_factory=lambda: [0, 0])
    non_finite: int = 0

    def summary(self) -> dict[str, Any]:
        """max/mean abs error, relative L2, cosine mean/worst, examples, non_finite (+ top-1 agreement)."""
        cos = np.array(self.cos, dtype=np.float64)
        bad = self.non_finite
        row: dict[str, Any] = {
            "max_abs": math.inf if bad else self.max_abs,
            "mean_abs": math.inf if bad else self.abs_sum / max(self.n, 1),
            "rel_l2": math.inf if bad else (math.sqrt(self.d2 / self.r2) if self.r2 > 0 else 0.0),
            "cos_mean": math.nan if bad or not cos.size else float(cos.mean()),
            "cos_worst": math.nan if bad or not cos.size else float(cos.min()),
            "examples": len(cos), "non_finite": bad}
        if self.top1[1]:
            row["top1_agreement"] = self.top1[0] / self.top1[1]
        return row


class OutputComparison:
    """Compare a candidate's outputs with the reference's batch by batch (:meth:`add`), then :meth:`summary`.

    Outputs are matched by name over the reference's names (the candidate must have each). ``mask`` (batch x
    sequence, 1 = real token) restricts (batch, sequence, ...) outputs to real tokens and pools them per example
    for the cosine. An example with a NaN/Inf candidate value counts in ``non_finite`` and makes the error
    statistics inf and the cosines NaN, never 0.
    """

    def __init__(self) -> None:
        self.outputs: dict[str, OutputStats] = {}

    def add(self, ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> int:
        """Accumulate one batch; returns how many of its examples have a NaN/Inf candidate value in any output."""
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf etc.: counted, not warned about
            return self._add(ref, cand, mask)

    def _add(self, ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray], mask: np.ndarray | None) -> int:
        any_bad: np.ndarray | None = None
        for name, r in ref.items():
            if name not in cand:
                raise BadInput(f"the candidate has no output {name!r} (it has {sorted(cand)}); compare outputs of one model")
            c = np.asarray(cand[name]).astype(np.float64)
            r = np.asarray(r).astype(np.float64)
            if c.shape != r.shape:
                raise BadInput(f"output {name!r} has shape {list(c.shape)} in the candidate and {list(r.shape)} in the "
                               "reference; they are not the same model")
            a = self.outputs.setdefault(name, OutputStats())
            m = token_mask(r, mask)
            bad = bad_examples(c, m)
            a.non_finite += int(bad.sum())
            if any_bad is None or (any_bad.shape != bad.shape and bad.sum() > any_bad.sum()):
                any_bad = bad
            elif any_bad.shape == bad.shape:
                any_bad = any_bad | bad
            if bad.any():
                a.max_abs = math.inf
            _accumulate(a, name, r, c, m, bad)
        return int(any_bad.sum()) if any_bad is not None else 0

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per output: max/mean abs error, relative L2, cosine mean/worst, top-1 agreement (logits) and the
        ``non_finite`` example count (when > 0 the errors are inf and the cosines NaN)."""
        return {name: stats.summary() for name, stats in self.outputs.items()}


def _accumulate(a: OutputStats, name: str, r: np.ndarray, c: np.ndarray, m: np.ndarray | None, bad: np.ndarray) -> None:
    if m is not None:  # padding positions take no part (NaN there must not leak into the pooled cosine)
        keep = m.reshape(m.shape + (1,) * (r.ndim - m.ndim))
        c, r = np.where(keep, c, 0.0), np.where(keep, r, 0.0)
    diff = np.abs(c - r)
    sel = diff[m] if m is not None else diff
    a.max_abs = max(a.max_abs, float(sel.max()) if sel.size else 0.0)
    a.abs_sum += float(sel.sum())
    a.n += sel.size
    a.d2 += float((sel ** 2).sum())
    a.r2 += float(((r[m] if m is not None else r) ** 2).sum())
    if m is not None:
        w = m[..., None].astype(np.float64)
        pc, pr = (c * w).sum(1) / np.maximum(w.sum(1), 1), (r * w).sum(1) / np.maximum(w.sum(1), 1)
    else:
        pc, pr = c.reshape(len(c), -1), r.reshape(len(r), -1)
    pc, pr = pc.reshape(len(pc), -1), pr.reshape(len(pr), -1)
    num = (pc * pr).sum(1)
    den = np.linalg.norm(pc, axis=1) * np.linalg.norm(pr, axis=1)
    cos = num / np.maximum(den, 1e-30)
    if bad.shape == cos.shape:
        cos = np.where(bad, np.nan, cos)  # no cosine for an output with NaN/Inf
    a.cos.extend(cos.tolist())
    if is_logits(name, r):
        agree = (c.argmax(-1) == r.argmax(-1)) & np.isfinite(c).all(-1)  # NaN/Inf logits never agree
        if m is not None and agree.shape == m.shape:
            agree = agree[m]
        a.top1[0] += int(agree.sum())
        a.top1[1] += int(agree.size)


def compare_outputs(ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
                    mask: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Drift statistics of one batch of outputs (see :class:`OutputComparison`)."""
    comparison = OutputComparison()
    comparison.add(ref, cand, mask)
    return comparison.summary()
