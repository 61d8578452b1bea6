"""Issue 5: the same config under torchrun (2 CPU processes, gloo) matches one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunefix import tiny

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> Path:
    # Identical rows: the loss of a global batch then does not depend on how the
    # distributed sampler shards the data, only on gradient averaging and the update.
    row = {"instruction": "Give the capital of the country.", "input": "France", "output": "Paris"}
    path.write_text(json.dumps([row] * 16))
    return path


def _args(data: Path, out: Path, batch: int) -> list[str]:
    return ["train", "--data", str(data), "--model", str(tiny.tiny_model("llama")), "--template", "llama-3",
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", str(batch),
            "--gradient-accumulation", "1", "--warmup-steps", "0", "--learning-rate", "1e-3",
            "--max-seq-length", "64", "--seed", "5"]


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    data = _rows(tmp_path / "rows.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tunefix.cli", *_args(data, tmp_path / "one", 4)],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "tunefix.cli", *_args(data, tmp_path / "two", 2)],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-3)
    assert a[2] < a[0]  # it learned: the comparison is not between two flat lines
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").exists()
