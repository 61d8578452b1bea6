"""Issue 16: the main job on any fresh x86 machine. llama.cpp built for named ISA levels (no
AMX), run in a child process whose crash is one line and loses nothing; leftovers of a killed
tunefix removed by the next write to the same place, with the size freed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _logs import log_lines
from test_export_families import _error_lines, runs  # noqa: F401 - a fixture
from test_export_run import one_torch_thread  # noqa: F401 - a fixture
from tunefix import _io, llamacpp
from tunefix.cli import main

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- the build


def _features(info: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+) = (\w+)", info))


def test_llama_cpp_build_has_avx2_and_no_amx():
    """The installed llama-cpp-python was built with CMAKE_ARGS (no -march=native): AVX2 kernels
    for the quantised types, and no AMX, which a CPU may advertise and then refuse (SIGILL)."""
    features = _features(llamacpp.system_info())
    assert features.get("AVX2") == "1", features
    assert features.get("FMA") == "1" and features.get("F16C") == "1", features
    assert not [k for k, v in features.items() if k.startswith("AMX") and v == "1"], features


def test_makefile_builds_llama_cpp_with_the_module_flags_and_no_wheel_cache(tmp_path):
    """One place for the flags (tunefix.llamacpp, read by the Makefile); pip's wheel cache, keyed
    by the sdist and not by CMAKE_ARGS, is never used for this build."""
    done = subprocess.run(["make", "-n", "llama", f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert f'CMAKE_ARGS="{llamacpp.CMAKE_ARGS}"' in done.stdout
    assert "-DGGML_NATIVE=OFF" in llamacpp.CMAKE_ARGS
    assert "--no-cache-dir" in done.stdout and f"llama-cpp-python=={llamacpp.LLAMA_CPP_VERSION}" in done.stdout


# -------------------------------------------------------------- a crash in the child


@pytest.fixture(scope="module")
def crashed(runs, tmp_path_factory):  # noqa: F811
    """One export whose q8_0 file's llama.cpp dies of SIGILL and q4_0 file's of SIGKILL (on
    purpose), the f16 file's not."""
    import _pytest.monkeypatch

    r = runs("llama")
    root = tmp_path_factory.mktemp("crashed")
    out = root / "out"
    with _pytest.monkeypatch.MonkeyPatch.context() as mp:
        mp.setenv("TUNEFIX_TEST_LLAMA_CRASH", "signal:q8_0,oom:q4_0")
        err_file = root / "stderr.txt"
        with open(err_file, "w") as err, contextlib.redirect_stderr(err):
            code = main(["export", str(r["run"]), "--out", str(out), "--gguf", "f16,q8_0,q4_0", "--ollama"])
    return {"root": root, "out": out, "code": code, "err": err_file.read_text()}


@pytest.mark.slow
def test_llama_cpp_crash_during_verification_keeps_the_export(crashed):
    """A signal (SIGILL, as AMX on a CPU that refuses it) and an out-of-memory kill (SIGKILL):
    the export is published with every file, the manifest says which files are not verified
    and why, the command says so in one line, exit 1."""
    out = crashed["out"]
    assert crashed["code"] == 1
    (line,) = _error_lines(crashed["err"])
    assert line.startswith("tunefix: error: not verified: ") and "run-q8_0.gguf" in line, line
    assert "SIGILL" in line and "make llama" in line and "--no-cache-dir" in line, line
    names = {p.name for p in out.iterdir()}
    assert {"run-f16.gguf", "run-q8_0.gguf", "run-q4_0.gguf", "Modelfile", "export.json", "README.md",
            "merged"} <= names
    assert not [p.name for p in crashed["root"].iterdir() if p.name.startswith(".")], "staging left behind"
    v = json.loads((out / "export.json").read_text())["verification"]
    assert v["ok"] is False and v["not_verified"] == ["run-q8_0.gguf", "run-q4_0.gguf"]
    assert v["files"]["run-f16.gguf"]["ok"], v["files"]["run-f16.gguf"]  # the other file was verified
    sigill = v["files"]["run-q8_0.gguf"]["checks"]["llama.cpp"]
    assert sigill["summary"] == "not verified: llama.cpp SIGILL" and sigill["error"] in line
    oom = v["files"]["run-q4_0.gguf"]["checks"]["llama.cpp"]
    assert oom["summary"] == "not verified: llama.cpp SIGKILL" and "out-of-memory killer" in oom["error"]
    assert "\n" not in oom["error"]


@pytest.mark.slow
def test_the_demos_llama_answers_go_on_past_a_crashing_file(crashed, monkeypatch):
    from rich.console import Console

    from tunefix.demo import llama_accuracies

    monkeypatch.setenv("TUNEFIX_TEST_LLAMA_CRASH", "signal:q8_0")
    out, acc = crashed["out"], {}
    convs = [[{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]]
    with open(os.devnull, "w") as sink:
        failures = llama_accuracies(Console(file=sink), [out / "run-f16.gguf", out / "run-q8_0.gguf"], convs, acc)
    assert list(acc) == ["llama.cpp run-f16.gguf"] and len(failures) == 1 and "SIGILL" in failures[0]


@pytest.mark.slow
def test_chat_with_a_crashing_gguf_is_one_line(crashed, monkeypatch, capsys):
    monkeypatch.setenv("TUNEFIX_TEST_LLAMA_CRASH", "signal:f16")
    code = main(["chat", str(crashed["out"] / "run-f16.gguf"), "--prompt", "Hi"])
    (line,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and "SIGILL" in line and "run-f16.gguf" in line, line


def test_a_failing_op_is_an_error_and_the_child_ends():
    with llamacpp.LlamaProcess() as child:
        with pytest.raises(llamacpp.TunefixError, match="llama.cpp failed"):
            child.call("tokenize", [("x", True)])  # no model opened: the op fails, the child lives
        assert "AVX" in child.call("system_info")
    assert child._proc.returncode == 0


# ------------------------------------------------------- leftovers of a killed tunefix


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_writers_are_removed_and_reported(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".exp.p{dead}.abcd_123.partial"
    (stale / "merged").mkdir(parents=True)
    (stale / "merged" / "model.safetensors").write_bytes(b"x" * 5000)
    legacy = tmp_path / ".exp._w8s67i2.partial"  # named before the pid was recorded
    legacy.mkdir()
    (legacy / "f16.gguf").write_bytes(b"y" * 1000)
    live = tmp_path / f".exp.p{os.getpid()}.zzzzzzzz.partial"  # a writer still running: kept
    live.mkdir()
    other = tmp_path / f".other.p{dead}.abcdefgh.partial"  # another target: not ours to judge here
    other.write_bytes(b"z")
    with log_lines("tunefix._io") as lines:
        freed = _io.remove_stale(tmp_path, "exp")
    assert freed == 6000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    assert len(lines) == 1 and "removed 2 unfinished writes" in lines[0] and "5.9 KiB freed" in lines[0]


def test_an_interrupted_swap_puts_the_previous_export_back(tmp_path):
    """Killed between moving the old --out aside and renaming the new one in: the old copy is
    restored, never removed."""
    old = tmp_path / f".exp.p{_dead_pid()}.abcdefgh.old"
    (old / "x").mkdir(parents=True)
    (old / "x" / "export.json").write_text("{}")
    _io.remove_stale(tmp_path, "exp")
    assert (tmp_path / "exp" / "export.json").read_text() == "{}" and not old.exists()


def _wait_for(predicate, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_export_killed_with_sigkill_is_cleaned_by_the_next_export(runs, tmp_path):  # noqa: F811
    """kill -9 in the middle of an export: the next export to the same --out removes the hidden
    staging directory (its process is gone) and says how much it freed."""
    r = runs("llama")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "tunefix.cli", "export", str(r["run"]), "--out", str(out), "--gguf", "f16",
            "--no-verify"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = lambda: [p for p in tmp_path.glob(f".out.p{proc.pid}.*.partial") if (p / "merged").is_dir()]  # noqa: E731
    try:
        _wait_for(lambda: staged() or proc.poll() is not None, 300)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    (left,) = staged()
    assert left.exists() and not out.exists()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed 1 unfinished write left by a killed tunefix" in done.stderr and "freed" in done.stderr
    assert not left.exists() and (out / "run-f16.gguf").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- small things


def test_wrapping_with_lora_prints_no_deprecation_of_peft_code():
    """transformers 5 warns about the deprecated attribute PEFT reads: not the user's business."""
    import warnings

    from transformers import AutoModelForCausalLM

    from tunefix import tiny
    from tunefix.model.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny.tiny_model("llama")))
    model.activation_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(model, r=4)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    # Nothing is left filtered after the call:
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        model.is_gradient_checkpointing  # noqa: B018 - the deprecated read itself still warns
    assert any("is_gradient_checkpointing" in str(w.message) for w in after)


def test_unknown_yaml_key_is_named_as_written_with_its_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: examples/alpaca_sample.json\nno_such_key_here: 3\nlora_rr: 8\n")
    assert main(["train", str(bad)]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"unknown key no_such_key_here in {bad}" in line and "--" not in line.split(" in ")[0], line
