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


# One row (a CSV/TSV record, a JSONL or text line) larger than this is refused: it is far
# beyond any context length (rows are truncated to max_seq_length tokens) and is more likely
# a file without line breaks or a binary file than a training example.
MAX_ROW_BYTES = 16 * 1024 * 1024


def _text(path: Path, rows_are_lines: bool = True) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TunefixError(f"cannot read {path} ({e.strerror or e})",
                           "Check the path and its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TunefixError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})",
                           "Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from e
    if not text.strip():
        raise TunefixError(f"{path}: the file is empty", "Give a file with a header row and data rows")
    if rows_are_lines and len(text) > MAX_ROW_BYTES:
        _check_row_sizes(path, text)
    return text


def _check_row_sizes(path: Path, text: str) -> None:
    for line_no, line in enumerate(text.split("\n"), 1):
        if len(line) > MAX_ROW_BYTES:
            raise TunefixError(f"{path}:{line_no}: one line of {len(line) / 2**20:.0f} MiB, over tunefix's "
                               f"{MAX_ROW_BYTES // 2**20} MiB limit for a row",
                               "Split it into smaller rows (each row is truncated to --max-seq-length tokens anyway)")


def _check_table(path: Path, delimiter: str) -> list[str]:
    text = _text(path)
    # The csv module's cell limit (128 KiB) is process-wide state: raised for this read only.
    old_limit = csv.field_size_limit()
    csv.field_size_limit(MAX_ROW_BYTES)
    try:
        return _check_rows(path, csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as e:
        raise TunefixError(f"{path}: not a readable {'CSV' if delimiter == ',' else 'TSV'} file ({e})",
                           "Fix the quoting, or split rows over "
                           f"{MAX_ROW_BYTES // 2**20} MiB") from None
    finally:
        csv.field_size_limit(old_limit)


def _check_rows(path: Path, rows) -> list[str]:
    header = next(rows, None)
    if not header:
        raise TunefixError(f"{path}:1: the first line is empty; expected a header row", "Put the column names first")
    n = len(header)
    if any(not h.strip() for h in header):
        raise TunefixError(f"{path}:1: the header has an empty column name", "Name every column")
    seen: set[str] = set()
    for h in header:
        if h in seen:
            raise TunefixError(f"{path}:1: the column {h!r} appears twice in the header",
                               "Give every column its own name")
        seen.add(h)
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
    text = _text(path, rows_are_lines=False)
    if kind == "jsonl" or (kind == "json" and not text.lstrip().startswith("[")
                           and text.count("\n") > 1 and text.lstrip().startswith("{")):
        if len(text) > MAX_ROW_BYTES:
            _check_row_sizes(path, text)
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip() and not isinstance(_parse(path, line, i), dict):
                raise TunefixError(f"{path}:{i}: a JSON Lines row must be an object ({{...}})",
                                   "Write one JSON object per line")
        return
    data = _parse(path, text, None)
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        raise TunefixError(f"{path}: expected a JSON list of objects (one per example) or JSON Lines",
                           "Write [{...}, {...}] or one object per line")


def _check_parquet(path: Path) -> None:
    """Parquet files start and end with b"PAR1"; checked here so that pyarrow's own log line
    about a bad footer never reaches the user's terminal."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(size - 4, 0))
            tail = f.read(4)
    except OSError as e:
        raise TunefixError(f"cannot read {path} ({e.strerror or e})", "Check the path and its permissions") from None
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        raise TunefixError(f"{path} is not a Parquet file (no PAR1 magic at its start and end)",
                           "The file is truncated or in another format: write it again, or rename it")


def _parse(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = line if line is not None else e.lineno
        raise TunefixError(f"{path}:{where}: invalid JSON: {e.msg}", "Fix the JSON syntax") from e
    except RecursionError:
        raise TunefixError(f"{path}{'' if line is None else f':{line}'}: JSON nested too deeply to read",
                           "Flatten the structure") from None


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
    elif kind == "parquet":
        _check_parquet(path)
    builder = _jsonl_kind(path, kind)
    kwargs: dict[str, Any] = {}
    if kind in ("csv", "tsv"):
        builder = "csv"
        # Strings as written; an empty cell becomes None.
        kwargs = {"sep": "," if kind == "csv" else "\t", "keep_default_na": False, "na_values": [""],
                  "features": datasets.Features({h: datasets.Value("string") for h in header})}
    # A local file needs no network: datasets would otherwise send a HEAD request to its
    # download counter on S3 for every load (measured: a 3 s wait where DNS hangs). Switched
    # off for this call only: the user's own datasets calls keep their setting.
    counts = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises many types; every one means "could not read"
        raise TunefixError(f"{path}: could not be read as {kind}: {str(e).splitlines()[0]}",
                           "Check the file's format") from e
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts


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
    """A hub dataset id found in the local Hugging Face cache (tunefix works offline).

    Resolved with huggingface_hub's cache lookup (no network), then its data files are read
    like local files: the train files when the repository names them, else all of one kind.
    """
    if name.count("/") != 1 or name.startswith((".", "/")) or Path(name).suffix:
        raise TunefixError(f"{name}: no such file or directory", "Check the path (and the current directory)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise TunefixError(f"{name}: no such file, and not a dataset in the local Hugging Face cache",
                           "Give a local file, or download the dataset once where you are online") from None
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix.lower() in _KINDS)
    train = [p for p in files if "train" in p.relative_to(local).as_posix().lower()]
    chosen = train or files
    if not chosen:
        raise TunefixError(f"{name}: the cached dataset holds no data file tunefix reads",
                           f"Expected one of {', '.join(_KINDS)}")
    kinds = {p.suffix.lower() for p in chosen}
    if len(kinds) > 1:
        chosen = [p for p in chosen if p.suffix.lower() == sorted(kinds)[0]]
    if len(chosen) == 1:
        return load_table(chosen[0])
    import datasets

    return datasets.concatenate_datasets([load_table(p) for p in chosen])
