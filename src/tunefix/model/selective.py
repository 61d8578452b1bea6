"""Selective checkpointing: checkpoint each decoder layer, but keep its attention's output.

Plain checkpointing (mode ``on``) keeps a layer's input and runs the whole layer forward
again in the backward. Attention is the one part of that recompute whose cost grows with
the square of the sequence (at 2 x 2048 tokens on SmolLM2-135M it is more than the
layer's matmuls), while its output is small: (B, heads, T, head_dim), the size of the
hidden states, plus one fp32 log-sum-exp per (row, head, token). Keeping those two from
the forward (torch's selective activation checkpointing, ``create_selective_checkpoint_
contexts``) lets the backward recompute everything else and reuse them: one attention
forward fewer per layer, for about one hidden-state tensor per layer of memory (30 x
9 MB for SmolLM2 at 2 x 2048 in fp32).

The kept ops are the fused attention kernels ``torch.nn.functional.scaled_dot_product_
attention`` dispatches to; a model on the eager (matmul + softmax) attention keeps
nothing and behaves as mode ``on``. Mode ``on`` is the reference: tests check that both
give the same gradients.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


def _attention_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    # Each exists in the torch versions tunefix supports on the platforms that have it.
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


KEPT_OPS = _attention_ops()


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(function, *args, **kwargs):
    """transformers' per-layer checkpoint function: non-reentrant, attention outputs kept."""
    contexts = functools.partial(create_selective_checkpoint_contexts, _policy)
    return checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)
