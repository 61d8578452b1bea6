"""Recognising data formats and standardising rows into one conversation form.

Every format becomes a list of ``{"role", "content"}`` messages (roles ``system``, ``user``,
``assistant``), contents stripped of surrounding whitespace once, here, so that templates
need not trim (Ollama cannot). An assistant message may also carry ``reasoning`` (its
thinking before the answer), read from ``reasoning`` or the spellings datasets and chat
APIs use (``reasoning_content``, ``thinking``); the token policy hands it to templates
under the names they read. Raw text for continued pretraining stays ``{"text": ...}``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tunefix.data.merge import MergeTemplate, default_merge, is_empty, output_template, parse_merge
from tunefix.errors import TunefixError

FORMATS = ("openai", "sharegpt", "alpaca", "prompt-completion", "text", "table")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                   "system": "system"}
_EXPECTED = ("openai (messages: [{role, content}]), sharegpt (conversations: [{from, value}]), "
             "alpaca (instruction, [input], output), prompt-completion (prompt, completion), "
             "text (text), or a table with --merge/--output")

# The keys a message's reasoning is found under, first non-empty wins: ``reasoning`` is
# tunefix's own (and OpenRouter's), ``reasoning_content`` DeepSeek's API and Qwen's templates,
# ``thinking`` Ollama's messages and gpt-oss's template.
REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")

Row = Mapping[str, Any]
Conversation = list[dict[str, str]]


def _first_list(rows: Sequence[Row], column: str) -> list | None:
    for row in rows:
        value = row.get(column)
        if isinstance(value, list) and value:
            return value
    return None


def detect_format(columns: Sequence[str], sample: Sequence[Row]) -> str | None:
    """The format of rows with these columns, or None when nothing matches."""
    cols = set(columns)
    for col in ("messages", "conversations", "conversation"):
        first = _first_list(sample, col) if col in cols else None
        if first and isinstance(first[0], dict):
            if {"role", "content"} <= set(first[0]):
                return "openai"
            if {"from", "value"} <= set(first[0]):
                return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols or {"prompt", "response"} <= cols:
        return "prompt-completion"
    if "text" in cols:
        return "text"
    return None


def _msg(role: str, content: Any, reasoning: Any = None) -> dict[str, str]:
    """A standardised message; ``reasoning`` is kept on assistant messages when not empty."""
    msg = {"role": role, "content": "" if is_empty(content) else str(content).strip()}
    if role == "assistant" and not is_empty(reasoning):
        msg["reasoning"] = str(reasoning).strip()
    return msg


def _reasoning(item: Mapping[str, Any]) -> Any:
    return next((item[k] for k in REASONING_KEYS if not is_empty(item.get(k))), None)


def _from_list(items: Sequence[Mapping[str, Any]], role_key: str, content_key: str,
               roles: Mapping[str, str] | None) -> Conversation:
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise TunefixError(f"a conversation holds {type(item).__name__} {str(item)[:40]!r} where a message "
                               f"({{{role_key}, {content_key}}}) belongs",
                               "Write every message as an object with a role and a content")
        role = str(item.get(role_key, "")).lower()
        role = roles.get(role, role) if roles else role
        if role not in ("system", "user", "assistant"):
            raise TunefixError(f"unknown role {item.get(role_key)!r} in a conversation",
                               "Roles must be system, user or assistant (human/gpt for ShareGPT)")
        out.append(_msg(role, item.get(content_key), _reasoning(item)))
    return out


def _conversation_column(row: Row) -> list:
    for col in ("messages", "conversations", "conversation"):
        if isinstance(row.get(col), list):
            return row[col]
    return []


def _alpaca(row: Row) -> Conversation:
    instruction = "" if is_empty(row.get("instruction")) else str(row["instruction"]).strip()
    extra = row.get("input")
    prompt = instruction if is_empty(extra) else f"{instruction}\n\n{str(extra).strip()}"
    return [_msg("user", prompt), _msg("assistant", row.get("output"))]


def _prompt_completion(row: Row) -> Conversation:
    answer = row.get("completion", row.get("response"))
    return [_msg("user", row.get("prompt")), _msg("assistant", answer)]


def converter(fmt: str, columns: Sequence[str], merge: str | None = None,
              output: str | None = None, reasoning: str | None = None) -> Callable[[Row], Conversation]:
    """A function turning one row of format ``fmt`` into a conversation (``reasoning``: for a
    table, the column or template that becomes the answer's reasoning)."""
    if fmt == "openai":
        return lambda row: _from_list(_conversation_column(row), "role", "content", None)
    if fmt == "sharegpt":
        return lambda row: _from_list(_conversation_column(row), "from", "value", _SHAREGPT_ROLES)
    if fmt == "alpaca":
        return _alpaca
    if fmt == "prompt-completion":
        return _prompt_completion
    if fmt == "table":
        return _table_converter(columns, merge, output, reasoning)
    raise TunefixError(f"unknown data format {fmt!r}", f"Choose one of {', '.join(FORMATS)}")


def _table_converter(columns: Sequence[str], merge: str | None, output: str | None, reasoning: str | None):
    if output is None:
        raise TunefixError("a table needs --output: the column (or {template}) the model should answer",
                           f"Available columns: {', '.join(columns)}")
    out_t: MergeTemplate = output_template(output, columns)
    why_t = output_template(reasoning, columns) if reasoning is not None else None
    if merge is None:
        answer_columns = set(out_t.columns) | set(why_t.columns if why_t else ())
        merge = default_merge([c for c in columns if c not in answer_columns])
    in_t = parse_merge(merge, columns)
    return lambda row: [_msg("user", in_t.fill(row)),
                        _msg("assistant", out_t.fill(row), why_t.fill(row) if why_t else None)]


def with_system(conversation: Conversation, system: str | None) -> Conversation:
    """Prepend ``system`` unless the conversation already starts with a system message."""
    if not system or (conversation and conversation[0]["role"] == "system"):
        return conversation
    return [_msg("system", system)] + conversation


def extend_conversations(conversations: Sequence[Conversation], turns: int,
                         seed: int = 0) -> list[Conversation]:
    """Join ``turns`` random rows into each multi-turn conversation (each row used once).

    Only the first row's system message is kept, so that the result has one system prompt.
    """
    if turns <= 1:
        return list(conversations)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    out = []
    for start in range(0, len(order), turns):
        joined: Conversation = []
        for k, i in enumerate(order[start:start + turns]):
            conv = conversations[i]
            joined += conv if k == 0 else [m for m in conv if m["role"] != "system"]
        out.append(joined)
    return out
