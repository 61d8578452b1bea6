"""MoE experts train through transformers' grouped kernel, never a Python loop over experts.

transformers 5 dispatches a MoE block's experts to ``grouped_mm`` (one ``_grouped_mm`` per
projection for all experts) where torch can, and to ``eager`` (a loop over the experts hit,
found with ``nonzero``) otherwise. PEFT 0.21 adapts the fused expert parameters in place, so the
grouped kernel still runs with adapters; these tests hold tunefix's loading and LoRA to that,
and the grouped step to the eager one (the reference) within fp32 noise.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tunefix.model.load import load_model
from tunefix.model.lora import add_lora
from tunefix.tiny import tiny_model


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    with _Ops() as ops:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, ops.calls


def _lora(implementation: str | None):
    model, _ = load_model(str(tiny_model("qwen3_moe")), dtype=torch.float32, report=None)
    if implementation:
        model.set_experts_implementation(implementation)
    torch.manual_seed(0)
    model = add_lora(model, r=8)
    with torch.no_grad():  # B starts at zero; make the expert adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def test_experts_train_through_the_grouped_kernel_with_their_adapters():
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    model = _lora(None)  # as tunefix loads it
    assert model.config._experts_implementation == "grouped_mm"
    assert any("experts" in n and "lora" in n for n, p in model.named_parameters() if p.requires_grad)
    loss, grads, calls = _step(model, ids)
    layers = model.config.num_hidden_layers
    # Forward: gate_up and down per layer, one grouped call each for all experts; no expert loop.
    assert calls.get("_grouped_mm", 0) >= 2 * layers
    assert "nonzero" not in calls

    eager_loss, eager_grads, eager_calls = _step(_lora("eager"), ids)
    assert "_grouped_mm" not in eager_calls and eager_calls.get("nonzero", 0) >= layers
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-3, atol=1e-6, msg=name)


def test_padded_batches_stay_whole_where_each_forward_rebuilds_the_experts():
    """Groups (padding-free) re-add every expert's B @ A once per forward: on a MoE LoRA the
    trainer computes the padded batch in one forward (bench/RESULTS.md has the measurement)."""
    from transformers import AutoModelForCausalLM

    from tunefix.model.padding import groups_pay_off

    assert not groups_pay_off(_lora(None))
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")), dtype=torch.float32)
    assert groups_pay_off(add_lora(dense, r=8))
