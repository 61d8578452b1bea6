"""Tokenisation for training: one BOS, end-of-turn after every answer, response-only labels.

Labels are decided on characters, not tokens: the rendered text is known with the exact
character span of every assistant answer plus its end-of-turn token, and a token is trained
when its character offsets overlap such a span. Tokenising the prompt and the answer
separately and concatenating (the common way) breaks wherever BPE would merge across the
boundary; offsets come from the one tokenisation the model will really see.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunefix.errors import TunefixError
from tunefix.templates import ChatTemplate, render_for
from tunefix.templates.policy import IGNORE, bos_id, one_bos

__all__ = ["IGNORE", "Tokenized", "bos_id", "pack", "render_with_spans", "tokenize_conversation",
           "tokenize_rows", "tokenize_text"]
Span = tuple[int, int]


@dataclass
class Tokenized:
    """Token rows plus what happened to them on the way."""

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in real text, never trimmed


def render_with_spans(tokenizer: Any, template: ChatTemplate,
                      messages: Sequence[dict[str, str]]) -> tuple[str, list[Span]]:
    """The training text of ``messages`` and the character spans that are trained.

    Each span is an assistant answer plus the end-of-turn token that follows it. Found by
    rendering once with markers in place of the contents, then checking that putting the
    contents back gives exactly the real rendering.
    """
    marked = [dict(m, content=_marker(i)) for i, m in enumerate(messages)]
    rendered = render_for(tokenizer, template, marked)
    text, starts, pos = [], {}, 0
    for i, m in enumerate(messages):
        at = rendered.find(_marker(i), pos)
        if at < 0:
            raise TunefixError(f"the chat template {template.name!r} drops the {m['role']} message "
                               f"#{i + 1} (or moves it)", "Choose another --template or remove that message")
        text.append(rendered[pos:at])
        starts[i] = sum(map(len, text))
        text.append(m["content"])
        pos = at + len(_marker(i))
    text.append(rendered[pos:])
    full = "".join(text)
    if full != render_for(tokenizer, template, messages):
        raise TunefixError(f"the chat template {template.name!r} changes message contents (e.g. trims)",
                           "Choose another --template")
    return full, [_answer_span(full, starts[i], m["content"], template.eot)
                  for i, m in enumerate(messages) if m["role"] == "assistant"]


def _answer_span(text: str, start: int, content: str, eot: str) -> Span:
    end = start + len(content)
    at = text.find(eot, end)
    if at < 0 or text[end:at].strip():
        raise TunefixError(f"the chat template does not end an assistant turn with {eot!r}",
                           "The model would never learn to stop: choose another --template")
    return start, at + len(eot)


def check_end_of_turn(tokenizer: Any, eot: str) -> int:
    """The id of ``eot``; an error when the tokenizer would split it into pieces."""
    ids = tokenizer(eot, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TunefixError(f"the end-of-turn token {eot!r} is not a single token of this tokenizer "
                           f"({len(ids)} pieces)", "Choose a template made for this model's family")
    return ids[0]


def _labels(ids: list[int], offsets: list[Span], spans: list[Span]) -> list[int]:
    out = []
    for tok, (a, b) in zip(ids, offsets, strict=True):
        trained = b > a and any(a < e and b > s for s, e in spans)
        out.append(tok if trained else IGNORE)
    return out


def tokenize_conversation(tokenizer: Any, template: ChatTemplate,
                          messages: Sequence[dict[str, str]]) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``-100`` outside answers) of one conversation, untruncated."""
    text, spans = render_with_spans(tokenizer, template, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = _labels(ids, [tuple(o) for o in enc["offset_mapping"]], spans)
    ids, labels = one_bos(ids, labels, bos_id(tokenizer))
    return {"input_ids": ids, "labels": labels}


def tokenize_text(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """Raw text for continued pretraining: BOS (when the family has one), text, EOS; all trained."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids, labels = one_bos(ids, list(ids), bos_id(tokenizer))
    return {"input_ids": ids, "labels": labels}


def _fit(row: dict[str, list[int]], max_len: int | None, out: Tokenized) -> None:
    if max_len is not None and len(row["input_ids"]) > max_len:
        row = {k: v[:max_len] for k, v in row.items()}
        out.truncated += 1
    if all(x == IGNORE for x in row["labels"]):
        out.dropped += 1  # nothing left to learn from
        return
    out.rows.append(row)


def tokenize_rows(tokenizer: Any, template: ChatTemplate | None,
                  rows: Iterable[Sequence[dict[str, str]] | str], *,
                  max_seq_length: int | None = None) -> Tokenized:
    """Tokenise conversations (with ``template``) or raw texts; truncate, drop and count."""
    out = Tokenized()
    if template is not None:
        check_end_of_turn(tokenizer, template.eot)
    for row in rows:
        if isinstance(row, str):
            one = tokenize_text(tokenizer, row)
        else:
            if template is None:
                raise TunefixError("conversations need a chat template", "Pass --template")
            one = tokenize_conversation(tokenizer, template, row)
        _fit(one, max_seq_length, out)
    return out


def pack(rows: Sequence[dict[str, list[int]]], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Pack rows into sequences of at most ``max_seq_length`` tokens without mixing them.

    Each packed sequence carries ``position_ids`` restarting at 0 for every row (attention
    implementations that honour them, e.g. flash-attention varlen or transformers'
    ``DataCollatorWithFlattening`` path, then keep rows apart) and ``seq_lens``; the first
    label of every row is ignored so that no row is trained to follow its neighbour.
    A row is never split across two sequences.
    """
    packs: list[dict[str, list[int]]] = []
    cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for row in rows:
        n = len(row["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_seq_length:
            packs.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        cur["input_ids"] += row["input_ids"]
        cur["labels"] += [IGNORE] + row["labels"][1:]
        cur["position_ids"] += list(range(n))
        cur["seq_lens"].append(n)
    if cur["input_ids"]:
        packs.append(cur)
    return packs
