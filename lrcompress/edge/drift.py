"""lrcompress's rules around ``exporters.compare`` (which accumulates the drift of a candidate's named outputs
from the reference's): the reference must be finite, the two must share output names and shapes; each broken
rule is a :class:`DataError` naming the fix."""

from __future__ import annotations

from typing import Any

import numpy as np

from exporters.compare import OutputComparison, non_finite_examples

from ..errors import DataError

__all__ = ["OutputComparison", "check_reference", "common_outputs", "compare", "summarize"]


def check_reference(ref: dict[str, np.ndarray], mask: np.ndarray | None) -> None:
    """Refuse reference outputs with NaN/Inf (nothing can be compared against them)."""
    for name, bad in non_finite_examples(ref, mask).items():
        if bad:
            raise DataError(f"the reference model produces NaN/Inf on the data (output {name!r}, {bad} example(s) of "
                            "one batch); fix the reference weights or the data before validating")


def common_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference's outputs that the candidate also has; a :class:`DataError` when they share none."""
    common = {n: ref[n] for n in ref if n in cand}
    if not common:
        raise DataError(f"candidate outputs {sorted(cand)} and reference outputs {sorted(ref)} share no name; "
                        "export both from the same architecture")
    return common


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], mask: np.ndarray | None,
            acc: OutputComparison) -> int:
    """Add one batch to ``acc``; returns how many of its examples have a NaN/Inf candidate value in
    any output. Outputs of different shapes are a :class:`DataError` (not the same model)."""
    for name, r in ref.items():
        c = cand[name]
        if np.shape(c) != np.shape(r):
            raise DataError(f"output {name!r} has shape {list(np.shape(c))} in the candidate and {list(np.shape(r))} "
                            "in the reference; they are not the same model")
    return acc.add(ref, cand, mask)


def summarize(acc: OutputComparison) -> dict[str, dict[str, Any]]:
    """Per output: max/mean abs error, relative L2, cosine mean/worst, top-1 agreement and the
    ``non_finite`` example count (when > 0 the errors are inf and the cosines NaN)."""
    return acc.summary()
