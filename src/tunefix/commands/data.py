"""``tunefix data preview`` and ``tunefix templates``: data and templates as the model sees them."""

from __future__ import annotations

from dataclasses import dataclass

from tunefix.commands.build import positional


@dataclass
class PreviewOptions:
    file: str = positional()
    """CSV, TSV, JSON, JSONL, Parquet, save_to_disk directory or cached hub dataset"""
    merge: str | None = None
    """input template over columns, e.g. "{sex}, {age}[[, deck {deck}]]" """
    output: str | None = None
    """the answer: a column name or a template such as {alive}"""
    template: str | None = None
    """chat template: a registry name or a file (default: the model's own)"""
    model: str | None = None
    """model or tokenizer directory (default: the built-in SmolLM2)"""
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


@dataclass
class TemplatesOptions:
    name: str | None = positional(default=None)
    """a registry name or a template file (none: list the registry)"""


def run_preview(opts: PreviewOptions) -> int:
    from tunefix.data.preview import CLOSE, OPEN, marked_text, preview
    from tunefix.data.tokenize import IGNORE
    from tunefix.errors import TunefixError

    if opts.rows < 0:
        raise TunefixError(f"--rows must be at least 0, got {opts.rows}")
    p = preview(opts.file, fmt=opts.format, merge=opts.merge, output=opts.output, system=opts.system,
                turns=opts.turns, template=opts.template, model=opts.model, max_seq_length=opts.max_seq_length)
    print(f"format: {p.format}   template: {p.template.name if p.template else '(raw text)'}   "
          f"rows: {len(p.rows)}   trained part between {OPEN} {CLOSE}")
    for i in range(min(opts.rows, len(p.rows))):
        text, spans = p.rendered(i)
        print(f"--- row {i + 1}")
        print(marked_text(text, spans))
        if i < len(p.done.rows):
            ids = p.done.rows[i]["input_ids"]
            trained = sum(x != IGNORE for x in p.done.rows[i]["labels"])
            print(f"--- {len(ids)} tokens, {trained} trained")
    lengths = [len(r["input_ids"]) for r in p.done.rows]
    longest = max(lengths) if lengths else 0
    print(f"total: {len(p.done.rows)} rows kept, {p.done.truncated} truncated to {opts.max_seq_length}, "
          f"{p.done.dropped} dropped (nothing left to train), longest {longest} tokens")
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
