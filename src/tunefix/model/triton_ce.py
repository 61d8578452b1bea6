"""One chunk's cross-entropy and its gradient in one Triton kernel, in place of the logits.

``loss._LinearCrossEntropy`` computes a chunk's logits ``hidden @ weight.T`` with a matmul
(cuBLAS on CUDA); the torch path then makes the chunk's fp32 logits, their exp, a capped
copy with a softcap, and a gradient copy in the compute dtype, each a (chunk x vocab)
tensor. Here one kernel, one program per row, reads the row twice and writes it once:

1. a streaming max and log-sum-exp over the vocabulary, a block of ``BLOCK`` columns at a
   time (the running sum is rescaled whenever the running max grows), after the optional
   soft-capping ``c * tanh(x / c)`` of Gemma 2; the row's loss is ``lse - logit[target]``
   (0 where the target is ``ignore_index``, nan where it is out of range);
2. the row is overwritten with ``d loss / d logits * scale``: ``softmax - onehot(target)``,
   times ``1 - tanh(x / c) ** 2`` under a softcap, 0 on an ignored row.

The logits may be fp32, bf16 or fp16: the arithmetic is fp32, the gradient is written back
in the logits' dtype (the dtype the next matmuls want), so no second buffer exists. Written
from the math above; no third-party kernel was copied.

triton is imported only when the kernel is first used. ``TRITON_INTERPRET=1`` (set before
triton is imported) runs the kernel on CPU tensors with numpy: that is how the tests check
it without a GPU. ``TUNEFIX_TRITON=0`` turns the kernel off (the torch path is used).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch

DISABLE_ENV = "TUNEFIX_TRITON"
# Columns per block. A power of two; capped at the vocabulary's next power of two.
BLOCK = 4096
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

tl: Any = None  # triton.language, bound on first use (the kernel's global, as Triton wants)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """Whether the kernel can run here: triton imports, and a CUDA device or the interpreter."""
    if os.environ.get(DISABLE_ENV, "").strip() == "0":
        return False
    if not (interpreting() or torch.cuda.is_available()):
        return False  # don't pay for importing triton on a CPU machine
    return _triton_imports()


def supports(device: torch.device | str) -> bool:
    """Whether the kernel can run on tensors of ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return available()
    return device.type == "cpu" and interpreting() and available()


def cross_entropy_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    softcap: float | None = None,
    scale: float = 1.0,
    grad: bool = True,
    block: int | None = None,
) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` (C, V) against ``targets`` (C,), fp32 (C,).

    With ``grad`` the logits are overwritten, in place, by ``scale`` times the gradient of
    each row's loss with respect to its logits (rows of ``ignore_index`` become zeros).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a (rows x vocab) row-major tensor, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    if logits.dtype not in DTYPES:
        raise ValueError(f"logits of dtype {logits.dtype}: the kernel takes {DTYPES}")
    rows, vocab = logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"targets of shape {tuple(targets.shape)} for {rows} rows")
    targets = targets.to(device=logits.device, dtype=torch.int64).contiguous()
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    width = min(block or BLOCK, 1 << max(vocab - 1, 1).bit_length())
    kernel = _kernel()
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        kernel[(rows,)](logits, targets, losses, logits.stride(0), vocab, ignore_index,
                        float(softcap or 0.0), float(scale), SOFTCAP=bool(softcap), GRAD=grad,
                        BLOCK=width, num_warps=8 if width >= 2048 else 4, enable_fp_fusion=True)
    return losses


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_ce_rows)


def _ce_rows(logits_ptr, targets_ptr, loss_ptr, stride, vocab, ignore_index, softcap, scale,
             SOFTCAP: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: see the module docstring. Jitted by ``_kernel()``."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    scored = target != ignore_index
    in_range = (target >= 0) & (target < vocab)
    cols = tl.arange(0, BLOCK)

    # 1. Streaming log-sum-exp. Every block holds at least one column, so its max is
    # finite and the first rescale is exp(-inf) * 0 = 0.
    top = tl.full((), float("-inf"), tl.float32)
    norm = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        idx = start + cols
        mask = idx < vocab
        x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:  # c * tanh(x / c), tanh(y) = 2 * sigmoid(2y) - 1
            x = softcap * (2.0 * tl.sigmoid(2.0 * (x / softcap)) - 1.0)
        x = tl.where(mask, x, float("-inf"))
        new_top = tl.maximum(top, tl.max(x, axis=0))
        norm = norm * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top

    picked = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
    if SOFTCAP:
        picked = softcap * (2.0 * tl.sigmoid(2.0 * (picked / softcap)) - 1.0)
    loss = tl.where(in_range, top + tl.log(norm) - picked, float("nan"))
    tl.store(loss_ptr + row, tl.where(scored, loss, 0.0))

    # 2. The gradient, over the logits: (softmax - onehot(target)) * scale.
    if GRAD:
        weight = tl.where(scored, scale / norm, 0.0)
        hit = tl.where(scored, scale, 0.0)
        for start in range(0, vocab, BLOCK):
            idx = start + cols
            mask = idx < vocab
            x = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                tanh = 2.0 * tl.sigmoid(2.0 * (x / softcap)) - 1.0
                x = softcap * tanh
            g = tl.exp(x - top) * weight - tl.where(idx == target, hit, 0.0)
            if SOFTCAP:  # d(c * tanh(x / c))/dx = 1 - tanh^2
                g = g * (1.0 - tanh * tanh)
            tl.store(base + idx, g.to(logits_ptr.dtype.element_ty), mask=mask)
