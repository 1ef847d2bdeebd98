"""Real English text from Python's bundled docs (pydoc_data.topics), split into sentences.

The reference split used by the benchmarks: sentences split on sentence ends, kept if
40-300 characters, shuffled with random.Random(0); the first 256 calibrate, sentences
1000-1499 are held out. Run as a script to (re)write samples/calib.txt and samples/eval.txt.
"""

from __future__ import annotations

import random
import re
from pathlib import Path


def sentences() -> list[str]:
    """All usable sentences, shuffled deterministically."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            if 40 <= len(s) <= 300 and s not in seen:
                seen.add(s)
                out.append(s)
    random.Random(0).shuffle(out)
    return out


def reference_split() -> tuple[list[str], list[str]]:
    """(calibration = sentences 0-255, held out = sentences 1000-1499)."""
    s = sentences()
    return s[:256], s[1000:1500]


if __name__ == "__main__":
    calib, held = reference_split()
    here = Path(__file__).parent
    (here / "calib.txt").write_text("\n".join(calib) + "\n")
    (here / "eval.txt").write_text("\n".join(held) + "\n")
    print(f"wrote {len(calib)} calibration and {len(held)} held-out sentences to {here}")
