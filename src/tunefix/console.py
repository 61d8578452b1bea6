"""The terminal's rendering of ``tunefix.progress``: what the commands pass to the library.

A stage is a spinner while it runs, then one line: a tick and its duration, or a cross
when it failed. A stage that reports counted progress (training) turns its spinner into
a bar whose description is the live status line; the bar's last state stays on screen as
the stage's line. Notes inside a stage are indented under it.

Only the command layer (the CLI, the demo) imports this module: the library reports to
``tunefix.progress.Reporter`` and never imports rich for it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunefix.progress import label


class RichReporter:
    """A ``tunefix.progress.Reporter`` drawing on a rich console (stdout when none is given)."""

    def __init__(self, console: Console | None = None):
        self.console = console if console is not None else Console()
        self._stages: list[str] = []  # the running stages, outermost first
        self._status = None  # the spinner of the running stage
        self._bar = None  # its progress bar, once it reported counted progress
        self._task = None

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        text = label(name, detail)
        indent = "  " * len(self._stages)
        start = time.monotonic()
        self._stages.append(text)
        if self._status is None and self._bar is None:
            self._status = self.console.status(f"{escape(text)} ...", spinner="dots")
            self._status.start()
        elif self._status is not None:  # a stage inside a stage: one spinner, the inner label
            self._status.update(f"{escape(text)} ...")
        try:
            yield
        except BaseException:
            self._end()
            self.console.print(f"{indent}[red]✗[/] {escape(text)}", highlight=False)
            raise
        had_bar = self._bar is not None
        self._end()
        if not had_bar:  # a bar's last state is already the stage's line
            self.console.print(f"{indent}[green]✓[/] {escape(text)} [dim]({time.monotonic() - start:.1f}s)[/]",
                               highlight=False)

    def _end(self) -> None:
        """Close the innermost stage's live display (an outer stage gets its spinner back)."""
        self._stages.pop()
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None
        if not self._stages:
            if self._status is not None:
                self._status.stop()
                self._status = None
        elif self._status is None:  # the inner stage's bar had replaced the outer spinner
            self._status = self.console.status(f"{escape(self._stages[-1])} ...", spinner="dots")
            self._status.start()
        else:
            self._status.update(f"{escape(self._stages[-1])} ...")

    def advance(self, done: int, total: int | None = None, detail: str = "") -> None:
        if self._bar is None:
            self._start_bar(done, total)
        self._bar.update(self._task, completed=done, total=total, description=escape(detail))

    def _start_bar(self, done: int, total: int | None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        if self._status is not None:  # the bar replaces the spinner (one live display at a time)
            self._status.stop()
            self._status = None
        name = escape(self._stages[-1] if self._stages else "").replace("{", "{{").replace("}", "}}")
        self._bar = Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             TextColumn("{task.description}"), console=self.console, transient=False)
        self._bar.start()
        self._task = self._bar.add_task("", total=total, completed=done)

    def event(self, name: str, detail: str = "") -> None:
        self.note(label(name, detail))

    def note(self, text: str) -> None:
        if self._stages:
            self.console.print(f"  [dim]{escape(text)}[/]", highlight=False)
        else:
            self.console.print(text, highlight=False, markup=False)


def result_table(export_dir: Path, files: Sequence[dict], verification: dict | None) -> Table:
    """An export's files with their sizes and what verification said of each."""
    from tunefix._io import human_size
    from tunefix.export.pipeline import file_size, summarize

    table = Table(title=str(export_dir), title_justify="left")
    for col in ("file", "type", "size", "verification"):
        table.add_column(col, overflow="fold")
    vf = (verification or {}).get("files", {})
    for f in files:
        size = f.get("size")
        if size is None and (export_dir / f["path"]).exists():
            size = file_size(export_dir / f["path"])
        if verification is None:
            cell = "not verified"
        elif f["kind"] == "modelfile" and verification.get("template"):
            c = verification["template"]
            cell = f"template {'ok' if c['ok'] else 'FAIL'} ({c['summary']})"
        else:
            cell = summarize(vf.get(f["path"]))
        table.add_row(f["path"], f["type"], human_size(size or 0), cell)
    return table
