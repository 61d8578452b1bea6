"""The causal-LM loss without the full-vocabulary logits.

A plain ``model(input_ids, labels=labels)`` computes ``logits = lm_head(hidden)``, a
(tokens x vocab) tensor, upcasts it to fp32 and keeps it (and its softmax) for the
backward. With Llama 3's 128k vocabulary that is 0.5 MB per token: 2 GB for a batch of
2 x 2048, more than the rest of a small model's activations together.

``chunked`` (the default) never builds it. It drops the tokens whose label is ignored
(prompt and padding: their gradient is zero, so they need no logits at all), then walks
the remaining tokens in chunks: each chunk's ``hidden @ lm_head.T`` is made in fp32,
turned into its cross-entropy and, in the same pass, into its gradients with respect to
the chunk's hidden states and the lm_head weight; then the chunk's logits are freed. The
backward only scales those stored gradients. This does the three matmuls of the plain
path (forward, grad of hidden, grad of weight) and no recompute. The road not taken:
wrapping each chunk in ``torch.utils.checkpoint`` is simpler but recomputes every
chunk's logits in the backward (a fourth matmul); it is kept for lm_heads that are not a
plain ``nn.Linear`` (a LoRA-wrapped or ``modules_to_save`` lm_head), whose forward we
must call rather than read a weight from.

On CUDA (with triton installed) ``chunked`` resolves to ``fused``: the same chunks and
matmuls, but each chunk's log-sum-exp, loss and gradient come from one Triton kernel
(``triton_ce``) that reads the matmul's logits in their own dtype and overwrites them with
their gradient in place: three passes over the chunk instead of the torch code's eight or
so, and no other (chunk x vocab) tensor (the torch code adds an fp32 copy of bf16 logits,
a capped copy under a softcap and a bf16 copy of the gradient). On CPU ``chunked`` is the
torch code. ``TUNEFIX_TRITON=0`` keeps the torch code on CUDA too.

``reference`` computes the plain logits and hands them to transformers' own
``ForCausalLMLoss``, so the two paths are compared against the semantics Hugging Face
trains with (label shift, ``ignore_index``, ``num_items_in_batch``). Choose with the
``impl`` argument or ``TUNEFIX_LOSS=reference|chunked|fused`` (``fused`` insists on the
kernel: an error where it cannot run).

Written by hand because neither transformers nor peft offer a chunked loss for CPU; the
fused CUDA kernels of other projects are not used (and not copied): ours is written from
the math.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunefix.errors import TunefixError

IMPLS = ("reference", "chunked", "fused")
IMPL_ENV = "TUNEFIX_LOSS"
# Elements of one chunk's (tokens x vocab) fp32 logits: 2**25 is 128 MB, about 260
# tokens of a 128k vocabulary and 680 of SmolLM2's 49k. Smaller chunks save little more
# (the model's own activations dominate) and make the matmuls less efficient.
CHUNK_ELEMENTS = 1 << 25


def resolve_impl(impl: str | None = None, device: torch.device | str | None = None) -> str:
    """The loss implementation to use: ``impl``, else ``$TUNEFIX_LOSS``, else ``chunked``.

    With the ``device`` of the hidden states, ``chunked`` becomes ``fused`` where the
    Triton kernel runs there (CUDA and triton, or the Triton interpreter).
    """
    chosen = impl or os.environ.get(IMPL_ENV) or "chunked"
    if chosen not in IMPLS:
        source = "impl" if impl else IMPL_ENV
        raise TunefixError(f"unknown loss implementation {chosen!r} (from {source})",
                           f"Choose one of {', '.join(IMPLS)}")
    if device is None or chosen == "reference":
        return chosen
    from tunefix.model import triton_ce

    if triton_ce.supports(device):
        return "fused"
    if chosen == "fused":
        raise TunefixError(f"the fused loss needs triton and a CUDA device (hidden states on "
                           f"{torch.device(device)}, {triton_ce.DISABLE_ENV}="
                           f"{os.environ.get(triton_ce.DISABLE_ENV, 'unset')})",
                           "Use the chunked loss: the kernel where it runs, torch elsewhere")
    return "chunked"


def shift_labels_of(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Targets for next-token prediction: position t is scored on labels[t + 1].

    Same as transformers' ``ForCausalLMLoss``: pad one ``ignore_index`` on the right
    rather than cut the last position, so the shapes of hidden and targets stay equal.
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()  # (B, T)


def causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``lm_head(hidden)`` against ``labels``.

    hidden: (B, T, H) final hidden states (after the model's last norm).
    labels: (B, T) token ids, ``ignore_index`` where no loss is wanted; shifted here.
        Or pass ``shift_labels`` (B, T), already aligned with ``hidden``.
    num_items_in_batch: when given, the sum of the token losses is divided by it instead
        of by the number of scored tokens (gradient accumulation over micro-batches, as in
        transformers' Trainer).
    softcap: Gemma 2's ``final_logit_softcapping``: logits become ``c * tanh(logits / c)``.
    impl: ``chunked``, ``fused`` or ``reference`` (default: ``$TUNEFIX_LOSS``, else
        ``chunked``, which is ``fused`` where the Triton kernel runs).
    chunk_size: tokens per chunk (default: about 128 MB of fp32 logits per chunk).

    Returns an fp32 scalar.
    """
    if shift_labels is None:
        if labels is None:
            raise TunefixError("causal_lm_loss needs labels or shift_labels")
        shift_labels = shift_labels_of(labels, ignore_index)
    if shift_labels.shape != hidden.shape[:-1]:
        raise TunefixError(f"labels of shape {tuple(shift_labels.shape)} do not match hidden "
                           f"states of shape {tuple(hidden.shape)}")
    chosen = resolve_impl(impl, hidden.device)
    if chosen == "reference":
        return reference_loss(hidden, lm_head, shift_labels, num_items_in_batch=num_items_in_batch,
                              ignore_index=ignore_index, softcap=softcap)
    return chunked_loss(hidden, lm_head, shift_labels, num_items_in_batch=num_items_in_batch,
                        ignore_index=ignore_index, softcap=softcap, chunk_size=chunk_size,
                        fused=chosen == "fused")


def reference_loss(hidden, lm_head, shift_labels, *, num_items_in_batch=None, ignore_index=-100,
                   softcap=None) -> torch.Tensor:
    """The plain path: full logits, then transformers' ``ForCausalLMLoss``."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = lm_head(hidden)  # (B, T, V): the tensor the chunked path avoids
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, None, logits.shape[-1], num_items_in_batch=num_items_in_batch,
                           ignore_index=ignore_index, shift_labels=shift_labels.contiguous())


def chunked_loss(hidden, lm_head, shift_labels, *, num_items_in_batch=None, ignore_index=-100,
                 softcap=None, chunk_size=None, fused=False) -> torch.Tensor:
    """The memory-lean path (see the module docstring).

    ``fused``: each chunk's cross-entropy by the Triton kernel, where lm_head is a plain
    ``nn.Linear`` with a plain weight, computing in fp32, bf16 or fp16 (else the torch
    code, silently).
    """
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H), N = B * T
    targets = shift_labels.reshape(-1).to(flat.device)  # (N,)
    keep = (targets != ignore_index).nonzero().squeeze(1)  # (M,) scored positions
    scored = flat.index_select(0, keep)  # (M, H); its backward scatters into zeros
    targets = targets.index_select(0, keep)  # (M,)

    weight, bias = _plain_linear(lm_head)
    vocab = weight.shape[0] if weight is not None else _out_features(lm_head)
    chunk = chunk_size or max(1, CHUNK_ELEMENTS // vocab)

    if scored.shape[0] == 0:
        # Nothing to score: keep the graph connected so backward() still works.
        total = flat.sum().float() * 0.0
    elif weight is not None:
        compute_dtype = _compute_dtype(scored.device.type, weight.dtype)
        from tunefix.model import triton_ce

        # A tensor subclass (a DTensor shard, say) would reach the kernel as raw memory.
        fused = fused and compute_dtype in triton_ce.DTYPES and type(weight.data) is torch.Tensor
        total = _LinearCrossEntropy.apply(scored, weight, bias, targets, softcap, chunk,
                                          compute_dtype, ignore_index if fused else None)
    else:
        total = _module_chunks(scored, lm_head, targets, softcap, chunk)

    # Same division as transformers' fixed_cross_entropy: by the count of scored tokens
    # (mean), or by num_items_in_batch under gradient accumulation. Zero scored tokens
    # give 0/0 = nan in both, on purpose: a batch with no labels is a data bug.
    if num_items_in_batch is None:
        return total / keep.numel()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _plain_linear(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight, bias) when ``module`` computes exactly ``F.linear(x, weight, bias)``.

    A peft LoRA layer or ``ModulesToSaveWrapper`` is not a plain ``nn.Linear`` (its class
    differs), and a module with forward hooks may change the output: both go through the
    module itself, chunk by chunk.
    """
    plain = type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)
    if plain:
        return module.weight, module.bias
    return None, None


def _out_features(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)  # peft wrappers forward .weight to the base layer
    if weight is None:
        raise TunefixError(f"cannot tell the vocabulary size of lm_head {type(module).__name__}")
    return weight.shape[0]


def _compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    # The plain path's lm_head matmul runs in the autocast dtype when autocast is on (and
    # its logits are upcast to fp32 afterwards); do the same so both paths agree.
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight_dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T + bias), gradients made in forward.

    Computing the gradients while each chunk's logits exist is what lets the backward
    skip the logits entirely; the cost is holding grad_hidden (M x H, the size of the
    input) and, only when the weight is trained, an fp32 grad_weight (V x H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk, compute_dtype, fused_ignore):
        # fused_ignore: None for the torch code, else the ignore_index for the Triton kernel.
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        rows = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)  # (V, H)
            b = bias.to(compute_dtype) if bias is not None else None
            grad_h = torch.empty_like(hidden) if need_h else None  # (M, H)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, rows, chunk):
                stop = min(start + chunk, rows)
                h = hidden[start:stop].to(compute_dtype)  # (C, H)
                t = targets[start:stop]  # (C,)
                want_grad = need_h or need_w or need_b
                if fused_ignore is not None:
                    # Logits in the compute dtype, overwritten by their gradient (C, V).
                    grad = F.linear(h, w, b)
                    total += _fused_chunk(grad, t, softcap, want_grad, fused_ignore)
                else:
                    part, grad = _torch_chunk(F.linear(h, w, b).float(), t, softcap, want_grad)
                    total += part
                if not want_grad:
                    continue
                grad_c = grad.to(compute_dtype)  # (C, V); no copy when fused
                if need_h:
                    grad_h[start:stop] = grad_c @ w  # (C, H)
                if need_w and compute_dtype == torch.float32:
                    grad_w.addmm_(grad_c.t(), h)  # (V, H), accumulated without a temporary
                elif need_w:
                    grad_w += (grad_c.t() @ h).float()  # (V, H)
                if need_b:
                    grad_b += grad.sum(0, dtype=torch.float32)  # (V,)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        # The loss is a scalar: its incoming gradient just scales what forward stored
        # (1 / num_items, the loss scale, the accumulation factor).
        out_h = (grad_h * grad_out).to(h_dtype) if grad_h is not None else None
        out_w = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None


def _torch_chunk(logits, targets, softcap, want_grad):
    """(loss sum, d loss / d logits or None) of fp32 logits (C, V), consumed in place."""
    tanh = None
    if softcap:
        tanh = logits.div_(softcap).tanh_()  # (C, V), in place
        logits = tanh * softcap  # (C, V)
    # log-sum-exp by hand rather than torch.logsumexp: its exp is also the softmax the
    # gradient needs, so the (C, V) exp is made once, in place.
    top = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    picked = logits.gather(1, targets[:, None])  # (C, 1)
    exp = logits.sub_(top).exp_()  # (C, V), in place of the logits
    norm = exp.sum(dim=-1, keepdim=True)  # (C, 1)
    total = (top + norm.log() - picked).sum()
    if not want_grad:
        return total, None
    # d(lse - logit_t)/d logits = softmax - onehot(t), made in place.
    grad = exp.div_(norm)  # (C, V)
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    if tanh is not None:
        grad.mul_(1.0 - tanh.square_())  # d(c * tanh(x / c))/dx = 1 - tanh^2
    return total, grad


def _fused_chunk(logits, targets, softcap, want_grad, ignore_index):
    """The loss sum of logits (C, V); with ``want_grad`` they become its gradient, in place.

    chunked_loss dropped the ignored rows already; a target out of range gives a nan loss
    (the torch code raises on CPU and asserts on CUDA).
    """
    from tunefix.model import triton_ce

    return triton_ce.cross_entropy_(logits, targets, ignore_index=ignore_index, softcap=softcap,
                                    grad=want_grad).sum()


def _chunk_ce_sum(lm_head, hidden, targets, softcap):
    logits = lm_head(hidden).float()  # (C, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _module_chunks(hidden, lm_head, targets, softcap, chunk) -> torch.Tensor:
    # Each chunk is recomputed in the backward (only its (C, H) input is kept), so at most
    # one chunk's logits exist at a time, whatever lm_head's forward does.
    total = None
    for start in range(0, hidden.shape[0], chunk):
        part = checkpoint(_chunk_ce_sum, lm_head, hidden[start:start + chunk],
                          targets[start:start + chunk], softcap, use_reentrant=False)
        total = part if total is None else total + part
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/FSDP-style (``.module``) and peft wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft's PeftModel
        model = model.get_base_model()
    return model


def final_hidden(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """The last hidden states (B, T, H) of a causal LM, without its full logits.

    The model is called through its own (and its wrappers') forward, so peft, DDP and
    accelerate keep working, with ``logits_to_keep=1``: the lm_head then runs on the last
    position only (B x 1 x V, negligible). A forward hook on the decoder body (this
    instance only, removed afterwards) catches its output. The road not taken: calling
    ``model.model(...)`` directly is simpler but bypasses a DDP wrapper's forward, and with
    it the gradient synchronisation.
    """
    base = unwrap(model)
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise TunefixError(f"{type(base).__name__} has no logits_to_keep argument",
                           "Use TUNEFIX_LOSS=reference for this model")
    decoder = base.get_decoder()
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0])  # ModelOutput and tuples both index as (last_hidden_state, ...)

    handle = decoder.register_forward_hook(grab)
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise TunefixError(f"expected one decoder output, got {len(captured)}")
    return captured[0]


def logit_softcap(model: nn.Module) -> float | None:
    """The final-logit soft-capping of ``model``'s config (Gemma 2 and 3), else None."""
    config = unwrap(model).config
    config = getattr(config, "get_text_config", lambda: config)()
    for name in ("logit_scale", "logits_scaling"):  # Cohere, Granite: not handled yet
        if getattr(config, name, 1.0) not in (None, 1.0):
            raise TunefixError(f"{type(config).__name__} scales its logits ({name}); the "
                               "chunked loss does not", "Use TUNEFIX_LOSS=reference")
    return getattr(config, "final_logit_softcapping", None) or None


def model_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    impl: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The training loss of ``model`` on ``batch`` (input_ids, attention_mask, labels, ...).

    Equal to ``model(**batch).loss`` (with ``num_items_in_batch`` passed through), but the
    chunked implementation never holds the (tokens x vocab) logits.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "labels" not in batch:
        raise TunefixError("the batch has no labels")
    hidden = final_hidden(model, **inputs)  # (B, T, H)
    return causal_lm_loss(hidden, unwrap(model).get_output_embeddings(), batch["labels"],
                          num_items_in_batch=num_items_in_batch, softcap=logit_softcap(model),
                          impl=impl, chunk_size=chunk_size)
