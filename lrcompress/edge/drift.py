"""Drift of a candidate's outputs from the reference's, accumulated batch by batch: max/mean
absolute error over real tokens, relative L2, cosine per example, top-1 agreement for logits,
and the examples whose candidate output is not finite (never counted as agreement)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import DataError


def _bad_examples(x: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Per example (first axis): whether any value it counts (real tokens under ``m``) is NaN/Inf."""
    if x.ndim == 0:
        return np.array([not np.isfinite(x)])
    bad = ~np.isfinite(x)
    if m is not None:
        bad = bad & m.reshape(m.shape + (1,) * (x.ndim - m.ndim))
    return bad.reshape(len(x), -1).any(axis=1)


def check_reference(ref: dict[str, np.ndarray], mask: np.ndarray | None) -> None:
    """Refuse reference outputs with NaN/Inf (nothing can be compared against them)."""
    for name, r in ref.items():
        m = mask.astype(bool) if mask is not None and r.ndim >= 3 and r.shape[:2] == mask.shape else None
        bad = int(_bad_examples(np.asarray(r), m).sum())
        if bad:
            raise DataError(f"the reference model produces NaN/Inf on the data (output {name!r}, {bad} example(s) of "
                            "one batch); fix the reference weights or the data before validating")


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], mask: np.ndarray | None,
            acc: dict[str, dict[str, Any]]) -> int:
    """Accumulate per-output error statistics for one batch; returns how many of its examples
    have a NaN/Inf candidate value in any output. Such examples count in ``non_finite`` and make
    the error statistics inf and their cosine NaN, never 0."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf etc.: counted, not warned about
        return _compare(ref, cand, mask, acc)


def _compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], mask: np.ndarray | None,
             acc: dict[str, dict[str, Any]]) -> int:
    any_bad: np.ndarray | None = None
    for name, r in ref.items():
        c = cand[name].astype(np.float64)
        r = r.astype(np.float64)
        if c.shape != r.shape:
            raise DataError(f"output {name!r} has shape {list(c.shape)} in the candidate and {list(r.shape)} in the "
                            "reference; they are not the same model")
        a = acc.setdefault(name, {"max_abs": 0.0, "abs_sum": 0.0, "n": 0, "d2": 0.0, "r2": 0.0, "cos": [],
                                  "top1": [0, 0], "non_finite": 0})
        m = mask.astype(bool) if mask is not None and r.ndim >= 3 and r.shape[:2] == mask.shape else None
        bad = _bad_examples(c, m)
        a["non_finite"] += int(bad.sum())
        if any_bad is None or (any_bad.shape != bad.shape and bad.sum() > any_bad.sum()):
            any_bad = bad
        elif any_bad.shape == bad.shape:
            any_bad = any_bad | bad
        if bad.any():
            a["max_abs"] = math.inf
        if m is not None:  # padding positions take no part (NaN there must not leak into the pooled cosine)
            keep = m.reshape(m.shape + (1,) * (r.ndim - m.ndim))
            c, r = np.where(keep, c, 0.0), np.where(keep, r, 0.0)
        diff = np.abs(c - r)
        sel = diff[m] if m is not None else diff
        a["max_abs"] = max(a["max_abs"], float(sel.max()) if sel.size else 0.0)
        a["abs_sum"] += float(sel.sum())
        a["n"] += sel.size
        a["d2"] += float((sel ** 2).sum())
        a["r2"] += float(((r[m] if m is not None else r) ** 2).sum())
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
        a["cos"].extend(cos.tolist())
        if "logit" in name.lower() or (r.ndim == 2 and r.shape[1] > 1 and name == "output"):
            agree = (c.argmax(-1) == r.argmax(-1)) & np.isfinite(c).all(-1)  # NaN/Inf logits never agree
            if m is not None and agree.shape == m.shape:
                agree = agree[m]
            a["top1"][0] += int(agree.sum())
            a["top1"][1] += int(agree.size)
    return int(any_bad.sum()) if any_bad is not None else 0


def summarize(acc: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per output: max/mean abs error, relative L2, cosine mean/worst, top-1 agreement and the
    ``non_finite`` example count (when > 0 the errors are inf and the cosines NaN)."""
    out = {}
    for name, a in acc.items():
        cos = np.array(a["cos"], dtype=np.float64)
        bad = a.get("non_finite", 0)
        row = {"max_abs": math.inf if bad else a["max_abs"],
               "mean_abs": math.inf if bad else a["abs_sum"] / max(a["n"], 1),
               "rel_l2": math.inf if bad else (math.sqrt(a["d2"] / a["r2"]) if a["r2"] > 0 else 0.0),
               "cos_mean": math.nan if bad or not cos.size else float(cos.mean()),
               "cos_worst": math.nan if bad or not cos.size else float(cos.min()),
               "examples": len(cos), "non_finite": bad}
        if a["top1"][1]:
            row["top1_agreement"] = a["top1"][0] / a["top1"][1]
        out[name] = row
    return out
