"""Mistral's versioned templates against Mistral's own reference (mistral-common's
``encode_chat_completion`` on the tokenizer files it ships) and against the real templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from tunefix import assets
from tunefix.data import tokenize_conversation
from tunefix.data.history import changed_turns
from tunefix.doctor.suggest import suggest_templates
from tunefix.errors import TunefixError
from tunefix.templates import REGISTRY
from tunefix.templates.policy import prompt_ids
from tunefix.templates.probes import PROBES, wants_generation_prompt
from tunefix.templates.render import render_jinja
from tunefix.templates.select import mistral_template

DATA = Path(mistral_common.__file__).parent / "data"

# Registry entry -> (file shipped in mistral_common/data, tokenizer version to read it as).
# No Tekken v7 file ships: Nemo's tekken_240911.json (v3) is read as v7. Its special-token
# table is mistral-common's default one, which v7 files use unchanged ([SYSTEM_PROMPT] = 17).
FILES = {
    "mistral": ("tokenizer.model.v1", "v1"),
    "mistral-v3": ("mistral_instruct_tokenizer_240323.model.v3", "v3"),
    "mistral-v7": ("mistral_instruct_tokenizer_241114.model.v7", "v7"),
    "mistral-v3-tekken": ("tekken_240911.json", "v3"),
    "ministral-3": ("tekken_240911.json", "v7"),
}
_ROLES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def _hf_tokenizer(file: Path, tmp: Path, legacy: bool):
    """The Hugging Face tokenizer of the same file, as transformers converts it."""
    if file.suffix == ".json":
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        return convert_tekken_tokenizer(str(file), chat_template="")
    from transformers import LlamaTokenizer

    shutil.copy(file, tmp / "tokenizer.model")
    # v1 (Mistral 7B v0.1) ships the legacy SentencePiece normaliser; v3 and v7 Metaspace
    # with prepend_scheme "first" (design.md, "Real Mistral v0.3 tokenizers").
    return LlamaTokenizer.from_pretrained(str(tmp), legacy=legacy)


def _reference(file: Path, version: str, tmp: Path) -> MistralTokenizer:
    if file.suffix == ".json" and json.loads(file.read_text())["config"]["version"] != version:
        data = json.loads(file.read_text())
        data["config"]["version"] = version
        file = tmp / f"tekken_{version}.json"
        file.write_text(json.dumps(data))
    # agnostic: rows (assistant last) and prompts (user last) with one tokenizer
    return MistralTokenizer.from_file(str(file), mode=ValidationMode.agnostic)


@pytest.fixture(scope="module", params=sorted(FILES))
def pair(request, tmp_path_factory):
    """(registry name, Hugging Face tokenizer, mistral-common tokenizer) of one version."""
    name = request.param
    file, version = FILES[name]
    tmp = tmp_path_factory.mktemp(name)
    return name, _hf_tokenizer(DATA / file, tmp, legacy=version == "v1"), _reference(DATA / file, version, tmp)


def _mc_ids(mc: MistralTokenizer, msgs) -> list[int]:
    request = ChatCompletionRequest(messages=[_ROLES[m["role"]](content=m["content"]) for m in msgs])
    return mc.encode_chat_completion(request).tokens


# Besides the probes: a digit run, an emoji, a tab, a newline. Not runs of spaces: there
# transformers' conversion of a SentencePiece model merges "▁▁" where SentencePiece splits at
# each space (measured: "ok  then" is "▁ok", "▁▁", "then" against "▁ok", "▁", "▁then"), a
# difference of the tokenizers, whatever the template.
EXTRA = [
    [{"role": "user", "content": "12345 😀\tx"}, {"role": "assistant", "content": "ok\nthen"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


def test_training_and_prompt_ids_equal_mistral_common(pair):
    name, tok, mc = pair
    t = REGISTRY[name]
    for msgs in PROBES + EXTRA:
        want = _mc_ids(mc, msgs)
        if wants_generation_prompt(msgs):
            have = prompt_ids(tok, t, msgs)
        else:
            # last_only: the ids are the whole rendering's; see the prefix-stability test for why
            have = tokenize_conversation(tok, t, msgs, last_only=True)["input_ids"]
        assert have == want, (f"{name} on {msgs}:\n{tok.convert_ids_to_tokens(have)}\n"
                              f"{tok.convert_ids_to_tokens(want)}")


def test_the_old_mistral_entry_fails_on_later_versions(pair):
    """The measurement behind the versioned entries: v1's text is wrong for v3 and Tekken."""
    name, tok, mc = pair
    if name == "mistral":
        return
    msgs = PROBES[3]  # system, user, assistant
    assert tokenize_conversation(tok, REGISTRY["mistral"], msgs)["input_ids"] != _mc_ids(mc, msgs)


def test_version_is_picked_from_the_tokenizer(pair):
    name, tok, _ = pair
    if name == "ministral-3":  # same file as Nemo's: told apart by what the tokenizer carries
        assert mistral_template(tok) == "mistral-v3-tekken"
        tok.chat_template = assets.chat_template("mistralai-Ministral-3-14B-Reasoning-2512")
        try:
            assert mistral_template(tok) == "ministral-3"
        finally:
            tok.chat_template = ""
        return
    assert mistral_template(tok) == name


def test_other_vocabularies_get_v1():
    from transformers import AutoTokenizer

    for n in ("llama-spm", "llama-bpe", "qwen2"):
        assert mistral_template(AutoTokenizer.from_pretrained(assets.tokenizer(n))) == "mistral"


def test_doctor_suggests_the_version_and_not_untrained_control_tokens(tmp_path):
    tok = _hf_tokenizer(DATA / "mistral_instruct_tokenizer_240323.model.v3", tmp_path, legacy=False)
    probe = SimpleNamespace(s=SimpleNamespace(tokenizer=tok), untrained_ids=set())
    names = suggest_templates(probe)
    assert "mistral-v3" in names and "mistral" not in names
    probe.untrained_ids = {tok.convert_tokens_to_ids("[INST]")}
    assert not any(n.startswith(("mistral", "ministral")) for n in suggest_templates(probe))


def test_v2_file_is_v3_format(tmp_path):
    """SentencePiece v2 (Mixtral 8x22B's first release) renders plain chat as v3 does."""
    file = DATA / "mistral_instruct_tokenizer_240216.model.v2"
    tok, mc = _hf_tokenizer(file, tmp_path, legacy=False), _reference(file, "v2", tmp_path)
    assert mistral_template(tok) == "mistral-v3"
    for msgs in PROBES:
        fn = prompt_ids if wants_generation_prompt(msgs) else (
            lambda tk, t, m: tokenize_conversation(tk, t, m, last_only=True)["input_ids"])
        assert fn(tok, REGISTRY["mistral-v3"], msgs) == _mc_ids(mc, msgs)


# ------------------------------------------------------------------ the real templates


def _real(name: str, msgs) -> str:
    return render_jinja(assets.chat_template(name), msgs, add_generation_prompt=wants_generation_prompt(msgs),
                        bos_token="<s>", eos_token="</s>")


def _ours(name: str, msgs) -> str:
    return REGISTRY[name].render(msgs, add_generation_prompt=wants_generation_prompt(msgs), bos_token="<s>")


def test_nemo_real_template_drops_the_system_prompt_from_training_rows():
    """Equal to Nemo's own template except where it loses the system prompt (loop.last)."""
    for msgs in PROBES:
        real, ours = _real("mistralai-Mistral-Nemo-Instruct-2407", msgs), _ours("mistral-v3-tekken", msgs)
        if msgs[0]["role"] == "system" and msgs[-1]["role"] == "assistant":
            assert real == _ours("mistral-v3-tekken", msgs[1:]) != ours
        else:
            assert real == ours


@pytest.mark.parametrize("real_name", ["mistralai-Ministral-3-14B-Reasoning-2512",
                                       "Mistral-Small-3.2-24B-Instruct-2506"])
def test_v7_tekken_real_templates_equal_but_for_their_default_system(real_name):
    for msgs in PROBES:
        real, ours = _real(real_name, msgs), _ours("ministral-3", msgs)
        if msgs[0]["role"] != "system":
            head, _, rest = real.partition("[/SYSTEM_PROMPT]")
            assert head.startswith("<s>[SYSTEM_PROMPT]") and len(head) > 200  # their default prompt
            real = "<s>" + rest
        assert real == ours


def test_system_in_last_user_turn_is_not_prefix_stable(pair):
    """v3's system prompt moves to the latest user turn, so a multi-turn row with a system
    prompt can only be trained turn by turn. data.history's probes have no system message and
    call these templates prefix-stable; the whole-row tokenisation then refuses such a row
    (loudly: the system text comes after the first user turn) rather than mistrain it."""
    name, tok, _ = pair
    msgs = PROBES[6]  # system, user, assistant, user, assistant
    moves = name in ("mistral-v3", "mistral-v3-tekken")
    assert changed_turns(tok, REGISTRY[name], msgs) == ([2] if moves else [])
    if moves:
        with pytest.raises(TunefixError, match="moves it"):
            tokenize_conversation(tok, REGISTRY[name], msgs)
    else:
        tokenize_conversation(tok, REGISTRY[name], msgs)
