"""The token policy: BOS, the inference prompt and the stop ids, decided here and nowhere else.

Hugging Face's own paths disagree about BOS (``apply_chat_template(tokenize=True)`` adds no
special tokens, ``tokenizer(text)`` adds BOS), and a tokenizer's ``add_bos_token`` attribute
can say False while its post-processor adds BOS (measured, design.md). So BOS is decided by
tokenising, and every path (training rows, evaluation and chat prompts, the doctor, the GGUF
metadata) asks this module. Rendering goes through ``render_for`` (Jinja's immutable sandbox).

Still computed elsewhere (issue 17's next slice): verification's prompt ids and stop set
(``export/verify.py``), the GGUF end-of-turn id (``export/gguf_meta.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunefix.errors import TunefixError

IGNORE = -100  # label of a token that is not trained


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


def prompt_ids(tokenizer: Any, template, messages: Sequence[dict[str, str]]) -> list[int]:
    """The inference prompt exactly as training tokenises it: rendered with the generation
    prompt, no special tokens added by the tokenizer, one BOS."""
    from tunefix.templates.select import render_for

    text = render_for(tokenizer, template, list(messages), add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return one_bos(ids, [IGNORE] * len(ids), bos_id(tokenizer))[0]


def stop_ids(tokenizer: Any, template) -> list[int]:
    """The ids generation stops on: the template's end-of-turn and stop tokens, and EOS."""
    from tunefix.templates.select import stop_tokens

    ids = {tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(template, tokenizer)}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)
