"""Right-padded training batches without their mask (``drop_padding_mask``) and without
their padding (``split_rows``, ``padding_free_loss``).

With a padding mask, transformers hands attention a (B, 1, T, T) mask and the kernel
computes every (query, key) block: on a CPU, torch's flash kernel with a mask costs about
2x its causal form forward and backward (measured: B=2, 9 heads, T=2048, head_dim 64, one
thread: 2.2 s + 5.8 s with the mask, 1.2 s + 3.1 s causal). With no mask, transformers
asks for ``is_causal=True`` and the kernel skips the blocks above the diagonal.

For a right-padded batch whose padding is not scored, the mask changes no scored output:
under causal attention a real token at position t only sees keys at positions <= t, all
real (padding comes after every real token of its row); positions other than attention
are per-token. What the mask does change is the hidden state *at* padding positions (with
it they see only the real keys), so the mask is kept when any padding position is scored,
when the padding is on the left (real tokens would then see padding keys) or when there
are no labels to check. Position ids are not derived from the mask in transformers'
training forward (they are ``arange(T)`` either way).

Padding-free (``padding_free_loss``): the rows of a batch are run in groups of similar
length, each group cut to its own longest row, so the padding is not computed at all; see
the section below. The road not taken: packing rows into one sequence with per-row
attention (varlen) would do the same in one forward, but needs a varlen kernel that CPUs
lack (a block-diagonal mask makes torch's CPU kernel compute every block).

``enabled=False`` is the reference path (the batch as given) of both; tests check they agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def drop_padding_mask(batch: Mapping[str, torch.Tensor], *, enabled: bool = True,
                      ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """``batch`` without its ``attention_mask`` where that cannot change the loss, else as is.

    batch: input_ids (B, T), attention_mask (B, T) of 0/1, labels (B, T).
    Returns a new dict (the argument is not modified).
    """
    out = dict(batch)
    if enabled and _right_padded_unscored(batch, ignore_index):
        del out["attention_mask"]
    return out


def _right_padded_unscored(batch: Mapping[str, torch.Tensor], ignore_index: int) -> bool:
    """Each row real tokens then padding (a 2-D 0/1 mask), no padding position scored."""
    mask, labels = batch.get("attention_mask"), batch.get("labels")
    if mask is None or labels is None or mask.dim() != 2 or labels.shape != mask.shape:
        return False
    keep = mask.bool()  # (B, T)
    right_padded = bool((keep[:, 1:] <= keep[:, :-1]).all())  # each row: ones, then zeros
    return right_padded and bool((labels[~keep] == ignore_index).all())


# --------------------------------------------------------------------------- padding-free
# A right-padded batch computes every layer on its padding: with rows of 1,024 to 2,048
# tokens padded to the longest, about a tenth of the matmuls and more of the attention go
# to tokens nobody scores. The rows of a causal LM do not interact (no layer mixes the
# batch), so the same loss is the sum over groups of rows, each group cut to its own longest
# row, every group divided by the whole batch's count of scored tokens. The backward is
# still one backward of that sum.

# A group takes the next (shorter) row while its padding stays under this share of it (a
# forward's fixed cost is a few tokens' worth of compute once rows are long)...
MAX_WASTE = 1 / 32
# ...or while the group has fewer tokens than this. Short rows run less efficiently apart
# (smaller matmuls split worse over threads, and each forward has a fixed cost): on
# SmolLM2-135M with 2 threads, rows of 130 + 110 tokens took 2.69 s apart and 2.35 s padded
# together, rows of 300 + 200 4.1 s apart and 5.8 s together. A GPU runs short rows far
# below its width, so there a group must be larger before splitting pays (not measured yet).
MIN_GROUP_TOKENS_CPU = 256
MIN_GROUP_TOKENS_ACCELERATOR = 1024
_ROW_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


def split_rows(batch: Mapping[str, torch.Tensor], *, max_waste: float | None = None,
               min_group_tokens: int | None = None,
               ignore_index: int = -100) -> list[dict[str, torch.Tensor]]:
    """``batch`` as groups of rows of similar length, each cut to its longest row.

    Only a right-padded batch with unscored padding and nothing but input_ids, attention_mask
    and labels is split (position ids, packed masks and other inputs go as given); otherwise,
    or when one group is best, the result is ``[batch]``. Rows are grouped longest first: a
    group takes the next row while its padding would stay within ``max_waste`` of its
    tokens, or while it has fewer than ``min_group_tokens`` tokens (defaults: ``MAX_WASTE``,
    ``min_group_tokens_for`` the batch's device).
    """
    if set(batch) != _ROW_KEYS or len(batch["input_ids"]) < 2 or not _right_padded_unscored(batch, ignore_index):
        return [dict(batch)]
    mask = batch["attention_mask"]
    max_waste = MAX_WASTE if max_waste is None else max_waste
    if min_group_tokens is None:
        min_group_tokens = min_group_tokens_for(mask.device)
    lengths = mask.bool().sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    groups: list[list[int]] = []
    for r in order:
        if groups:
            group = groups[-1]
            width = lengths[group[0]]
            tokens = width * (len(group) + 1)
            waste = tokens - sum(lengths[i] for i in group) - lengths[r]
            if waste <= max_waste * tokens or width * len(group) < min_group_tokens:
                group.append(r)
                continue
        groups.append([r])
    if len(groups) == 1:
        return [dict(batch)]
    out = []
    for group in groups:
        rows, width = torch.tensor(group), max(lengths[group[0]], 1)
        out.append({k: v[rows, :width] for k, v in batch.items()})
    return out


def min_group_tokens_for(device: torch.device | str) -> int:
    """The smallest group of rows ``split_rows`` splits off on ``device``."""
    return MIN_GROUP_TOKENS_CPU if torch.device(device).type == "cpu" else MIN_GROUP_TOKENS_ACCELERATOR


def groups_pay_off(model) -> bool:
    """Whether computing a batch in groups (``padding_free_loss``) saves time on ``model``: not
    where every forward rebuilds whole weights. PEFT's adapters on fused expert parameters
    (Qwen3-MoE, gpt-oss) add B @ A to every expert's weight in each forward, so each group
    pays that again (measured, tiny Qwen3-MoE at 2 x 2048 against plain transformers + PEFT:
    0.85x the speed in groups, 1.30x in one padded forward; memory 0.19x and 0.18x)."""
    from peft.tuners.lora.layer import ParamWrapper

    return not any(isinstance(m, ParamWrapper) for m in model.modules())


def padding_free_loss(model, batch: Mapping[str, torch.Tensor], *, enabled: bool = True,
                      drop_mask: bool = True, num_items_in_batch: torch.Tensor | int | None = None,
                      impl: str | None = None, min_group_tokens: int | None = None) -> torch.Tensor:
    """``model_loss(model, batch)`` computed group by group (``split_rows``), without padding.

    Equal to the loss of the batch as given (and so are its gradients): each group's summed
    token losses are divided by ``num_items_in_batch`` or, by default, by the batch's count
    of scored tokens. ``drop_mask`` applies ``drop_padding_mask`` to each group.
    ``enabled=False`` is the reference: the whole batch at once. ``min_group_tokens``: see
    ``split_rows``.
    """
    from tunefix.model.loss import model_loss, shift_labels_of

    groups = split_rows(batch, min_group_tokens=min_group_tokens) if enabled else [dict(batch)]
    if len(groups) > 1 and num_items_in_batch is None:  # the whole batch's mean, not each group's
        num_items_in_batch = int((shift_labels_of(batch["labels"]) != -100).sum())
    parts = []
    for group in groups:
        # Autocast caches its casts of trainable weights until the outermost autocast exits, so a
        # second group's forward would cast nothing, while its recompute in the backward (a fresh
        # autocast) casts again: selective checkpointing then finds an op it never saw and stops
        # the run (measured: "_to_copy invocation index 23 ... not found", any family, bf16).
        # Each group starts from an empty cache, as its recompute will; the casts are the
        # adapters' (frozen weights are never cached).
        torch.clear_autocast_cache()
        parts.append(model_loss(model, drop_padding_mask(group, enabled=drop_mask),
                                num_items_in_batch=num_items_in_batch, impl=impl))
    return sum(parts[1:], parts[0])
