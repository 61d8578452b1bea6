"""LoRA through PEFT, with fused projections (Phi-3) split so each gets its own adapter.

Phi-3 computes q, k and v with one ``qkv_proj`` and gate and up with one ``gate_up_proj``.
A LoRA on the fused Linear is one low-rank update shared by q, k and v: a different model
from the q/k/v LoRA every other family gets. ``unfuse_projections`` replaces each fused
Linear by a ``SplitLinear`` holding one Linear per part (named q_proj, k_proj, v_proj /
gate_proj, up_proj) whose outputs are concatenated: the same function, and LoRA then
targets each part. ``fuse_projections`` puts the fused Linear back (after merging) so the
saved checkpoint is a plain Phi-3 one.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tunefix.families import FUSED

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SplitLinear(nn.Module):
    """Several Linear layers whose outputs are concatenated: an unfused ``qkv_proj``."""

    def __init__(self, parts: dict[str, nn.Linear]):
        super().__init__()
        self.part_names = list(parts)
        for name, linear in parts.items():
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, n)(x) for n in self.part_names], dim=-1)


def _sizes(model, fused_name: str) -> list[int]:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if fused_name == "qkv_proj":
        kv = c.num_key_value_heads * head_dim
        return [c.num_attention_heads * head_dim, kv, kv]
    return [c.intermediate_size, c.intermediate_size]


def unfuse_projections(model) -> int:
    """Split every fused qkv_proj / gate_up_proj in place; returns how many were split."""
    count = 0
    for parent in list(model.modules()):
        for fused_name, part_names in FUSED.items():
            fused = getattr(parent, fused_name, None)
            if not isinstance(fused, nn.Linear):
                continue
            sizes = _sizes(model, fused_name)
            weights = fused.weight.data.split(sizes, dim=0)  # each (part_out, in)
            biases = fused.bias.data.split(sizes) if fused.bias is not None else [None] * len(sizes)
            parts = {}
            for name, w, b in zip(part_names, weights, biases, strict=True):
                lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
                lin.weight.data.copy_(w)
                if b is not None:
                    lin.bias.data.copy_(b)
                parts[name] = lin
            setattr(parent, fused_name, SplitLinear(parts))
            count += 1
    return count


def fuse_projections(model) -> int:
    """Undo ``unfuse_projections`` (on a merged model): plain fused Linear layers again."""
    count = 0
    for parent in list(model.modules()):
        for fused_name in FUSED:
            split = getattr(parent, fused_name, None)
            if not isinstance(split, SplitLinear):
                continue
            parts = [getattr(split, n) for n in split.part_names]
            w = torch.cat([p.weight.data for p in parts], dim=0)
            has_bias = parts[0].bias is not None
            lin = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, dtype=w.dtype, device=w.device)
            lin.weight.data.copy_(w)
            if has_bias:
                lin.bias.data.copy_(torch.cat([p.bias.data for p in parts]))
            setattr(parent, fused_name, lin)
            count += 1
    return count


def add_lora(model, *, r: int = 16, alpha: int | None = None, dropout: float = 0.0,
             target_modules: list[str] | None = None, use_rslora: bool = False,
             train_embeddings: bool = False) -> Any:
    """Wrap ``model`` with LoRA adapters (PEFT). ``train_embeddings``: continued
    pretraining, embed_tokens and lm_head trained in full (their learning rate is set by
    the optimizer's parameter groups, see ``train.optim``)."""
    from peft import LoraConfig, get_peft_model

    targets = list(target_modules or ALL_LINEAR)
    left_out = [t for t in ALL_LINEAR if t not in targets]
    if left_out:
        log.warning("LoRA leaves out %s: fewer adapted projections usually learn less "
                    "(all of q, k, v, o, gate, up, down is the default)", ", ".join(left_out))
    if unfuse_projections(model):
        log.info("split fused projections (qkv_proj, gate_up_proj) so each part gets its own adapter")
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                        target_modules=targets, use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM",
                        modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None)
    with peft_quietly():
        return get_peft_model(model, config)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """PEFT reads transformers 5's deprecated ``is_gradient_checkpointing`` each time it wraps a
    model, and transformers warns (FutureWarning): a line about PEFT's code that no user can act
    on (measured: printed twice into the demo). Only that warning, only while PEFT wraps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        # On MoE models (Qwen3-MoE) PEFT maps the expert projections to the fused expert
        # parameters itself and then warns that its own generated patterns matched no module.
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        yield
