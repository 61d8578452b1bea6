"""Capturing a tunefix logger's INFO lines in module-scoped fixtures (caplog is per test)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def log_lines(name: str) -> Iterator[list[str]]:
    """The messages ``name`` logs at INFO or above inside the block, in order."""
    lines: list[str] = []

    class _Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = _Lines(logging.INFO), logging.getLogger(name)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
