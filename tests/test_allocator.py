"""tunefix.model.allocator: glibc's thresholds are set when enabled, nothing when not;
torch's huge pages are asked for only before torch is imported, and then really used.

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
from pathlib import Path

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
out.update(after=mmapped(100_000), applied=tuning.applied, reason=tuning.reason,
           huge_pages=tuning.huge_pages)
print(json.dumps(out))
"""


def run_child(switch: str, script: str = CHILD, **env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", allocator.THP_ENV)}
    done = subprocess.run([sys.executable, "-c", script, switch], env={**clean, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


thp = pytest.mark.skipif(not allocator.kernel_has_huge_pages(),
                         reason="the kernel has transparent huge pages set to never")


@glibc
@thp
def test_applies_on_glibc():
    out = run_child("on", THP_MEM_ALLOC_ENABLE="1")
    assert out["applied"] == {"mmap_threshold": 65536, "trim_threshold": 0}
    assert out["reason"] == "" and out["huge_pages"]
    assert out["before"] == 0 and out["after"] >= 30  # heap before, own mmaps after


@glibc
def test_without_huge_pages_it_says_so():
    out = run_child("on")
    assert out["applied"] == {"mmap_threshold": 65536, "trim_threshold": 0}
    assert not out["huge_pages"] and "THP_MEM_ALLOC_ENABLE=1" in out["reason"]


PHASES = CHILD.replace("out = {", "tuning = tune_cpu_allocator(enabled=sys.argv[1] == 'on')\nout = {", 1)
PHASES = PHASES[:PHASES.index("out = {")] + r"""
out = {}
tuning.backward_phase()
out["backward_small"], out["backward_large"] = mmapped(100_000), mmapped(20_000_000, count=3)
blocks = [libc.malloc(1_000_000) for _ in range(60)]  # 60 MB of heap, then freed: its top stays
for block in blocks:
    libc.free(block)
out["heap_after_backward"] = libc.mallinfo2().arena
tuning.forward_phase()
out["heap_after_forward_phase"] = libc.mallinfo2().arena
out["forward_small"] = mmapped(100_000)
print(json.dumps(out))
"""


@glibc
def test_forward_mmaps_backward_uses_the_heap_and_the_forward_trims_it():
    out = run_child("on", PHASES, THP_MEM_ALLOC_ENABLE="1")
    assert out["backward_small"] == 0 and out["backward_large"] == 0  # glibc's heap
    assert out["heap_after_backward"] > 50_000_000  # the freed top is kept through the backward
    assert out["heap_after_forward_phase"] < out["heap_after_backward"] - 50_000_000  # trimmed
    assert out["forward_small"] >= 30  # own mmaps again


@glibc
def test_phases_leave_the_users_setting_and_a_disabled_tuning_alone():
    out = run_child("on", PHASES, MALLOC_MMAP_THRESHOLD_="1048576")
    # The user's 1 MB threshold holds in both phases: 100 KB from the heap, 20 MB mmapped.
    assert out["backward_small"] == 0 and out["backward_large"] == 3 and out["forward_small"] == 0
    out = run_child("off", PHASES)
    assert out["backward_small"] == 0 and out["forward_small"] == 0


RESTORED = PHASES[:PHASES.index("out = {}")] + r"""
tuning.forward_phase()
tuning.backward_phase()
tuning.restore()
print(json.dumps({"small": mmapped(100_000), "large": mmapped(1_000_000, count=3)}))
"""


@glibc
def test_restore_puts_glibcs_default_thresholds_back():
    """After the last backward (a 32 MB threshold) restore gives glibc's 128 KiB again:
    100 KB from the heap (the lean forward would mmap it), 1 MB mmapped (the backward would not)."""
    assert run_child("on", RESTORED, THP_MEM_ALLOC_ENABLE="1") == {"small": 0, "large": 3}


HUGE = r"""
import json, sys
from tunefix.model.allocator import request_huge_pages
if sys.argv[1] == "late":
    import torch
on = request_huge_pages()
import torch

block = torch.ones(64 << 18)  # 64 MB of fp32, every page touched
start = block.data_ptr()
huge = 0
with open("/proc/self/smaps") as f:  # the mapping that holds the block: its huge pages
    inside = False
    for line in f:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= start < hi
        elif inside and head == "AnonHugePages:":
            huge = int(line.split()[1])
print(json.dumps({"on": on, "huge_kb": huge}))
"""


@thp
@pytest.mark.skipif(platform.system() != "Linux", reason="transparent huge pages are Linux's")
@pytest.mark.parametrize("when", ["early", "late", "user-off"])
def test_request_huge_pages_reaches_torch_only_before_it_is_imported(when):
    clean = {k: v for k, v in os.environ.items() if k != allocator.THP_ENV}
    env = {**clean, allocator.THP_ENV: "0"} if when == "user-off" else clean
    done = subprocess.run([sys.executable, "-c", HUGE, when], env=env, capture_output=True,
                          text=True, check=True)
    out = json.loads(done.stdout)
    if when == "early":
        # At least one 2 MB page (a kernel short of free huge pages falls back to 4 KB ones
        # for some; here most of the 64 MB comes in 2 MB pages).
        assert out["on"] and out["huge_kb"] >= 2048
    else:  # torch imported first, or the user said 0: nothing changes
        assert not out["on"]
        if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            assert out["huge_kb"] == 0  # (with THP "always" every large mapping has them)


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


def test_auto_is_lean_only_with_huge_pages(monkeypatch):
    monkeypatch.setattr(allocator, "kernel_has_huge_pages", lambda: True)
    monkeypatch.setenv(allocator.THP_ENV, "1")
    assert allocator.resolve_cpu_allocator("auto") == "lean"
    monkeypatch.setenv(allocator.THP_ENV, "0")
    assert allocator.resolve_cpu_allocator("auto") == "default"
    monkeypatch.delenv(allocator.THP_ENV)
    assert allocator.resolve_cpu_allocator("auto") == "default"
    assert allocator.resolve_cpu_allocator("lean") == "lean"  # asked for: slower, still lean
    monkeypatch.setenv(allocator.THP_ENV, "1")
    monkeypatch.setattr(allocator, "kernel_has_huge_pages", lambda: False)
    assert allocator.resolve_cpu_allocator("auto") == "default"
    assert allocator.resolve_cpu_allocator("default") == "default"


CLI = r"""
import os, sys
from tunefix.cli import main
code = main(sys.argv[1:])
print(code, os.environ.get("THP_MEM_ALLOC_ENABLE"))
"""


@thp
@pytest.mark.skipif(platform.system() != "Linux", reason="transparent huge pages are Linux's")
@pytest.mark.parametrize("choice", ["auto", "lean", "default"])
def test_tunefix_train_turns_huge_pages_on_before_torch_loads(tmp_path, choice):
    # A template name that does not exist stops the run inside train(), after torch is
    # imported and before any model loads: the switch must be in the environment by then.
    examples = Path(__file__).resolve().parents[1] / "examples"
    clean = {k: v for k, v in os.environ.items() if k != allocator.THP_ENV}
    done = subprocess.run([sys.executable, "-c", CLI, "train", str(examples / "titanic.yaml"),
                           "--template", "no-such-template", "--cpu-allocator", choice,
                           "--output-dir", str(tmp_path / "run")],
                          env=clean, capture_output=True, text=True)
    code, value = done.stdout.split()
    assert code == "2" and "no-such-template" in done.stderr
    assert value == ("None" if choice == "default" else "1")
