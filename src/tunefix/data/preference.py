"""Preference data: pairs (DPO, ORPO), KTO rows and GRPO prompts, through the one token policy.

Preference trainers tokenise the prompt and the answer separately and let the collator join
them (TRL: ``prompt_ids + chosen_ids``, the completion mask over the second part). That seam
is where BOS doubles or the end-of-turn token goes missing, so tunefix hands TRL token ids it
made itself: ``prompt_ids`` are exactly the inference prompt (``policy.prompt_ids``: one BOS,
the generation prompt) and ``completion_ids`` exactly the tokens SFT scores for that answer
(``data.tokenize``'s labels: the answer and the template's end-of-turn token, nothing after
it). The tests join them with TRL's own collators and compare with tunefix's tokenisation of
the whole conversation, on every tiny family.

Loading accepts TRL's dataset layouts (an explicit ``prompt``; or, for pairs, ``chosen`` and
``rejected`` as whole conversations sharing their prompt), text or messages, and tables with
SFT's column merge (``{column}``, ``[[optional]]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunefix.data.formats import _from_list, with_system
from tunefix.data.load import load_table
from tunefix.data.merge import MergeTemplate, default_merge, is_empty, output_template, parse_merge
from tunefix.data.tokenize import _tokenize, check_end_of_turn, render_turns
from tunefix.errors import TunefixError
from tunefix.templates import policy

__all__ = ["KINDS", "METHOD_KINDS", "PreferenceRows", "PreferenceStats", "load_preference", "shown", "template_for_rows",
           "tokenize_answer", "tokenize_kto", "tokenize_pairs", "tokenize_prompts"]

KINDS = ("pairs", "kto", "prompts")
METHOD_KINDS = {"dpo": "pairs", "orpo": "pairs", "kto": "kto", "grpo": "prompts"}
# The answer columns of each kind, by their default names (TRL's).
_ANSWERS = {"pairs": ("chosen", "rejected"), "kto": ("completion",), "prompts": ()}
_TRUE = {"true", "1", "yes", "desirable", "good", "1.0"}
_FALSE = {"false", "0", "no", "undesirable", "bad", "0.0"}

Message = dict[str, str]


@dataclass
class PreferenceRows:
    """Standardised rows of one ``kind``.

    pairs: ``{"prompt": [messages], "chosen": message, "rejected": message}``; kto:
    ``{"prompt", "completion", "label": bool}``; prompts: ``{"prompt", **other columns}`` (the
    other columns go to the reward functions). ``text``: every prompt and answer was a plain
    string (no messages, no table, no system prompt), kept as written so that a base model
    without a chat template can train on ``prompt + answer`` verbatim (TRL's text convention);
    with a chat template they are stripped like SFT's contents.
    """

    kind: str
    rows: list[dict[str, Any]]
    columns: list[str]
    text: bool

    def conversations(self) -> list[list[Message]]:
        """Every answer with its prompt: what ``templates.select.for_rows`` picks the thinking
        mode from (one template for chosen and rejected alike)."""
        names = _ANSWERS[self.kind]
        return [row["prompt"] + [row[name]] for row in self.rows for name in names] or \
            [row["prompt"] for row in self.rows]


@dataclass
class PreferenceStats:
    """What tokenising did: rows ``truncated`` (an answer cut at its end), ``dropped`` (the
    prompt alone fills ``max_seq_length``) and ``source[k]``, the row ``rows[k]`` came from."""

    truncated: int = 0
    dropped: int = 0
    source: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------- loading


def load_preference(source: str | Path, kind: str, *, merge: str | None = None, chosen: str | None = None,
                    rejected: str | None = None, output: str | None = None, label: str | None = None,
                    system: str | None = None, limit: int | None = None) -> PreferenceRows:
    """Load ``source`` as ``kind`` rows ("pairs", "kto" or "prompts").

    A table is read when ``merge`` or an answer (``chosen``/``rejected`` for pairs, ``output``
    for KTO: a column or a ``{template}``) is given; otherwise rows carry ``prompt`` and the
    answers under TRL's names. ``label``: KTO's label column (default ``label``).
    """
    answers = _answer_specs(kind, chosen, rejected, output)
    ds = load_table(source)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    columns = list(ds.column_names)
    table = merge is not None or any(v is not None for v in (chosen, rejected, output))
    read = _table_reader(columns, merge, answers, label) if table else _json_reader(columns, kind, label)
    rows, plain = [], not table and not system
    for n, raw in enumerate(ds, 1):
        prompt, values, flag = read(raw)
        plain = plain and isinstance(prompt, str) and all(isinstance(v, str) for v in values.values())
        row = _standard(kind, prompt, values, n, system)
        if kind == "kto":
            row["label"] = _label(flag, n)
        elif kind == "prompts":
            row = {**{c: raw[c] for c in columns if c != "prompt"}, **row}
        rows.append(row)
    if not rows:
        raise TunefixError(f"{source}: no rows", "Give a file with at least one row")
    return PreferenceRows(kind, rows, columns, plain)


def _answer_specs(kind: str, chosen: str | None, rejected: str | None, output: str | None) -> dict[str, str | None]:
    """The answer name -> column or template given; options that do not apply are refused."""
    if kind not in KINDS:
        raise TunefixError(f"unknown preference data kind {kind!r}", f"Choose one of {', '.join(KINDS)}")
    given = {"chosen": chosen, "rejected": rejected, "completion": output}
    for name, value in given.items():
        if value is not None and name not in _ANSWERS[kind]:
            option = "--output" if name == "completion" else f"--{name}"
            raise TunefixError(f"{option} does not apply to {kind} data",
                               {"pairs": "Pairs take --chosen and --rejected", "kto": "KTO rows take --output",
                                "prompts": "GRPO prompts take --merge only (other columns reach the rewards)"}[kind])
    return {name: given[name] for name in _ANSWERS[kind]}


def _json_reader(columns: Sequence[str], kind: str, label: str | None):
    """Rows with TRL's columns: ``prompt`` (absent: pairs whose answers are whole conversations)
    and the answers; a missing one is an error listing the columns."""
    needed = list(_ANSWERS[kind]) + ([label or "label"] if kind == "kto" else [])
    if "prompt" not in columns and kind != "pairs":
        needed.insert(0, "prompt")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise TunefixError(f"{kind} data needs a {missing[0]!r} column (columns: {', '.join(columns)})",
                           "Rename the column, or map a table with --merge and "
                           + {"pairs": "--chosen/--rejected", "kto": "--output/--label", "prompts": "--merge"}[kind])
    flag = label or "label"
    return lambda row: (row.get("prompt"), {n: row[n] for n in _ANSWERS[kind]}, row.get(flag))


def _table_reader(columns: Sequence[str], merge: str | None, answers: Mapping[str, str | None],
                  label: str | None):
    """Rows of a table: the prompt is ``merge`` over the columns (default: every column not used
    by an answer or the label, as SFT's default merge), each answer a column or ``{template}``."""
    outs: dict[str, MergeTemplate] = {n: output_template(spec or n, columns) for n, spec in answers.items()}
    used = {c for t in outs.values() for c in t.columns} | ({label} if label else set())
    if label is not None and label not in columns:
        raise TunefixError(f"unknown label column {label!r}", f"Available columns: {', '.join(columns)}")
    in_t = parse_merge(merge or default_merge([c for c in columns if c not in used]), columns)
    flag = label or "label"
    return lambda row: (in_t.fill(row), {n: t.fill(row) for n, t in outs.items()}, row.get(flag))


def _standard(kind: str, prompt: Any, values: Mapping[str, Any], n: int, system: str | None) -> dict[str, Any]:
    """One row as messages: the prompt (plus any turns an answer list carries before its last
    message, the same for every answer) and each answer as one assistant message."""
    before: list[Message] | None = None
    row: dict[str, Any] = {}
    for name, value in values.items():
        history, answer = _answer(value, n, name)
        if before is not None and history != before:
            raise TunefixError(f"row {n}: the chosen and rejected conversations differ before their last message",
                               "Give both the same prompt (or put it in a 'prompt' column)")
        before, row[name] = history, answer
    messages = ([] if prompt is None else _messages(prompt, n, "prompt")) + (before or [])
    if not any(m["role"] == "user" and not is_empty(m["content"]) for m in messages):
        raise TunefixError(f"row {n}: the prompt is empty", "Every row needs a prompt (a user message)")
    return {"prompt": with_system(messages, system), **row}


def _messages(value: Any, n: int, what: str) -> list[Message]:
    """Text (a user message, kept as written) or a list of messages (stripped, as in SFT)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and value:
        return _from_list(value, "role", "content", None)
    raise TunefixError(f"row {n}: the {what} is {type(value).__name__ if value is not None else 'missing'}, "
                       "not text or a list of messages", "Write text, or [{role, content}, ...]")


def _answer(value: Any, n: int, name: str) -> tuple[list[Message], Message]:
    """An answer: text, one assistant message, or a conversation whose last message it is."""
    if isinstance(value, str):
        answer, history = {"role": "assistant", "content": value}, []
    elif is_empty(value) or (isinstance(value, list) and not value):
        answer, history = {"role": "assistant", "content": ""}, []
    else:
        *history, answer = _messages(value, n, name)
    if answer["role"] != "assistant":
        raise TunefixError(f"row {n}: the {name} conversation ends with a {answer['role']} message",
                           "End it with the assistant's answer")
    if is_empty(answer["content"]):
        raise TunefixError(f"row {n}: the {name} answer is empty",
                           "Every answer needs text: fix the row or remove it")
    return history, answer


def _label(value: Any, n: int) -> bool:
    """KTO's desirable (True) or undesirable (False), from a bool, 0/1 or a word."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if value is not None else ""
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise TunefixError(f"row {n}: the label {value!r} is not desirable or undesirable",
                       "Write true/false, 1/0 or desirable/undesirable")


# ------------------------------------------------------------------------- tokenising


def template_for_rows(tokenizer: Any, rows: PreferenceRows, name: str | None = None) -> Any:
    """The chat template the rows train with, None for text: text rows with no template named
    and a tokenizer without one (a base model) train as ``prompt + answer + EOS``. Otherwise
    ``name`` or the model's own, in the thinking mode every answer together calls for (chosen
    and rejected with one template)."""
    from tunefix.templates import template_for
    from tunefix.templates.select import for_rows

    if rows.text and name is None and not getattr(tokenizer, "chat_template", None):
        return None
    return for_rows(tokenizer, template_for(tokenizer, name), rows.conversations(), named=name is not None)


def _chat(messages: Sequence[Message]) -> list[Message]:
    """Contents stripped once, as SFT's formats do (text rows were kept as written)."""
    return [dict(m, content=m["content"].strip()) for m in messages]


def tokenize_answer(tokenizer: Any, template: Any, prompt: Sequence[Message], answer: Message) -> dict[str, list[int]]:
    """``prompt_ids`` (the inference prompt, one BOS) and ``completion_ids`` (the answer's scored
    tokens: everything after the prompt up to and including the end-of-turn token).

    The text after the prompt is tokenised alone, as the model generates it after the prompt
    (``data.tokenize._tokenize``'s per-turn cut, applied to every answer here). Tokens after the
    end of turn (ChatML's newline) are not scored in SFT and are left out: TRL's collator
    scores every completion token. ``template`` None: text rows, ``prompt + answer + EOS``.
    """
    if template is None:
        return _text_answer(tokenizer, prompt, answer)
    prompt, answer = _chat(prompt), _chat([answer])[0]
    prompt_ids = policy.prompt_ids(tokenizer, template, prompt)
    r = render_turns(tokenizer, template, [*prompt, answer], last_only=True)
    enc = _tokenize(tokenizer, replace(r, prompt_end=None))
    if enc["input_ids"][:len(prompt_ids)] != prompt_ids:  # tokens merge across the seam
        enc = _tokenize(tokenizer, replace(r, prompt_end=_prompt_end(tokenizer, template, prompt, r)))
    ids, labels, n = enc["input_ids"], enc["labels"], len(prompt_ids)
    scored = [k for k, t in enumerate(labels) if t != policy.IGNORE]
    if ids[:n] != prompt_ids or not scored or scored[0] != n or len(scored) != scored[-1] - n + 1:
        raise TunefixError(f"the chat template {template.name!r} puts unscored tokens between the prompt "
                           "and the end of the answer", "Choose another --template")
    return {"prompt_ids": prompt_ids, "completion_ids": ids[n:scored[-1] + 1]}


def _prompt_end(tokenizer: Any, template: Any, prompt: Sequence[Message], r: Any) -> int:
    """Where the inference prompt ends in the rendered conversation ``r``."""
    if r.prompt_end is not None:
        return r.prompt_end
    start = policy.render(tokenizer, template, prompt, add_generation_prompt=True)
    if not r.text.startswith(start):
        raise TunefixError(f"the chat template {template.name!r} renders an answered turn without its "
                           "inference prompt in front", "Choose another --template")
    return len(start)


def _text_answer(tokenizer: Any, prompt: Sequence[Message], answer: Message) -> dict[str, list[int]]:
    """A text row: the prompt as written (one BOS), the answer tokenised alone, then EOS."""
    if len(prompt) != 1:
        raise TunefixError("conversations need a chat template", "Pass --template")
    encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    ids = encode(prompt[0]["content"])
    prompt_ids = policy.one_bos(ids, ids, policy.bos_id(tokenizer))[0]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return {"prompt_ids": prompt_ids, "completion_ids": encode(answer["content"]) + eos}


def _fit(prompt: list[int], answer: list[int], max_len: int | None) -> list[int] | None:
    """The answer cut to fit after the prompt; None when the prompt alone fills ``max_len``.

    The start is kept (as SFT truncates, and TRL's default ``keep_start``): the prompt stays
    the one inference sends; cutting its start instead would train after a prompt without its
    BOS and system turn, which no user ever sends.
    """
    if max_len is None:
        return answer
    if len(prompt) >= max_len:
        return None
    return answer[:max_len - len(prompt)]


def _check(tokenizer: Any, template: Any) -> None:
    if template is not None:
        check_end_of_turn(tokenizer, template.eot)


def tokenize_pairs(tokenizer: Any, template: Any, rows: Sequence[Mapping[str, Any]],
                   max_seq_length: int | None = None) -> tuple[list[dict[str, list[int]]], PreferenceStats]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` rows for TRL's ``DataCollatorForPreference``."""
    _check(tokenizer, template)
    out, stats = [], PreferenceStats()
    for k, row in enumerate(rows):
        chosen = tokenize_answer(tokenizer, template, row["prompt"], row["chosen"])
        rejected = tokenize_answer(tokenizer, template, row["prompt"], row["rejected"])["completion_ids"]
        prompt, chosen = chosen["prompt_ids"], chosen["completion_ids"]
        fitted = [_fit(prompt, a, max_seq_length) for a in (chosen, rejected)]
        if fitted[0] is None:
            stats.dropped += 1
            continue
        stats.truncated += fitted != [chosen, rejected]
        out.append({"prompt_ids": prompt, "chosen_ids": fitted[0], "rejected_ids": fitted[1]})
        stats.source.append(k)
    return out, stats


def tokenize_kto(tokenizer: Any, template: Any, rows: Sequence[Mapping[str, Any]],
                 max_seq_length: int | None = None) -> tuple[list[dict[str, Any]], PreferenceStats]:
    """``{"prompt_ids", "completion_ids", "label"}`` rows for TRL's ``DataCollatorForUnpairedPreference``
    (TRL's ``KTOTrainer._prepare_dataset`` adds ``KL_completion_ids`` from these)."""
    _check(tokenizer, template)
    out, stats = [], PreferenceStats()
    for k, row in enumerate(rows):
        enc = tokenize_answer(tokenizer, template, row["prompt"], row["completion"])
        completion = _fit(enc["prompt_ids"], enc["completion_ids"], max_seq_length)
        if completion is None:
            stats.dropped += 1
            continue
        stats.truncated += completion != enc["completion_ids"]
        out.append({"prompt_ids": enc["prompt_ids"], "completion_ids": completion, "label": bool(row["label"])})
        stats.source.append(k)
    return out, stats


def tokenize_prompts(tokenizer: Any, template: Any, rows: Sequence[Mapping[str, Any]],
                     max_seq_length: int | None = None) -> tuple[list[dict[str, Any]], PreferenceStats]:
    """``{"prompt_ids", "prompt", **other columns}`` rows for GRPO (the inference prompt; the
    other columns go to the rewards); a prompt that leaves no room to answer is dropped."""
    _check(tokenizer, template)
    out, stats = [], PreferenceStats()
    for k, row in enumerate(rows):
        if template is None:
            ids = _text_answer(tokenizer, row["prompt"], {"role": "assistant", "content": ""})["prompt_ids"]
        else:
            ids = policy.prompt_ids(tokenizer, template, _chat(row["prompt"]))
        if _fit(ids, [], max_seq_length) is None:
            stats.dropped += 1
            continue
        out.append({**row, "prompt_ids": ids})
        stats.source.append(k)
    return out, stats


# ---------------------------------------------------------------------------- preview


def shown(tokenizer: Any, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> tuple[str, tuple[int, int]]:
    """The text of a tokenised row and the character span of its scored part, decoded from the
    ids the trainer gets (so what is shown is what is trained, special tokens included)."""
    decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False,  # noqa: E731
                                          clean_up_tokenization_spaces=False)
    whole, prompt = decode([*prompt_ids, *completion_ids]), decode(prompt_ids)
    if not whole.startswith(prompt):  # SentencePiece decodes a piece differently alone
        whole = prompt + decode(completion_ids)
    return whole, (len(prompt), len(whole))
