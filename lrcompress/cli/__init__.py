"""Command line: a thin click layer over the pipeline. User errors exit 2 with one line."""

from __future__ import annotations

import sys

import click

from ..errors import LrcompressError
from . import compress, edge, recovery, workflow  # noqa: F401  (registers the commands on the group)
from .common import cli

__all__ = ["cli", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps user errors to one line on stderr and exit code 2; under torchrun the
    process group is torn down before exit (every rank in step on success)."""
    from ..distributed import shutdown
    try:
        code = _dispatch(argv)
    except BaseException:
        shutdown(sync=False)
        raise
    shutdown(sync=True)
    sys.exit(code if isinstance(code, int) else 0)


def _dispatch(argv: list[str] | None) -> object:
    try:
        code = cli.main(args=argv, prog_name="lrcompress", standalone_mode=False)
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
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("lrcompress: interrupted", err=True)
        sys.exit(130)
    return code
