"""Atomic writes: every artifact appears under its final name complete, or not at all.

A full disk (ENOSPC, or a quota: EDQUOT) or a read-only file system in the middle of a
write becomes a one-line ``TunefixError``; the temporary file or directory is removed, so
nothing half-written is ever left under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tunefix.errors import TunefixError

# errno values that mean "this disk/location cannot take the write", whoever raised them.
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}


def _disk_error(exc: BaseException) -> OSError | None:
    """The OSError with a disk-full/read-only errno in ``exc``'s cause chain, if any.

    Libraries (safetensors, torch.save, transformers) sometimes wrap the OSError; the chain
    still holds it.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _translate(exc: BaseException, final: Path) -> TunefixError | None:
    disk = _disk_error(exc)
    if disk is None:
        return None
    return TunefixError(f"{_DISK_ERRORS[disk.errno]} while writing {final}",
                        "Free some space (or choose an output directory on another disk) and run "
                        "again; nothing was written under that name")


def _prepare_parent(final: Path) -> None:
    """Create ``final``'s directory, or say in one line why it cannot be."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _translate(e, final) or TunefixError(
            f"cannot create the output directory {final.parent} ({e.strerror or e})",
            "Choose an output path whose parent is a directory you can write to") from None


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkstemp(final: Path, kind: str) -> Path:
    try:
        if kind == "file":
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
            os.close(fd)
        else:
            tmp = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    except OSError as e:
        raise _translate(e, final) or TunefixError(
            f"cannot write in {final.parent} ({e.strerror or e})",
            "Choose an output directory you can write to") from None
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s directory; rename it to ``final`` on success.

    The temporary name starts with ``.`` and ends with ``.partial`` so that a crash
    leaves only a hidden, obviously unfinished file, never a truncated ``final``.
    """
    final = Path(final)
    _prepare_parent(final)
    tmp_path = _mkstemp(final, "file")
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        translated = _translate(e, final)
        if translated is not None:
            raise translated from e
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; it becomes ``final`` on success.

    ``final`` must not exist yet (callers decide about ``--force`` before this).
    """
    final = Path(final)
    _prepare_parent(final)
    tmp = _mkstemp(final, "dir")
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        translated = _translate(e, final)
        if translated is not None:
            raise translated from e
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(name: str, default: str = "model", max_len: int = 120) -> str:
    """A file name derived from ``name`` (a model name, a hub id, a path) that stays put.

    The result is one path component of ``[A-Za-z0-9._+-]`` that does not start with ``.``
    or ``-``: no separators, no ``..``, nothing absolute, no hidden or option-like name. So
    ``out_dir / safe_name(x)`` is always directly inside ``out_dir``. "org/Model-7B" becomes
    "org-Model-7B"; "../../etc/passwd" becomes "etc-passwd".
    """
    text = _UNSAFE.sub("-", str(name).replace("\\", "/").replace("/", "-"))
    text = re.sub(r"[-.]*-[-.]*", "-", text).strip(".-")  # "-.-", "--" -> "-"
    text = re.sub(r"\.{2,}", ".", text)[:max_len].strip(".-")
    return text or default


def inside(out_dir: str | os.PathLike, name: str) -> Path:
    """``out_dir / safe_name(name)``, checked to resolve directly inside ``out_dir``."""
    base = Path(out_dir).resolve()
    path = (base / safe_name(name)).resolve()
    if path.parent != base:  # cannot happen with safe_name; kept as the guard it promises
        raise TunefixError(f"output name {name!r} would leave {out_dir}", "Choose another model name")
    return path
