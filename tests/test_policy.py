"""The token policy (``tunefix.templates.policy``) is the one path: on every tiny family with
every registry template its tokenizer can hold, the inference prompt of evaluation and chat is
exactly the start of the training row, with one BOS."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tunefix import tiny
from tunefix.data import tokenize_rows
from tunefix.errors import TunefixError
from tunefix.templates import REGISTRY, end_of_turn, policy, reasoning, template_for

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"},
                {"role": "assistant", "content": "6"}]
# Thinking templates train rows whose last answer carries reasoning (rows without it take the
# ``-no-think`` entry: templates/reasoning.py says what holds).
REASONED = CONVERSATION[:-1] + [{"role": "assistant", "content": "6", "reasoning": "Three and three make six."}]


def _holds(tok, template) -> bool:
    """The template's end-of-turn text is one token of this tokenizer (else training refuses it)."""
    return len(tok(end_of_turn(template, tok), add_special_tokens=False)["input_ids"]) == 1


@pytest.fixture(scope="module")
def toks():
    return {f: AutoTokenizer.from_pretrained(str(tiny.tiny_model(f))) for f in tiny.FAMILIES}


def test_every_family_is_checked_with_several_templates(toks):
    pairs = [(f, n) for f in toks for n in REGISTRY if _holds(toks[f], template_for(toks[f], n))]
    assert len(pairs) >= 2 * len(toks)  # alpaca, vicuna and zephyr end with EOS: every family
    assert {f for f, _ in pairs} == set(toks)


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_training_evaluation_and_chat_prompts_are_one_list(family, toks):
    tok = toks[family]
    for name in REGISTRY:
        template = template_for(tok, name)
        if not _holds(tok, template):
            continue
        conversation = REASONED if reasoning.is_thinking(template) else CONVERSATION
        # The sequence that trains the last turn: the whole row, or (templates that render
        # history or the answered turn otherwise than inference: Qwen3, Gemma 4, Mistral v3,
        # gpt-oss) that turn's own sequence.
        encoded = tokenize_rows(tok, template, [conversation]).rows[-1]
        row = encoded["input_ids"]
        prompt = policy.prompt_ids(tok, template, conversation[:-1])
        assert row[:len(prompt)] == prompt, (family, name)
        bos = policy.bos_id(tok)
        assert (prompt[:1] == [bos] and prompt[1:2] != [bos]) if bos is not None else True, (family, name)
        from tunefix.train.evaluate import prompt_ids as evaluation_ids

        assert evaluation_ids(tok, template, conversation[:-1]) == prompt  # evaluation and TorchChat
        scored = [t for t in encoded["labels"][len(prompt):] if t != policy.IGNORE]
        assert scored and scored[-1] in policy.stop_ids(tok, template), (family, name)  # it learns to stop


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_verification_ids_and_gguf_stops_follow_the_policy(family, toks):
    """Verification renders and tokenises like training (from the template the exported model
    directory carries), and the GGUF metadata names exactly the ids training learns to stop on."""
    from tunefix.export import gguf_meta, verify

    tok = toks[family]
    saved = tok.chat_template
    checked = 0
    try:
        for name in REGISTRY:
            template = template_for(tok, name)
            if not _holds(tok, template):
                continue
            tok.chat_template = template.jinja  # as merge writes it into the exported directory
            for conv, ids in zip(verify.CONVERSATIONS, verify.prompt_ids(tok), strict=True):
                try:
                    expected = policy.prompt_ids(tok, template, conv)
                except TunefixError:  # a template without a system turn: verification drops it
                    expected = policy.prompt_ids(tok, template, conv[1:])
                assert ids == expected, (family, name, conv)
            want = gguf_meta.expected_metadata(None, tok)
            named = {want.get("tokenizer.ggml.eos_token_id"), want["tokenizer.ggml.eot_token_id"]} - {None}
            assert named == set(policy.stop_ids(tok, template)), (family, name)
            assert verify.stop_ids(tok) == set(policy.stop_ids(tok, template)), (family, name)
            checked += 1
    finally:
        tok.chat_template = saved
    assert checked >= 2, family


def test_the_doctor_renders_in_the_strict_sandbox():
    """A template reaching for Python internals is refused on the doctor's path too (transformers'
    own sandbox would render it as nothing)."""
    from tunefix.doctor.probe import render

    tok = AutoTokenizer.from_pretrained(str(tiny.tiny_model("llama")))
    hostile = "{{ ''.__class__ }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TunefixError, match="sandbox"):
        render(hostile, tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False)
