"""``tunefix data preview`` and ``tunefix templates``: data and templates as the model sees them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunefix.commands.build import positional


@dataclass
class PreviewOptions:
    file: str = positional()
    """CSV, TSV, JSON, JSONL, Parquet, save_to_disk directory or cached hub dataset"""
    merge: str | None = None
    """input template over columns, e.g. "{sex}, {age}[[, deck {deck}]]" """
    output: str | None = None
    """the answer: a column name or a template such as {alive}"""
    reasoning: str | None = None
    """the answer's reasoning (thinking before it): a column name or a template such as {why}"""
    template: str | None = None
    """chat template: a registry name or a file (default: the model's own)"""
    model: str | None = None
    """model or tokenizer directory (default: the built-in SmolLM2)"""
    train_turns: Literal["auto", "per-turn", "last"] = "auto"
    """auto (every assistant turn, each in the context the template gives it at inference), per-turn
    (one sequence per assistant turn) or last (only each row's last turn)"""
    rows: int = 3
    """rows to show"""
    format: str | None = None
    """openai, sharegpt, alpaca, prompt-completion, text or table (default: detect)"""
    system: str | None = None
    """system prompt added to every conversation"""
    turns: int = 1
    """join N random rows into one conversation"""
    max_seq_length: int = 2048
    """truncate rows to this many tokens"""
    method: Literal["sft", "cpt", "dpo", "orpo", "kto", "grpo"] = "sft"
    """the training method the data is for: dpo/orpo show chosen and rejected, kto the labelled
    completion, grpo the prompt"""
    chosen: str | None = None
    """dpo/orpo tables: the chosen answer, a column name or a template such as {good}"""
    rejected: str | None = None
    """dpo/orpo tables: the rejected answer, a column name or a template such as {bad}"""
    label: str | None = None
    """kto: the column saying whether a completion is desirable (default: label)"""


@dataclass
class TemplatesOptions:
    name: str | None = positional(default=None)
    """a registry name or a template file (none: list the registry)"""


def run_preview(opts: PreviewOptions) -> int:
    from tunefix.data.preview import (
        CLOSE,
        OPEN,
        THINK_CLOSE,
        THINK_OPEN,
        marked_text,
        preview,
        reasoning_note,
    )
    from tunefix.data.tokenize import IGNORE
    from tunefix.errors import TunefixError

    if opts.rows < 0:
        raise TunefixError(f"--rows must be at least 0, got {opts.rows}")
    if opts.method in ("dpo", "orpo", "kto", "grpo"):
        return _run_preference_preview(opts)
    p = preview(opts.file, fmt=opts.format, merge=opts.merge, output=opts.output, reasoning=opts.reasoning,
                system=opts.system, turns=opts.turns, template=opts.template, model=opts.model,
                max_seq_length=opts.max_seq_length, train_turns=opts.train_turns)
    print(f"format: {p.format}   template: {p.template.name if p.template else '(raw text)'}   "
          f"rows: {len(p.rows)}   trained part between {OPEN} {CLOSE}, reasoning between {THINK_OPEN} {THINK_CLOSE}")
    if p.history_line():
        print(f"turns: {p.history_line()}")
    for i in range(min(opts.rows, len(p.rows))):
        kept = [p.done.rows[k] for k, n in enumerate(p.done.source) if n == i]
        renderings = p.renderings(i)
        for j, r in enumerate(renderings):
            print(f"--- row {i + 1}" + (f", sequence {j + 1} of {len(renderings)}" if len(renderings) > 1 else ""))
            print(marked_text(r.text, r.spans, r.reasoning))
            note = reasoning_note(r.spans, r.reasoning, r.reasoning_dropped)
            if note:
                print(f"--- {note}")
            # Each sequence's counts under it (a dropped sequence leaves them unpaired: all at the end).
            if len(kept) == len(renderings) or j == len(renderings) - 1:
                for row in kept[j:j + 1] if len(kept) == len(renderings) else kept:
                    trained = sum(x != IGNORE for x in row["labels"])
                    print(f"--- {len(row['input_ids'])} tokens, {trained} trained")
    lengths = [len(r["input_ids"]) for r in p.done.rows]
    longest = max(lengths) if lengths else 0
    kept = "rows" if p.done.history == "whole" else f"sequences (from {len(p.rows)} rows)"
    print(f"total: {len(p.done.rows)} {kept} kept, {p.done.truncated} truncated to {opts.max_seq_length}, "
          f"{p.done.dropped} dropped (nothing left to train), longest {longest} tokens")
    return 0


def _run_preference_preview(opts: PreviewOptions) -> int:
    """Chosen and rejected (KTO: the completion; GRPO: the prompt) as the trainer gets them."""
    from tunefix.data.preference import shown
    from tunefix.data.preview import CLOSE, OPEN, marked_text, preview_preference

    rows, chat, tok, done, stats = preview_preference(
        opts.file, opts.method, merge=opts.merge, chosen=opts.chosen, rejected=opts.rejected, output=opts.output,
        label=opts.label, system=opts.system, template=opts.template, model=opts.model,
        max_seq_length=opts.max_seq_length)
    print(f"method: {opts.method}   template: {chat.name if chat else '(raw text)'}   rows: {len(rows.rows)}   "
          f"trained part between {OPEN} {CLOSE}")
    answers = {"pairs": ("chosen", "rejected"), "kto": ("completion",), "prompts": ("prompt",)}[rows.kind]
    for row, source in list(zip(done, stats.source, strict=True))[:opts.rows]:
        for name in answers:
            ids = row.get(f"{name}_ids", row.get("completion_ids", [])) if name != "prompt" else []
            text, span = shown(tok, row["prompt_ids"], ids)
            label = f", label {'desirable' if row['label'] else 'undesirable'}" if "label" in row else ""
            print(f"--- row {source + 1}, {name}{label}: {len(row['prompt_ids']) + len(ids)} tokens, {len(ids)} trained")
            print(marked_text(text, [span] if ids else []))
    print(f"total: {len(done)} rows kept, {stats.truncated} truncated to {opts.max_seq_length}, "
          f"{stats.dropped} dropped (the prompt alone fills it)")
    return 0


def run_templates(opts: TemplatesOptions) -> int:
    from tunefix.templates import REGISTRY, get_template

    if not opts.name:
        width = max(map(len, REGISTRY))
        for name, t in REGISTRY.items():
            print(f"{name:<{width}}  {t.description}")
        return 0
    t = get_template(opts.name)
    print(f"name: {t.name}\nend of turn: {t.eot}\nstop: {', '.join(t.stop)}")
    print(f"default system: {t.default_system or '(none)'}\nwrites BOS: {'yes' if t.bos else 'no'}")
    print(f"--- Jinja (Hugging Face chat_template)\n{t.jinja}")
    print(f"--- Ollama TEMPLATE (Go)\n{t.ollama or '(none)'}")
    return 0
