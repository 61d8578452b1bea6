"""Issue 6 (every family exports and verifies; LoRA-only adapters) and issue 9 (a full disk
during export, names from models) for `tunefix export RUN_DIR`.

Each family is trained once (2 LoRA steps, through the module-scoped ``runs`` cache) on its
tiny random model with a real tokenizer, then exported through the CLI.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_export_run import _train, one_torch_thread, tree_digest  # noqa: F401 - a fixture
from tunefix import _io, tiny
from tunefix.cli import main

# family -> the registry template its tiny tokenizer trains on (the family record's). The tiny
# Gemma carries the Llama 2 vocabulary (see tunefix.tiny), which has no <start_of_turn>: its
# record names the mistral template. The Gemma export path (converter, metadata fixes) is what
# that family checks. Phi-3 and Gemma 2/3 export through test_export_gguf's conversions.
FAMILIES = {f: tiny.FAMILIES[f].template for f in ("llama", "mistral", "qwen2", "gemma", "qwen3", "qwen3_moe",
                                                     "smollm3", "gpt_oss", "qwen3_5", "ministral3",
                                                     "gemma4")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(family)``: a trained run of that family, trained on first use in this module."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            run = _train(root / "run", str(tiny.tiny_model(family)), FAMILIES[family])
            cache[family] = {"run": run, "root": root, "before": tree_digest(run)}
        return cache[family]

    return get


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tunefix: error")]


def _ollama_ids(gguf_file: Path, template_go: str, messages: list[dict]) -> list[int]:
    """What Ollama feeds llama.cpp: the Go rendering, tokenised with the GGUF's own BOS policy."""
    from tunefix.export import verify
    from tunefix.templates.gorender import render_ollama

    text = render_ollama(template_go, messages)
    with verify.open_llama(gguf_file, vocab_only=True) as llm:
        # add_bos=True is llama.cpp's add_special: BOS only where the GGUF's add_bos_token says.
        return llm.tokenize(text, add_bos=True)


# ------------------------------------------------------------------------- families


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_and_passes_verification(family, runs, capsys):
    from tunefix.export import verify
    from tunefix.export.ollama import parse_modelfile

    r = runs(family)
    out = r["root"] / "export"
    # One conversion, two quantisations from it, each file verified in llama.cpp.
    rc = main(["export", str(r["run"]), "--out", str(out), "--gguf", "f16,q8_0,q4_k_m", "--ollama"])
    err = capsys.readouterr().err
    v = json.loads((out / "export.json").read_text())["verification"]
    assert rc == 0 and v["ok"], v["first_error"]
    assert sorted(v["files"]) == ["run-f16.gguf", "run-q4_k_m.gguf", "run-q8_0.gguf"]
    assert not _error_lines(err) and "Traceback" not in err
    checks = v["files"]["run-f16.gguf"]["checks"]
    tokens, logits, stops = checks["tokens"], checks["logits"], checks["stops"]
    assert tokens["ok"] and not tokens["failures"] and "double BOS" not in tokens["summary"], tokens
    assert logits["judged"] and logits["top1_agreement"] == 1.0 and logits["max_abs_diff"] < 0.25, logits
    assert logits["compared"] > 0
    assert stops["judged"] and stops["ok"] and stops["torch_stopped"] == stops["llama_stopped"], stops
    assert v["template"]["ok"] and v["template"]["checked"] >= 8, v["template"]

    # One BOS on Ollama's path too: Go template + the GGUF's add_bos_token == training's ids.
    tok = verify.load_tokenizer(out / "merged")
    template_go = parse_modelfile((out / "Modelfile").read_text())["TEMPLATE"][0]
    conv = list(verify.CONVERSATIONS[1])  # with a system message: the Modelfile SYSTEM stays out
    ids = _ollama_ids(out / "run-f16.gguf", template_go, conv)
    assert ids == verify.hf_ids(tok, verify.render(tok, conv))
    if tok.bos_token_id is not None:
        assert ids[:2].count(tok.bos_token_id) <= 1 and ids.count(tok.bos_token_id) <= 1, ids[:4]

    # `tunefix chat` on the run and on its f16 GGUF: the same greedy answer.
    answers = []
    for target in (r["run"], out / "run-f16.gguf"):
        assert main(["chat", str(target), "--prompt", "Hello there", "--max-new-tokens", "8"]) == 0
        answers.append(capsys.readouterr().out.strip())
    if answers[0] != answers[1]:
        _assert_greedy_differs_only_at_a_tie(r["run"], out / "run-f16.gguf")
    assert tree_digest(r["run"]) == r["before"]


TIE = 0.05  # logits this close are a tie that f16 rounding may break either way


def _assert_greedy_differs_only_at_a_tie(run: Path, gguf_file: Path) -> None:
    """The tiny models are random: after two steps their next-token logits are nearly flat, and
    greedy decoding follows whichever of two near-equal tokens rounding favours. So where the
    two answers part, the run's own logits must show a tie between the two tokens; a gap
    larger than ``TIE`` there is a real difference."""
    import torch

    from tunefix.chat import LlamaChat, open_chat

    messages = [{"role": "user", "content": "Hello there"}]
    with LlamaChat(gguf_file) as llama:
        prompt = llama.prompt_ids(messages)
        generated = llama.llm.call("generate", prompt, sorted(llama.eog), 8)
    run_chat = open_chat(str(run))
    model = run_chat.model.float().eval()
    ids = list(prompt)
    for token in generated:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        best = int(logits.argmax())
        if best != token:
            gap = float(logits[best] - logits[token])
            assert gap < TIE, f"the run prefers {best} over llama.cpp's {token} by {gap:.3f}"
            return
        ids.append(token)


# ------------------------------------------------------------------------ LoRA only


@pytest.mark.slow
def test_lora_only_peft_and_gguf_adapters_match_the_run(runs, capsys):
    """The exported PEFT adapter, loaded the stock way, == the run's adapter; the GGUF adapter
    on the base GGUF in llama.cpp has the merged PyTorch model's top-1 everywhere."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunefix.export import gguf, verify
    from tunefix.train.run import load_run, read_run

    r = runs("qwen2")
    out = r["root"] / "lora"
    assert main(["export", str(r["run"]), "--out", str(out), "--lora-only", "--ollama"]) == 0, \
        capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"adapter", "run-lora-f16.gguf", "Modelfile", "README.md",
                                               "export.json"}
    _, summary = read_run(r["run"])
    base = summary["base_model"]
    run_model, tok, _, _ = load_run(r["run"], merge=False)
    run_model = run_model.float()
    stock = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    exported = PeftModel.from_pretrained(stock, str(out / "adapter")).eval()
    prompts = verify.prompt_ids(tok)[:2]
    for ids in prompts:
        ours, theirs = verify.torch_logits(exported, ids), verify.torch_logits(run_model, ids)
        torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), rtol=0, atol=1e-4)

    (base_gguf,) = gguf.export_gguf(base, r["root"] / "base", ["f32"], name="base")
    merged = load_run(r["run"], merge=True)[0].float()
    lp = verify.lora_parity(base_gguf, out / "run-lora-f16.gguf", merged, tok, prompts=prompts)
    assert lp.positions > 0 and lp.top1_agreement == 1.0 and lp.max_abs_diff < 0.01, lp
    assert tree_digest(r["run"]) == r["before"]


# ------------------------------------------------------------------- names from models


@pytest.mark.slow
def test_names_from_models_cannot_leave_the_out_dir(runs, tmp_path, capsys):
    from tunefix.export.ollama import parse_modelfile

    r = runs("gemma")
    # A run directory whose name is hidden and option-like, exported under a --name that climbs.
    odd = tmp_path / "-.odd run"
    shutil.copytree(r["run"], odd)
    out = tmp_path / "a" / "b" / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["export", str(odd), "--out", str(out), "--gguf", "f16", "--ollama", "--no-verify",
                 "--name", "../../escape/me"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "escape-me-f16.gguf",
                                                     "export.json"]
    assert parse_modelfile((out / "Modelfile").read_text())["FROM"] == ["./escape-me-f16.gguf"]
    assert "ollama create escape-me -f Modelfile" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]

    # LoRA-only: the gemma's vocabulary (Llama 2's) has no pad; the doctor pads with <unk>
    # rather than resizing, so its adapter holds LoRA tensors only and exports as well.
    q = runs("gemma")
    lora = tmp_path / "lora"
    assert main(["export", str(q["run"]), "--out", str(lora), "--lora-only", "--no-verify",
                 "--name", "/abs/../x y"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in lora.iterdir()) == ["README.md", "abs-x-y-lora-f16.gguf", "adapter", "export.json"]
    assert tree_digest(r["run"]) == r["before"]


# ----------------------------------------------------------------- full disk (ENOSPC)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _assert_clean_disk_error(code: int, err: str, out: Path) -> None:
    errors = _error_lines(err)
    assert code == 2 and len(errors) == 1 and "no space left on device" in errors[0], err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary left"


@pytest.mark.slow
def test_enospc_at_fsync_through_the_cli(runs, tmp_path, monkeypatch, capsys):
    r = runs("gemma")
    monkeypatch.setattr(_io.os, "fsync", _no_space)
    out = tmp_path / "out"
    code = main(["export", str(r["run"]), "--out", str(out), "--gguf", "f16", "--ollama"])
    monkeypatch.undo()
    _assert_clean_disk_error(code, capsys.readouterr().err, out)
    assert tree_digest(r["run"]) == r["before"]


def _fail_while_writing(name: str, hits: list[Path]):
    """An ``_io._fsync_file`` that runs out of space on the temporary file of ``name``."""
    real = _io._fsync_file

    def fsync(path):
        if Path(path).name.startswith(f".{name}."):
            hits.append(Path(path))
            _no_space()
        real(path)

    return fsync


_CHILD_NO_SPACE = ("import errno, os, sys; open(sys.argv[1], 'wb').write(b'GGUF' * 4096); "
                   "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["converter", "quantizer", "Modelfile", "README.md", "export.json"])
def test_enospc_while_writing_each_export_file(where, runs, tmp_path, monkeypatch, capsys):
    """Each writer of the export runs out of space: one line, exit 2, nothing under a final name."""
    from tunefix import llamacpp
    from tunefix.export import gguf

    r = runs("gemma")
    partial: list[Path] = []  # the temporary files the failing writer wrote into
    if where == "converter":  # a real child process that fills its output and dies of ENOSPC
        def command(src, model_dir, out_file, outtype, name):
            partial.append(Path(out_file))
            return [sys.executable, "-c", _CHILD_NO_SPACE, str(out_file)]

        monkeypatch.setattr(gguf, "_converter_command", command)
    elif where == "quantizer":  # llama.cpp's quantiser writes part of the file, then gives up
        def quantize(src, dst, ftype, nthread):
            partial.append(Path(dst))
            Path(dst).write_bytes(b"GGUF" * 4096)
            return 1, []  # what llama.cpp returns for an "iostream error", a full disk among them

        monkeypatch.setattr(llamacpp, "quantize", quantize)
        monkeypatch.setattr(gguf, "out_of_space", lambda directory: True)
    else:
        monkeypatch.setattr(_io, "_fsync_file", _fail_while_writing(where, partial))
    out = tmp_path / "out"
    code = main(["export", str(r["run"]), "--out", str(out), "--gguf", "f16,q8_0", "--ollama", "--no-verify"])
    _assert_clean_disk_error(code, capsys.readouterr().err, out)
    assert partial and not any(p.exists() for p in partial), partial  # it failed where meant to, cleaned up
    assert tree_digest(r["run"]) == r["before"]


def _tmpfs_available(mnt: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"', str(mnt)],
                          capture_output=True)
    return done.returncode == 0


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("family,where", [("gemma", "merge"), ("gemma", "metadata patch"),
                                          ("mistral", "quantizer")])
def test_a_real_full_disk(family, where, runs, tmp_path):
    """`tunefix export` onto a small tmpfs (mounted in a user namespace): the disk fills while
    safetensors writes the merge, while gguf-py rewrites the GGUF's metadata (numpy's short
    write, no errno) or while llama.cpp quantises (a bare error code)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not _tmpfs_available(mnt):
        pytest.skip("no user namespaces with tmpfs mounts here")
    r = runs(family)
    base = Path(json.loads((r["run"] / "summary.json").read_text())["base_model"])
    weights = (base / "model.safetensors").stat().st_size
    merged = _size(base)  # the merged directory is the base's files, rewritten
    # Enough for the merge and for the converter's up-front check (1.1 x weights), not for the
    # gemma's metadata rewrite (a second f16 file) nor for the mistral's q8_0 (0.53 x weights).
    size = weights // 2 if where == "merge" else merged + int(1.1 * weights) + 4 * 2**20
    # sh -c SCRIPT MOUNT_POINT SIZE COMMAND...: the listing shows what the export left there.
    script = ('mount -t tmpfs -o size="$1" tmpfs "$0" || exit 77; shift; "$@"; rc=$?; '
              'echo @@listing; find "$0" -mindepth 1; exit $rc')
    cli = [sys.executable, "-c", "import sys; from tunefix.cli import main; sys.exit(main(sys.argv[1:]))"]
    argv = ["export", str(r["run"]), "--out", str(mnt / "out"), "--gguf", "f16,q8_0", "--no-verify"]
    done = subprocess.run(["unshare", "-Urm", "sh", "-c", script, str(mnt), str(size), *cli, *argv],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode == 77:
        pytest.skip("tmpfs mount refused")
    errors = _error_lines(done.stderr)
    assert done.returncode == 2 and len(errors) == 1 and "no space left on device" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.split("@@listing", 1)[1].split() == [], done.stdout  # the disk holds nothing
    assert tree_digest(r["run"]) == r["before"]


# ------------------------------------------------------------------------ fast units


def test_converter_input_lists_tokens_added_after_the_sentencepiece_model(tmp_path):
    """transformers 5 keeps added tokens in tokenizer.json only; llama.cpp's SentencePiece
    converter reads them from tokenizer_config.json (measured: the pad token tunefix adds
    to Mistral's vocabulary became "[PAD32000]" and the export failed token parity)."""
    from transformers import AutoTokenizer

    from tunefix.export.gguf import _converter_input

    src = tiny.tiny_model("mistral")
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.model", "model.safetensors"):
        (model / name).symlink_to(src / name)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.save_pretrained(str(model))
    with _converter_input(model) as staged:
        assert staged == model  # nothing beyond the SentencePiece model: used as it is
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.save_pretrained(str(model))
    before = (model / "tokenizer_config.json").read_text()
    with _converter_input(model) as staged:
        listed = json.loads((staged / "tokenizer_config.json").read_text())["added_tokens_decoder"]
        assert listed == {"32000": {**listed["32000"], "content": "<|pad|>", "special": True}}
        assert (staged / "tokenizer.model").resolve() == (src / "tokenizer.model").resolve()
    assert (model / "tokenizer_config.json").read_text() == before  # the user's files untouched


def test_disk_space_check_scales_with_the_output_type(tmp_path, monkeypatch):
    from tunefix.errors import TunefixError
    from tunefix.export import gguf

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(gguf.shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(10**6, 0, 1500))
    gguf._check_disk_space(tmp_path, tmp_path, "f16")  # 1100 bytes needed
    with pytest.raises(TunefixError, match="not enough disk space"):
        gguf._check_disk_space(tmp_path, tmp_path, "f32")  # 2200 bytes: twice the bf16 weights


def test_disk_space_message_names_the_chosen_directory_not_the_staging_one(tmp_path, monkeypatch):
    from tunefix.errors import TunefixError
    from tunefix.export import gguf

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    staging = tmp_path / "out" / ".export.abc123.partial"
    staging.mkdir(parents=True)
    monkeypatch.setattr(gguf.shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(10**6, 0, 10))
    with pytest.raises(TunefixError) as err:
        gguf._check_disk_space(tmp_path, staging, "f16")
    assert f"not enough disk space in {tmp_path / 'out'}:" in err.value.one_line()
