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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunefix.families import FUSED

log = logging.getLogger(__name__)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen3.5's Gated DeltaNet (linear attention) layers project with these instead of q/k/v/o
# (named with their parent: "out_proj" alone would also match vision towers). Their
# depthwise ``conv1d`` is an nn.Conv1d, not a Linear: it stays frozen, as PEFT's "all-linear"
# leaves it (measured, PEFT 0.21: all-linear adapts exactly these 5 plus the 7 above).
LINEAR_ATTENTION = tuple(f"linear_attn.{n}" for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b",
                                                      "out_proj"))
# MoE routing weights: a module beside a block's ``experts`` (Qwen3-MoE's and Mixtral's ``gate``,
# gpt-oss's ``router``, Qwen3.5's ``shared_expert_gate``). An adapter there changes which experts
# each token is sent to; no default target names them (PEFT's "all-linear" does: measured).
ROUTERS = ("gate", "router", "shared_expert_gate")


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
    from peft import get_peft_model

    config = lora_config(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                         use_rslora=use_rslora, train_embeddings=train_embeddings)
    with peft_quietly():
        return get_peft_model(model, config)


def lora_config(model, *, r: int = 16, alpha: int | None = None, dropout: float = 0.0,
                target_modules: list[str] | None = None, use_rslora: bool = False,
                train_embeddings: bool = False) -> Any:
    """The ``LoraConfig`` ``add_lora`` wraps ``model`` with (fused projections split in place
    first): what a TRL trainer is given, so that it wraps the model itself."""
    from peft import LoraConfig

    # The linear-attention names only where the model has such layers: an adapter's config
    # lists its targets, and one of a Llama naming DeltaNet projections would puzzle a reader.
    names = {n for n, _ in model.named_modules()}
    own = tuple(t for t in LINEAR_ATTENTION if any(n.endswith(t) for n in names))
    targets = list(target_modules or ALL_LINEAR + own)
    left_out = [t for t in ALL_LINEAR if t not in targets]
    if left_out:
        log.warning("LoRA leaves out %s: fewer adapted projections usually learn less "
                    "(all of q, k, v, o, gate, up, down is the default)", ", ".join(left_out))
    plan = moe_plan(model.config, targets)
    expert_parameters = None
    if plan is not None and plan.routers_adapted:
        log.warning("LoRA adapts the MoE router(s) %s: tokens may be routed to other experts after "
                    "training (leave 'gate'/'router' out of the targets)", ", ".join(plan.routers_adapted[:3]))
    if plan is not None and plan.experts_unadapted and not left_out:
        # All linear layers were asked for, and PEFT has no mapping of the dense names to this
        # family's fused experts (gpt-oss, Qwen3.5-MoE): name the stacked expert weights.
        expert_parameters = plan.expert_parameters
        log.info("MoE experts adapted through their stacked weights %s", ", ".join(expert_parameters))
    if unfuse_projections(model):
        log.info("split fused projections (qkv_proj, gate_up_proj) so each part gets its own adapter")
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                      target_modules=targets, use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM",
                      modules_to_save=["embed_tokens", "lm_head"] if train_embeddings else None,
                      target_parameters=expert_parameters)


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


@dataclass
class MoePlan:
    routers_adapted: list[str]      # router modules LoRA would adapt
    experts_unadapted: list[str]    # ``experts`` modules LoRA would leave without an adapter
    expert_parameters: list[str]    # the experts' stacked weights, as PEFT ``target_parameters``


def is_moe(config) -> bool:
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return any(isinstance(get(k), int) and get(k) > 0 for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def moe_plan(config, targets: list[str] | str, target_parameters: list[str] | None = None) -> MoePlan | None:
    """What LoRA adapts in the MoE blocks for ``targets``; None for a dense model.

    Found by wrapping a meta-device copy of the model (no weights; 0.1 to 0.4 s on the tiny
    configs): PEFT's own matching, with its remapping of gate/up/down_proj onto the fused experts
    where it has one (Qwen3-MoE), and without where it has none (measured, PEFT 0.21: the
    experts of gpt-oss and Qwen3.5-MoE get no adapter from the all-linear names).
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if not is_moe(config):
        return None
    if isinstance(config, dict):
        fields = {k: v for k, v in config.items() if k != "model_type"}
        config = AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    experts = sorted(n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "experts")
    names = {n for n, _ in model.named_modules()}
    routers = [f"{e.rsplit('.', 1)[0]}.{leaf}" for e in experts for leaf in ROUTERS
               if f"{e.rsplit('.', 1)[0]}.{leaf}" in names]
    stacked = sorted({f"experts.{n.rsplit('.', 1)[-1]}" for n, p in model.named_parameters()
                      if n.rsplit(".", 2)[-2] == "experts" and p.dim() == 3})
    lora = LoraConfig(r=8, target_modules=targets, target_parameters=target_parameters)
    with peft_quietly():
        wrapped = get_peft_model(model, lora)
    adapted = {n.split(".lora_A.")[0].removeprefix("base_model.model.").replace(".base_layer", "")
               for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    return MoePlan([r for r in routers if r in adapted], [e for e in experts if e not in adapted], stacked)
