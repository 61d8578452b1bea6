"""The CPU-reachable parts of the benchmarks: bench/gpu.sh, bench/train.py's CUDA options
and the 8B model construction, bench/context.py's search.

No speed is asserted here (design.md: speed is measured in bench/, never in tests).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
GPU_OPTIONS = ["--model", "llama3-8b", "--lora-r", "32", "--device", "cuda", "--seq", "2048",
               "--batch", "2", "--grad-accum", "4", "--warmup", "1", "--steps", "3"]


def bench_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their neighbour _common
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(cuda_available(), reason="checks the behaviour without CUDA")
def test_gpu_script_fails_clearly_without_cuda():
    done = run("bash", "bench/gpu.sh")
    assert done.returncode == 2
    assert "torch sees no CUDA device" in done.stderr


def test_gpu_script_dry_run_builds_the_8b_shapes():
    done = run("bash", "bench/gpu.sh", "--dry-run")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dry run OK" in done.stdout
    assert "8,030,261,248 parameters" in done.stdout  # Llama-3-8B's count, built on meta
    assert "83,886,080 for all 32" in done.stdout  # LoRA r=32 on q, k, v, o, gate, up, down
    assert "logits (2, 2048, 128256), hidden (2, 2048, 4096)" in done.stdout


def test_train_parses_the_gpu_options(monkeypatch):
    train = bench_module("train", monkeypatch)
    args = train.parser().parse_args(GPU_OPTIONS + ["--quant", "4bit", "--padding", "dynamic"])
    assert (args.device, args.seq, args.batch, args.grad_accum, args.lora_r, args.quant) == (
        "cuda", 2048, 2, 4, 32, "4bit")
    common = bench_module("_common", monkeypatch)
    argv = common.model_argv(args, "bf16")  # what each child process is given
    child = train.parser().parse_args(argv)
    assert (child.model, child.device, child.lora_r, child.quant, child.precision, child.padding) == (
        "llama3-8b", "cuda", 32, "4bit", "bf16", "dynamic")


@pytest.mark.skipif(cuda_available(), reason="checks the behaviour without CUDA")
def test_train_refuses_what_cannot_run_here(monkeypatch, capsys):
    train = bench_module("train", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model", "llama3-8b"])  # full size on a CPU
    assert exit_.value.code == 2 and "needs --device cuda" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train.main(GPU_OPTIONS)
    assert "torch sees no CUDA device" in str(exit_.value.code)


def test_scaled_down_8b_config_keeps_its_structure(monkeypatch):
    common = bench_module("_common", monkeypatch)
    config = common.llama3_8b_config(layers=2, hidden=512)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (512, 4, 1)
    assert config.hidden_size // config.num_attention_heads == 128  # 8B's head_dim
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}  # transformers 5 / 4
    assert config.vocab_size == 128256 and rope["rope_theta"] == 500000.0


@pytest.mark.slow
def test_scaled_down_8b_trains_alike_on_both_sides():
    """The GPU run's code path (random 8B-shaped model, accumulation, LoRA r=32) on a CPU."""
    done = run(sys.executable, "bench/train.py", "--model", "llama3-8b", "--layers", "1",
               "--hidden", "256", "--seq", "32", "--batch", "2", "--grad-accum", "2",
               "--lora-r", "32", "--warmup", "0", "--steps", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratios tunefix/baseline" in done.stdout


def test_context_search_doubles_then_bisects(monkeypatch):
    context = bench_module("context", monkeypatch)
    seen = []

    def fake_probe(args, precision, side, seq, budget_mb, timeout):
        seen.append(seq)
        fits = seq <= 3000
        return {"ok": fits, "why": "RSS over the budget", "peak_mb": seq / 10, "wall_s": 0.0}

    monkeypatch.setattr(context, "run_probe", fake_probe)
    args = SimpleNamespace(start=512, max_seq=65536, granularity=256, time_budget=0, probe_timeout=60)
    result = context.search(args, "fp32", "tunefix", 6144)
    assert seen[:4] == [512, 1024, 2048, 4096]  # doubling until the first failure
    assert result["max_seq"] <= 3000 < result["first_fail"]
    assert result["first_fail"] - result["max_seq"] <= max(256, result["max_seq"] // 8)
    assert result["peak_mb_at_max"] == result["max_seq"] / 10 and not result["capped"]

    seen.clear()
    capped = context.search(SimpleNamespace(start=512, max_seq=2048, granularity=256, time_budget=0,
                                            probe_timeout=60), "fp32", "tunefix", 6144)
    assert seen == [512, 1024, 2048] and capped["capped"] and context.describe(capped) == ">= 2,048"

    def slow_probe(args, precision, side, seq, budget_mb, timeout):
        seen.append((seq, timeout))
        if seq > 1024:  # as run_probe reports a probe it killed for time
            return {"ok": False, "why": "out of time", "timed_out": True, "peak_mb": 0, "wall_s": timeout}
        return {"ok": True, "peak_mb": 1.0, "wall_s": 0.0}

    seen.clear()
    monkeypatch.setattr(context, "run_probe", slow_probe)
    undecided = context.search(SimpleNamespace(start=512, max_seq=65536, granularity=256,
                                               time_budget=100, probe_timeout=60),
                               "fp32", "tunefix", 6144)
    assert [s for s, _ in seen] == [512, 1024, 2048] and all(t <= 60 for _, t in seen)
    assert undecided["max_seq"] == 1024 and undecided["first_fail"] is None
    assert undecided["stopped_early"] and not undecided["capped"]
    assert context.describe(undecided) == ">= 1,024"
