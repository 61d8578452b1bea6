"""The chunked loss equals the plain one, and the checkpointing modes give the same gradients.

All in fp32 on the tiny Llama with the real Llama 3 tokenizer (128,256-token vocabulary),
where the logits are what dominates memory.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tunefix.errors import TunefixError
from tunefix.model import checkpointing, loss

B, T = 2, 40


@pytest.fixture(scope="module")
def model_dir():
    from tunefix.tiny import tiny_model

    return tiny_model("llama")


def _lora_model(model_dir, *, targets="all-linear", seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(base, config)
    with torch.no_grad():  # B starts at zero; make the adapters matter for the gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 30:] = 0  # right padding on the second row
    labels = input_ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _loss_and_grads(model, batch, impl, **kwargs):
    model.zero_grad(set_to_none=True)
    value = loss.model_loss(model, batch, impl=impl, **kwargs)
    value.backward()
    return value.detach(), _lora_grads(model)


def _assert_grads_close(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_equals_reference_for_lora_params(model_dir):
    model = _lora_model(model_dir)
    batch = _batch(model.config.vocab_size)
    assert model.config.vocab_size == 128256
    ref, ref_grads = _loss_and_grads(model, batch, "reference")
    chunked, chunked_grads = _loss_and_grads(model, batch, "chunked", chunk_size=7)
    # The reference is what transformers itself computes.
    with torch.no_grad():
        hf = model(**batch).loss
    torch.testing.assert_close(ref, hf)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-6)
    _assert_grads_close(chunked_grads, ref_grads)


def test_chunked_equals_reference_for_hidden_and_weight(model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    batch = _batch(base.config.vocab_size)
    with torch.no_grad():
        hidden = loss.final_hidden(base, input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"])  # (B, T, H)
    head = base.get_output_embeddings()
    results = []
    for impl in ("reference", "chunked"):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        value = loss.causal_lm_loss(h, head, batch["labels"], impl=impl, chunk_size=16)
        (2.5 * value).backward()  # a scale on the loss reaches the stored gradients
        results.append((value.detach(), h.grad, head.weight.grad.clone()))
    (ref, ref_h, ref_w), (got, got_h, got_w) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-4, atol=1e-7)
    # Positions whose next token is ignored get no gradient at all.
    shifted = loss.shift_labels_of(batch["labels"])
    assert got_h[shifted == -100].abs().max() == 0


def test_num_items_in_batch_matches_transformers(model_dir):
    model = _lora_model(model_dir)
    batch = _batch(model.config.vocab_size)
    n = torch.tensor(100)  # e.g. the scored tokens of all micro-batches of one step
    with torch.no_grad():
        hf = model(**batch, num_items_in_batch=n).loss
        chunked = loss.model_loss(model, batch, num_items_in_batch=n, impl="chunked")
        mean = loss.model_loss(model, batch, impl="chunked")
    scored = int((loss.shift_labels_of(batch["labels"]) != -100).sum())
    torch.testing.assert_close(chunked, hf, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked * 100, mean * scored, rtol=1e-5, atol=1e-5)


def test_ignore_index():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(1, 6, 16)
    labels = torch.tensor([[5, 7, -100, 9, -100, 3]])
    # Shifted, position t is scored on labels[t + 1]: positions 0 (-> 7), 2 (-> 9), 4 (-> 3).
    logits = head(hidden)[0].float()
    expected = torch.stack([nn.functional.cross_entropy(logits[t], torch.tensor(c))
                            for t, c in ((0, 7), (2, 9), (4, 3))]).mean()
    for impl in ("reference", "chunked"):
        torch.testing.assert_close(loss.causal_lm_loss(hidden, head, labels, impl=impl), expected)
        # Another ignore_index means the same thing.
        other = labels.where(labels != -100, -1)
        torch.testing.assert_close(
            loss.causal_lm_loss(hidden, head, other, ignore_index=-1, impl=impl), expected)
        # Nothing to score is nan in both paths, as in transformers: a data bug, not a zero.
        empty = loss.causal_lm_loss(hidden, head, torch.full_like(labels, -100), impl=impl)
        assert math.isnan(empty.item())


def test_softcap_and_bias():
    torch.manual_seed(0)
    head = nn.Linear(24, 300, bias=True).double()
    hidden = torch.randn(2, 9, 24, dtype=torch.float64)
    labels = torch.randint(0, 300, (2, 9))
    results = []
    for impl in ("reference", "chunked"):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        value = loss.causal_lm_loss(h, head, labels, softcap=5.0, impl=impl, chunk_size=4)
        value.backward()
        results.append((value, h.grad, head.weight.grad, head.bias.grad))
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_lora_wrapped_lm_head_goes_through_the_module(model_dir):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = _lora_model(model_dir, targets=targets)
    head = model.get_base_model().get_output_embeddings()
    assert loss._plain_linear(head) == (None, None)  # a peft layer: the checkpointed path
    batch = _batch(model.config.vocab_size)
    ref, ref_grads = _loss_and_grads(model, batch, "reference")
    chunked, chunked_grads = _loss_and_grads(model, batch, "chunked", chunk_size=16)
    assert any("lm_head" in name for name in chunked_grads)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-6)
    _assert_grads_close(chunked_grads, ref_grads)


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any (rows x vocab) tensor that an op makes.

    The lm_head weight seen transposed, (H, V), is not logits: shapes with exactly
    ``hidden`` rows are left out (the test's token counts differ from it).
    """

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden, self.rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                rows = t.numel() // self.vocab
                if rows != self.hidden:
                    self.rows = max(self.rows, rows)
        return out


def test_chunked_never_makes_the_full_logits(model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    vocab, hidden = base.config.vocab_size, base.config.hidden_size
    batch = _batch(vocab)
    batch["labels"][:] = batch["input_ids"]  # every token scored: the worst case
    tokens = B * (T - 1)
    assert hidden not in (tokens, B * T)
    chunk = 8
    rows = {}
    for impl in ("reference", "chunked"):
        base.zero_grad(set_to_none=True)
        with _LargestVocabTensor(vocab, hidden) as probe:
            loss.model_loss(base, batch, impl=impl, chunk_size=chunk).backward()
        rows[impl] = probe.rows
    # The probe does see the full logits on the plain path (so this test can fail) ...
    assert rows["reference"] >= tokens
    # ... and never more than one chunk of tokens on ours, forward and backward (B rows
    # are the one-position logits of logits_to_keep=1).
    assert rows["chunked"] <= max(chunk, B)


def test_offload_gives_the_gradients_of_on(model_dir):
    batch = _batch(128256)
    grads = {}
    for mode in ("off", "on", "offload"):
        model = _lora_model(model_dir)
        model.eval()  # as from_pretrained returns it: apply_checkpointing must undo this
        offloader = checkpointing.apply_checkpointing(model, mode, force_copy=True)
        assert model.training
        assert checkpointing.is_checkpointing(model) == (mode != "off")
        grads[mode] = _loss_and_grads(model, batch, "chunked")[1]
        if mode == "offload":
            # One saved input per decoder layer went through the offloader.
            assert offloader.packed == model.config.num_hidden_layers
    for name in grads["on"]:
        torch.testing.assert_close(grads["offload"][name], grads["on"][name], rtol=0, atol=0)
    _assert_grads_close(grads["off"], grads["on"])


def test_offload_on_cpu_is_on_and_bad_settings_fail(model_dir, monkeypatch):
    model = _lora_model(model_dir)
    assert checkpointing.apply_checkpointing(model, "offload") is None
    assert checkpointing.is_checkpointing(model)
    with pytest.raises(TunefixError):
        checkpointing.apply_checkpointing(model, "sometimes")
    monkeypatch.setenv(loss.IMPL_ENV, "fastest")
    with pytest.raises(TunefixError):
        loss.resolve_impl()
    monkeypatch.setenv(loss.IMPL_ENV, "reference")
    assert loss.resolve_impl() == "reference"
    assert loss.resolve_impl("chunked") == "chunked"


def test_chunked_under_bf16_autocast_tracks_reference():
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False)
    hidden = torch.randn(2, 33, 64)
    labels = torch.randint(0, 1000, (2, 33))
    results = []
    for impl in ("reference", "chunked"):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss.causal_lm_loss(h, head, labels, impl=impl, chunk_size=10)
        value.backward()
        assert value.dtype == torch.float32 and h.grad.dtype == torch.float32
        results.append((value.detach(), h.grad))
    (ref, ref_h), (got, got_h) = results
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_h, ref_h, rtol=2e-2, atol=2e-4)
