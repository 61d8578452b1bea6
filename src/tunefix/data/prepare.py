"""From a file to standardised rows: load, detect the format, convert, add system, extend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunefix.data.formats import (
    _EXPECTED,
    FORMATS,
    Conversation,
    converter,
    detect_format,
    extend_conversations,
    with_system,
)
from tunefix.data.load import load_table
from tunefix.errors import TunefixError


@dataclass
class Prepared:
    """Standardised rows: conversations (``kind == "chat"``) or raw texts (``"text"``)."""

    format: str
    kind: str
    rows: list[Conversation] | list[str]
    columns: list[str]


def _format(ds, source: str | Path, fmt: str | None, merge: str | None, output: str | None,
            reasoning: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise TunefixError(f"unknown data format {fmt!r}", f"Choose one of {', '.join(FORMATS)}")
        if reasoning is not None and fmt != "table":
            raise TunefixError(f"--reasoning maps table columns; format {fmt} carries reasoning in its messages",
                               "Give assistant messages a `reasoning` field, or drop --reasoning")
        return fmt
    if merge is not None or output is not None or reasoning is not None:
        return "table"
    found = detect_format(ds.column_names, ds.select(range(min(len(ds), 20))).to_list())
    if found is None:
        raise TunefixError(f"{source}: no known format in columns {', '.join(ds.column_names)}",
                           f"Expected {_EXPECTED}; or give --format")
    return found


def prepare(source: str | Path, *, fmt: str | None = None, merge: str | None = None,
            output: str | None = None, reasoning: str | None = None, system: str | None = None,
            turns: int = 1, seed: int = 0, limit: int | None = None) -> Prepared:
    """Load ``source`` and standardise its rows (``limit``: only the first rows; ``reasoning``:
    for a table, the column or template that becomes each answer's reasoning)."""
    ds = load_table(source)
    if limit is not None:
        ds = ds.select(range(min(limit * max(turns, 1), len(ds))))
    fmt = _format(ds, source, fmt, merge, output, reasoning)
    if fmt == "text":
        if "text" not in ds.column_names:
            raise TunefixError(f"{source}: format text needs a 'text' column",
                               f"Columns: {', '.join(ds.column_names)}")
        return Prepared(fmt, "text", [str(t) for t in ds["text"] if t], ds.column_names)
    convert = converter(fmt, ds.column_names, merge, output, reasoning)
    conversations = [with_system(convert(row), system) for row in ds]
    if not any(m["role"] == "assistant" for c in conversations for m in c):
        raise TunefixError(f"{source}: no assistant turns found", "Check --format / --output")
    return Prepared(fmt, "chat", extend_conversations(conversations, turns, seed), ds.column_names)
