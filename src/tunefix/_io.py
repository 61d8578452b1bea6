"""Atomic writes: every artifact appears under its final name complete, or not at all.

A full disk (ENOSPC, or a quota: EDQUOT) or a read-only file system in the middle of a
write becomes a one-line ``TunefixError``; the temporary file or directory is removed, so
nothing half-written is ever left under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tunefix.errors import TunefixError

log = logging.getLogger(__name__)

# errno values that mean "this disk/location cannot take the write", whoever raised them.
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system"}
# Below this many free bytes a failed write is taken to have filled the disk.
_FULL_BELOW = 16 * 2**20


def out_of_space(directory: str | os.PathLike) -> bool:
    """Whether the file system of ``directory`` is (about) full.

    For writers that do not say why they failed: numpy's ``tofile`` (gguf-py's writer, in
    process and in llama.cpp's converter) reports a full disk as "N requested and M
    written" with no errno, and llama.cpp's quantiser returns a bare error code.
    """
    try:
        return shutil.disk_usage(directory).free < _FULL_BELOW
    except OSError:
        return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _disk_error(exc: BaseException, where: Path | None = None) -> int | None:
    """The disk-full/read-only errno behind ``exc``, if that is what it is.

    Libraries wrap the OSError: in the cause chain (transformers), or in their own type
    whose text keeps the system's message (safetensors: "I/O error: No space left on
    device (os error 28)"). An OSError without an errno (a numpy short write) counts when
    ``where``'s disk is full.
    """
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
            return e.errno
        text = str(e).lower()
        for code, words in _DISK_ERRORS.items():
            if words in text:
                return code
    if where is not None and any(isinstance(e, OSError) and e.errno is None for e in chain) \
            and out_of_space(where):
        return errno.ENOSPC
    return None


def translate_disk_error(exc: BaseException, final: str | os.PathLike) -> TunefixError | None:
    """``exc`` as the one-line error about writing ``final``, when a full or read-only disk
    caused it; None otherwise. Call it before removing the partial output (see
    ``out_of_space``)."""
    final = Path(final)
    code = _disk_error(exc, final.parent)
    if code is None:
        return None
    return TunefixError(f"{_DISK_ERRORS[code]} while writing {final}",
                        "Free some space (or choose an output directory on another disk) and run "
                        "again; nothing was written under that name")


def _prepare_parent(final: Path) -> None:
    """Create ``final``'s directory, or say in one line why it cannot be."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise translate_disk_error(e, final) or TunefixError(
            f"cannot create the output directory {final.parent} ({e.strerror or e})",
            "Choose an output path whose parent is a directory you can write to") from None


def _fsync_file(path: Path) -> None:
    """fsync a file, or a directory (a rename is durable only once its entry is on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_dir = _fsync_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_mode(path: Path, kind: str) -> None:
    """What a plain ``open``/``mkdir`` would have given: temporary files and directories are
    created private (0600/0700); the finished artifact follows the user's umask."""
    os.chmod(path, (0o666 if kind == "file" else 0o777) & ~_umask())


# ------------------------------------------------------------- leftovers of killed writers

# A temporary name: ".FINAL.pPID.XXXXXXXX.partial" (or ".old", an --force export's previous
# copy during the swap). The pid says whether its writer is still alive: a writer killed with
# SIGKILL or by the out-of-memory killer cleans up nothing (measured: 519 MB left by `kill -9`
# 25 s into the demo's export; an 8B model would leave about 32 GB).
_TEMP_NAME = re.compile(r"^\.(?P<final>.+?)\.(?:p(?P<pid>\d+)\.)?[a-z0-9_]{8}\.(?P<kind>partial|old)$")


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.p{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _disk_usage(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_stale(directory: str | os.PathLike, final: str | None = None) -> int:
    """Remove the temporary files and directories in ``directory`` (of the final name ``final``,
    or of any) whose writer is gone; return the bytes freed, and say so in the log.

    Names without a pid come from tunefix versions before the pid was recorded: their writer
    is taken to be gone. A previous copy left by an interrupted ``--force`` swap is put back
    when its final name is free, never removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    freed, removed = 0, []
    for entry in directory.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if not m or (final is not None and m["final"] != final) or (m["pid"] and _alive(int(m["pid"]))):
            continue
        target = directory / m["final"]
        if m["kind"] == "old" and (entry / "x").exists() and not target.exists():
            os.replace(entry / "x", target)  # the interrupted swap's previous copy: restored, not lost
        freed += _disk_usage(entry)
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        removed.append(entry.name)
    if removed:
        log.warning(
            "removed %d unfinished %s left by a killed tunefix in %s (%s freed): %s", len(removed),
            "writes" if len(removed) > 1 else "write", directory, human_size(freed), ", ".join(removed))
    return freed


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _mkstemp(final: Path, kind: str) -> Path:
    remove_stale(final.parent, final.name)
    try:
        if kind == "file":
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".partial", dir=final.parent)
            os.close(fd)
        else:
            tmp = tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".partial", dir=final.parent)
    except OSError as e:
        raise translate_disk_error(e, final) or TunefixError(
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
        _ordinary_mode(tmp_path, "file")
        _fsync_file(tmp_path)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        translated = translate_disk_error(e, final)  # while the partial file still fills the disk
        tmp_path.unlink(missing_ok=True)
        if translated is not None:
            raise translated from e
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; it becomes ``final`` on success.

    ``final`` must not exist yet (callers decide about ``--force`` before this), unless
    ``replace``: then an existing ``final`` stays intact until the new one is complete,
    is swapped out by rename, and is removed only once the new one is in place.
    """
    final = Path(final)
    _prepare_parent(final)
    tmp = _mkstemp(final, "dir")
    try:
        yield tmp
        _ordinary_mode(tmp, "dir")
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
        old = None
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".old", dir=final.parent))
            os.replace(final, old / "x")
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old / "x", final)
            raise
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        translated = translate_disk_error(e, final)  # while the partial files still fill the disk
        shutil.rmtree(tmp, ignore_errors=True)
        if translated is not None:
            raise translated from e
        raise


def check_output_dir(out: str | os.PathLike, option: str, *, allowed: bool = False,
                     allow_hint: str | None = None) -> None:
    """One rule for every command's output directory (``train``'s output_dir, ``doctor --fix``,
    ``export --out``): it does not exist yet or is a directory, the nearest existing one of it
    and its parents is a directory this user can write in, and it is empty unless ``allowed``
    (by the flag that lets the command continue or replace it, named in ``allow_hint``).
    Checked before anything slow runs, so a mistake costs one line and writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TunefixError(f"{option} {out} is a file, not a directory", f"Choose another {option}")
    nearest = next((p for p in (out.absolute(), *out.absolute().parents) if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise TunefixError(f"{option} {out}: {nearest} is a file, not a directory",
                           f"Choose an {option} under a directory")
    if nearest is not None and not os.access(nearest, os.W_OK | os.X_OK):
        raise TunefixError(f"{option} {out}: cannot write in {nearest}", f"Choose an {option} you can write to")
    if out.is_dir() and any(out.iterdir()) and not allowed:
        raise TunefixError(f"{option} {out} already exists and is not empty",
                           allow_hint or f"Choose another {option}: tunefix never overwrites")


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
