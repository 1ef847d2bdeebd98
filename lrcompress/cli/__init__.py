"""Command line: a thin click layer over the pipeline. User errors exit 2 with one line;
SIGINT exits 130 and SIGTERM 143, each with one line, after the usual clean-up."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import warnings
from typing import Any, Iterator

import click

from ..errors import DataWarning, Interrupted, LrcompressError
from . import compress, edge, evaluate, recovery, workflow  # noqa: F401  (registers the commands on the group)
from .common import cli

__all__ = ["cli", "main"]
_SIGNALS = {signal.SIGINT: "interrupted (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps user errors to one line on stderr and exit code 2; under torchrun the
    process group is torn down before exit (every rank in step on success)."""
    from ..io.distributed import shutdown
    try:
        with _signals_raise(), _warnings_as_lines():
            code = _dispatch(argv)
    except Interrupted as e:
        shutdown(sync=False)
        note = f"; {e.note}" if e.note else ""
        click.echo(f"lrcompress: {_SIGNALS.get(e.signum, 'stopped')}; unfinished outputs were removed{note}", err=True)
        sys.exit(128 + e.signum)
    except BaseException:
        shutdown(sync=False)
        raise
    shutdown(sync=True)
    sys.exit(code if isinstance(code, int) else 0)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """For the duration of a command, SIGINT and SIGTERM raise ``Interrupted`` (a BaseException
    that click leaves alone), so every ``finally`` and atomic writer cleans up; the previous
    handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Our data warnings print as one ``lrcompress: warning:`` line each (scoped)."""
    def show(message: Any, category: type, *args: Any, **kw: Any) -> None:
        if issubclass(category, DataWarning):
            click.echo(f"lrcompress: warning: {' '.join(str(message).split())}", err=True)
        else:
            original(message, category, *args, **kw)

    with warnings.catch_warnings():
        original = warnings.showwarning
        warnings.simplefilter("always", DataWarning)
        warnings.showwarning = show
        yield


def _dispatch(argv: list[str] | None) -> object:
    try:
        code = cli.main(args=argv, prog_name="lrcompress", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("lrcompress: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.UsageError as e:
        msg = " ".join(e.format_message().split())
        click.echo(f"lrcompress: error: {msg} (see lrcompress --help)", err=True)
        sys.exit(2)
    except LrcompressError as e:
        click.echo(f"lrcompress: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except Exception as e:  # exporters' errors (a separate package, no heavy imports)
        from exporters.errors import ExportError
        if not isinstance(e, ExportError):
            raise
        click.echo(f"lrcompress: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    return code
