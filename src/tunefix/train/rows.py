"""The training rows of a run: the config's data standardised, held out, tokenised with
response-only labels (packed when asked), and batched by the collator.

No model is needed here but its tokenizer; ``train()``, ``tunefix eval`` and the demo all
split the data through ``prepare_data``, so they hold out the same rows.
"""

from __future__ import annotations

import logging
import random

from tunefix.errors import TunefixError
from tunefix.train.config import RunConfig

log = logging.getLogger(__name__)
IGNORE = -100


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out split (train, held out); the same config always holds out the same rows."""
    if fraction <= 0:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_rows(cfg: RunConfig):
    """The config's data, standardised (no model needed): a ``tunefix.data.Prepared``."""
    from tunefix.data import prepare

    fmt = cfg.format or ("text" if cfg.method == "cpt" else None)
    return prepare(cfg.data, fmt=fmt, merge=cfg.merge, output=cfg.output, reasoning=cfg.reasoning,
                   system=cfg.system, limit=cfg.limit_rows, seed=cfg.seed)


def prepare_data(cfg: RunConfig, tokenizer, prepared=None):
    """Rows of the config's data: (template, train conversations, eval conversations)."""
    from tunefix.templates import template_for
    from tunefix.templates.select import for_rows

    prepared = prepared if prepared is not None else load_rows(cfg)
    template = None
    if prepared.kind == "chat":
        template = for_rows(tokenizer, template_for(tokenizer, cfg.template), prepared.rows,
                            named=cfg.template is not None)
    train_rows, eval_rows = hold_out(prepared.rows, cfg.eval_fraction, cfg.seed)
    return template, train_rows, eval_rows


def tokenize(cfg: RunConfig, tokenizer, template, rows: list, *, warn: bool = True) -> list[dict]:
    from tunefix.data import pack, tokenize_rows

    out = tokenize_rows(tokenizer, template, rows, max_seq_length=cfg.max_seq_length, turns=cfg.train_turns)
    if out.truncated or out.dropped:
        log.warning("%d rows truncated to %d tokens; %d rows dropped (no trainable token left)",
                    out.truncated, cfg.max_seq_length, out.dropped)
    if not out.rows:
        raise TunefixError("no trainable rows", f"Check {RunConfig.option('max_seq_length')} and the data")
    longest = max(len(r["input_ids"]) for r in out.rows)
    if warn and cfg.max_seq_length > 8 * longest and cfg.max_seq_length > 512:
        # Dynamic padding makes this harmless for unpacked batches, but packs, position
        # tables and any non-dynamic consumer (an exported num_ctx) pay for it.
        log.warning("--max-seq-length %d is far beyond the longest row (%d tokens); lower it to "
                    "save memory", cfg.max_seq_length, longest)
    if cfg.packing:
        return pack(out.rows, cfg.max_seq_length)  # with position_ids and seq_lens per pack
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in out.rows]


class Collator:
    """Dynamic padding to the longest row of the batch; labels padded with -100.

    Packed rows (``seq_lens`` present) get a 4-D block-diagonal causal mask (B, 1, T, T)
    and positions restarting at 0 for every row, so no row attends to its neighbours.
    Measured: transformers' sdpa path ignores restarting ``position_ids`` alone (packed
    logits differ from the rows' own), while an explicit boolean 4-D mask is honoured.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "seq_lens" in rows[0]:
            batch.update(packed_mask(rows, width))
        return batch


def packed_mask(rows: list[dict], width: int) -> dict:
    """Block-diagonal causal attention and per-row positions for packed sequences."""
    import torch

    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    masks, positions = [], torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        segment = torch.full((width,), -1, dtype=torch.long)  # -1: padding, attends nowhere
        start = 0
        for k, n in enumerate(r["seq_lens"]):
            segment[start:start + n] = k
            positions[i, start:start + n] = torch.arange(n)
            start += n
        same = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0)
        masks.append(causal & same)
    mask = torch.stack(masks)[:, None]  # (B, 1, T, T) bool
    # A padding query row with no key at all would give NaN in softmax: let it see itself.
    mask |= torch.eye(width, dtype=torch.bool)[None, None]
    return {"attention_mask": mask, "position_ids": positions}

