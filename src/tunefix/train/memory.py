"""Running out of memory while training: one line naming the memory options, no traceback,
and no half-made run directory left in the way of the retry.

torch raises ``torch.OutOfMemoryError`` on CUDA, a ``RuntimeError`` on other devices ("MPS
backend out of memory", CPU "DefaultCPUAllocator: can't allocate memory"), and Python a
``MemoryError``; all three mean the same thing to the user.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tunefix.errors import TunefixError
from tunefix.train.config import RunConfig

_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in _OOM_TEXTS)


def checkpointing_mode(cfg: RunConfig, cuda: bool) -> str:
    from tunefix.model.checkpointing import resolve_checkpointing

    return resolve_checkpointing(cfg.gradient_checkpointing, cuda)


def memory_hint(cfg: RunConfig, cuda: bool) -> str:
    """What to change, in the order that usually pays: batch, sequence length, checkpointing,
    the loss, 4-bit. (On a CPU activations already live in host memory: offload is on there.)"""
    o = RunConfig.option
    steps = [f"Lower {o('batch_size')} (now {cfg.batch_size}; raise {o('gradient_accumulation')} to keep "
             f"the effective batch) or {o('max_seq_length')} (now {cfg.max_seq_length})"]
    mode = checkpointing_mode(cfg, cuda)
    if mode == "off":
        steps.append(f"set {o('gradient_checkpointing')} on")
    elif mode == "on" and cuda:
        steps.append(f"set {o('gradient_checkpointing')} offload (activations in CPU memory)")
    elif mode == "selective":
        steps.append(f"set {o('gradient_checkpointing')} on (selective keeps each layer's attention output)")
    if not cuda:
        from tunefix.model.allocator import resolve_cpu_allocator

        if resolve_cpu_allocator(cfg.cpu_allocator) == "default":
            steps.append(f"set {o('cpu_allocator')} lean (about 2-3x less peak memory on a CPU)")
    if cfg.loss == "reference":
        steps.append(f"set {o('loss')} chunked (never holds the full-vocabulary logits)")
    if cuda and not cfg.load_in_4bit:
        steps.append(f"load the model in 4-bit ({o('load_in_4bit')} true)")
    return ", ".join(steps[:-1]) + (", or " if len(steps) > 1 else "") + steps[-1]


@contextlib.contextmanager
def out_of_memory_as_error(cfg: RunConfig, trainer, run_dir: Path, created: Path | None,
                           *, owner: bool = True) -> Iterator[None]:
    """Turn running out of memory inside the block into a TunefixError with the options to
    try. ``created``: the directory this run made (removed again when no checkpoint is worth
    keeping); ``owner``: this process owns the run directory (rank 0)."""
    import torch

    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.empty_cache()
        from tunefix.train.rundir import clean_up_fresh_run

        keep = clean_up_fresh_run(run_dir, created, cfg.resume) if owner else ""
        step = trainer.state.global_step + 1
        raise TunefixError(
            f"out of memory in training step {step} (batch {cfg.batch_size} x up to {cfg.max_seq_length} "
            f"tokens, gradient checkpointing {checkpointing_mode(cfg, cuda)}){keep}",
            memory_hint(cfg, cuda)) from None
