"""What the model will be trained on, before any training: each row rendered with its
trained part marked, and its token counts (``tunefix data preview`` prints them;
``tunefix.commands.data``)."""

from __future__ import annotations

from dataclasses import dataclass
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



@dataclass
class Preview:
    """The rows as training would see them: ``rows`` (conversations, or texts for raw-text
    data), each one's ``text`` and trained ``spans``, and the tokenised ``done`` rows."""

    format: str
    template: Any  # the ChatTemplate, or None for raw text
    rows: list
    done: Any  # data.tokenize's result: rows, truncated, dropped
    tokenizer: Any

    def rendered(self, i: int) -> tuple[str, list[tuple[int, int]]]:
        from tunefix.data.tokenize import render_with_spans

        row = self.rows[i]
        if isinstance(row, str):
            return row, [(0, len(row))]
        return render_with_spans(self.tokenizer, self.template, row)


def preview(file: str, *, fmt: str | None = None, merge: str | None = None, output: str | None = None,
            system: str | None = None, turns: int = 1, template: str | None = None,
            model: str | None = None, max_seq_length: int = 2048) -> Preview:
    """Load, render and tokenise ``file`` as training does (``model``: its tokenizer, the
    built-in SmolLM2 by default; ``template`` None: the model's own)."""
    import datasets

    from tunefix.data.prepare import prepare
    from tunefix.data.tokenize import tokenize_rows
    from tunefix.templates import template_for

    datasets.disable_progress_bars()  # keep stderr for the one-line errors
    for name, value, least in (("--turns", turns, 1), ("--max-seq-length", max_seq_length, 1)):
        if value < least:
            raise TunefixError(f"{name} must be at least {least}, got {value}")
    # The cheap checks first: the data and the template name, then the tokenizer.
    prepared = prepare(file, fmt=fmt, merge=merge, output=output, system=system, turns=turns)
    if template:
        from tunefix.templates import get_template

        get_template(template)
    tokenizer = load_tokenizer(model)
    chat = template_for(tokenizer, template) if prepared.kind == "chat" else None
    done = tokenize_rows(tokenizer, chat, prepared.rows, max_seq_length=max_seq_length)
    return Preview(prepared.format, chat, prepared.rows, done, tokenizer)
