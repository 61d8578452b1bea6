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

The price of mmapping every block is page faults: each fresh mapping is faulted in 4 KB at
a time and zeroed (measured: 10x the faults of glibc's own heap, steps ~1.4x longer). Two
things take it back:

- Only the forward needs it. The forward keeps each checkpointed layer input (and, with
  ``selective``, each attention output) between that layer's temporaries: that is what
  fragments the heap. The backward keeps nothing across layers. So the trainer switches
  per step (``AllocatorTuning.forward_phase`` / ``backward_phase``): the tuned thresholds
  for the forward, with ``malloc_trim`` giving back the heap's free pages first, and
  glibc's heap (largest mmap threshold, no trimming) for the backward.
- Transparent huge pages: torch's CPU allocator asks the kernel for 2 MB pages on its
  blocks of 2 MB or more when ``THP_MEM_ALLOC_ENABLE=1`` is in the environment at its
  first allocation, so before torch is imported (``request_huge_pages``, which
  ``tunefix train`` and ``tunefix demo`` call; ``cpu_allocator: auto`` is lean only then).

Measured on SmolLM2-135M at 2 x 2048 tokens (bench/RESULTS.md): the peak of the all-mmap
setting (about 0.3x the baseline's) at about the speed of glibc's own heap.

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
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 64 * 1024  # bytes: blocks this size or larger get their own mmap
TRIM_THRESHOLD = 0  # bytes of free heap top kept before trimming: none
# The backward phase: glibc's largest mmap threshold (HEAP_MAX_SIZE / 2 on 64-bit), and a
# heap top kept until the next forward trims it.
GLIBC_MMAP_THRESHOLD = GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults (mallopt(3))
BACKWARD_MMAP_THRESHOLD = 32 * 1024 * 1024
BACKWARD_TRIM_THRESHOLD = 1 << 30

# Each setting, its mallopt number and the glibc environment variable that also sets it.
_SETTINGS = {
    "mmap_threshold": (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
    "trim_threshold": (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
}
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's switch for huge pages on its CPU blocks of >= 2 MB
_THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclass
class AllocatorTuning:
    """What ``tune_cpu_allocator`` did: ``applied`` holds each setting it set (name: bytes)."""

    applied: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    huge_pages: bool = False
    libc: object = field(default=None, repr=False, compare=False)  # the handle it set them through

    def __bool__(self) -> bool:
        return bool(self.applied)

    def forward_phase(self) -> None:
        """Before a training step's forward: the tuned thresholds, and the heap's free pages
        given back (``malloc_trim``), so the backward's heap does not sit under the forward."""
        self._set(self.applied)
        if self.applied:
            self.libc.malloc_trim(ctypes.c_size_t(0))

    def backward_phase(self) -> None:
        """After the loss, before its backward: glibc's heap again (no faults). The backward
        holds nothing across layers, so its heap does not fragment the way the forward's
        would (the forward keeps each layer's checkpointed input between its temporaries)."""
        self._set({"mmap_threshold": BACKWARD_MMAP_THRESHOLD, "trim_threshold": BACKWARD_TRIM_THRESHOLD})

    def restore(self) -> None:
        """glibc's own default values back (128 KiB each) and the free heap returned: nothing
        of the tuning outlives the training that asked for it. (glibc has no getter for these,
        and any mallopt call turns its adaptive mmap threshold off for good, so "back" means
        its documented starting values; measured below in tests/test_allocator.py.)"""
        self._set({"mmap_threshold": GLIBC_MMAP_THRESHOLD, "trim_threshold": GLIBC_TRIM_THRESHOLD})
        if self.applied:
            self.libc.malloc_trim(ctypes.c_size_t(0))

    def _set(self, values: dict[str, int]) -> None:
        if not self.applied:
            return
        for name, value in values.items():
            if name in self.applied:  # only what tune_cpu_allocator itself set (never the user's)
                self.libc.mallopt(ctypes.c_int(_SETTINGS[name][0]), ctypes.c_int(value))


def _glibc():
    """The C library's handle when it is glibc, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def kernel_has_huge_pages() -> bool:
    """Whether the kernel gives transparent huge pages to regions that ask (``madvise`` or ``always``)."""
    try:
        with open(_THP_SYSFS) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_requested() -> bool:
    """Whether torch's CPU allocator was told to use huge pages (the environment says so)."""
    return os.environ.get(THP_ENV, "").strip() not in ("", "0")


def huge_pages_on() -> bool:
    """Asked for, and the kernel gives them."""
    return huge_pages_requested() and kernel_has_huge_pages()


def request_huge_pages() -> bool:
    """Turn on torch's transparent huge pages for CPU tensors of 2 MB or more, if still possible.

    torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so this only works
    before torch is imported; a value the user set is kept either way. Off Linux, or where
    the kernel has THP set to ``never``, nothing is set. Returns whether it is on.
    """
    if THP_ENV in os.environ:
        return huge_pages_requested()
    if "torch" in sys.modules or platform.system() != "Linux" or not kernel_has_huge_pages():
        return False
    os.environ[THP_ENV] = "1"
    return True


def resolve_cpu_allocator(choice: str) -> str:
    """``auto`` as ``lean`` where torch's huge pages are on (the tuning then costs little
    speed), else ``default``; ``default`` and ``lean`` as they are."""
    if choice != "auto":
        return choice
    return "lean" if huge_pages_on() else "default"


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
    result, kept = AllocatorTuning(libc=libc), []
    for name, value in wanted.items():
        number, env = _SETTINGS[name]
        if env in os.environ:
            kept.append(f"{env}={os.environ[env]} (set by the user)")
            continue
        if libc.mallopt(ctypes.c_int(number), ctypes.c_int(value)) != 1:
            kept.append(f"{name}: mallopt refused {value}")
            continue
        result.applied[name] = value
    result.huge_pages = huge_pages_on()
    if not result.huge_pages:
        kept.append(f"slower forwards: set {THP_ENV}=1 before torch is imported")
    result.reason = "; ".join(kept)
    settings = ", ".join(f"{name.replace('_', ' ')} {value:,} B" for name, value in result.applied.items())
    log.info("CPU allocator: lean (each forward: %s; each backward: glibc's heap), huge pages %s%s",
             settings or "nothing set", "on" if result.huge_pages else "off",
             f" ({result.reason})" if result.reason else "")
    return result
