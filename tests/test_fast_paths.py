"""CPU training fast paths against their references, on a tiny Llama in fp32.

- checkpointing ``selective`` (attention outputs kept) against ``on``;
- ``drop_padding_mask`` (causal attention alone for right-padded batches) against the
  batch with its mask;
- ``fuse_lora_forward`` (the LoRA update accumulated into the base output) against PEFT's
  own LoRA forward;
- ``padding_free_loss`` (rows in groups cut to their length) against the padded batch.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tunefix.model import checkpointing, loss
from tunefix.model.fused_lora import fuse_lora_forward
from tunefix.model.padding import (
    drop_padding_mask,
    min_group_tokens_for,
    padding_free_loss,
    split_rows,
)
from tunefix.model.selective import KEPT_OPS
from tunefix.tiny import FAMILIES

B, T = 2, 40


@pytest.fixture(scope="module")
def model_dir():
    from tunefix.tiny import tiny_model

    return tiny_model("llama")


def _lora_model(model_dir, mode="on", *, fused=False, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                            target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero; make the adapters matter for the gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    checkpointing.apply_checkpointing(model, mode)
    if fused:
        from peft.tuners.lora import Linear as LoraLinear

        lora_layers = sum(isinstance(m, LoraLinear) for m in model.modules())
        assert lora_layers >= 4 * model.config.num_hidden_layers  # Phi-3: qkv, o, gate_up, down
        assert fuse_lora_forward(model) == lora_layers
    return model


def _batch(padding="right"):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 128256, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    if padding == "right":
        attention_mask[1, 28:] = 0
    elif padding == "left":
        attention_mask[1, :12] = 0
    labels = input_ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in KEPT_OPS
        return func(*args, **(kwargs or {}))


def _loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    value = loss.model_loss(model, batch)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return value.detach(), grads


def _plain_loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    value = model(**batch).loss
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return value.detach(), grads


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


def test_selective_checkpointing_equals_on_and_skips_the_attention_recompute(model_dir):
    batch = drop_padding_mask(_batch("right"))
    results, calls = {}, {}
    for mode in ("on", "selective"):
        model = _lora_model(model_dir, mode)
        assert checkpointing.is_checkpointing(model)
        with _CountAttention() as counter:
            results[mode] = _loss_grads(model, batch)
        calls[mode] = counter.calls
    _assert_same(results["selective"], results["on"], rtol=0, atol=0)
    layers = 2
    assert calls["on"] == 2 * layers  # forward, then again in the backward's recompute
    assert calls["selective"] == layers  # the backward reuses the forward's output


def test_right_padded_batch_drops_its_mask_with_equal_loss_and_grads(model_dir):
    batch = _batch("right")
    fast = drop_padding_mask(batch)
    assert "attention_mask" not in fast and "attention_mask" in batch  # a new dict
    assert "attention_mask" in drop_padding_mask(batch, enabled=False)  # the reference
    model = _lora_model(model_dir)
    _assert_same(_loss_grads(model, fast), _loss_grads(model, batch))


@pytest.mark.parametrize("case", ["left", "scored-padding", "no-labels"])
def test_mask_kept_where_it_matters(case):
    batch = _batch("left" if case == "left" else "right")
    if case == "scored-padding":
        batch["labels"][1, -1] = 5
    if case == "no-labels":
        del batch["labels"]
    assert "attention_mask" in drop_padding_mask(batch)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_paths_equal_the_reference_in_every_family(family):
    # Sliding windows (Mistral, Gemma 2/3), softcapped attention (Gemma 2), fused projections
    # (Phi-3), q/k norms (Qwen3), MoE experts with PEFT's parameter adapters (Qwen3-MoE), NoPE
    # layers (SmolLM3): selective checkpointing == on, and the dropped mask == the mask, in each.
    from tunefix.tiny import tiny_model

    model_dir = tiny_model(family)
    batch = _batch("right")
    vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size") or 32000
    batch["input_ids"] = batch["input_ids"] % vocab
    labels = batch["input_ids"].clone()
    labels[:, :8] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    ref = _loss_grads(_lora_model(model_dir, "on"), batch)
    fast = _loss_grads(_lora_model(model_dir, "selective", fused=True), drop_padding_mask(batch))
    _assert_same(fast, ref, rtol=1e-4, atol=1e-6)
    # And tunefix's loss (chunked lm_head + cross-entropy) equals plain transformers + PEFT:
    # no checkpointing, the model's own ``loss`` (fp32, relative 1e-4).
    _assert_same(ref, _plain_loss_grads(_lora_model(model_dir, "off"), batch), rtol=1e-4, atol=1e-6)


class _CountOps(TorchDispatchMode):
    """How often each aten op ran, and how many elements of new memory all ops made."""

    def __init__(self):
        super().__init__()
        self.calls, self.made = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.calls[name] = self.calls.get(name, 0) + 1
        seen = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):  # views and in-place results reuse an input's memory
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.made += t.numel()
        return out


@pytest.mark.parametrize("mode", ["off", "on"])
def test_fused_lora_equals_peft_and_makes_no_output_sized_temporaries(model_dir, mode):
    batch = drop_padding_mask(_batch("right"))
    results, ops = {}, {}
    for fused in (False, True):
        model = _lora_model(model_dir, mode, fused=fused)
        with _CountOps() as counter:
            results[fused] = _loss_grads(model, batch)
        ops[fused] = counter
    _assert_same(results[True], results[False])
    lora_layers = 14  # 7 projections x 2 layers
    passes = 1 if mode == "off" else 2  # checkpointing runs each layer's forward again
    # (the recompute stops once the backward has what it needs: before the last LoRA
    # update of each layer, down_proj's, which no backward reads)
    assert ops[True].calls.get("addmm_", 0) == lora_layers * passes - (passes - 1) * 2
    assert "addmm_" not in ops[False].calls
    # PEFT makes two tensors of each LoRA layer's output size in each forward (the scaled
    # update and the sum) and one in the backward (the gradient times scaling); the fused
    # form none. The tiny Llama's output widths: q 256, k 128, v 128, o 256, gate 512,
    # up 512, down 256 = 2048 a layer.
    tokens, widths, down = B * T, 2 * 2048, 2 * 256
    assert ops[False].made - ops[True].made >= tokens * (widths * (2 * passes + 1) - (passes - 1) * 2 * down)


def test_fused_lora_with_dropout_draws_the_same_masks(model_dir):
    batch = drop_padding_mask(_batch("right"))
    results = {}
    for fused in (False, True):
        model = _lora_model(model_dir, "off", fused=fused, dropout=0.1)
        model.train()
        torch.manual_seed(5)
        results[fused] = _loss_grads(model, batch)
    _assert_same(results[True], results[False])


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply(model_dir):
    ids = _batch("right")["input_ids"]
    logits = {}
    for fused in (False, True):
        model = _lora_model(model_dir, "off", fused=fused)
        with torch.no_grad():
            with model.disable_adapter():  # adapters off: PEFT runs the base layer alone
                off = model(input_ids=ids).logits
            on = model(input_ids=ids).logits
            model.merge_adapter()  # merged into the base weights: the base layer alone
            merged = model(input_ids=ids).logits
        logits[fused] = (off, on, merged)
    assert not torch.allclose(logits[False][0], logits[False][1])  # the adapters matter
    for ref, fast in zip(logits[False], logits[True], strict=True):
        torch.testing.assert_close(fast, ref)
    assert fuse_lora_forward(model, enabled=False) == 0


def test_fused_lora_under_bf16_autocast_matches_peft(model_dir):
    # The GPU path: bf16 base weights, fp32 adapters (PEFT's default upcast), bf16 autocast.
    # Both forms then compute in bf16, so they agree to bf16 rounding, not bit for bit.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    batch = drop_padding_mask(_batch("right"))
    results = {}
    for fused in (False, True):
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
        if fused:
            assert fuse_lora_forward(model) == 14
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fused] = _loss_grads(model, batch)
    ref, fast = results[False], results[True]
    torch.testing.assert_close(fast[0], ref[0], rtol=2e-2, atol=0)
    for name in ref[1]:
        a, b = fast[1][name].float(), ref[1][name].float()
        # Per tensor: the relative size of the difference, as bf16 rounding allows.
        assert (a - b).norm() <= 0.05 * b.norm(), name


def test_fused_lora_leaves_an_adapter_bias_to_peft(model_dir):
    # PEFT's lora_bias gives lora_B a bias the fused matmul does not add: PEFT's forward runs.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = _batch("right")["input_ids"]
    logits = {}
    for fused in (False, True):
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                lora_bias=True))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)  # the weight and the bias
        if fused:
            fuse_lora_forward(model)
        with torch.no_grad():
            logits[fused] = model(input_ids=ids).logits
    torch.testing.assert_close(logits[True], logits[False])


def _ragged(lengths, width=None, prompt=3):
    """Right-padded rows of the given lengths, prompt and padding unscored."""
    width = width or max(lengths)
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 128256, (len(lengths), width), generator=g)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        attention_mask[r, :n] = 1
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_split_rows_groups_rows_of_similar_length_without_their_padding():
    batch = _ragged([300, 1000, 980, 40], width=1024)
    groups = split_rows(batch, min_group_tokens=64)
    assert [g["input_ids"].shape for g in groups] == [(2, 1000), (1, 300), (1, 40)]
    assert torch.equal(groups[0]["input_ids"], batch["input_ids"][[1, 2], :1000])
    assert torch.equal(groups[1]["labels"], batch["labels"][[0], :300])
    assert all(bool(g["attention_mask"][:, 0].all()) for g in groups)
    # The default keeps very short rows together (on a GPU, short ones: not measured yet).
    assert [g["input_ids"].shape for g in split_rows(_ragged([130, 60]))] == [(2, 130)]
    assert [g["input_ids"].shape for g in split_rows(_ragged([300, 100]))] == [(1, 300), (1, 100)]
    assert min_group_tokens_for("cpu") < min_group_tokens_for(torch.device("cuda", 0))
    assert [g["input_ids"].shape for g in split_rows(_ragged([2048, 1100]))] == [(1, 2048), (1, 1100)]
    assert len(split_rows(_ragged([2048, 1950]))) == 1  # 2.4% padding: not worth a forward


@pytest.mark.parametrize("case", ["left", "scored-padding", "position_ids", "one-row"])
def test_split_rows_leaves_batches_it_cannot_split_whole(case):
    batch = _ragged([400, 40] if case != "one-row" else [400])
    if case == "left":
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    if case == "scored-padding":
        batch["labels"][1, -1] = 5
    if case == "position_ids":
        batch["position_ids"] = torch.arange(400).expand(2, 400)
    groups = split_rows(batch, min_group_tokens=1)
    assert len(groups) == 1 and groups[0].keys() == batch.keys()
    assert all(groups[0][k] is batch[k] for k in batch)


@pytest.mark.parametrize("given,mode", [(False, "selective"), (True, "selective"), (False, "offload")])
def test_padding_free_loss_equals_the_padded_batch(model_dir, given, mode):
    # Three rows, three groups: each group's summed token losses over the batch's count.
    # Offload (its copies forced on the CPU): three forwards' saved inputs before one backward.
    batch = _ragged([40, 9, 23])
    items = int((loss.shift_labels_of(batch["labels"]) != -100).sum()) + 7 if given else None
    model = _lora_model(model_dir, "selective" if mode == "selective" else "on", fused=True)
    offloader = checkpointing.apply_checkpointing(model, "offload", force_copy=True) if mode == "offload" else None
    calls = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)

    def run(enabled):
        model.zero_grad(set_to_none=True)
        value = padding_free_loss(model, batch, enabled=enabled, num_items_in_batch=items,
                                  min_group_tokens=1)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast, ref = run(True), run(False)
    hook.remove()
    assert calls == [(1, 40), (1, 23), (1, 9), (3, 40)]  # the groups, then the reference
    if offloader is not None:
        # Each layer's input, in each forward: the three groups', then the reference's.
        assert offloader.packed == (3 + 1) * model.config.num_hidden_layers
    _assert_same(fast, ref, rtol=1e-5, atol=1e-7)
    # The reference is the plain padded batch with its mask.
    model.zero_grad(set_to_none=True)
    plain = loss.model_loss(model, batch, num_items_in_batch=items)
    torch.testing.assert_close(plain.detach(), ref[0], rtol=1e-6, atol=0)


def test_padding_free_groups_under_bf16_autocast_with_selective_checkpointing(model_dir):
    """Several groups' forwards inside one autocast, then one backward outside it (as a training
    step runs): autocast's cache of the adapters' casts must not make a group's forward differ
    from its recompute (it stopped selective checkpointing with "invocation index ... not
    found" before each group started from an empty cache). Same loss and gradients as ``on``."""
    batch = _ragged([40, 9, 23])

    def run(mode):
        model = _lora_model(model_dir, mode, fused=True)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = padding_free_loss(model, batch, min_group_tokens=1)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    _assert_same(run("selective"), run("on"), rtol=1e-2, atol=1e-4)
