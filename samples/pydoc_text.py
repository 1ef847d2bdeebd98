"""Real English text from Python's bundled docs (pydoc_data.topics), split into sentences.

The reference split used by the benchmarks: sentences split on sentence ends, kept if
40-300 characters, shuffled with random.Random(0); the first 256 calibrate, sentences
1000-1499 are held out. Run as a script to (re)write samples/calib.txt and samples/eval.txt;
``--large-train FILE`` writes the large training text (see :func:`large_training_text`).
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from pathlib import Path

_SKIP_TOP = {"site-packages", "test", "idlelib", "lib2to3", "tkinter"}


def _split(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if 40 <= len(s.strip()) <= 300]


def docstring_sentences() -> list[str]:
    """Sentences of the standard library's docstrings (module, class and function), read with
    ``ast`` (nothing is imported); doctest examples skipped; shuffled with random.Random(0).
    The count depends on the Python version (10,307 on 3.11.7)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    seen: set[str] = set()
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if parts[0] in _SKIP_TOP or "tests" in parts:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or ">>>" in doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                for s in _split(para):
                    if s[0].isupper() and s not in seen:
                        seen.add(s)
                        out.append(s)
    random.Random(0).shuffle(out)
    return out


def sentences() -> list[str]:
    """All usable sentences, shuffled deterministically."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for s in _split(topics[key]):
            if s not in seen:
                seen.add(s)
                out.append(s)
    random.Random(0).shuffle(out)
    return out


def reference_split() -> tuple[list[str], list[str]]:
    """(calibration = sentences 0-255, held out = sentences 1000-1499)."""
    s = sentences()
    return s[:256], s[1000:1500]


def large_training_text() -> list[str]:
    """Every pydoc sentence outside the held-out range plus the standard library's docstring
    sentences, minus any held-out sentence; shuffled with random.Random(1). About 12,000
    sentences (12,078 on Python 3.11.7) against the 1,000 of samples/train.txt."""
    s = sentences()
    held = set(s[1000:1500])
    out = [x for x in s[:1000] + s[1500:] + docstring_sentences() if x not in held]
    random.Random(1).shuffle(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--large-train":
        lines = large_training_text()
        Path(sys.argv[2]).write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} training sentences to {sys.argv[2]}")
        raise SystemExit(0)
    calib, held = reference_split()
    here = Path(__file__).parent
    (here / "calib.txt").write_text("\n".join(calib) + "\n")
    (here / "eval.txt").write_text("\n".join(held) + "\n")
    print(f"wrote {len(calib)} calibration and {len(held)} held-out sentences to {here}")
