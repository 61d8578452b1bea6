"""Registry entries against the real chat templates of their families (llama.cpp's collection,
``tunefix.assets.chat_template``), on the shared probe conversations: the same text, byte for
byte, where the real template accepts the conversation. The reasoning, Mistral and harmony
entries have their own files (test_reasoning_templates, test_mistral_templates, test_gpt_oss).

Llama 3.2's template writes today's date unless ``date_string`` is given; the registry's
``llama-3.1`` fixes it to Llama 3.1's own default, so the real templates are given that date.
"""

from __future__ import annotations

import pytest

from tunefix import assets
from tunefix.errors import TunefixError
from tunefix.templates import REGISTRY
from tunefix.templates.probes import PROBES, wants_generation_prompt
from tunefix.templates.render import render_jinja

PAIRS = [("llama-3.1", "meta-llama-Llama-3.1-8B-Instruct"), ("llama-3.1", "meta-llama-Llama-3.2-3B-Instruct"),
         ("llama-3.1", "meta-llama-Llama-3.3-70B-Instruct"), ("qwen-2.5", "Qwen-Qwen2.5-7B-Instruct"),
         ("gemma", "google-gemma-2-2b-it"), ("smollm-3", "HuggingFaceTB-SmolLM3-3B")]
SPECIALS = {"bos_token": "<BOS>", "eos_token": "</s>", "date_string": "26 Jul 2024"}


@pytest.mark.parametrize(("name", "real"), PAIRS)
def test_registry_entry_renders_as_the_real_template(name, real):
    entry, source = REGISTRY[name], assets.chat_template(real)
    compared = 0
    for msgs in PROBES:
        gen = wants_generation_prompt(msgs)
        try:
            want = render_jinja(source, msgs, add_generation_prompt=gen, **SPECIALS, **entry.variables)
        except TunefixError:  # Gemma's template refuses a system role; the entry folds it in
            continue
        assert entry.render(msgs, add_generation_prompt=gen, **SPECIALS) == want, (name, real, msgs)
        compared += 1
    assert compared >= 4, (name, real)
