"""Loading user files into a ``datasets.Dataset``, with errors that name the file and line.

``datasets`` (through pandas/pyarrow) reports a ragged CSV or a bad byte as a parser
traceback with no line a user can find, and an empty file as an opaque schema error. So
text files are checked here first, with the standard library, before ``datasets`` reads
them; CSV/TSV cells are read as strings, exactly as written (no "22" becoming 22.0).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError

_KINDS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
          ".parquet": "parquet", ".txt": "text"}


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TunefixError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                           "Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from e
    if not text.strip():
        raise TunefixError(f"{path}: the file is empty", "Give a file with a header row and data rows")
    return text


def _check_table(path: Path, delimiter: str) -> list[str]:
    rows = csv.reader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
    header = next(rows)
    n = len(header)
    if any(not h.strip() for h in header):
        raise TunefixError(f"{path}:1: the header has an empty column name", "Name every column")
    count = 0
    for row in rows:
        if not row:
            continue
        count += 1
        if len(row) != n:
            raise TunefixError(f"{path}:{rows.line_num}: {len(row)} fields where the header has {n}",
                               "Fix the row (quote cells that contain the delimiter)")
    if count == 0:
        raise TunefixError(f"{path}: the file has a header but no data rows", "Add rows")
    return header


def _check_json(path: Path, kind: str) -> None:
    text = _text(path)
    if kind == "jsonl" or (kind == "json" and not text.lstrip().startswith("[")
                           and text.count("\n") > 1 and text.lstrip().startswith("{")):
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                _parse(path, line, i)
        return
    data = _parse(path, text, None)
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise TunefixError(f"{path}: expected a JSON list of objects (one per example) or JSON Lines",
                           "Write [{...}, {...}] or one object per line")


def _parse(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = line if line is not None else e.lineno
        raise TunefixError(f"{path}:{where}: invalid JSON: {e.msg}", "Fix the JSON syntax") from e


def _kind(path: Path, fmt: str | None) -> str:
    if path.is_dir():
        return "disk"
    kind = fmt or _KINDS.get(path.suffix.lower())
    if kind is None:
        raise TunefixError(f"{path}: cannot tell the file type from {path.suffix or 'no extension'!r}",
                           f"Use one of {', '.join(_KINDS)}")
    return kind


def _jsonl_kind(path: Path, kind: str) -> str:
    """A ``.json`` file holding JSON Lines is common; datasets reads both with "json"."""
    return "json" if kind in ("json", "jsonl") else kind


def load_table(source: str | Path, fmt: str | None = None):
    """Load a data file, a ``save_to_disk`` directory or a cached hub dataset as a Dataset."""
    import datasets

    path = Path(source)
    if not path.exists():
        return _load_hub(str(source))
    kind = _kind(path, fmt)
    if kind == "disk":
        return _load_disk(path)
    header: list[str] = []
    if kind in ("csv", "tsv"):
        header = _check_table(path, "," if kind == "csv" else "\t")
    elif kind in ("json", "jsonl"):
        _check_json(path, kind)
    elif kind == "text":
        _text(path)
    builder = _jsonl_kind(path, kind)
    kwargs: dict[str, Any] = {}
    if kind in ("csv", "tsv"):
        builder = "csv"
        # Strings as written; an empty cell becomes None.
        kwargs = {"sep": "," if kind == "csv" else "\t", "keep_default_na": False, "na_values": [""],
                  "features": datasets.Features({h: datasets.Value("string") for h in header})}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types; every one means "could not read"
        raise TunefixError(f"{path}: could not be read as {kind}: {str(e).splitlines()[0]}",
                           "Check the file's format") from e


def _load_disk(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise TunefixError(f"{path}: a directory, but not one written by `save_to_disk`",
                           "Point at a data file or a save_to_disk directory") from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise TunefixError(f"{path}: no 'train' split (has {', '.join(loaded)})")
        return loaded["train"]
    return loaded


def _load_hub(name: str):
    import datasets

    if name.count("/") > 1 or name.startswith((".", "/")) or Path(name).suffix:
        raise TunefixError(f"{name}: no such file or directory")
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as e:  # offline: anything not in the local cache fails here
        raise TunefixError(f"{name}: no such file, and not a hub dataset in the local cache "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                           "Give a local file, or download the dataset while online first") from e
