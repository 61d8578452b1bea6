"""glibc malloc settings for training on a CPU: a fixed mmap threshold, trimming on free.

Measured (bench/RESULTS.md, SmolLM2-135M, LoRA, batch 2 x 2048, fp32): with glibc's
default malloc most of a training step's peak RSS is memory that was freed but that the
allocator keeps. Activation blocks of 5-30 MB fall under glibc's *dynamic* mmap threshold
(it starts at 128 KB and rises to the size of the largest mmapped block freed, up to
32 MB), so after the first step they come from the heap, fragment it, and the heap is
never given back. A fixed threshold (which also turns the dynamic one off) sends every
block of 64 KB or more to its own mmap, returned to the OS on free; a trim threshold of 0
gives back the top of the heap on every free. Same effect as the environment variables
``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``, but set from inside the
process, at the start of training, so the user need not know about them.

This is process-wide state (the whole process's malloc, not one model), so it is behind a
switch and reports what it did. It is a no-op off Linux/glibc (macOS, musl, Windows),
when an allocator is preloaded in glibc's place (jemalloc, tcmalloc, mimalloc), and for
each setting the user already chose through glibc's environment variable.

Written by hand (ctypes over glibc's documented ``mallopt``): neither torch nor
transformers sets the C allocator.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 * 1024  # bytes: blocks this size or larger get their own mmap
TRIM_THRESHOLD = 0  # bytes of free heap top kept before trimming: none

# Each setting, its mallopt number and the glibc environment variable that also sets it.
_SETTINGS = {
    "mmap_threshold": (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
    "trim_threshold": (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
}
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass
class AllocatorTuning:
    """What ``tune_cpu_allocator`` did: ``applied`` holds each setting it set (name: bytes)."""

    applied: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.applied)


def _glibc():
    """The C library's handle when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def tune_cpu_allocator(enabled: bool = True, *, mmap_threshold: int = MMAP_THRESHOLD,
                       trim_threshold: int = TRIM_THRESHOLD) -> AllocatorTuning:
    """Set glibc's mmap and trim thresholds for CPU training (see the module docstring).

    enabled: False does nothing (the switch; the result says so).
    Returns an ``AllocatorTuning``: true when at least one setting was applied; its
    ``reason`` says why something was not.
    """
    if not enabled:
        return AllocatorTuning(reason="disabled")
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preload), None)
    if other:
        return AllocatorTuning(reason=f"{other} is preloaded in place of glibc malloc")
    libc = _glibc()
    if libc is None:
        return AllocatorTuning(reason=f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})")
    wanted = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
    result, kept = AllocatorTuning(), []
    for name, value in wanted.items():
        number, env = _SETTINGS[name]
        if env in os.environ:
            kept.append(f"{env}={os.environ[env]} (set by the user)")
            continue
        if libc.mallopt(ctypes.c_int(number), ctypes.c_int(value)) != 1:
            kept.append(f"{name}: mallopt refused {value}")
            continue
        result.applied[name] = value
    result.reason = "; ".join(kept)
    log.info("CPU allocator: %s%s", result.applied or "unchanged",
             f" ({result.reason})" if result.reason else "")
    return result
