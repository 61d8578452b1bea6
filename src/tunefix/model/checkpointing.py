"""Gradient checkpointing modes: ``off``, ``on``, ``offload``, ``selective``.

``on`` is transformers' own activation checkpointing of each decoder layer, non-reentrant
(the reentrant variant needs inputs that require grad and breaks with frozen embeddings
under LoRA). transformers' models come back from ``from_pretrained`` in eval mode, where
their layers skip checkpointing without a word, so every mode puts the model in training
mode.

``offload`` checkpoints the same layers and, on an accelerator, moves the one tensor each
checkpointed layer keeps for its backward (its input hidden states, B x T x H) to pinned
host memory. The copy out runs with ``non_blocking`` on a side stream, so the next
layer's forward does not wait for it; in the backward, when layer i's input is brought
back, layer i-1's input starts coming back on the side stream, so it is there by the time
its recompute starts. transformers 5 has an ``offload=True`` of its own (torch's
``save_on_cpu`` around each checkpoint); we do not use it because it copies on the
compute stream, synchronously, both ways. On a CPU the tensors are already in host
memory and ``offload`` is ``on``.

``selective`` checkpoints the same layers but keeps each layer's attention output from the
forward, so the backward's recompute skips attention (``tunefix.model.selective``): for
about one hidden-state tensor a layer, the one recomputed part whose cost grows with the
square of the sequence is gone. ``on`` is its reference.

How: transformers calls ``layer._gradient_checkpointing_func(forward, *args)`` for each
checkpointed layer, an attribute it sets on each layer instance for this purpose. We set
our own function there, on this model's layers only: torch's non-reentrant checkpoint
inside our ``saved_tensors_hooks``. Inside a checkpoint, torch's own hooks (innermost)
take every activation, so ours see only what the checkpoint saves for itself: the inputs.
The road not taken: replacing each layer with a wrapper module changes the state-dict
keys (and so the saved adapters); patching the layer class would touch every model in
the process.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunefix.errors import TunefixError
from tunefix.model.loss import unwrap

MODES = ("off", "on", "offload", "selective")


def resolve_checkpointing(mode: str, cuda: bool) -> str:
    """``auto`` as a mode: ``selective`` on a CPU (the attention recompute is the costliest
    part of the backward there, and memory is what the allocator gives back), ``on`` with
    CUDA (selective's extra tensor per layer is unmeasured in GPU memory); others as given."""
    if mode == "auto":
        return "on" if cuda else "selective"
    return mode


def apply_checkpointing(model: nn.Module, mode: str, *, force_copy: bool = False) -> Offloader | None:
    """Set ``model``'s gradient checkpointing to ``mode`` and put it in training mode.

    model: a transformers causal LM, possibly inside peft / DDP wrappers.
    force_copy: with ``offload``, copy the saved inputs even when they are already in host
        memory (tests use it to run the offload path on a CPU).
    Returns the ``Offloader`` when one is installed (its ``packed`` counts the tensors it
    moved), else None.
    """
    if mode not in MODES:
        raise TunefixError(f"unknown gradient checkpointing mode {mode!r}",
                           f"Choose one of {', '.join(MODES)}")
    base = unwrap(model)
    model.train()  # eval mode silently disables checkpointing (see the module docstring)
    if mode == "off":
        if is_checkpointing(base):
            disable = getattr(base, "activation_checkpointing_disable", None)  # transformers >= 5
            (disable or base.gradient_checkpointing_disable)()
        return None
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise TunefixError(f"{type(base).__name__} does not support gradient checkpointing",
                           "Use gradient_checkpointing=off")
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "on":
        return None
    layers = _checkpointed_layers(base)
    if mode == "selective":
        from tunefix.model.selective import selective_checkpoint

        for layer in layers:
            layer._gradient_checkpointing_func = selective_checkpoint
        return None
    device_type = next(base.parameters()).device.type
    if device_type == "cpu" and not force_copy:
        return None  # already in host memory: offload is on
    offloader = Offloader(force_copy=force_copy)
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = functools.partial(offloader.checkpoint, index)
    return offloader


def is_checkpointing(model: nn.Module) -> bool:
    """Whether ``model``'s decoder layers are checkpointed (in training mode)."""
    base = unwrap(model)
    # transformers 5 renamed the flag and deprecated the old name.
    flag = "is_activation_checkpointing" if hasattr(base, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, flag, False))


def _checkpointed_layers(base: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in base.modules()
              if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]
    if not layers:
        raise TunefixError(f"{type(base).__name__} has no checkpointable decoder layers",
                           "Use gradient_checkpointing=on")
    return layers


class Offloader:
    """Keeps the inputs of checkpointed layers in pinned host memory between forward and backward.

    One per model (no global state). ``packed`` counts the tensors moved out.
    """

    def __init__(self, *, force_copy: bool = False):
        self.force_copy = force_copy
        self.packed = 0
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: weakref.ref[_Offloaded] | None = None

    def checkpoint(self, index: int, function, *args, **kwargs):
        """transformers' checkpoint function for layer ``index``: torch's, with our hooks outside."""
        pack = functools.partial(self._pack, index)
        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            return checkpoint(function, *args, use_reentrant=False, **kwargs)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, index: int, tensor: torch.Tensor):
        on_host = tensor.device.type == "cpu"
        if tensor.numel() == 0 or (on_host and not self.force_copy):
            return tensor  # checkpoint's empty marker tensor; or nothing to move
        if on_host:
            handle = _Offloaded(index, tensor.clone(), tensor.device, None)
        elif tensor.device.type == "cuda":
            stream = self._stream(tensor.device)
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # wait until it is written
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            # The compute stream may free ``tensor`` right away; this keeps its memory from
            # being reused before the side stream has read it.
            tensor.record_stream(stream)
            handle = _Offloaded(index, host, tensor.device, stream)
        else:
            return tensor  # other accelerators: kept in place (same as on)
        previous = self._last() if self._last is not None else None
        if previous is not None and previous.index == index - 1:
            handle.previous = weakref.ref(previous)  # the input the backward needs after this one
        self._last = weakref.ref(handle)
        self.packed += 1
        return handle

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _Offloaded):
            return packed
        tensor = packed.take()
        previous = packed.previous() if packed.previous is not None else None
        if previous is not None:
            previous.prefetch()  # overlaps with this layer's recompute and backward
        return tensor


class _Offloaded:
    """One saved input in host memory, and its way back to the device."""

    def __init__(self, index: int, host: torch.Tensor, device: torch.device, stream):
        self.index = index
        self.host = host  # pinned (CUDA) or a plain copy (CPU, tests)
        self.device = device
        self.stream = stream
        self.previous: weakref.ref[_Offloaded] | None = None
        self._back: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        if self.stream is None or self._back is not None:
            return
        # Same side stream as the copy out, so it runs after it.
        with torch.cuda.stream(self.stream):
            self._back = self.host.to(self.device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(self.stream)

    def take(self) -> torch.Tensor:
        if self.stream is None:
            return self.host
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self._ready)
        tensor, self._back = self._back, None
        tensor.record_stream(current)  # made on the side stream, used on the compute stream
        return tensor
