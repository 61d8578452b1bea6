"""Issue 9: training killed with SIGKILL at random points resumes from the last complete
checkpoint to the same loss; long runs do not grow in memory."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunefix import tiny

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALPACA = EXAMPLES / "alpaca_sample.json"
MAX_STEPS = 8


def _argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tunefix.cli", "train", "--data", str(ALPACA),
            "--model", str(tiny.tiny_model("llama")), "--template", "llama-3", "--output-dir", str(out),
            "--max-steps", str(MAX_STEPS), "--save-steps", "1", "--batch-size", "2",
            "--gradient-accumulation", "1", "--warmup-steps", "0", "--learning-rate", "1e-3",
            "--max-seq-length", "64", "--seed", "1", "--precision", "fp32", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _final_loss(run: Path) -> float:
    """The loss logged at the last step (the latest record wins: a resumed run relogs)."""
    losses = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses[MAX_STEPS]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = subprocess.run(_argv(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _final_loss(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_sigkill_then_resume_reaches_the_same_loss(seed, tmp_path, uninterrupted):
    from tunefix.train.rundir import checkpoint_complete, last_complete_checkpoint

    rng = random.Random(seed)
    kill_after = rng.randint(1, MAX_STEPS - 1)  # wait for this checkpoint to start appearing,
    delay = rng.uniform(0.0, 0.5)               # then kill anywhere in the next half second
    out = tmp_path / "run"
    proc = subprocess.Popen(_argv(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / f"checkpoint-{kill_after}").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    # Nothing half-written under a final name: every checkpoint but maybe the newest is
    # complete, and a killed save is what resume must skip.
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert all(checkpoint_complete(p) for p in ckpts[:-1])
    newest_complete = last_complete_checkpoint(out / "checkpoints")
    assert newest_complete is not None

    resumed = subprocess.run(_argv(out, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _final_loss(out) == pytest.approx(uninterrupted, rel=1e-4, abs=1e-5)
    assert not list(out.glob(".*.partial")) and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert all(checkpoint_complete(p) for p in (out / "checkpoints").glob("checkpoint-*"))


def test_resume_skips_an_incomplete_checkpoint(tmp_path):
    """A checkpoint cut short (no trainer_state.json, a truncated optimizer) is not used."""
    from tunefix.train.rundir import last_complete_checkpoint

    ck = tmp_path / "checkpoints"
    for step in (2, 4):
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            (d / name).write_bytes(b"x")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    half = ck / "checkpoint-6"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"x")
    (half / "optimizer.pt").write_bytes(b"x")
    torn = ck / "checkpoint-5"  # state file torn mid-write
    torn.mkdir()
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (torn / name).write_bytes(b"x")
    (torn / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(ck) == ck / "checkpoint-4"
    assert half.exists()  # only looked at
    assert last_complete_checkpoint(ck, clean=True) == ck / "checkpoint-4"
    assert not half.exists() and not torn.exists() and (ck / "checkpoint-2").exists()


# ------------------------------------------------------------------------ soak


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_memory_does_not_grow(tmp_path, monkeypatch):
    """300 tiny steps with a checkpoint every 25: RSS after warm-up stays flat."""
    import gc

    from tunefix.train import callbacks
    from tunefix.train.config import RunConfig
    from tunefix.train.trainer import train

    samples: list[tuple[int, float]] = []
    real_on_log = callbacks.LossLog.on_log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            samples.append((state.global_step, _rss_mb()))
        return real_on_log(self, args, state, control, logs=logs, **kwargs)

    monkeypatch.setattr(callbacks.LossLog, "on_log", on_log)
    steps = 300
    cfg = RunConfig(model=str(tiny.tiny_model("llama")), data=str(ALPACA), template="llama-3",
                    output_dir=str(tmp_path / "run"), max_steps=steps, save_steps=25, batch_size=1,
                    gradient_accumulation=1, warmup_steps=0, learning_rate=1e-4, max_seq_length=32, seed=1,
                    precision="fp32", logging_steps=1)
    gc.collect()
    result = train(cfg)
    assert result.steps == steps and len(samples) == steps
    warm = [rss for step, rss in samples if 50 < step <= 100]
    late = [rss for step, rss in samples if step > steps - 100]
    baseline = sorted(warm)[len(warm) // 2]
    growth = max(late) - baseline
    # Least-squares slope over the steps after warm-up, in MB per step.
    xs = [s for s, _ in samples if s > 50]
    ys = [r for s, r in samples if s > 50]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    assert growth < 48 and slope < 0.1, f"RSS grew {growth:.1f} MB after warm-up (slope {slope:.3f} MB/step)"
    # save_total_limit keeps the disk bounded too.
    assert len(list((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))) <= 3
