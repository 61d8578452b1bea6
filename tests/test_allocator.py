"""tunefix.model.allocator: glibc's thresholds are set when enabled, nothing when not.

The thresholds are process-wide, so the checks that change them run in a child process;
what glibc does with them is read back through ``mallinfo2`` (glibc >= 2.33): 100 KB blocks
are below glibc's default mmap threshold (128 KB) and above the tuned one (64 KB), so 40 of
them held at once (4 MB, more than any free heap top) get their own mmaps (``hblks``) only
once the tuning is applied.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tunefix.model import allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")

CHILD = r"""
import ctypes, json, sys
from tunefix.model.allocator import tune_cpu_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(size, count=40):
    before = libc.mallinfo2().hblks
    blocks = [libc.malloc(size) for _ in range(count)]
    after = libc.mallinfo2().hblks
    for block in blocks:
        libc.free(block)
    return after - before

out = {"before": mmapped(100_000)}
tuning = tune_cpu_allocator(enabled=sys.argv[1] == "on")
out.update(after=mmapped(100_000), applied=tuning.applied, reason=tuning.reason)
print(json.dumps(out))
"""


def run_child(switch: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", CHILD, switch], env={**clean, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@glibc
def test_applies_on_glibc():
    out = run_child("on")
    assert out["applied"] == {"mmap_threshold": 65536, "trim_threshold": 0}
    assert out["reason"] == ""
    assert out["before"] == 0 and out["after"] >= 30  # heap before, own mmaps after


@glibc
def test_disabled_changes_nothing():
    out = run_child("off")
    assert out["applied"] == {} and out["reason"] == "disabled"
    assert out["before"] == 0 and out["after"] == 0


@glibc
def test_user_environment_wins():
    out = run_child("on", MALLOC_MMAP_THRESHOLD_="1048576")
    assert out["applied"] == {"trim_threshold": 0}
    assert "MALLOC_MMAP_THRESHOLD_=1048576" in out["reason"]
    assert out["after"] == 0  # the user's 1 MB threshold stands


def test_disabled_never_touches_libc(monkeypatch):
    def fail():
        raise AssertionError("libc was loaded")

    monkeypatch.setattr(allocator, "_glibc", fail)
    tuning = allocator.tune_cpu_allocator(enabled=False)
    assert not tuning and tuning.reason == "disabled"


def test_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    tuning = allocator.tune_cpu_allocator()
    assert not tuning and tuning.reason.startswith("not glibc")


def test_no_op_under_a_preloaded_allocator(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    tuning = allocator.tune_cpu_allocator()
    assert not tuning and "jemalloc" in tuning.reason
