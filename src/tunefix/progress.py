"""How library code says how far it is: one small protocol, rendered elsewhere.

Fetching assets, converting and quantising GGUF files, the steps of an export and the
steps of a training run all report through a ``Reporter``. The library never draws
anything itself: the commands pass ``tunefix.console.RichReporter`` (a spinner per stage,
a bar for counted progress), a notebook or a web UI passes its own, and a library call
without one gets ``Silent``. So this module is stdlib only, and nothing that reports
progress imports a renderer.

Four calls, chosen so that a renderer that only appends lines (a log, a web page fed by
events) and one that redraws (a terminal) can both show everything:

- ``with reporter.stage(name, detail):`` a step with a duration; the block is its work,
  an exception leaving the block is its failure;
- ``reporter.advance(done, total, detail)``: counted progress inside the current stage
  (training steps), ``detail`` the current status line;
- ``reporter.event(name, detail)``: a named thing that happened, with no duration of its
  own (a GGUF file's metadata patched), for renderers and recorders that keep structure;
- ``reporter.note(text)``: one line for a person (a fix the doctor applied).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Reporter(Protocol):
    """What library code reports to. See the module doc for the meaning of each call."""

    def stage(self, name: str, detail: str = "") -> AbstractContextManager[None]: ...

    def advance(self, done: int, total: int | None = None, detail: str = "") -> None: ...

    def event(self, name: str, detail: str = "") -> None: ...

    def note(self, text: str) -> None: ...


def label(name: str, detail: str = "") -> str:
    """A stage or event as one human line: ``convert f16``."""
    return f"{name} {detail}" if detail else name


class Silent:
    """The default: shows nothing. Notes (what a person should read: a fix applied) go to
    this module's logger at INFO, stages and events at DEBUG (``tunefix demo`` fetching its
    cached assets would otherwise list each one); counted progress is dropped (a line per
    training step would drown a log)."""

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        log.debug("%s ...", label(name, detail))
        yield

    def advance(self, done: int, total: int | None = None, detail: str = "") -> None:
        pass

    def event(self, name: str, detail: str = "") -> None:
        log.debug("%s", label(name, detail))

    def note(self, text: str) -> None:
        log.info("%s", text)


def or_silent(reporter: Reporter | None) -> Reporter:
    return reporter if reporter is not None else Silent()


class Recorder(Silent):
    """Keeps the stages and events it sees as ``(name, detail)`` pairs, in order, and the
    notes; shows nothing. An export records its GGUF steps in its manifest with one; tests
    see what a call reported with one."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []
        self.notes: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        self.steps.append((name, detail))
        yield

    def event(self, name: str, detail: str = "") -> None:
        self.steps.append((name, detail))

    def note(self, text: str) -> None:
        self.notes.append(text)
