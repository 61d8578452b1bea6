"""Tokenisation for training: one BOS, end-of-turn after every answer, response-only labels.

Labels are decided on characters, not tokens: the rendered text is known with the exact
character span of every assistant answer plus its end-of-turn token, and a token is trained
when its character offsets overlap such a span. Tokenising the prompt and the answer
separately and concatenating (the common way) breaks wherever BPE would merge across the
boundary; offsets come from the one tokenisation the model will really see.

An answer's reasoning (``reasoning`` on the message, rendered by templates that read it) is
trained with it. Templates that render earlier turns otherwise than the latest (reasoning in
history, ``data.history``) get one sequence per assistant turn, so that each turn is trained
after exactly the prompt the template gives it at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunefix.data.history import prefix_stable
from tunefix.errors import TunefixError
from tunefix.templates import ChatTemplate, render_for
from tunefix.templates.policy import IGNORE, bos_id, one_bos

__all__ = ["HISTORY", "IGNORE", "Rendering", "Tokenized", "bos_id", "history_mode", "pack",
           "render_turns", "render_with_spans", "sequences", "tokenize_conversation", "tokenize_rows",
           "tokenize_text"]
Span = tuple[int, int]
log = logging.getLogger(__name__)


@dataclass
class Tokenized:
    """Token rows plus what happened to them on the way.

    ``history`` says how multi-turn rows became sequences: ``whole`` (one per row, every turn
    trained), ``per-turn`` (one per assistant turn, its history as the template renders it at
    inference, that turn trained) or ``last`` (each row's last turn). ``source[k]`` is the
    index of the row that ``rows[k]`` came from; ``reasoning_dropped`` counts trained turns
    whose reasoning the template does not render.
    """

    rows: list[dict[str, list[int]]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    history: str = "whole"
    source: list[int] = field(default_factory=list)
    reasoning_dropped: int = 0


@dataclass
class Rendering:
    """A sequence's text, its trained spans (answers with their end-of-turn token, reasoning
    included) and the spans of the reasoning the template rendered."""

    text: str
    spans: list[Span]
    reasoning: list[Span]
    reasoning_dropped: int = 0
    prompt_end: int | None = None  # a per-turn sequence: where the inference prompt ends


def _marker(i: int, kind: str = "") -> str:
    return f"\ue000{kind}{i}\ue001"  # private-use characters: never in real text, never trimmed


def _marked(m: dict[str, str], i: int) -> dict[str, str]:
    out = dict(m, content=_marker(i))
    if m.get("reasoning"):
        out["reasoning"] = _marker(i, "r")
    return out


def render_with_spans(tokenizer: Any, template: ChatTemplate,
                      messages: Sequence[dict[str, str]]) -> tuple[str, list[Span]]:
    """The training text of ``messages`` and the character spans that are trained."""
    r = render_turns(tokenizer, template, messages)
    return r.text, r.spans


def render_turns(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict[str, str]], *,
                 last_only: bool = False) -> Rendering:
    """The training text of ``messages``, what is trained, and where the reasoning is.

    Each trained span is an assistant answer plus the end-of-turn token that follows it. Found
    by rendering once with markers in place of the contents, then checking that putting the
    contents back gives exactly the real rendering. ``last_only``: only the last message is
    marked and trained; the history is whatever the template renders (as at inference).
    """
    marks = [len(messages) - 1] if last_only else list(range(len(messages)))
    marked = [_marked(m, i) if i in marks else dict(m) for i, m in enumerate(messages)]
    rendered = render_for(tokenizer, template, marked)
    text, starts, thoughts, pos = [], {}, {}, 0
    for i in marks:
        m = messages[i]
        at = rendered.find(_marker(i, "r"), pos) if m.get("reasoning") else -1
        if at >= 0:  # a template may drop reasoning (counted below); never the content
            text.append(rendered[pos:at])
            thoughts[i] = sum(map(len, text))
            text.append(m["reasoning"])
            pos = at + len(_marker(i, "r"))
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
    spans, prompt_end = [], None
    for i in marks:
        if messages[i]["role"] != "assistant":
            continue
        start = thoughts.get(i, starts[i])
        if i in thoughts or last_only:
            generated = _generation_start(tokenizer, template, messages, i, full, start)
            prompt_end = generated if last_only and generated != start else prompt_end
            start = generated
        spans.append(_answer_span(full, start, starts[i], messages[i]["content"], template.eot))
    reasoning = [(s, s + len(messages[i]["reasoning"])) for i, s in thoughts.items()]
    dropped = sum(1 for i in marks if messages[i].get("reasoning") and i not in thoughts
                  and messages[i]["role"] == "assistant")
    if last_only and messages[-1]["role"] == "assistant" and not thoughts:
        return _after_prompt(tokenizer, template, messages, Rendering(full, spans, [], dropped, prompt_end),
                             starts[len(messages) - 1])
    return Rendering(full, spans, reasoning, dropped, prompt_end)


def _after_prompt(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict[str, str]],
                  r: Rendering, content_start: int) -> Rendering:
    """A last turn the template renders after another text than its inference prompt (Gemma 4:
    the prompt opens an empty thought channel, the answered turn has none) is trained as
    inference sees it: the prompt, then the answer and what follows it."""
    prompt = render_for(tokenizer, template, list(messages[:-1]), add_generation_prompt=True)
    if r.text.startswith(prompt) or not r.spans:
        return r
    shift = len(prompt) - content_start
    (_, end), = r.spans
    return Rendering(prompt + r.text[content_start:], [(len(prompt), end + shift)], [],
                     r.reasoning_dropped, len(prompt))


def _generation_start(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict[str, str]],
                      i: int, text: str, start: int) -> int:
    """Where the model's own text of turn ``i`` begins: right after the inference prompt when
    the text starts with it, so what a template writes between the prompt and the answer
    (Qwen3's ``<think>\n...\n</think>\n\n``, empty without reasoning) is trained too; else
    ``start``."""
    prompt = render_for(tokenizer, template, list(messages[:i]), add_generation_prompt=True)
    return len(prompt) if text.startswith(prompt) and len(prompt) <= start else start


def _answer_span(text: str, start: int, content_start: int, content: str, eot: str) -> Span:
    end = content_start + len(content)
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


def tokenize_conversation(tokenizer: Any, template: ChatTemplate, messages: Sequence[dict[str, str]], *,
                          last_only: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``-100`` outside answers) of one conversation, untruncated
    (``last_only``: only its last turn trained, the history as the template renders it)."""
    return _tokenize(tokenizer, render_turns(tokenizer, template, messages, last_only=last_only))


def _tokenize(tokenizer: Any, r: Rendering) -> dict[str, list[int]]:
    # A per-turn sequence is tokenised as inference sees it: the prompt's own ids, then the
    # turn. One tokenisation of the whole text can merge across that boundary (measured:
    # Qwen3.5's prompt ends "<think>\n" and its turn starts "\n</think>": one "\n\n" token in
    # the row, never in a prompt); then the turn is tokenised alone. Only then: a SentencePiece
    # tokenizer starts a text of its own with "▁" (measured: mistral-v3 on llama-spm trained a
    # stray "▁▁" after "[/INST]" where the whole row has none).
    cut = len(r.text)
    if r.prompt_end is not None:
        whole = tokenizer(r.text, add_special_tokens=False)["input_ids"]
        prompt = tokenizer(r.text[:r.prompt_end], add_special_tokens=False)["input_ids"]
        cut = len(r.text) if whole[:len(prompt)] == prompt else r.prompt_end
    ids, offsets = [], []
    for a, b in ((0, cut), (cut, len(r.text))):
        if a == b:
            continue
        enc = tokenizer(r.text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"]
        offsets += [(x + a, y + a) for x, y in enc["offset_mapping"]]
    labels = _labels(ids, offsets, r.spans)
    ids, labels = one_bos(ids, labels, bos_id(tokenizer))
    return {"input_ids": ids, "labels": labels}


HISTORY = ("auto", "per-turn", "last")


def history_mode(tokenizer: Any, template: ChatTemplate, turns: str = "auto") -> str:
    """How rows become sequences: ``turns`` as asked, ``auto`` deciding by the template: whole
    rows where it is prefix-stable (``data.history``), else one sequence per assistant turn."""
    if turns not in HISTORY:
        raise TunefixError(f"--train-turns must be {', '.join(HISTORY)}, got {turns!r}")
    if turns != "auto":
        return turns
    try:
        return "whole" if prefix_stable(tokenizer, template) else "per-turn"
    except TunefixError as e:  # a template that refuses the probe: the rows will say why, if at all
        log.info("the reasoning-history probe does not render (%s); rows are trained whole", e)
        return "whole"


def sequences(row: Sequence[dict[str, str]], history: str) -> list[tuple[Sequence[dict[str, str]], bool]]:
    """The (messages, last_only) sequences a conversation is trained as under ``history``."""
    turns = [i for i, m in enumerate(row) if m["role"] == "assistant"]
    if history == "whole" or not turns:
        return [(row, False)]
    if history == "last":
        turns = turns[-1:]
    return [(row[:i + 1], True) for i in turns]


def tokenize_text(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """Raw text for continued pretraining: BOS (when the family has one), text, EOS; all trained."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids, labels = one_bos(ids, list(ids), bos_id(tokenizer))
    return {"input_ids": ids, "labels": labels}


def _fit(row: dict[str, list[int]], max_len: int | None, out: Tokenized, source: int) -> None:
    if max_len is not None and len(row["input_ids"]) > max_len:
        row = {k: v[:max_len] for k, v in row.items()}
        out.truncated += 1
    if all(x == IGNORE for x in row["labels"]):
        out.dropped += 1  # nothing left to learn from
        return
    out.rows.append(row)
    out.source.append(source)


def tokenize_rows(tokenizer: Any, template: ChatTemplate | None,
                  rows: Iterable[Sequence[dict[str, str]] | str], *,
                  max_seq_length: int | None = None, turns: str = "auto") -> Tokenized:
    """Tokenise conversations (with ``template``) or raw texts; truncate, drop and count.

    ``turns``: ``auto`` trains every assistant turn in the context the template gives it at
    inference (whole rows, or one sequence per turn for templates that render history
    otherwise, see ``history_mode``), ``per-turn`` always splits, ``last`` trains each row's
    last turn only.
    """
    out = Tokenized()
    if template is not None:
        check_end_of_turn(tokenizer, template.eot)
        out.history = history_mode(tokenizer, template, turns)
    for n, row in enumerate(rows):
        if isinstance(row, str):
            _fit(tokenize_text(tokenizer, row), max_seq_length, out, n)
            continue
        if template is None:
            raise TunefixError("conversations need a chat template", "Pass --template")
        for messages, last_only in sequences(row, out.history):
            r = render_turns(tokenizer, template, messages, last_only=last_only)
            out.reasoning_dropped += r.reasoning_dropped
            _fit(_tokenize(tokenizer, r), max_seq_length, out, n)
    if out.history == "per-turn" and turns == "auto":
        log.info("the chat template %r renders earlier turns otherwise than at inference (reasoning in "
                 "history): each assistant turn is trained as a sequence of its own", template.name)
    if out.reasoning_dropped:
        log.warning("the chat template %r does not render the reasoning of %d trained turns: it is not "
                    "trained", template.name, out.reasoning_dropped)
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
