"""The doctor's ``stop-inside-answer``: a stop id that the template writes inside an assistant
turn (gpt-oss's ``<|end|>`` between analysis and final answer) ends generation after the
reasoning. Checked on the tiny gpt-oss model with its real o200k-harmony tokenizer and the
``gpt-oss`` template, with the stop ids of the real checkpoint and with ``<|end|>`` added."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunefix import tiny
from tunefix.doctor import apply_fixes, examine
from tunefix.templates import REGISTRY


@pytest.fixture(scope="module")
def model_and_tok():
    path = tiny.tiny_model("gpt_oss")
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = REGISTRY["gpt-oss"].jinja
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model, tok


def _ids(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def test_end_of_message_as_a_stop_is_found_and_removed(model_and_tok):
    model, tok = model_and_tok
    real = _ids(tok, "<|return|>", "<|endoftext|>", "<|call|>")  # gpt-oss's generation_config
    model.generation_config.eos_token_id = real
    assert "stop-inside-answer" not in {f.code for f in examine(model, tok).findings}

    model.generation_config.eos_token_id = real + _ids(tok, "<|end|>")
    report = examine(model, tok)
    (finding,) = [f for f in report.findings if f.code == "stop-inside-answer"]
    assert finding.severity == "error" and finding.evidence["tokens"] == ["<|end|>"]
    assert "<|channel|>final<|message|>" in finding.evidence["trained_turn"]
    lines = apply_fixes(model, tok, report)
    assert any("removed <|end|>" in line for line in lines)
    assert sorted(model.generation_config.eos_token_id) == sorted(real)
    assert "stop-inside-answer" not in {f.code for f in examine(model, tok).findings}


def test_no_generation_prompt_only_where_the_template_has_an_assistant_header():
    """Mistral's formats have no assistant header (the answer follows ``[/INST]``): nothing to
    warn about. ChatML without its ``<|im_start|>assistant`` prompt is the bug."""
    from tunefix.doctor.probe import Probe
    from tunefix.doctor.subject import from_model
    from tunefix.doctor.template import no_generation_prompt

    for family, name in (("mistral", "mistral"), ("mistral", "mistral-v3"), ("qwen2", "chatml")):
        path = tiny.tiny_model(family)
        tok = AutoTokenizer.from_pretrained(str(path))
        tok.chat_template = REGISTRY[name].jinja
        subject = from_model(AutoModelForCausalLM.from_pretrained(str(path)), tok)
        assert no_generation_prompt(Probe(subject)) is None, name
    tok.chat_template = REGISTRY["chatml"].jinja.replace("{% if add_generation_prompt %}", "{% if false %}")
    finding = no_generation_prompt(Probe(from_model(AutoModelForCausalLM.from_pretrained(str(path)), tok)))
    assert finding is not None and finding.code == "no-generation-prompt"
