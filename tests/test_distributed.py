"""Issue 5: the same config under torchrun (2 CPU processes, gloo) matches one process:
DDP for LoRA, FSDP (sharded weights, gradients and optimizer state) for full fine-tuning."""

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


def _args(data: Path, out: Path, batch: int, method: str = "lora") -> list[str]:
    return ["train", "--finetune", method, "--data", str(data), "--model", str(tiny.tiny_model("llama")), "--template", "llama-3",
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", str(batch),
            "--gradient-accumulation", "1", "--warmup-steps", "0",
            "--max-seq-length", "64", "--seed", "5"]


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def _one_and_two(tmp_path: Path, method: str, lr: str) -> tuple[Path, Path]:
    data = _rows(tmp_path / "rows.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = lambda out, batch: [*_args(data, out, batch, method), "--learning-rate", lr]  # noqa: E731
    one = subprocess.run([sys.executable, "-m", "tunefix.cli", *args(tmp_path / "one", 4)],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "-m", "tunefix.cli", *args(tmp_path / "two", 2)],
                         env=env, capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    # Rank 0 reports for both: one closing report, not two.
    assert two.stdout.count("run directory:") == 1, two.stdout
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-3)
    assert a[2] < a[0]  # it learned: the comparison is not between two flat lines
    return tmp_path / "one", tmp_path / "two"


def _distributed(run: Path) -> str:
    return json.loads((run / "summary.json").read_text())["distributed"]


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    one, two = _one_and_two(tmp_path, "lora", "1e-3")
    assert (two / "adapter" / "adapter_model.safetensors").exists()
    assert _distributed(one) == "no" and _distributed(two) == "multi_cpu"


@pytest.mark.slow
def test_fsdp_full_fine_tuning_two_cpu_processes_match_one(tmp_path):
    from safetensors.torch import load_file

    one, two = _one_and_two(tmp_path, "full", "1e-4")
    assert _distributed(one) == "no" and _distributed(two) == "fsdp"
    # The shards were gathered into one full model on rank 0, equal to the one-process weights.
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(tiny.tiny_model("llama") / "model.safetensors")
    moved = 0
    for key in a:
        assert a[key].shape == b[key].shape
        assert (a[key] - b[key]).abs().max() < 1e-5, key
        if key in base and base[key].shape == a[key].shape:
            moved += not bool((a[key] == base[key]).all())
    assert moved >= len(a) // 2  # every layer trained, not an adapter
    assert not (two / "adapter").exists()


def test_resuming_a_sharded_full_fine_tune_is_refused_before_loading(tmp_path, monkeypatch):
    # Its checkpoints hold the weights only (the sharded optimizer state is not saved).
    import tunefix.model.load as load
    from tunefix.errors import TunefixError
    from tunefix.train.config import RunConfig
    from tunefix.train.trainer import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    cfg = RunConfig(model=str(tiny.tiny_model("llama")), data=str(_rows(tmp_path / "rows.json")),
                    output_dir=str(run), finetune="full", resume=True)
    with pytest.raises(TunefixError, match="resuming a full fine-tune run in several processes"):
        train(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
