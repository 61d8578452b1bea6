"""Issue 2: the package, the CLI, and the real assets (fetched, checksummed, idempotent)."""

import logging
import shutil
import subprocess
import sys

import pytest

from tunefix import assets, tiny
from tunefix.cli import main

MULTILINGUAL = "Hello world! Grüße aus Köln, 你好世界, こんにちは, Привет 🙂 1234567 \tend"


def test_cli_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("doctor", "demo", "assets"):
        assert command in out


def test_cli_version():
    done = subprocess.run([sys.executable, "-m", "tunefix.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("tunefix ")


def test_import_is_light():
    code = ("import sys, tunefix, tunefix.cli, tunefix.assets, tunefix.errors; "
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'triton', 'datasets') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_fetch_twice_downloads_once(caplog):
    assets.fetch_all()
    with caplog.at_level(logging.INFO, logger="tunefix.assets"):
        paths = assets.fetch_all()
    assert not [r for r in caplog.records if "downloading" in r.getMessage() or "building" in r.getMessage()]
    assert all(p.exists() for p in paths.values())


def test_corrupted_cache_is_detected_and_fetched_again(tmp_path, monkeypatch, caplog):
    # A private cache seeded with the real sdist, so only the last step needs the registry.
    (tmp_path / "downloads").mkdir()
    real = assets.download(assets.LLAMA_CPP_SDIST)
    shutil.copy(real, tmp_path / "downloads" / real.name)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    caplog.set_level(logging.INFO, logger="tunefix.assets")

    vocab = assets.vocab_gguf("gpt-2")
    assert assets.sha256_file(vocab) == assets.VOCAB_SHA256["gpt-2"]
    assert not [r for r in caplog.records if "downloading" in r.getMessage()]

    # A flipped byte in an extracted file: detected, extracted again from the archive.
    data = bytearray(vocab.read_bytes())
    data[1000] ^= 0xFF
    vocab.write_bytes(bytes(data))
    caplog.clear()
    assert assets.sha256_file(assets.vocab_gguf("gpt-2")) == assets.VOCAB_SHA256["gpt-2"]
    assert any("checksum mismatch" in r.getMessage() for r in caplog.records)

    # A truncated archive: detected and downloaded again from the registry.
    archive = tmp_path / "downloads" / real.name
    archive.write_bytes(archive.read_bytes()[:1000])
    vocab.unlink()
    caplog.clear()
    assert assets.sha256_file(assets.vocab_gguf("gpt-2")) == assets.VOCAB_SHA256["gpt-2"]
    assert any("downloading" in r.getMessage() for r in caplog.records)
    assert assets.sha256_file(archive) == assets.LLAMA_CPP_SDIST.sha256


def test_built_directory_is_rebuilt_when_changed(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    builds = []

    def build(d):
        builds.append(d)
        (d / "a.txt").write_text("hello")

    first = assets.cached_dir("thing", build)
    assert assets.cached_dir("thing", build) == first and len(builds) == 1
    (first / "a.txt").write_text("tampered")
    assert not assets.verify_dir(first)
    assets.cached_dir("thing", build)
    assert len(builds) == 2 and (first / "a.txt").read_text() == "hello"
    assert not list(tmp_path.glob(".*partial"))


def test_two_processes_building_one_cache_entry_build_it_once(tmp_path):
    """The benchmark's two sides start on a fresh cache together: one builds, the other waits
    and gets the same directory (they once raced on the final rename)."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tunefix import assets\n"
        "def build(d):\n"
        "    with open(sys.argv[1], 'a') as log: log.write('built\\n')\n"
        "    time.sleep(1.0)\n"
        "    (d / 'a.txt').write_text('hello')\n"
        "print(assets.cached_dir('shared', build))\n")
    env = dict(__import__("os").environ, **{assets.CACHE_ENV: str(tmp_path / "cache")})
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(log)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0] and log.read_text() == "built\n"
    assert (tmp_path / "cache" / "shared" / "a.txt").read_text() == "hello"


def test_smollm2_answers_a_chat_question():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# Whether each family's real tokenizer adds a BOS token, and which.
BOS = {"llama-bpe": "<|begin_of_text|>", "llama-spm": "<s>", "phi-3": "<s>", "qwen2": None, "qwen35": None, "gpt-2": None,
       "gemma-4": "<bos>", "o200k-harmony": None, "tekken": "<s>"}
# The tokenizers that ship as no vocab GGUF: their models' vocabulary sizes.
NOT_GGUF_VOCAB = {"o200k-harmony": 201088, "tekken": 131072}  # gpt-oss; Mistral Nemo / Ministral 3


@pytest.mark.parametrize("name", assets.TOKENIZERS)
def test_vocab_tokenizers_round_trip_and_bos(name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.tokenizer(name))
    ids = tok(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == MULTILINGUAL
    assert len(tok) == assets_vocab_size(name)
    with_special = tok(MULTILINGUAL)["input_ids"]
    if BOS[name] is None:
        assert with_special == ids
    else:
        assert with_special == [tok.convert_tokens_to_ids(BOS[name])] + ids


def assets_vocab_size(name):
    from tunefix.assets_build import read_gguf_vocab

    if name in NOT_GGUF_VOCAB:
        return NOT_GGUF_VOCAB[name]

    return len(read_gguf_vocab(assets.vocab_gguf(name))["tokens"])


@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_rebuilt_sentencepiece_model_matches(name):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = assets.tokenizer(name)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(d)
    # tokenizer.model holds the base pieces; added tokens (Phi-3's) live in tokenizer.json.
    assert sp.get_piece_size() <= len(tok)
    assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == tok.convert_ids_to_tokens(list(range(sp.get_piece_size())))
    # Leading and repeated spaces included: SentencePiece's dummy prefix goes in front of
    # text that already starts with a space (" a" is "▁", "▁a").
    for text in SPM_TEXTS:
        assert sp.encode(text) == tok(text, add_special_tokens=False)["input_ids"], text


# Texts where SentencePiece tokenizers are easy to get wrong: the dummy prefix with leading
# spaces, whitespace runs, newlines, byte fallback, and (in SPM_SPECIAL) text right after
# special tokens, where llama.cpp puts the dummy prefix again.
SPM_TEXTS = ["Hello world", " leading space", "  two leading spaces", " ", "double  space ",
             "\nnew line first", "x\n\ny", "tabs\tand\n new lines\n\n", "你好 🙂 12345", "digits 3.14159 -42",
             MULTILINGUAL]
SPM_SPECIAL = ["<s>Hello", "<s> Hello", "<s>\nHello", "Hello</s>World", "before</s> after </s>",
               "<s>[INST] Hi [/INST]"]


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gemma-4"])
def test_sentencepiece_tokenizers_match_llama_cpp(name):
    from transformers import AutoTokenizer

    from tunefix.llamacpp import LlamaProcess

    tok = AutoTokenizer.from_pretrained(assets.tokenizer(name))
    # Not Phi-3's special-token texts: llama.cpp strips the whitespace after Phi-3's
    # special tokens when general.name says Phi-3 (this vocab's does; see export/gguf_arch.py),
    # which this tokenizer.json does not do.
    texts = SPM_TEXTS + (SPM_SPECIAL if name == "llama-spm" else [])
    if name == "gemma-4":  # built by hand from the GGUF (model.files.gemma4_tokenizer)
        texts = SPM_TEXTS + ["<bos>Hello<eos> x", "<|turn>user\nHi<turn|>\n<|turn>model\n"]
    with LlamaProcess(assets.vocab_gguf(name), vocab_only=True) as llm:
        theirs = llm.call("tokenize", [(text, False) for text in texts] + [("a", True)])
    for text, ids in zip(texts, theirs, strict=False):
        assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
    assert tok("a")["input_ids"] == theirs[-1]  # one <s>


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_tiny_models_load_and_run(family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.tiny_model(family)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.hidden_size % 256 == 0
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
