"""The token policy: BOS, rendering, the end-of-turn token, the inference prompt and the stop
ids, decided here and nowhere else.

Hugging Face's own paths disagree about BOS (``apply_chat_template(tokenize=True)`` adds no
special tokens, ``tokenizer(text)`` adds BOS), and a tokenizer's ``add_bos_token`` attribute
can say False while its post-processor adds BOS (measured, design.md). So BOS is decided by
tokenising. Every conversation is rendered by ``render`` (Jinja's immutable sandbox, made
strict, never transformers' ``apply_chat_template``). Training rows, evaluation and chat
prompts, the doctor, the GGUF metadata, the Modelfile's stops and the export's verification
all ask this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunefix.errors import TunefixError
from tunefix.templates.record import EOS, ChatTemplate
from tunefix.templates.render import Message

IGNORE = -100  # label of a token that is not trained


# ------------------------------------------------------------------------------ BOS


def bos_id(tokenizer: Any) -> int | None:
    """The BOS id this tokenizer puts in front of text, decided by tokenising (attributes lie)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id:
        return with_special[0]
    return None


def adds_bos(tokenizer: Any) -> bool:
    return bos_id(tokenizer) is not None


def one_bos(ids: list[int], labels: list[int], bos: int | None) -> tuple[list[int], list[int]]:
    """Ids rendered and tokenised without special tokens, with exactly one BOS where the family
    has one (the template may have written it; the BOS is never trained). Two is an error."""
    if bos is None:
        return ids, labels
    if ids[:2] == [bos, bos]:
        raise TunefixError("double-bos: the rendered text starts with BOS and the tokenizer adds another",
                           "Run `tunefix doctor` on the model and template")
    if ids[:1] != [bos]:
        return [bos] + ids, [IGNORE] + labels
    return ids, labels


# ------------------------------------------------------------------------ rendering


def _specials(tokenizer: Any) -> dict[str, str]:
    specials = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    specials.setdefault("bos_token", "")
    specials.setdefault("eos_token", "")
    return specials


def render(tokenizer: Any, template: ChatTemplate | str, messages: Sequence[Message], *,
           add_generation_prompt: bool = False, **variables: Any) -> str:
    """The text the model sees: ``template`` (a record, or bare Jinja as a model carries it)
    rendered in the strict sandbox with ``tokenizer``'s special tokens, as Hugging Face passes them,
    and the record's ``variables`` (``enable_thinking``; ``variables`` here override them).
    An assistant message's ``reasoning`` reaches the template as ``render.template_message`` says."""
    if isinstance(template, str):
        template = ChatTemplate("jinja", template, None, "", ())
    return template.render(messages, add_generation_prompt=add_generation_prompt,
                           **{**_specials(tokenizer), **variables})


# ---------------------------------------------------------------------- end of turn


def end_of_turn_text(tokenizer: Any, jinja: str) -> str | None:
    """The token a Jinja template writes right after an assistant's content (None: no token).

    Rendered on a marked answer; the longest special or added token the rest starts with, so
    ``<|im_end|>`` wins over a shorter token it begins with.
    """
    mark = "\ue000tunefix-answer\ue001"
    text = render(tokenizer, jinja, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}])
    after = text[text.index(mark) + len(mark):].lstrip(" ") if mark in text else ""
    specials = sorted((t for t in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()) if t),
                      key=len, reverse=True)
    return next((token for token in specials if after.startswith(token)), None)


def end_of_turn(template: ChatTemplate, tokenizer: Any) -> str:
    """The token that closes every assistant turn (trained, and a stop token at inference)."""
    return template.bind(tokenizer.eos_token or "").eot


def token_id(tokenizer: Any, text: str | None) -> int | None:
    """The id of ``text`` when it is one token of the vocabulary, else None."""
    if not text:
        return None
    i = tokenizer.convert_tokens_to_ids(text)
    return i if isinstance(i, int) and i != tokenizer.unk_token_id else None


def end_of_turn_id(tokenizer: Any, template: ChatTemplate | None) -> int | None:
    """The end-of-turn id a GGUF names besides EOS: the template's end-of-turn token when it is
    one vocabulary token other than EOS (None for templates that end turns with EOS)."""
    if template is None:
        return None
    i = token_id(tokenizer, end_of_turn(template, tokenizer))
    return None if i == tokenizer.eos_token_id else i


# ---------------------------------------------------------------------------- stops


def stop_tokens(template: ChatTemplate, tokenizer: Any) -> list[str]:
    """Stop strings for Ollama / llama.cpp: the template's, then the tokenizer's EOS."""
    bound = template.bind(tokenizer.eos_token or "")
    extra = [tokenizer.eos_token] if tokenizer.eos_token else []
    return list(dict.fromkeys([s for s in bound.stop if EOS not in s] + extra))


def stop_ids(tokenizer: Any, template: ChatTemplate | None) -> list[int]:
    """The ids that end an answer: the template's end-of-turn token (what training scores last)
    and EOS (alone without a template). Exactly the ids a GGUF's metadata names
    (``eos_token_id``, ``eot_token_id``), so PyTorch and llama.cpp stop at the same token. The
    template's other stop strings (ChatML's ``<|im_start|>``) are guards for Ollama's Modelfile
    only, not where an answer ends."""
    eot = end_of_turn(template, tokenizer) if template is not None else None
    ids = {token_id(tokenizer, eot), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------- prompt


def prompt_ids(tokenizer: Any, template: ChatTemplate | str, messages: Sequence[Message]) -> list[int]:
    """The inference prompt exactly as training tokenises it: rendered with the generation
    prompt, no special tokens added by the tokenizer, one BOS."""
    text = render(tokenizer, template, list(messages), add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return one_bos(ids, [IGNORE] * len(ids), bos_id(tokenizer))[0]
