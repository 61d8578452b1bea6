"""The Triton cross-entropy kernel (triton_ce) gives the losses and gradients of the torch paths.

Without a GPU the kernel runs in Triton's CPU interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before triton is imported: the checks run in a child process,
this file run as a script. Small shapes: the interpreter executes each program in Python.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tunefix.errors import TunefixError
from tunefix.model import loss, triton_ce

ROWS, HIDDEN, VOCAB, BLOCK = 37, 64, 1000, 256  # 1000 = 3 full blocks of 256 and 232 more


def test_kernel_matches_torch_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it is in the dev extra)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    for name in (loss.IMPL_ENV, triton_ce.DISABLE_ENV):
        env.pop(name, None)
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout, done.stdout + done.stderr


def test_kernel_compiles_for_gpus(monkeypatch):
    """The interpreter is lenient: compile for real GPUs too (to a cubin, no GPU needed)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (it is in the dev extra)")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton_ce._kernel.__wrapped__()  # a fresh JITFunction, not an interpreted one
    for arch, dtype, softcap, grad in ((90, "bf16", True, True), (90, "fp32", False, True),
                                       (80, "fp16", True, False)):
        signature = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                     "stride": "i32", "vocab": "i32", "ignore_index": "i32", "softcap": "fp32",
                     "scale": "fp32", "SOFTCAP": "constexpr", "GRAD": "constexpr",
                     "BLOCK": "constexpr"}
        try:
            source = ASTSource(fn=kernel, signature=signature,
                               constexprs={"SOFTCAP": softcap, "GRAD": grad, "BLOCK": 4096})
        except TypeError as error:  # an older triton spells its arguments differently
            pytest.skip(f"triton {triton.__version__}: {error}")
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": 8, "enable_fp_fusion": True})
        assert f".target sm_{arch}" in compiled.asm["ptx"] and compiled.asm["cubin"]


def test_chunked_is_torch_on_cpu_and_fused_insists(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(loss.IMPL_ENV, raising=False)
    if not torch.cuda.is_available():
        assert not triton_ce.available()
    assert loss.resolve_impl(None, "cpu") == "chunked"
    assert loss.resolve_impl("chunked", torch.device("cpu")) == "chunked"
    assert loss.resolve_impl("reference", "cpu") == "reference"
    assert loss.resolve_impl("fused") == "fused"  # no device: just the name
    with pytest.raises(TunefixError, match="fused loss needs triton"):
        loss.resolve_impl("fused", "cpu")
    # The switch that keeps the torch code even where the kernel could run.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(triton_ce.DISABLE_ENV, "0")
    assert not triton_ce.available() and not triton_ce.supports("cpu")
    assert loss.resolve_impl("chunked", "cpu") == "chunked"
    with pytest.raises(TunefixError, match="TUNEFIX_TRITON=0"):
        loss.resolve_impl("fused", "cpu")


# ---- run in the child process, under the interpreter -----------------------------------


class _NewVocabTensors(TorchDispatchMode):
    """Counts the tensors with ``vocab`` columns that ops allocate (not in-place results)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.made = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values())
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):
                self.made += 1
        return out


def _check_kernel():
    """cross_entropy_ on its own: losses and scaled gradients of logits, in place."""
    torch.manual_seed(0)
    targets = torch.randint(0, VOCAB, (ROWS,))
    targets[[3, 17, 30]] = -100
    for dtype in (torch.float32, torch.bfloat16):
        for softcap in (None, 5.0):
            logits = (4 * torch.randn(ROWS, VOCAB)).to(dtype)
            x = logits.float().requires_grad_(True)
            capped = torch.tanh(x / softcap) * softcap if softcap else x
            want = nn.functional.cross_entropy(capped, targets, reduction="none")
            (0.5 * want.sum()).backward()
            got = logits.clone()
            losses = triton_ce.cross_entropy_(got, targets, softcap=softcap, scale=0.5, block=BLOCK)
            torch.testing.assert_close(losses, want.detach(), rtol=1e-5, atol=1e-5)
            assert losses[[3, 17, 30]].eq(0).all()
            # In the logits' own dtype, converted once from fp32 as the torch path's grad_c.
            # The GPU rounds to nearest even; the interpreter truncates (its numpy cast),
            # so allow one unit in the last place of bf16.
            rtol = 1e-5 if dtype == torch.float32 else 2**-7
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), x.grad, rtol=rtol, atol=1e-7)
            assert got[[3, 17, 30]].eq(0).all()
            kept = logits.clone()
            again = triton_ce.cross_entropy_(kept, targets, softcap=softcap, grad=False, block=BLOCK)
            assert torch.equal(kept, logits)  # no gradient asked: the logits stay
            torch.testing.assert_close(again, losses, rtol=0, atol=0)
    # A target outside the vocabulary is a nan loss, not a read out of bounds.
    bad = targets.clone()
    bad[0] = VOCAB
    assert triton_ce.cross_entropy_(torch.randn(ROWS, VOCAB), bad, block=BLOCK)[0].isnan()


def _loss_and_grads(impl, hidden, head, labels, *, softcap=None, autocast=False):
    h = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = loss.causal_lm_loss(h, head, labels, softcap=softcap, impl=impl, chunk_size=16)
    (2.5 * value).backward()
    bias = head.bias.grad if head.bias is not None else None
    return value.detach(), h.grad, head.weight.grad, bias


def _torch_chunked(*args, **kwargs):
    os.environ[triton_ce.DISABLE_ENV] = "0"
    try:
        assert loss.resolve_impl("chunked", "cpu") == "chunked"
        return _loss_and_grads("chunked", *args, **kwargs)
    finally:
        del os.environ[triton_ce.DISABLE_ENV]


def _assert_all_close(got, want, rtol, atol):
    for name, g, w in zip(("loss", "grad of hidden", "grad of weight", "grad of bias"), got, want,
                          strict=True):
        if w is None:
            assert g is None, name
        else:
            assert g.dtype == w.dtype, name
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _check_loss():
    """causal_lm_loss through the kernel against the reference (transformers) and torch paths."""
    assert triton_ce.supports("cpu") and loss.resolve_impl("chunked", "cpu") == "fused"
    triton_ce.BLOCK = BLOCK  # several blocks per row, the last one ragged
    torch.manual_seed(1)
    labels = torch.randint(0, VOCAB, (1, ROWS + 1))  # shifted: ROWS scored positions at most
    labels[0, [5, 6, 20, 33]] = -100
    for bias, softcap, scale in ((False, None, 1.0), (True, 5.0, 10.0)):
        head = nn.Linear(HIDDEN, VOCAB, bias=bias)
        hidden = scale * torch.randn(1, ROWS + 1, HIDDEN)  # scaled: the softcap must bite
        ref = _loss_and_grads("reference", hidden, head, labels, softcap=softcap)
        for impl in ("fused", "chunked"):  # chunked resolves to fused here
            with _NewVocabTensors(VOCAB) as probe:
                got = _loss_and_grads(impl, hidden, head, labels, softcap=softcap)
            _assert_all_close(got, ref, rtol=1e-5, atol=1e-6)
            # One (chunk x vocab) tensor per chunk (the matmul's), none for the gradient.
            assert probe.made == 3, probe.made  # ceil((ROWS - 4) / 16) chunks
        torch.testing.assert_close(_torch_chunked(hidden, head, labels, softcap=softcap)[0], ref[0])

    # bf16: weights in bf16, and fp32 weights under bf16 autocast (the compute dtype is bf16
    # both times). The kernel reads bf16 logits and writes a bf16 gradient, as the torch
    # path's grad_c: the two agree to a bf16 rounding (the interpreter truncates where the
    # torch path rounds), and both track the fp32 reference.
    hidden = torch.randn(1, ROWS + 1, HIDDEN)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    ref = _loss_and_grads("reference", hidden, head, labels)
    for autocast in (False, True):
        h, m = (hidden, head) if autocast else (hidden.bfloat16(), copy.deepcopy(head).bfloat16())
        got = _loss_and_grads("fused", h, m, labels, autocast=autocast)
        _assert_all_close(got, _torch_chunked(h, m, labels, autocast=autocast), rtol=2e-2, atol=2e-4)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got[1].float(), ref[1], rtol=2e-2, atol=2e-4)

    # No gradient wanted: the kernel only scores.
    with torch.no_grad():
        torch.testing.assert_close(loss.causal_lm_loss(hidden, head, labels, impl="fused"), ref[0])


if __name__ == "__main__":
    assert triton_ce.interpreting(), "run under TRITON_INTERPRET=1"
    for check in (_check_kernel, _check_loss):
        start = time.perf_counter()
        check()
        print(f"{check.__name__}: ok in {time.perf_counter() - start:.1f} s")
    print("all checks passed")
