"""Process-wide state changed only in scope: torch's thread count is set inside a context that
puts it back, and figures are drawn with matplotlib's object API (no pyplot, no global backend)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .errors import ConfigError


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: as is), then restore the previous count."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def figure(**kw: Any) -> Any:
    """A matplotlib Figure of its own: drawn and saved without pyplot, so no backend is chosen
    for the process and nothing needs closing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with pip install 'lrcompress[plot]'") from None
    return Figure(**kw)
