"""Atomic publication of artifacts: build in a hidden sibling folder, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput


def check_target(path: str | os.PathLike[str], suffix: str) -> Path:
    """Validate an output path: it must end with ``suffix`` and its parent must be creatable."""
    target = Path(path)
    if target.suffix.lower() != suffix:
        raise BadInput(f"output path '{target}' must end with '{suffix}'; rename it to '{target.with_suffix(suffix).name}'")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create output folder '{target.parent}': {exc.strerror}; choose a writable location") from exc
    return target


@contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A temporary folder next to ``target`` (same filesystem, so renames are atomic); always removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, target: Path) -> None:
    """Move a staged file or folder onto ``target``, replacing what was there."""
    if not staged.is_dir():
        os.replace(staged, target)
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(target, old)
    try:
        os.replace(staged, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` as a Path if it exists, else raise :class:`BadInput`."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{what} '{p}' does not exist; check the path")
    return p
