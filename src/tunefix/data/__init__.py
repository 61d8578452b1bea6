"""Data: files in, standardised conversations, token ids with response-only labels.

Public entry points:

- ``prepare(source, fmt=None, merge=None, output=None, system=None, turns=1)`` -> ``Prepared``
- ``tokenize_rows(tokenizer, template, rows, max_seq_length=None)`` -> ``Tokenized``
- ``tokenize_conversation(tokenizer, template, messages)`` -> ``{"input_ids", "labels"}``
- ``pack(rows, max_seq_length)`` -> packed rows with ``position_ids`` and ``seq_lens``
- ``load_table(source)`` -> ``datasets.Dataset``
- ``load_preference(source, kind, ...)`` -> ``PreferenceRows`` (pairs, KTO rows, GRPO prompts) and
  ``tokenize_pairs`` / ``tokenize_kto`` / ``tokenize_prompts`` (``data.preference``)
"""

from tunefix.data.load import load_table
from tunefix.data.preference import (
    PreferenceRows,
    load_preference,
    tokenize_kto,
    tokenize_pairs,
    tokenize_prompts,
)
from tunefix.data.prepare import Prepared, prepare
from tunefix.data.tokenize import (
    IGNORE,
    Tokenized,
    bos_id,
    pack,
    render_with_spans,
    tokenize_conversation,
    tokenize_rows,
    tokenize_text,
)

__all__ = ["IGNORE", "PreferenceRows", "Prepared", "Tokenized", "bos_id", "load_preference", "load_table", "pack",
           "prepare", "tokenize_kto", "tokenize_pairs", "tokenize_prompts",
           "render_with_spans", "tokenize_conversation", "tokenize_rows", "tokenize_text"]
