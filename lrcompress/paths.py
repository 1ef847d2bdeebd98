"""Where outputs may go. An output is never an input of the same command (nor a folder that
holds one), an existing file is replaced only with ``--overwrite``, everything is written to a
temporary sibling and renamed into place, and a sibling left by a killed run is cleaned by the
next run to the same output."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ConfigError, OutputError

PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def _real(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(p)))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(flag: str, out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], *,
                    folder: bool) -> None:
    """Refuse an output path that is one of ``inputs``, lies inside an input folder, or (a folder
    output) holds an input or is the current folder or one above it: writing there would change
    or destroy the input."""
    o = _real(out)
    cwd = _real(os.getcwd())
    if folder and _inside(cwd, o):
        raise ConfigError(f"{flag} {str(out)!r} is the current folder or one above it; replacing it would delete "
                          f"what is in it: choose a new folder, e.g. {flag} out/model")
    for i in inputs:
        if i is None or not os.path.exists(i):
            continue
        r = _real(i)
        same = o == r or (o.exists() and os.path.samefile(o, r))
        if same:
            raise ConfigError(f"{flag} {str(out)!r} is also an input of this command ({str(i)!r}); writing there "
                              f"would replace it: choose another {flag} path")
        if folder and _inside(r, o):
            raise ConfigError(f"{flag} {str(out)!r} holds the input {str(i)!r}; replacing that folder would delete "
                              f"it: choose another {flag} folder")
        if r.is_dir() and _inside(o, r):
            raise ConfigError(f"{flag} {str(out)!r} is inside the input folder {str(i)!r}; writing there would change "
                              f"that input: choose a {flag} path outside it")


def check_distinct(outputs: dict[str, str | os.PathLike[str] | None]) -> None:
    """Refuse two outputs of one command at the same path (or one inside the other)."""
    items = [(flag, _real(p)) for flag, p in outputs.items() if p is not None]
    for i, (fa, a) in enumerate(items):
        for fb, b in items[i + 1:]:
            if _inside(a, b) or _inside(b, a):
                raise ConfigError(f"{fa} and {fb} point to the same place ({str(outputs[fa])!r}, "
                                  f"{str(outputs[fb])!r}); give each output its own path")


def check_output_file(flag: str, path: str | os.PathLike[str], *, overwrite: bool,
                      suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse, before any work, a file output that cannot be written: a folder, a missing or
    non-folder parent, an unwritable parent, an unknown image type, or an existing file
    without ``overwrite``."""
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a folder; give a file path")
    if suffixes is not None and p.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} {str(path)!r} has no known image type ({p.suffix or 'no suffix'}); end it in "
                          f"one of {', '.join(suffixes[:3])}, e.g. {flag} curve.png")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise ConfigError(f"{flag} {str(path)!r}: folder {str(parent)!r} does not exist; create it first or choose "
                          "another path")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r}: folder {str(parent)!r} is not writable; choose another path")
    if os.path.lexists(p):
        if not p.is_file():
            raise ConfigError(f"{flag} {str(path)!r} exists and is not a regular file; choose another path")
        if not overwrite:
            raise ConfigError(f"{flag} {str(path)!r} already exists; pass --overwrite to replace it or choose "
                              "another path")
    return p


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove temporary siblings of ``out`` left by a run that was killed (its process is gone);
    a previous version parked aside by a killed swap is put back when ``out`` is missing."""
    parent = out.parent
    if not parent.is_dir():
        return
    pattern = re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-(\d+)-[0-9a-f]{8}"
                         + f"(?:{re.escape(out.suffix)})?$")
    for sib in parent.iterdir():
        m = pattern.match(sib.name)
        if m is None:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another run is writing it now
        if m.group(1) == "old" and not os.path.lexists(out) and os.path.lexists(sib / "x"):
            os.replace(sib / "x", out)
        if sib.is_dir() and not sib.is_symlink():
            shutil.rmtree(sib, ignore_errors=True)
        else:
            sib.unlink(missing_ok=True)


def _sibling(out: Path, kind: str, suffix: str = "") -> Path:
    """``.NAME.KIND-PID-XXXXXXXX[SUFFIX]`` beside ``out`` (the pattern clean_stale recognises)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def check_output(out: str | Path, overwrite: bool = False, flag: str = "-o") -> Path:
    """Refuse output folders that cannot be (re)written, before any work is done."""
    p = Path(out)
    if str(out) in ("", ".", "..") or p.name in ("", ".", ".."):
        raise ConfigError(f"{flag} {str(out)!r} is not a folder name of its own; replacing it would delete the "
                          f"folder it names: choose a new folder, e.g. {flag} out/model")
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {str(p)!r} is an existing file; choose a folder path with {flag}")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputError(f"output folder {str(p)!r} is not empty; pass --overwrite or choose another {flag}")
    probe = p.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {str(p)!r}: {str(probe)!r} is a file, not a folder; choose another {flag}")
    try:
        tempfile.TemporaryDirectory(prefix=".lrcompress-probe-", dir=probe).cleanup()
    except OSError as e:
        raise OutputError(f"cannot write under {str(probe)!r} ({e.strerror or e}); choose a writable {flag}") from None
    return p


def _missing_parents(p: Path) -> list[Path]:
    """Ancestors of ``p`` that do not exist yet, deepest first."""
    out = []
    q = p.resolve().parent
    while not q.exists():
        out.append(q)
        q = q.parent
    return out


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it is renamed into place
    (replacing an old folder only after the new one is complete), on any failure or interrupt
    it and the parent folders this call created are removed, so nothing half-written is left."""
    out = check_output(out, overwrite)
    created = _missing_parents(out)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = _sibling(out, "tmp")
        tmp.mkdir()  # mode 0777 & ~umask, like any folder the user makes
        yield tmp
        if out.exists():
            old = _sibling(out, "old")
            old.mkdir()
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; only folders this call made, and only if empty
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise OutputError(f"writing {str(out)!r} failed ({e.strerror or e}); check free space and "
                              "permissions") from None
        raise


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix) to write; renamed onto ``path`` on success,
    removed on any failure or interrupt."""
    p = Path(path)
    clean_stale(p)
    tmp = _sibling(p, "tmp", p.suffix)  # same suffix: savefig picks the format from it
    try:
        yield tmp
        os.replace(tmp, p)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"writing {str(p)!r} failed ({e.strerror or e}); check free space and "
                              "permissions") from None
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
