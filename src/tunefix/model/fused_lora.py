"""A LoRA Linear's forward as one matmul-accumulate: no output-sized temporaries.

PEFT computes a LoRA Linear as ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling``:
besides the base output, three tensors of the output's size are made (``lora_B``'s
output, the scaled copy, the sum) and the backward makes one more (the gradient times
``scaling``). On SmolLM2-135M at 2 x 2048 tokens those are 9-25 MB each, seven projections
per layer, twice per layer with checkpointing: several GB of allocation and memory traffic
a step, and on a CPU every such block is either a heap hole (fragmentation) or fresh
pages (page faults).

The fused form writes the low-rank update into the base output in place:
``result = base(x2d); result.addmm_(lora_A(dropout(x2d)), B.T, alpha=scaling)``, with
``x2d`` the input as (tokens, features). ``addmm_`` accumulates inside the matmul, so the
only output-sized tensor is the base output itself; its backward passes the gradient
through unchanged and computes the two small (r-wide) gradients from it. In-place is safe
here because a Linear's backward needs its input and weight, never its output (autograd
would refuse otherwise).

Used only where it computes exactly PEFT's function: a plain ``nn.Linear`` base, one active
vanilla LoRA adapter (no DoRA or other variant, no ``lora_bias``), not merged, adapters
enabled, no per-row ``adapter_names``. Anything else goes through PEFT's own forward
(checked on every call).
``enabled=False`` (or not calling this) is the reference path; tests check that both give
the same outputs and gradients.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _eligible(layer, x: torch.Tensor, kwargs: dict) -> str | None:
    """The active adapter's name when the fused form computes PEFT's function, else None."""
    if kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
        return None  # PEFT's ``lora_bias``: leave the adapter's own bias to its forward
    if layer.lora_A[name].weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # PEFT casts the input to the adapter's dtype: leave that to it
    return name


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args else _eligible(self, x, kwargs)
    if name is None:
        return self._tunefix_peft_forward(x, *args, **kwargs)
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
    x2d = x.reshape(-1, x.shape[-1])
    result = self.base_layer(x2d)  # (tokens, out), a fresh tensor
    low = torch.nn.functional.linear(self.lora_dropout[name](x2d), lora_a)  # (tokens, r)
    # addmm_ is not autocast: give it the base output's dtype (a no-op in fp32).
    result.addmm_(low.to(result.dtype), lora_b.t().to(result.dtype), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


def fuse_lora_forward(model: nn.Module, enabled: bool = True) -> int:
    """Give each PEFT LoRA Linear over a plain ``nn.Linear`` the fused forward, in place.

    Returns how many layers got it (0 when ``enabled`` is False). Idempotent; the original
    forward stays on each layer as ``_tunefix_peft_forward`` and is used whenever a call is
    not eligible (see the module docstring).
    """
    if not enabled:
        return 0
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear:
            continue
        if "_tunefix_peft_forward" not in module.__dict__:
            module._tunefix_peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count
