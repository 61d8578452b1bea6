"""Reasoning templates (``templates/reasoning.py``): each registry entry renders as the family's
real template (llama.cpp's copies) with the same ``enable_thinking``, its Ollama twin renders
the same in Go's ``text/template`` with Ollama's ``think`` switch, reasoning reaches model-carried
templates, and the think switch travels with the record."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoTokenizer

from tunefix import assets
from tunefix.data import tokenize_conversation
from tunefix.errors import TunefixError
from tunefix.templates import REGISTRY, policy, reasoning, template_for
from tunefix.templates.gorender import render_ollama_many
from tunefix.templates.render import render_jinja

REAL = {"qwen-3": "Qwen-Qwen3-0.6B", "qwen-3.5": "Qwen3.5-4B", "smollm-3": "HuggingFaceTB-SmolLM3-3B",
        "gemma-4": "google-gemma-4-31B-it"}
NAMES = [t.name for t in reasoning.templates()]

_S = {"role": "system", "content": "Answer briefly."}
_U1 = {"role": "user", "content": "What is 2 + 2?"}
_A1 = {"role": "assistant", "content": "4"}
_A1R = {"role": "assistant", "content": "4", "reasoning": "Two plus two is four."}
_U2 = {"role": "user", "content": "And 3 + 3?"}
_A2 = {"role": "assistant", "content": "6"}
_A2R = {"role": "assistant", "content": "6", "reasoning": "Three and three:\nsix."}
CONVERSATIONS = {
    "single turn": [_U1, _A1],
    "multi-turn": [_U1, _A1, _U2, _A2],
    "with system": [_S, _U1, _A1, _U2, _A2],
    "reasoning on the last turn": [_S, _U1, _A1, _U2, _A2R],
    "reasoning on an earlier turn": [_U1, _A1R, _U2, _A2],
    "reasoning on every turn": [_U1, _A1R, _U2, _A2R],
    "generation prompt": [_U1],
    "generation prompt with system and history": [_S, _U1, _A1R, _U2],
}


def _family(name: str) -> str:
    return name.removesuffix("-no-think").removesuffix("-think")


def _gen(msgs) -> bool:
    return msgs[-1]["role"] != "assistant"


@pytest.fixture(scope="module")
def qwen_tok():
    return AutoTokenizer.from_pretrained(assets.tokenizer("qwen2"))


def test_the_families_have_both_modes():
    assert {"qwen-3", "qwen-3-no-think", "qwen-3.5", "qwen-3.5-no-think", "smollm-3", "smollm-3-no-think",
            "gemma-4", "gemma-4-think"} == set(NAMES) <= set(REGISTRY)
    for name in NAMES:
        thinks = REGISTRY[name].variables["enable_thinking"]
        assert reasoning.variant(REGISTRY[name], thinks) == name
        assert REGISTRY[reasoning.variant(REGISTRY[name], not thinks)].variables == {"enable_thinking": not thinks}


@pytest.mark.parametrize("name", NAMES)
def test_entry_renders_as_the_real_template(name):
    """Same text as the real template, in the entry's mode and with the switch set either way."""
    entry, real = REGISTRY[name], assets.chat_template(REAL[_family(name)])
    for label, msgs in CONVERSATIONS.items():
        for override in ({}, {"enable_thinking": True}, {"enable_thinking": False}):
            variables = {**entry.variables, **override}
            want = render_jinja(real, msgs, add_generation_prompt=_gen(msgs), bos_token="<bos>", **variables)
            have = entry.render(msgs, add_generation_prompt=_gen(msgs), bos_token="<bos>", **override)
            assert have == want, (name, label, override)


def test_the_real_templates_differ_in_what_they_keep():
    """What the comparison above covers (so that it can fail): Qwen3 keeps the last turn's
    reasoning only, Qwen3.5 likewise, SmolLM3 and text-only Gemma 4 keep none; the switch
    changes the generation prompt."""
    last, earlier = CONVERSATIONS["reasoning on the last turn"], CONVERSATIONS["reasoning on an earlier turn"]
    for name, kept in (("qwen-3", True), ("qwen-3.5", True), ("smollm-3", False), ("gemma-4", False)):
        t = REGISTRY[name]
        assert ("Three and three:\nsix." in t.render(last)) is kept, name
        assert "Two plus two" not in t.render(earlier), name
        on = t.render([_U1], add_generation_prompt=True, enable_thinking=True)
        assert on != t.render([_U1], add_generation_prompt=True, enable_thinking=False), name
    assert REGISTRY["qwen-3-no-think"].render([_U1], add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert REGISTRY["qwen-3"].render([_U1], add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_qwen35_refuses_what_its_real_template_refuses(qwen_tok):
    for msgs in ([_A1], [_U1, _S, _A1]):
        with pytest.raises(TunefixError):
            policy.render(qwen_tok, assets.chat_template(REAL["qwen-3.5"]), msgs)
        with pytest.raises(TunefixError):
            policy.render(qwen_tok, REGISTRY["qwen-3.5"], msgs)


def test_go_twins_render_as_the_jinja_with_ollamas_think():
    """Jinja == Go: ``think`` unset renders the entry's own mode; a thinking entry honours
    think=false (and true); a non-thinking entry never thinks, whatever ``think`` says
    (Ollama turns an unset think into true for a thinking-capable template)."""
    jobs, want = [], []
    for name in NAMES:
        t = REGISTRY[name]
        thinks = t.variables["enable_thinking"]
        for label, msgs in CONVERSATIONS.items():
            for think in (None, True, False):
                rendered = t.render(msgs, add_generation_prompt=_gen(msgs), bos_token="",
                                    **({"enable_thinking": think} if thinks and think is not None else {}))
                jobs.append((t.ollama, msgs, "", think))
                want.append((name, label, think, rendered))
    for (name, label, think, expected), got in zip(want, render_ollama_many(jobs), strict=True):
        assert got == expected, (name, label, think)


def test_go_twin_takes_the_modelfile_system():
    """The Modelfile's SYSTEM reaches the twin as a first system message does the Jinja."""
    jobs = [(REGISTRY[n].ollama, [_U1], _S["content"]) for n in NAMES]
    for name, got in zip(NAMES, render_ollama_many(jobs), strict=True):
        assert got == REGISTRY[name].render([_S, _U1], add_generation_prompt=True), name


def test_a_model_carried_template_sees_the_reasoning(qwen_tok):
    """``reasoning`` reaches a real template (which reads ``reasoning_content``) through the
    policy's renderer, as it reaches the registry entry."""
    msgs = CONVERSATIONS["reasoning on the last turn"]
    real = policy.render(qwen_tok, assets.chat_template(REAL["qwen-3"]), msgs)
    assert "<think>\nThree and three:\nsix.\n</think>\n\n6<|im_end|>" in real
    assert real == policy.render(qwen_tok, REGISTRY["qwen-3"], msgs)
    off = policy.render(qwen_tok, assets.chat_template(REAL["qwen-3"]), msgs[:-1], add_generation_prompt=True,
                        enable_thinking=False)
    assert off == policy.render(qwen_tok, REGISTRY["qwen-3-no-think"], msgs[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("name", NAMES)
def test_the_switch_travels_with_the_jinja(name, qwen_tok, tmp_path):
    """A path that carries only the Jinja (a model directory, a GGUF, apply_chat_template)
    renders the entry's mode; template.json keeps the variables."""
    from tunefix.train.run import load_template

    t = REGISTRY[name]
    for msgs in CONVERSATIONS.values():
        bare = render_jinja(t.jinja, msgs, add_generation_prompt=_gen(msgs), bos_token="<bos>")
        assert bare == t.render(msgs, add_generation_prompt=_gen(msgs), bos_token="<bos>"), name
    saved = qwen_tok.chat_template
    try:
        qwen_tok.chat_template = t.jinja
        hf = qwen_tok.apply_chat_template([_U1], tokenize=False, add_generation_prompt=True)
    finally:
        qwen_tok.chat_template = saved
    assert hf == policy.render(qwen_tok, t, [_U1], add_generation_prompt=True)
    record = json.loads(json.dumps(dataclasses.asdict(t), default=str))
    assert record["variables"] == t.variables
    (tmp_path / "template.json").write_text(json.dumps(record))
    assert load_template(tmp_path) == t


def _prompt_is_row_prefix(tok, name, conversation) -> bool:
    template = template_for(tok, name)
    row = tokenize_conversation(tok, template, conversation)["input_ids"]
    prompt = policy.prompt_ids(tok, template, conversation[:-1])
    return row[:len(prompt)] == prompt


def test_what_holds_between_training_rows_and_inference_prompts(qwen_tok):
    """The module docstring's statement, measured with the Qwen2 tokenizer: the prompt is a
    prefix of the training row when the last answer is rendered as inference continues it."""
    plain, reasoned = CONVERSATIONS["with system"], CONVERSATIONS["reasoning on the last turn"]
    for name in ("qwen-3", "qwen-3-no-think", "qwen-3.5-no-think", "smollm-3", "smollm-3-no-think"):
        assert _prompt_is_row_prefix(qwen_tok, name, plain), name
    for name in ("qwen-3", "qwen-3.5"):
        assert _prompt_is_row_prefix(qwen_tok, name, reasoned), name
    # Thinking Qwen3.5 on a row without reasoning: "<think>\n" + "\n</think>" is not "<think>\n\n".
    assert not _prompt_is_row_prefix(qwen_tok, "qwen-3.5", plain)
    # A no-think entry on a row whose last answer carries reasoning: the prompt's empty block.
    assert not _prompt_is_row_prefix(qwen_tok, "qwen-3-no-think", reasoned)
    # Gemma 4 without thinking: the prompt opens an empty thought channel the row lacks.
    for name in ("gemma-4", "gemma-4-think"):
        t = REGISTRY[name]
        prefix = t.render(plain[:-1], add_generation_prompt=True, bos_token="<bos>")
        assert t.render(plain, bos_token="<bos>").startswith(prefix) is (name == "gemma-4-think"), name


def test_a_model_carrying_the_real_template_gets_the_entry_and_its_twin(qwen_tok):
    """``from_tokenizer`` recognises each real template as the entry of its default mode, so a
    model that carries it trains with that entry's variables and exports its Ollama twin."""
    from tunefix.templates import from_tokenizer

    gemma = AutoTokenizer.from_pretrained(assets.tokenizer("gemma-4"))
    saved = {id(t): t.chat_template for t in (qwen_tok, gemma)}
    try:
        for family, tok in (("qwen-3", qwen_tok), ("qwen-3.5", qwen_tok), ("smollm-3", qwen_tok), ("gemma-4", gemma)):
            tok.chat_template = assets.chat_template(REAL[family])
            t = from_tokenizer(tok)
            assert t.description == f"the model's own ({family})" and t.ollama == REGISTRY[family].ollama, family
            assert t.variables == REGISTRY[family].variables and t.jinja == tok.chat_template, family
    finally:
        for tok in (qwen_tok, gemma):
            tok.chat_template = saved[id(tok)]


def test_rows_pick_the_thinking_mode_unless_the_template_was_named(caplog):
    """A model's own Qwen3 template (thinking by default) trained on rows without reasoning is
    trained and served with thinking off; rows with reasoning keep it on; a named entry stays."""
    from transformers import AutoTokenizer

    from tunefix import assets
    from tunefix.templates import template_for
    from tunefix.templates.select import for_rows

    tok = AutoTokenizer.from_pretrained(str(assets.tokenizer("qwen2")))
    tok.chat_template = assets.chat_template("Qwen-Qwen3-0.6B")
    own = template_for(tok)
    assert own.name == "qwen-3" and own.variables["enable_thinking"] is True
    plain = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    reasoned = [[{"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello.", "reasoning": "Greet back."}]]
    off = for_rows(tok, own, plain, named=False)
    assert off.name == "qwen-3-no-think" and off.variables["enable_thinking"] is False
    assert for_rows(tok, own, reasoned, named=False) is own
    assert for_rows(tok, off, reasoned, named=False).name == "qwen-3"
    with caplog.at_level("WARNING"):
        assert for_rows(tok, own, plain, named=True) is own
    assert "qwen-3-no-think" in caplog.text
    chatml = template_for(tok, "chatml")
    assert for_rows(tok, chatml, reasoned, named=False) is chatml  # no thinking switch: unchanged
