"""Capture library log records (instead of letting them print) for the duration of a call."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"{record.levelname}: {record.getMessage()}")


@contextmanager
def capture_logs(*names: str, level: int = logging.INFO) -> Iterator[list[str]]:
    """Route records of the named loggers ("root" = root logger) into a list; restore them afterwards."""
    lines: list[str] = []
    handler = _ListHandler(lines)
    saved = []
    for name in names:
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate, logger.handlers[:]))
        logger.setLevel(level)
        if name == "root":
            logger.handlers = [handler]
        else:
            logger.addHandler(handler)
            logger.propagate = False
    try:
        yield lines
    finally:
        for logger, lvl, propagate, handlers in saved:
            logger.setLevel(lvl)
            logger.propagate = propagate
            logger.handlers = handlers


@contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the logger ``name`` to ``level`` for the duration of the block, then restore it."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)
