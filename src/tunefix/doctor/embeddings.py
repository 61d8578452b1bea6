"""Checks on the weights the doctor reads: untrained rows, NaN/Inf."""

from __future__ import annotations

from tunefix.doctor.probe import Probe, special_names_among, token_names
from tunefix.doctor.report import Finding


def untrained_tokens(p: Probe) -> Finding | None:
    if not p.untrained:
        return None
    ids = p.untrained_ids
    tok = p.s.tokenizer
    evidence = {
        "count": len(ids),
        "by_matrix": {f"{u.matrix} ({u.kind})": len(u.ids) for u in p.untrained},
        "median_row_norm": round(p.untrained[0].median_norm, 4),
        "special_tokens": special_names_among(tok, ids),
        "first_ids": sorted(ids)[:8],
    }
    return Finding("untrained-tokens", "warning",
                   f"{len(ids)} embedding rows were never trained (zero or identical rows); "
                   "a training row that uses one gives NaN or garbage gradients",
                   evidence,
                   fix="set each untrained row to the mean of the trained rows (embed_tokens and lm_head)",
                   fixer="fix_untrained_tokens")


def template_untrained_token(p: Probe) -> Finding | None:
    bad = (p.template_ids | p.data_ids) & p.untrained_ids
    if not bad:
        return None
    where = "the chat template" if bad & p.template_ids else "the data"
    if (bad & p.template_ids) and (bad & p.data_ids):
        where = "the chat template and the data"
    return Finding("template-untrained-token", "error",
                   f"{where} uses {len(bad)} token(s) this model never trained "
                   "(an instruct template on a base model?)",
                   {"tokens": token_names(p.s.tokenizer, bad), "ids": sorted(bad)[:8]},
                   fix="use the instruct model, or apply the untrained-tokens fix, or train embed_tokens "
                       "and lm_head", fixer="fix_untrained_tokens")


def nonfinite_weights(p: Probe) -> Finding | None:
    import torch

    bad: dict[str, int] = {}
    from tunefix.doctor.probe import matrix_stats

    for m in p.s.matrices():
        n = matrix_stats(m).nonfinite_rows
        if n:
            bad[m.name] = n
    for name, load in p.s.norms:
        n = int((~torch.isfinite(load())).sum())
        if n:
            bad[name] = n
    if not bad:
        return None
    return Finding("nonfinite-weights", "error",
                   f"NaN or Inf in {len(bad)} tensor(s): every forward pass through them is garbage",
                   {"tensors": bad},
                   fix="re-download or re-export the checkpoint; a merge or conversion went wrong")
