"""The package's import graph has no cycle (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of this tree that ``path`` imports, resolving relative imports (imports for type
    checking only, under ``if TYPE_CHECKING:``, are not dependencies at run time)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in ("lrcompress", "exporters") for p in (ROOT / pkg).rglob("*.py")]
    names = {_module_name(p): p for p in files}
    return {n: _imports(p, n, set(names)) for n, p in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            # a package's __init__ importing its own submodules is not a cycle back to it
            if m.startswith(n + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "lrcompress.io.checkpoint" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None



STAGES = ("io", "calibration", "planning", "methods", "recovery", "workflow", "edge")


def test_package_faces_resolve_and_import_nothing_up_front() -> None:
    """Each stage package's public face names real objects, and importing the package alone
    imports none of its modules (faces load on first use)."""
    import subprocess
    import sys
    import importlib
    for stage in STAGES:
        face = importlib.import_module(f"lrcompress.{stage}")
        assert face.__all__, stage
        for name in face.__all__:
            assert getattr(face, name) is not None, f"lrcompress.{stage}.{name}"
    probe = ("import sys, lrcompress.errors\n"
             f"for s in {STAGES!r}:\n"
             "    __import__('lrcompress.' + s)\n"
             "print(sorted(m for m in sys.modules if m.count('.') >= 2 and m.startswith('lrcompress.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    loaded = eval(out)  # noqa: S307  (our own print of a list of names)
    assert loaded == [], loaded
