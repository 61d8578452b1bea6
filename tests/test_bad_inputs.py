"""Issue 9: the bad-input matrix. Every mistake gets exit status 2 (1 for doctor findings),
one line on stderr naming the problem and the next step, no traceback, and no file created
or changed anywhere under the test's directory (inputs included).

Cases run in-process through ``tunefix.cli.main`` (a subprocess per case would spend ~15 s
importing torch for each ``train`` case); ``test_real_processes_print_one_line`` runs a
sample of them as real ``tunefix`` processes, where warnings and logging reach stderr too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunefix import tiny
from tunefix.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ALPACA = EXAMPLES / "alpaca_sample.json"
TITANIC = EXAMPLES / "titanic.csv"


@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    return tiny.tiny_model("llama")


# ------------------------------------------------------------------------ input makers


def write(d: Path, name: str, content: str | bytes) -> Path:
    p = d / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def model_dir(d: Path, tiny_llama: Path, *, weights: dict[str, bytes] | None = None,
              config: dict | None = None, tokenizer: bool = False) -> Path:
    """A model directory with tiny Llama's config and the given weight files."""
    out = d / "model"
    out.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    for name, data in (weights or {}).items():
        (out / name).write_bytes(data)
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_llama / name, out / name)
    return out


def truncated_safetensors(tiny_llama: Path, n: int = 4096) -> bytes:
    with open(tiny_llama / "model.safetensors", "rb") as f:
        return f.read(n)


def gguf_file(d: Path, name: str, arch: str = "llama", truncate: int | None = None) -> Path:
    """A small GGUF written by gguf-py (optionally cut after ``truncate`` bytes)."""
    import gguf
    import numpy as np

    path = d / name
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones((32,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate is not None:
        data = path.read_bytes()
        path.write_bytes(data[:truncate])
    return path


class _Evil:
    """A pickle that would create a file when unpickled by a trusting loader."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4), "x": _Evil(str(marker))}, buf)
    return buf.getvalue()


def plain_pickle() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, buf)
    return buf.getvalue()


# Config families tunefix does not support: one transformers knows, one it does not.
MAMBA = {"model_type": "mamba", "architectures": ["MambaForCausalLM"]}
MYSTERY = {"model_type": "mystery", "architectures": ["MysteryForCausalLM"]}
EXAMPLE_OK = "<|u|>{INPUT}<|e|><|a|>{OUTPUT}<|e|><|u|>{INPUT}<|e|><|a|>{OUTPUT}<|e|>"
TRAIN_BASE = ["--max-steps", "2", "--batch-size", "1", "--gradient-accumulation", "1",
              "--warmup-steps", "0", "--max-seq-length", "64"]


@dataclass
class Case:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (tmp dir, tiny llama) -> argv
    needle: str  # a fragment of the one line (case-insensitive)
    code: int = 2


def train(d: Path, *extra: str, data: str | Path = ALPACA, model: str | Path | None = None,
          out: str | Path | None = None) -> list[str]:
    argv = ["train", "--data", str(data), "--output-dir", str(out or d / "run"), *TRAIN_BASE]
    if model is not None:
        argv += ["--model", str(model)]
    return argv + list(extra)


def preview(path: Path | str, *extra: str) -> list[str]:
    return ["data", "preview", str(path), *extra]


CASES: list[Case] = [
    # ------------------------------------------------------------------ doctor
    Case("doctor-missing-path", lambda d, t: ["doctor", str(d / "nope")], "no such file"),
    Case("doctor-path-under-a-file", lambda d, t: ["doctor", str(write(d, "f.txt", "x") / "model")],
         "no such file"),
    Case("doctor-empty-directory", lambda d, t: ["doctor", str(write(d, "m/.keep", "").parent)], "config.json"),
    Case("doctor-config-not-json", lambda d, t: ["doctor", str(write(d, "m/config.json", "{oops").parent)],
         "not readable json"),
    Case("doctor-config-a-list", lambda d, t: ["doctor", str(write(d, "m/config.json", "[1, 2]").parent)],
         "not an object"),
    Case("doctor-no-weights", lambda d, t: ["doctor", str(model_dir(d, t))], "holds no weights"),
    Case("doctor-truncated-safetensors",
         lambda d, t: ["doctor", str(model_dir(d, t, weights={"model.safetensors": truncated_safetensors(t)}))],
         "truncated"),
    Case("doctor-garbage-safetensors",
         lambda d, t: ["doctor", str(model_dir(d, t, weights={"model.safetensors": os.urandom(3000)}))],
         "not a readable safetensors"),
    Case("doctor-safetensors-header-not-object",
         lambda d, t: ["doctor", str(model_dir(d, t, weights={"model.safetensors": (7).to_bytes(8, "little")
                                                              + b"[1,2,3]"}))], "not a readable safetensors"),
    Case("doctor-pickle-refused",
         lambda d, t: ["doctor", str(model_dir(d, t, weights={"pytorch_model.bin": plain_pickle()}))],
         "--allow-pickle"),
    Case("doctor-evil-pickle-refused-even-opted-in",
         lambda d, t: ["doctor", "--allow-pickle",
                       str(model_dir(d, t, weights={"pytorch_model.bin": evil_pickle(d / "PWNED")}))],
         "refused or unreadable pickle"),
    Case("doctor-remote-code-refused",
         lambda d, t: ["doctor", str(model_dir(d, t, config={"model_type": "mystery", "auto_map": {
             "AutoConfig": "modeling_mystery.MysteryConfig"}}))], "--trust-remote-code"),
    Case("doctor-garbage-gguf", lambda d, t: ["doctor", str(write(d, "m.gguf", os.urandom(2000)))],
         "not a gguf file"),
    Case("doctor-truncated-gguf", lambda d, t: ["doctor", str(gguf_file(d, "m.gguf", truncate=300))],
         "gguf"),
    Case("doctor-gguf-unsupported-arch", lambda d, t: ["doctor", str(gguf_file(d, "m.gguf", arch="mamba"))],
         "architecture 'mamba'"),
    Case("doctor-not-a-model-file", lambda d, t: ["doctor", str(write(d, "notes.txt", "hello"))],
         "neither a model directory nor a .gguf"),
    Case("doctor-unknown-template", lambda d, t: ["doctor", str(t), "--template", "no-such-template"],
         "unknown chat template"),
    Case("doctor-template-not-utf8",
         lambda d, t: ["doctor", str(t), "--template", str(write(d, "t.jinja", b"{{ messages }}\xff\xfe"))],
         "utf-8"),
    Case("doctor-data-missing", lambda d, t: ["doctor", str(t), "--data", str(d / "nope.csv")],
         "does not exist"),
    Case("doctor-data-not-utf8", lambda d, t: ["doctor", str(t), "--data", str(write(d, "x.txt", b"ok\n\xff\n"))],
         "not utf-8"),
    Case("doctor-fix-into-nonempty-dir",
         lambda d, t: ["doctor", str(t), "--fix", str(write(d, "out/keep.txt", "mine").parent)],
         "already exists"),
    Case("doctor-fix-parent-is-a-file",
         lambda d, t: ["doctor", str(t), "--fix", str(write(d, "file", "x") / "out")], "is a file"),
    Case("doctor-unsupported-family-is-a-finding",  # still examined; train and export refuse it
         lambda d, t: ["doctor", "--json", str(model_dir(d, t, config=MAMBA, tokenizer=True, weights={
             "model.safetensors": (t / "model.safetensors").read_bytes()}))], "unsupported-family", code=0),
    Case("doctor-template-fails-to-render-is-a-finding",
         lambda d, t: ["doctor", str(t), "--json", "--template",
                       str(write(d, "t.jinja", "{{ raise_exception('nope') }}{{ messages }}"))],
         "template-error", code=1),
    Case("doctor-hostile-template-is-a-finding",
         lambda d, t: ["doctor", str(t), "--json", "--template",
                       str(write(d, "t.jinja", "{{ ''.__class__.__mro__ }}{{ messages }}"))],
         "template-error", code=1),
    # ------------------------------------------------------------------ data preview
    Case("preview-missing-file", lambda d, t: preview(d / "nope.csv"), "no such file"),
    Case("preview-path-under-a-file", lambda d, t: preview(write(d, "a.csv", "a\n1\n") / "b.csv"),
         "no such file"),
    Case("preview-directory-not-a-dataset", lambda d, t: preview(write(d, "dir/x.txt", "x").parent),
         "save_to_disk"),
    Case("preview-empty-csv", lambda d, t: preview(write(d, "e.csv", "")), "empty"),
    Case("preview-header-only-csv", lambda d, t: preview(write(d, "h.csv", "a,b\n")), "no data rows"),
    Case("preview-ragged-csv", lambda d, t: preview(write(d, "r.csv", "a,b\n1,2\n3\n")), "r.csv:3"),
    Case("preview-duplicate-columns", lambda d, t: preview(write(d, "dup.csv", "a,a\n1,2\n"), "--output", "a"),
         "appears twice"),
    Case("preview-empty-column-name", lambda d, t: preview(write(d, "n.csv", "a,\n1,2\n")), "empty column name"),
    Case("preview-csv-not-utf8", lambda d, t: preview(write(d, "l.csv", "name,city\nJosé,Köln\n".encode("latin-1"))),
         "not utf-8"),
    Case("preview-unknown-merge-column",
         lambda d, t: preview(TITANIC, "--merge", "{sex} {nope}", "--output", "alive"), "unknown column 'nope'"),
    Case("preview-unknown-output-column", lambda d, t: preview(TITANIC, "--output", "survivedd"),
         "unknown column 'survivedd'"),
    Case("preview-unbalanced-merge", lambda d, t: preview(TITANIC, "--merge", "[[{sex}", "--output", "alive"),
         "unbalanced"),
    Case("preview-table-without-output", lambda d, t: preview(TITANIC), "no known format"),
    Case("preview-gigantic-single-row",
         lambda d, t: preview(write(d, "big.jsonl", '{"text": "' + "x" * (17 * 2**20) + '"}\n')),
         "limit for a row"),
    Case("preview-gigantic-csv-cell",
         lambda d, t: preview(write(d, "big.csv", 'a,b\n"' + "y" * (17 * 2**20) + '",1\n'), "--output", "b"),
         "limit for a row"),
    Case("preview-json-object-not-list", lambda d, t: preview(write(d, "o.json", '{"a": 1}')),
         "expected a json list of objects"),
    Case("preview-json-list-of-numbers", lambda d, t: preview(write(d, "n.json", "[1, 2, 3]")),
         "expected a json list of objects"),
    Case("preview-json-syntax", lambda d, t: preview(write(d, "s.json", '[{"a": 1},]')), "invalid json"),
    Case("preview-jsonl-bad-line", lambda d, t: preview(write(d, "b.jsonl", '{"text": "a"}\n{"text": \n')),
         "b.jsonl:2"),
    Case("preview-jsonl-not-objects", lambda d, t: preview(write(d, "l.jsonl", "1\n2\n")), "must be an object"),
    Case("preview-json-deeply-nested", lambda d, t: preview(write(d, "deep.json", "[" * 100_000 + "]" * 100_000)),
         "nested too deeply"),
    Case("preview-unknown-role",
         lambda d, t: preview(write(d, "r.json", json.dumps([{"messages": [
             {"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]))), "unknown role"),
    Case("preview-unknown-extension", lambda d, t: preview(write(d, "data.xlsx", "x")), "cannot tell the file type"),
    Case("preview-unknown-format", lambda d, t: preview(ALPACA, "--format", "yaml"), "unknown data format"),
    Case("preview-garbage-parquet", lambda d, t: preview(write(d, "g.parquet", os.urandom(500))),
         "not a parquet file"),
    Case("preview-text-not-utf8", lambda d, t: preview(write(d, "t.txt", b"hello\n\xc3\x28\n")), "not utf-8"),
    Case("preview-unknown-template", lambda d, t: preview(ALPACA, "--template", "llama-9"),
         "unknown chat template"),
    Case("preview-bad-jinja", lambda d, t: preview(ALPACA, "--template", str(write(d, "t.jinja",
                                                                                   "{% for m in messages %}"))),
         "syntax error"),
    Case("preview-jinja-without-messages", lambda d, t: preview(ALPACA, "--template", str(write(d, "t.jinja",
                                                                                              "hello {{ x }}"))),
         "never reads `messages`"),
    Case("preview-example-missing-output",
         lambda d, t: preview(ALPACA, "--template", str(write(d, "ex.txt", "<u>{INPUT}<a>\n<u>{INPUT}"))),
         "{output} 0 time"),
    Case("preview-hostile-template",
         lambda d, t: preview(ALPACA, "--model", str(t), "--template",
                              str(write(d, "t.jinja", "{% for m in messages %}{{ cycler.__init__.__globals__ }}"
                                                      "{% endfor %}"))), "refused by the sandbox"),
    Case("preview-model-missing", lambda d, t: preview(ALPACA, "--model", str(d / "nomodel")),
         "not a model or tokenizer directory"),
    Case("preview-model-without-tokenizer", lambda d, t: preview(ALPACA, "--model", str(write(d, "m/x", "").parent)),
         "no tokenizer"),
    Case("preview-zero-seq-length", lambda d, t: preview(ALPACA, "--max-seq-length", "0"), "--max-seq-length"),
    # ------------------------------------------------------------------ templates
    Case("templates-unknown-name", lambda d, t: ["templates", "chatml2"], "unknown chat template"),
    Case("templates-example-once", lambda d, t: ["templates", str(write(d, "ex.txt", "<u>{INPUT}<a>{OUTPUT}</s>"))],
         "exactly twice"),
    Case("templates-example-disagrees",
         lambda d, t: ["templates", str(write(d, "ex.txt", "<u>{INPUT}<a>{OUTPUT}</s><u>{INPUT}<b>{OUTPUT}</s>"))],
         "disagree"),
    Case("templates-bad-jinja", lambda d, t: ["templates", str(write(d, "t.jinja", "{{ messages "))],
         "syntax error"),
    # ------------------------------------------------------------------ train
    Case("train-yaml-unknown-key", lambda d, t: ["train", str(write(d, "c.yaml", f"data: {ALPACA}\nlora_rank: 8\n"))],
         "unknown key lora_rank in"),
    Case("train-yaml-not-mapping", lambda d, t: ["train", str(write(d, "c.yaml", "- a\n- b\n"))], "mapping"),
    Case("train-yaml-syntax", lambda d, t: ["train", str(write(d, "c.yaml", "data: [unclosed\n"))],
         "not valid yaml"),
    Case("train-yaml-missing", lambda d, t: ["train", str(d / "nope.yaml")], "no such file"),
    Case("train-learning-rate-out-of-range", lambda d, t: train(d, "--learning-rate", "5"), "--learning-rate"),
    Case("train-dropout-out-of-range", lambda d, t: train(d, "lora_dropout=1.5"), "--lora-dropout"),
    Case("train-eval-fraction-one", lambda d, t: train(d, "eval_fraction=1"), "--eval-fraction"),
    Case("train-negative-warmup", lambda d, t: train(d, "warmup_steps=-3"), "--warmup-steps"),
    Case("train-unknown-cpu-allocator", lambda d, t: train(d, "--cpu-allocator", "jemalloc"),
         "--cpu-allocator must be auto, default or lean"),
    Case("train-fused-lora-not-a-bool", lambda d, t: train(d, "fused_lora=maybe"), "--fused-lora"),
    Case("train-unknown-checkpointing", lambda d, t: train(d, "--gradient-checkpointing", "sometimes"),
         "--gradient-checkpointing must be auto, off, on, offload or selective, got 'sometimes'"),
    Case("train-not-an-int", lambda d, t: train(d, "lora_r=big"), "not a valid int"),
    Case("train-no-data", lambda d, t: ["train", "--output-dir", str(d / "run")], "no training data"),
    Case("train-output-dir-exists", lambda d, t: train(d, out=write(d, "run/keep.txt", "mine").parent),
         "already exists"),
    Case("train-output-dir-is-a-file", lambda d, t: train(d, out=write(d, "run", "x")), "is a file"),
    Case("train-output-parent-is-a-file", lambda d, t: train(d, out=write(d, "f", "x") / "run"), "is a file"),
    Case("train-resume-not-a-run", lambda d, t: train(d, "--resume", out=write(d, "run/x.txt", "x").parent),
         "not a tunefix run"),
    Case("train-ragged-csv", lambda d, t: train(d, "--output", "b", data=write(d, "r.csv", "a,b\n1,2\n3\n")),
         "r.csv:3"),
    Case("train-unknown-merge-column", lambda d, t: train(d, "--merge", "{nope}", "--output", "alive", data=TITANIC),
         "unknown column"),
    Case("train-unknown-template", lambda d, t: train(d, "--template", "vicuna-9"), "unknown chat template"),
    Case("train-model-missing", lambda d, t: train(d, model=d / "nomodel"), "no such file"),
    Case("train-model-pickle-refused",
         lambda d, t: train(d, model=model_dir(d, t, weights={"pytorch_model.bin": plain_pickle()})),
         "--allow-pickle"),
    Case("train-model-remote-code-refused",
         lambda d, t: train(d, model=model_dir(d, t, config={"model_type": "mystery", "auto_map": {
             "AutoModelForCausalLM": "modeling_mystery.Mystery"}})), "--trust-remote-code"),
    Case("train-model-truncated-safetensors",
         lambda d, t: train(d, model=model_dir(d, t, weights={"model.safetensors": truncated_safetensors(t)},
                                                tokenizer=True)), "cannot load"),
    Case("train-model-garbage-gguf", lambda d, t: train(d, model=write(d, "m.gguf", os.urandom(1000))),
         "not a gguf file"),
    Case("train-model-gguf-unsupported-arch", lambda d, t: train(d, model=gguf_file(d, "m.gguf", arch="mamba")),
         "mamba"),
    Case("train-model-unsupported-family",
         lambda d, t: train(d, model=model_dir(d, t, config=MAMBA, tokenizer=True)), "model family 'mamba'"),
    Case("train-model-unknown-family",
         lambda d, t: train(d, model=model_dir(d, t, config=MYSTERY, tokenizer=True)), "model family 'mystery'"),
    # ------------------------------------------------------------------ demo
    Case("demo-model-unsupported-family",
         lambda d, t: ["demo", "--model", str(model_dir(d, t, config=MAMBA, tokenizer=True)), "--steps", "1",
                       "--rows", "10", "--no-export", "--output", str(d / "runs")], "model family 'mamba'"),
    Case("demo-model-missing", lambda d, t: ["demo", "--model", str(d / "nomodel"), "--no-export",
                                             "--output", str(d / "runs")], "no such file"),
    # ------------------------------------------------------------------ eval
    Case("eval-missing-run", lambda d, t: ["eval", str(d / "norun")], "does not exist"),
    Case("eval-not-a-run", lambda d, t: ["eval", str(write(d, "run/x.txt", "x").parent)], "not a finished"),
    Case("eval-corrupt-run", lambda d, t: ["eval", str(_corrupt_run(d))], "config.json"),
    # ------------------------------------------------------------------ chat, export, verify
    Case("chat-missing-model", lambda d, t: ["chat", str(d / "nope"), "--prompt", "hi"], "no such file"),
    Case("chat-not-a-model", lambda d, t: ["chat", str(write(d, "x.csv", "a\n1\n")), "--prompt", "hi"],
         "neither a model directory nor a .gguf"),
    Case("chat-dir-without-config", lambda d, t: ["chat", str(write(d, "m/x", "").parent), "--prompt", "hi"],
         "config.json"),
    Case("export-missing-source", lambda d, t: ["export", str(d / "nope"), "--out", str(d / "out")],
         "no such run directory"),
    Case("export-source-is-a-file", lambda d, t: ["export", str(write(d, "x.txt", "x")), "--out", str(d / "out")],
         "not a directory"),
    Case("export-source-not-a-run", lambda d, t: ["export", str(write(d, "m/x", "").parent), "--out",
                                                  str(d / "out")], "neither a tunefix run"),
    Case("export-out-exists", lambda d, t: ["export", str(t), "--out", str(write(d, "out/keep.txt", "mine").parent)],
         "not empty"),
    Case("export-unknown-gguf-type", lambda d, t: ["export", str(t), "--out", str(d / "out"), "--gguf", "q9_9"],
         "unknown gguf type"),
    Case("export-model-unsupported-family",
         lambda d, t: ["export", str(model_dir(d, t, config=MYSTERY, tokenizer=True)), "--out", str(d / "out"),
                       "--gguf", "f16"], "model family 'mystery'"),
    Case("export-out-under-a-file", lambda d, t: ["export", str(t), "--out", str(write(d, "f.txt", "x") / "out")],
         "is a file, not a directory"),
    Case("verify-missing-dir", lambda d, t: ["verify", str(d / "nope")], "not a tunefix export"),
    Case("verify-not-an-export", lambda d, t: ["verify", str(write(d, "e/x", "").parent)], "not a tunefix export"),
    # ------------------------------------------------------------------ the command line itself
    Case("cli-unknown-option", lambda d, t: ["doctor", str(t), "--frobnicate"], "unrecognized arguments"),
]


def _corrupt_run(d: Path) -> Path:
    run = d / "run"
    write(d, "run/summary.json", "{}")
    write(d, "run/config.json", "{not json")
    (run / "adapter").mkdir()
    return run


# ------------------------------------------------------------------------ the checks


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root``: content hash and mode (mtime too for files)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel + "/"] = oct(p.stat().st_mode)
        else:
            st = p.stat()
            out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(st.st_mode)} {st.st_mtime_ns}"
    return out


def one_line_with_next_step(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert "Traceback" not in err and line.startswith("tunefix: error: "), line
    # The problem, then what to do: at least two sentences, or a pointer to an option.
    body = line[len("tunefix: error: "):]
    assert re.search(r"[.?!] +[A-Z`(]", body) or "--" in body, f"no next step in: {line}"
    return line


@contextlib.contextmanager
def logging_at_stderr():
    """Every logging stream handler pointed at the current (captured) stderr, for the block.

    Libraries (transformers) install their own handler at import: it holds the stderr of its
    time. Pointed back afterwards: a handler left on this test's capture, closed when the test
    ends, made a later test's warning print "--- Logging error ---" and a traceback (measured).
    """
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                        if isinstance(lg, logging.Logger)]
    saved = []
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler:
                saved.append((h, h.stream, vars(h).get("flush")))
                h.stream = sys.stderr  # not setStream: it flushes the old stream
                if "flush" in vars(h):  # transformers pins flush to the stderr of its import
                    h.flush = sys.stderr.flush
    try:
        yield
    finally:
        for h, stream, flush in saved:
            h.stream = stream
            if flush is not None:
                h.flush = flush


def run_in_process(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()  # whatever making the inputs printed
    with logging_at_stderr():
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code if isinstance(e.code, int) else 2
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, tiny_llama, capfd, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default output paths (runs/...) would land here
    argv = case.argv(work, tiny_llama)
    before = snapshot(work)
    code, out, err = run_in_process(argv, capfd)
    assert code == case.code, f"exit {code}, stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    if case.code == 2:
        line = one_line_with_next_step(err)
        assert case.needle.lower() in line.lower(), line
    else:  # a doctor finding: the report on stdout, nothing alarming on stderr
        assert "Traceback" not in err and case.needle in out, out[-2000:]
    assert snapshot(work) == before, "files were created or changed"
    assert not (work / "PWNED").exists()


OUT_OF_MEMORY = {
    "cuda": lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                "allocate memory: you tried to allocate 1125899906842624 bytes"),
    "python": lambda: MemoryError(),
}


@pytest.fixture
def no_loading_bar():
    """transformers' "Loading weights" bar (stderr) comes before any training step can fail."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if was_on:
        hf_logging.enable_progress_bar()


@pytest.mark.parametrize("kind", list(OUT_OF_MEMORY))
def test_out_of_memory_in_training(kind, tmp_path, tiny_llama, capfd, monkeypatch, no_loading_bar):
    """Running out of memory in a training step: one line naming the memory options, and the
    run directory (created for this run, no checkpoint yet) is gone, so the retry can reuse it."""
    import tunefix.model.loss

    def no_memory(*args, **kwargs):
        raise OUT_OF_MEMORY[kind]()

    monkeypatch.setattr(tunefix.model.loss, "model_loss", no_memory)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(work)
    code, out, err = run_in_process(train(work, "--template", "llama-3", "--gradient-checkpointing", "off", model=tiny_llama,
                                          out=work / "runs" / "run"), capfd)
    assert code == 2, f"exit {code}, stdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    line = one_line_with_next_step(err)
    assert "out of memory in training step 1" in line, line
    for option in ("--batch-size", "--max-seq-length", "--gradient-checkpointing"):
        assert option in line, line
    assert snapshot(work) == before, "files were created or changed"


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path, tiny_llama, monkeypatch):
    import tunefix.model.loss

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(tunefix.model.loss, "model_loss", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(train(tmp_path, "--template", "llama-3", model=tiny_llama))


def test_matrix_is_large_enough():
    commands = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 40 and {"doctor", "preview", "templates", "train", "eval", "chat", "export",
                                 "verify", "demo"} <= commands


def test_debug_shows_the_traceback(tmp_path):
    from tunefix.errors import TunefixError

    with pytest.raises(TunefixError):
        main(["--debug", "data", "preview", str(tmp_path / "nope.csv")])


# A sample run as real processes: stderr then holds everything (warnings, logging).
REAL = ["doctor-garbage-gguf", "preview-ragged-csv", "templates-unknown-name", "train-unknown-template",
        "eval-not-a-run", "doctor-pickle-refused"]


@pytest.mark.parametrize("case_id", REAL)
def test_real_processes_print_one_line(case_id, tmp_path, tiny_llama):
    case = next(c for c in CASES if c.id == case_id)
    work = tmp_path / "work"
    work.mkdir()
    argv = case.argv(work, tiny_llama)
    before = snapshot(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tunefix.cli", *argv], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == case.code, proc.stderr[-3000:]
    line = one_line_with_next_step(proc.stderr)
    assert case.needle.lower() in line.lower()
    assert snapshot(work) == before


def test_one_rule_for_every_output_directory(tmp_path):
    """train's output_dir, doctor --fix and export --out share _io.check_output_dir."""
    import importlib
    import inspect

    from tunefix._io import check_output_dir
    from tunefix.errors import TunefixError

    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "--out")  # an empty directory is fine
    check_output_dir(tmp_path / "new" / "deeper", "--out")  # so is a new one
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(TunefixError, match="already exists and is not empty"):
        check_output_dir(tmp_path / "busy", "--out", allow_hint="Pass --force")
    check_output_dir(tmp_path / "busy", "--out", allowed=True)  # --force / --resume said so
    (tmp_path / "file").write_text("x")
    with pytest.raises(TunefixError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(TunefixError, match="file is a file, not a directory"):
        check_output_dir(tmp_path / "file" / "below", "--out")
    for module, name in (("tunefix.train.rundir", "check_run_dir"), ("tunefix.doctor.repair", "check_out_dir"),
                         ("tunefix.export.pipeline", "check_out_dir")):
        assert "check_output_dir(" in inspect.getsource(getattr(importlib.import_module(module), name)), module
