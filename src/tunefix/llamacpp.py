"""llama.cpp, always in a child process: a crash there is one line here, never the end of tunefix.

Measured on a CPU that advertises AMX but refuses to run it: a llama-cpp-python built with
llama.cpp's native flags dies with SIGILL (``tileloadd``) as soon as a quantised GGUF is
loaded, and an out-of-memory kill ends a process the same way. In the same process either
would take the export (and pytest) down with it. So every use of llama.cpp on a model
(verification, ``tunefix chat FILE.gguf``, the demo's answers, quantisation, metadata
reads) goes through ``LlamaProcess``: a child running ``tunefix._llama_child``, spoken to
over a pipe. ``import llama_cpp`` happens there only.

``CMAKE_ARGS`` is how llama-cpp-python should be built (the Makefile reads it from here):
named ISA levels instead of ``-march=native``, because a native build compiles AMX kernels
in even with ``GGML_AMX_*=OFF``. AVX2 + FMA + F16C keeps quantised inference on SIMD
kernels on every x86-64 machine of this project's kind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError

LLAMA_CPP_VERSION = "0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
REBUILD = (f'`make llama` in a tunefix checkout, or CMAKE_ARGS="{CMAKE_ARGS}" pip install --force-reinstall '
           f"--no-deps --no-cache-dir llama-cpp-python=={LLAMA_CPP_VERSION}")
_CLOSE_TIMEOUT_S = 30


class LlamaCrash(TunefixError):
    """The llama.cpp child died (a signal, an out-of-memory kill, an exit)."""

    def __init__(self, what: str, returncode: int):
        self.returncode = returncode
        self.cause = _cause(returncode)  # "SIGILL", "exit 3": the short form for tables
        message, hint = _explain(what, returncode, self.cause)
        super().__init__(message, hint)


def _cause(rc: int) -> str:
    if rc >= 0:
        return f"exit {rc}"
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _explain(what: str, rc: int, name: str) -> tuple[str, str]:
    if rc >= 0:
        return (f"llama.cpp exited with status {rc} on {what}",
                "Run again with --debug to see its output")
    sig = -rc
    if sig == signal.SIGKILL:
        return (f"llama.cpp was killed ({name}) on {what}, most likely by the out-of-memory killer",
                "Free memory (or use a smaller GGUF type) and run it again")
    if sig == signal.SIGILL:
        return (f"llama.cpp crashed on {what} ({name}: an instruction this CPU refuses, such as AMX)",
                f"Rebuild llama-cpp-python for this machine: {REBUILD}")
    return (f"llama.cpp crashed on {what} ({name})",
            f"If it happens again, rebuild llama-cpp-python: {REBUILD}")


class LlamaProcess:
    """One llama.cpp model in a child process; ``call(op, *args)`` runs an op of
    ``tunefix._llama_child`` there. Use it as a context manager: the child ends with the block.

    ``gguf=None`` starts a child without a model (quantisation, system info).
    """

    def __init__(self, gguf: str | os.PathLike | None = None, *, label: str | None = None, **llama_kwargs: Any):
        self.what = label or (Path(gguf).name if gguf is not None else "llama-cpp-python")
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()      # child -> parent
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tunefix._llama_child", str(down_r), str(up_w)],
                pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(down_r)
            os.close(up_w)
        self._send = Connection(down_w, readable=False)
        self._recv = Connection(up_r, writable=False)
        self.info: dict[str, Any] = {}
        if gguf is not None:
            try:
                self.info = self.call("open", str(gguf), llama_kwargs)
            except BaseException:
                self.close()
                raise

    def call(self, op: str, *args: Any) -> Any:
        try:
            self._send.send((op, args))
            status, value = self._recv.recv()
        except (EOFError, OSError):  # the child is gone: BrokenPipe, reset, end of stream
            raise LlamaCrash(self.what, self._wait()) from None
        if status != "ok":
            raise TunefixError(f"llama.cpp failed on {self.what}: {value}")
        return value

    def _wait(self) -> int:
        try:
            return self._proc.wait(timeout=_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def close(self) -> None:
        """End the child (closing its pipe ends its loop); idempotent."""
        if self._send.closed:
            return
        self._send.close()
        self._recv.close()
        self._wait()

    def __enter__(self) -> LlamaProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The facts of the opened model (``op_open``).
    @property
    def metadata(self) -> dict[str, str]:
        return self.info["metadata"]

    @property
    def eog(self) -> set[int]:
        """Every token llama.cpp ends generation on (its end-of-generation set)."""
        return set(self.info["eog"])

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.call("tokenize", [(text, add_bos)])[0]


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str, nthread: int) -> tuple[int, list[str]]:
    """llama.cpp's quantiser (``ftype``: a ``LLAMA_FTYPE_`` suffix); (return code, log lines)."""
    with LlamaProcess(label=f"quantising {Path(src).name} to {ftype}") as child:
        rc = child.call("quantize", str(src), str(dst), ftype, nthread)
        return rc, child.call("logs")


def system_info() -> str:
    """``llama_print_system_info()`` of the installed build (the ISA features compiled in)."""
    with LlamaProcess() as child:
        return child.call("system_info")
