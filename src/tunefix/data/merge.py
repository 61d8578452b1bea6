"""Merge templates: many table columns into one text, ``{column}`` and ``[[ optional ]]``.

``"{sex}, {age} years old[[, deck {deck}]]"`` writes each column's value; a ``[[ ... ]]``
section is dropped when any column inside it is empty (None, NaN, or blank), so rows
without a deck say nothing about decks instead of "deck None". Literal braces are written
``{{`` and ``}}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunefix.errors import TunefixError

_SECTION = re.compile(r"\[\[(.*?)\]\]", re.S)
_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 22.0 read by a numeric loader reads as "22"
    return str(value).strip()


@dataclass(frozen=True)
class MergeTemplate:
    """A parsed merge template; ``columns`` lists every column it reads, in order."""

    source: str
    columns: tuple[str, ...]

    def fill(self, row: Mapping[str, Any]) -> str:
        def section(m: re.Match) -> str:
            inner = m.group(1)
            names = [f.group(1) for f in _FIELD.finditer(inner) if f.group(1) is not None]
            return "" if any(is_empty(row[n]) for n in names) else _fields(inner, row)

        return _fields(_SECTION.sub(section, self.source), row)


def _fields(text: str, row: Mapping[str, Any]) -> str:
    def one(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        value = row[m.group(1)]
        return "" if is_empty(value) else _text(value)

    return _FIELD.sub(one, text)


def parse_merge(source: str, available: Sequence[str]) -> MergeTemplate:
    """Parse ``source``; an unknown column is an error that lists the available ones."""
    if source.count("[[") != source.count("]]"):
        raise TunefixError(f"merge template {source!r} has unbalanced [[ ]]", "Close every [[ with ]]")
    names = [m.group(1) for m in _FIELD.finditer(source) if m.group(1) is not None]
    if not names:
        raise TunefixError(f"merge template {source!r} names no column", "Write columns as {name}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise TunefixError(f"unknown column {unknown[0]!r} in {source!r}",
                           f"Available columns: {', '.join(available)}")
    return MergeTemplate(source, tuple(dict.fromkeys(names)))


def output_template(spec: str, available: Sequence[str]) -> MergeTemplate:
    """``--output``: a column name, or a merge template when it contains ``{``."""
    if "{" in spec:
        return parse_merge(spec, available)
    return parse_merge("{" + spec + "}", available)


def default_merge(columns: Sequence[str]) -> str:
    """Every column as "name: value", one per line, empty ones left out."""
    return "".join(f"[[{c}: {{{c}}}\n]]" for c in columns)
