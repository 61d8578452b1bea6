"""``tunefix data preview``: what the model will be trained on, before any training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError

OPEN, CLOSE = "⟦", "⟧"  # mark the trained part; visible without colours too


def load_tokenizer(model: str | None) -> Any:
    """A tokenizer from a model or tokenizer directory; the built-in SmolLM2 by default."""
    from transformers import AutoTokenizer

    from tunefix import assets

    path = Path(model) if model else assets.smollm2()
    if not path.is_dir():
        raise TunefixError(f"{path}: not a model or tokenizer directory", "Give a Hugging Face directory with --model")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a missing or bad tokenizer
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TunefixError(f"{path}: no tokenizer could be loaded ({first[:160]})",
                           "Give a model or tokenizer directory with --model") from e


def marked_text(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with every trained span wrapped in ⟦ ⟧."""
    out, pos = [], 0
    for s, e in spans:
        out += [text[pos:s], OPEN, text[s:e], CLOSE]
        pos = e
    return "".join(out + [text[pos:]])


def run_preview(args: argparse.Namespace) -> int:
    import datasets

    from tunefix.data.prepare import prepare
    from tunefix.data.tokenize import IGNORE, render_with_spans, tokenize_rows
    from tunefix.templates import template_for

    datasets.disable_progress_bars()  # keep stderr for the one-line errors
    for name, value, least in (("--rows", args.rows, 0), ("--turns", args.turns, 1),
                               ("--max-seq-length", args.max_seq_length, 1)):
        if value < least:
            raise TunefixError(f"{name} must be at least {least}, got {value}")
    # The cheap checks first: the data and the template name, then the tokenizer.
    prepared = prepare(args.file, fmt=args.format, merge=args.merge, output=args.output,
                       system=args.system, turns=args.turns)
    if args.template:
        from tunefix.templates import get_template

        get_template(args.template)
    tokenizer = load_tokenizer(args.model)
    template = template_for(tokenizer, args.template) if prepared.kind == "chat" else None
    done = tokenize_rows(tokenizer, template, prepared.rows, max_seq_length=args.max_seq_length)
    print(f"format: {prepared.format}   template: {template.name if template else '(raw text)'}   "
          f"rows: {len(prepared.rows)}   trained part between {OPEN} {CLOSE}")
    for i, row in enumerate(prepared.rows[: args.rows]):
        if isinstance(row, str):
            text, spans = row, [(0, len(row))]
        else:
            text, spans = render_with_spans(tokenizer, template, row)
        print(f"--- row {i + 1}")
        print(marked_text(text, spans))
        if i < len(done.rows):
            ids = done.rows[i]["input_ids"]
            trained = sum(x != IGNORE for x in done.rows[i]["labels"])
            print(f"--- {len(ids)} tokens, {trained} trained")
    lengths = [len(r["input_ids"]) for r in done.rows]
    longest = max(lengths) if lengths else 0
    print(f"total: {len(done.rows)} rows kept, {done.truncated} truncated to {args.max_seq_length}, "
          f"{done.dropped} dropped (nothing left to train), longest {longest} tokens")
    return 0


def run_templates(args: argparse.Namespace) -> int:
    from tunefix.templates import REGISTRY, get_template

    if not args.name:
        width = max(map(len, REGISTRY))
        for name, t in REGISTRY.items():
            print(f"{name:<{width}}  {t.description}")
        return 0
    t = get_template(args.name)
    print(f"name: {t.name}\nend of turn: {t.eot}\nstop: {', '.join(t.stop)}")
    print(f"default system: {t.default_system or '(none)'}\nwrites BOS: {'yes' if t.bos else 'no'}")
    print(f"--- Jinja (Hugging Face chat_template)\n{t.jinja}")
    print(f"--- Ollama TEMPLATE (Go)\n{t.ollama or '(none)'}")
    return 0
