"""Text of another domain than the calibration's (Python's reference documentation): software
licence and notice text that ships with every install of this project's dependencies -- Python's
LICENSE.txt and ONNX Runtime's ThirdPartyNotices.txt -- plus scikit-learn's descriptions of its
bundled datasets (statistics and biology), split into sentences, deduplicated and shuffled
deterministically. It shares no source with samples/pydoc_text.py."""

from __future__ import annotations

import random
import re
import sysconfig
from pathlib import Path


def _sources() -> list[Path]:
    out = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]
    try:
        import onnxruntime
        out.append(Path(onnxruntime.__file__).parent / "ThirdPartyNotices.txt")
    except ImportError:
        pass
    try:
        import sklearn.datasets
        out += sorted((Path(sklearn.datasets.__file__).parent / "descr").glob("*.rst"))
    except ImportError:
        pass
    return [p for p in out if p.is_file()]


def other_domain_sentences(n: int = 500) -> list[str]:
    """Up to ``n`` sentences of 6-60 words with mostly letters (no URLs, tables or code)."""
    seen: set[str] = set()
    found: list[str] = []
    for path in _sources():
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
        for s in re.split(r"(?<=[.!?])\s+", text):
            s = s.strip()
            words = s.split()
            letters = sum(c.isalpha() or c.isspace() for c in s) / max(len(s), 1)
            if not 6 <= len(words) <= 60 or letters < 0.85 or "http" in s or "===" in s or s in seen:
                continue
            seen.add(s)
            found.append(s)
    random.Random(0).shuffle(found)
    return found[:n]


if __name__ == "__main__":
    s = other_domain_sentences()
    print(len(s))
    print("\n".join(s[:5]))
