"""What the model will be trained on, before any training: each row rendered with its
trained part marked, and its token counts (``tunefix data preview`` prints them;
``tunefix.commands.data``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError

OPEN, CLOSE = "⟦", "⟧"  # mark the trained part; visible without colours too
THINK_OPEN, THINK_CLOSE = "⟪", "⟫"  # mark the reasoning, inside or outside the trained part


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


def marked_text(text: str, spans: list[tuple[int, int]], reasoning: list[tuple[int, int]] = ()) -> str:
    """``text`` with every trained span wrapped in ⟦ ⟧ and every reasoning span in ⟪ ⟫."""
    # (position, order, mark): at one position a span closes before the next one opens, and
    # reasoning opens inside the trained span that starts there.
    marks = sorted([(s, 1, OPEN) for s, _ in spans] + [(e, 0, CLOSE) for _, e in spans]
                   + [(s, 2, THINK_OPEN) for s, _ in reasoning] + [(e, -1, THINK_CLOSE) for _, e in reasoning])
    out, pos = [], 0
    for at, _, mark in marks:
        out += [text[pos:at], mark]
        pos = at
    return "".join(out + [text[pos:]])


def reasoning_note(spans: list[tuple[int, int]], reasoning: list[tuple[int, int]], dropped: int) -> str:
    """One line on the reasoning of a sequence: trained or not, dropped by the template ("" if none)."""
    trained = sum(1 for a, b in reasoning if any(s <= a and b <= e for s, e in spans))
    parts = [f"{trained} trained"] if trained else []
    if len(reasoning) > trained:
        parts.append(f"{len(reasoning) - trained} shown, not trained")
    if dropped:
        parts.append(f"{dropped} dropped by the template (not trained)")
    return f"reasoning {THINK_OPEN} {THINK_CLOSE}: " + ", ".join(parts) if parts else ""


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
        """Row ``i``'s first sequence: its text and trained spans."""
        r = self.renderings(i)[0]
        return r.text, r.spans

    def renderings(self, i: int) -> list:
        """Row ``i`` as the sequences training makes of it (several where each assistant turn is
        trained on its own, ``done.history``), each a ``data.tokenize.Rendering``."""
        from tunefix.data.tokenize import Rendering, render_turns, sequences

        row = self.rows[i]
        if isinstance(row, str):
            return [Rendering(row, [(0, len(row))], [])]
        return [render_turns(self.tokenizer, self.template, messages, last_only=last_only)
                for messages, last_only in sequences(row, self.done.history)]

    def history_line(self) -> str:
        """What ``done.history`` means for this data, in a sentence ("" for raw text)."""
        if self.template is None:
            return ""
        return {"whole": "each row is one sequence, every assistant turn trained",
                "per-turn": "each assistant turn is a sequence of its own, its history as the template "
                            "renders it at inference (the template renders earlier turns otherwise: "
                            "reasoning in history)",
                "last": "only each row's last assistant turn is trained"}[self.done.history]


def preview(file: str, *, fmt: str | None = None, merge: str | None = None, output: str | None = None,
            reasoning: str | None = None, system: str | None = None, turns: int = 1,
            template: str | None = None, model: str | None = None, max_seq_length: int = 2048,
            train_turns: str = "auto") -> Preview:
    """Load, render and tokenise ``file`` as training does (``model``: its tokenizer, the
    built-in SmolLM2 by default; ``template`` None: the model's own)."""
    import datasets

    from tunefix.data.prepare import prepare
    from tunefix.data.tokenize import tokenize_rows
    from tunefix.templates import template_for
    from tunefix.templates.select import for_rows

    datasets.disable_progress_bars()  # keep stderr for the one-line errors
    for name, value, least in (("--turns", turns, 1), ("--max-seq-length", max_seq_length, 1)):
        if value < least:
            raise TunefixError(f"{name} must be at least {least}, got {value}")
    # The cheap checks first: the data and the template name, then the tokenizer.
    prepared = prepare(file, fmt=fmt, merge=merge, output=output, reasoning=reasoning, system=system,
                       turns=turns)
    if template:
        from tunefix.templates import get_template

        get_template(template)
    tokenizer = load_tokenizer(model)
    chat = None
    if prepared.kind == "chat":  # in the thinking mode training picks (train.rows.prepare_data)
        chat = for_rows(tokenizer, template_for(tokenizer, template), prepared.rows, named=template is not None)
    done = tokenize_rows(tokenizer, chat, prepared.rows, max_seq_length=max_seq_length, turns=train_turns)
    return Preview(prepared.format, chat, prepared.rows, done, tokenizer)


def preview_preference(file: str, method: str, *, merge: str | None = None, chosen: str | None = None,
                       rejected: str | None = None, output: str | None = None, label: str | None = None,
                       system: str | None = None, template: str | None = None, model: str | None = None,
                       max_seq_length: int = 2048) -> tuple[Any, Any, Any, list, Any]:
    """Preference data (``method`` dpo, orpo, kto or grpo) loaded and tokenised as training does:
    (rows, template, tokenizer, tokenised rows, stats); ``data.preference.shown`` renders a row."""
    import datasets

    from tunefix.data import preference as pref
    datasets.disable_progress_bars()
    if max_seq_length < 1:
        raise TunefixError(f"--max-seq-length must be at least 1, got {max_seq_length}")
    rows = pref.load_preference(file, pref.METHOD_KINDS[method], merge=merge, chosen=chosen, rejected=rejected,
                                output=output, label=label, system=system)
    tokenizer = load_tokenizer(model)
    chat = pref.template_for_rows(tokenizer, rows, template)
    tokenize = {"pairs": pref.tokenize_pairs, "kto": pref.tokenize_kto, "prompts": pref.tokenize_prompts}[rows.kind]
    done, stats = tokenize(tokenizer, chat, rows.rows, max_seq_length)
    return rows, chat, tokenizer, done, stats
