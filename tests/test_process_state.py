"""Issue 17: the library is safe in a notebook. train() leaves nothing of itself in the process:
two runs in one process log into their own run directories (W&B included), and glibc's malloc
settings, the environment and matplotlib's pyplot are as they were."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tunefix import tiny

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TWO_RUNS = r"""
import json, os, sys
from pathlib import Path

import datasets
import wandb
from tunefix.model import allocator

real_glibc, mallopt_calls = allocator._glibc, []

class Recorded:  # glibc has no getter for its thresholds: record what tunefix sets through it
    def __init__(self, lib):
        self.lib = lib
    def mallopt(self, number, value):
        mallopt_calls.append((number.value, value.value))
        return self.lib.mallopt(number, value)
    def __getattr__(self, name):
        return getattr(self.lib, name)

allocator._glibc = lambda: Recorded(real_glibc())
from tunefix.train.config import RunConfig
from tunefix.train.trainer import train

root, model, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out = []
for name in ("first", "second"):
    cfg = RunConfig(model=model, data=data, template="llama-3", max_steps=1, output_dir=str(root / name),
                    max_seq_length=64, batch_size=2, gradient_accumulation=1, report_to="wandb",
                    cpu_allocator="lean", gradient_checkpointing="on", precision="fp32")
    train(cfg)
    out.append({"wandb_files": sorted(str(p.relative_to(root)) for p in (root / name).glob("wandb/offline-run-*")),
                "wandb_run_open": wandb.run is not None, "WANDB_DIR": os.environ.get("WANDB_DIR"),
                "pyplot": "matplotlib.pyplot" in sys.modules,
                "download_counts": datasets.config.HF_UPDATE_DOWNLOAD_COUNTS,
                "last_mallopt": dict(mallopt_calls), "mallopt_calls": len(mallopt_calls)})
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="measures glibc's malloc")
def test_two_trainings_in_one_process_leave_nothing_behind(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "WANDB_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", TWO_RUNS, str(tmp_path), str(tiny.tiny_model("llama")),
                           str(EXAMPLES / "alpaca_sample.json")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(first["wandb_files"]) == 1 and first["wandb_files"][0].startswith("first/wandb/")
    assert len(second["wandb_files"]) == 1 and second["wandb_files"][0].startswith("second/wandb/")
    for state in (first, second):
        assert not state["wandb_run_open"] and state["WANDB_DIR"] is None and not state["pyplot"], state
        assert state["download_counts"] is True, state  # datasets' own default, switched off per load only
        # The last value set for each threshold is glibc's default (M_MMAP_THRESHOLD -3,
        # M_TRIM_THRESHOLD -1): test_allocator measures that restore() gives glibc's behaviour.
        assert state["mallopt_calls"] > 4 and state["last_mallopt"] == {"-3": 131072, "-1": 131072}, state
