"""Ministral 3: the Tekken tokenizer asset against mistral-common, and what the family's
parametrised tests do not reach: prompts past YaRN's original context, where Llama 4's
attention temperature (``llama_4_scaling_beta``) starts to act.

The family's loading, doctor, training, fast paths, token policy and exports are in the
parametrised tests (``tests/test_families.py``, ``test_fast_paths.py``, ``test_policy.py``,
``test_export_gguf.py``, ``test_export_families.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tunefix import assets, tiny
from tunefix.data import tokenize_conversation
from tunefix.templates import template_for
from tunefix.templates.policy import prompt_ids

# mistral-common's own copy (the installed package), not the asset's: the reference is independent.
TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
TEXTS = ["Hello world", " leading space", "two  spaces\n\nand a newline\ttab", "12345 3.14159",
         "emoji 😀 and CJK 日本語, Cyrillic Привет", "don't stop", ""]
CONTROL = ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]", "[TOOL_CALLS]",
           "<unk>", "<pad>")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.tokenizer("tekken")))


@pytest.fixture(scope="module")
def mc():
    return MistralTokenizer.from_file(str(TEKKEN)).instruct_tokenizer.tokenizer


def test_tekken_asset_is_pinned_and_sized_like_the_model(tok, mc):
    asset = json.loads((assets.tokenizer("tekken") / "tunefix-asset.json").read_text())
    assert asset == {"source": "tekken_240911.json", "family_tokenizer": "tekken", "add_bos_token": True}
    assert assets.sha256_file(TEKKEN) == assets.TEKKEN_SHA256  # the installed file is the pinned one
    assert len(tok) == mc.n_words == 131072
    config = json.loads((tiny.tiny_model("ministral3") / "config.json").read_text())
    assert config["vocab_size"] == len(tok)


def test_tekken_asset_gives_mistral_commons_ids(tok, mc):
    for text in TEXTS:
        # add_special_tokens: BOS, as mistral-common's encode(bos=True) and continued pretraining
        assert tok(text)["input_ids"] == mc.encode(text, bos=True, eos=False), text
        assert tok(text, add_special_tokens=False)["input_ids"] == mc.encode(text, bos=False, eos=False), text
        assert tok.decode(mc.encode(text, bos=False, eos=False)) == mc.decode(mc.encode(text, bos=False, eos=False))
    assert (tok.bos_token_id, tok.eos_token_id) == (mc.bos_id, mc.eos_id) == (1, 2)
    assert tok.pad_token_id == mc.pad_id == 11


def test_tekken_control_tokens_are_mistral_commons(tok, mc):
    """In rendered chat text a control token is one id, mistral-common's, and the text around
    it is encoded as mistral-common encodes it on its own."""
    for name in CONTROL:
        ids = tok(f"a{name} b", add_special_tokens=False)["input_ids"]
        assert ids == mc.encode("a", bos=False, eos=False) + [mc.get_special_token(name)] \
            + mc.encode(" b", bos=False, eos=False), name


def test_ministral_3_rows_and_prompts_are_mistral_commons(tok, tmp_path):
    """The asset with the family's template gives encode_chat_completion's ids (one BOS,
    although the tokenizer adds one to plain text). Nemo's file read as v7, as
    tests/test_mistral_templates.py does."""
    data = json.loads(TEKKEN.read_text())
    data["config"]["version"] = "v7"
    (tmp_path / "tekken.json").write_text(json.dumps(data))
    ref = MistralTokenizer.from_file(str(tmp_path / "tekken.json"), mode=ValidationMode.agnostic)
    template = template_for(tok, tiny.FAMILIES["ministral3"].template)
    row = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
           {"role": "assistant", "content": "4"}]
    roles = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}

    def want(msgs):
        request = ChatCompletionRequest(messages=[roles[m["role"]](content=m["content"]) for m in msgs])
        return ref.encode_chat_completion(request).tokens

    assert tokenize_conversation(tok, template, row)["input_ids"] == want(row)
    assert prompt_ids(tok, template, row[:-1]) == want(row[:-1])


# ------------------------------------------------------------------ long prompts in GGUF


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    import torch

    from tunefix.export import gguf

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: one thread is faster
    [out] = gguf.export_gguf(tiny.tiny_model("ministral3"), tmp_path_factory.mktemp("ministral3"), ["f16"])
    yield out
    torch.set_num_threads(before)


@pytest.mark.slow
def test_yarn_and_attention_temperature_survive_in_gguf(f16):
    """591 tokens, 4.6x the tiny's original context of 128: llama.cpp agrees with transformers
    (measured max |diff| 0.00095, top-1 100%). The same comparison against a model without the
    attention temperature differs by 0.013 (measured), so these positions do exercise it."""
    from tunefix.export import verify

    hf = tiny.tiny_model("ministral3")
    assert verify.rope_parity(f16, hf).ok
    tok = verify.load_tokenizer(hf)
    ids = tok(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))["input_ids"]
    assert len(ids) > 4 * 128
    model = verify.load_reference(hf)
    same = verify.logits_parity(f16, hf, tok=tok, model=model, prompts=[ids], min_margin=0.01)
    assert same.top1_agreement == 1.0 and same.max_abs_diff < 0.004, same
    model.config.rope_parameters = {**model.config.rope_parameters, "llama_4_scaling_beta": 0.0}
    other = verify.logits_parity(f16, hf, tok=tok, model=model, prompts=[ids], max_abs=None)
    assert other.max_abs_diff > 2 * 0.004, other


def test_the_doctor_finds_no_rope_problem_on_the_clean_tiny():
    import tunefix

    report = tunefix.examine(str(tiny.tiny_model("ministral3")), template="ministral-3")
    codes = {f.code for f in report.findings}
    assert not {c for c in codes if c.startswith("rope")}, codes
    assert not [f for f in report.findings if f.severity == "error"], report.findings


def test_building_tekken_without_mistral_common_says_what_to_install(monkeypatch, tmp_path):
    from tunefix import _optional
    from tunefix.assets_build import build_tekken_tokenizer
    from tunefix.errors import TunefixError

    monkeypatch.setattr(_optional, "has_module", lambda name: name != "mistral_common")
    with pytest.raises(TunefixError) as e:
        build_tekken_tokenizer(TEKKEN, tmp_path)
    assert "mistral-common" in e.value.message and "pip install mistral-common" in e.value.hint
    assert not any(tmp_path.iterdir())
