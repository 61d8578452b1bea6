"""Several processes: DDP for LoRA (through Trainer/accelerate), FSDP for full fine-tuning.

Full fine-tuning shards weights, gradients and optimizer state over the processes with
torch's FSDP2 (``fully_shard``): one unit per decoder layer, then the root (embeddings,
final norm, lm_head). We shard the model ourselves instead of asking accelerate for FSDP
because accelerate's FSDP is for accelerators only (measured: with ``fsdp=...`` on CPU
processes it silently falls back to DDP), while FSDP2 runs on gloo as well, so the CPU
test is the same code a GPU user runs. The model is then marked the way transformers marks
a model sharded at load time, so Trainer neither wraps it in DDP nor moves it.

What that mode cannot do (transformers refuses it for sharded models): save optimizer state
in checkpoints. Checkpoints hold the weights only, and resuming a multi-process full
fine-tune is refused with a message (LoRA runs resume as usual).
"""

from __future__ import annotations

import os
from typing import Any

from tunefix.errors import TunefixError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def uses_fsdp(method: str) -> bool:
    return method == "full" and world_size() > 1


def shard_model(model) -> int:
    """Apply FSDP2 to every decoder layer and to the root; returns the number of layers."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise TunefixError(f"{type(model).__name__} does not name its decoder layers; FSDP cannot shard it",
                           "Run --finetune full in one process, or use --finetune lora")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        model.to(f"cuda:{torch.cuda.current_device()}")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    # The flag transformers sets on a model it sharded at load time: Trainer then neither wraps
    # it in DDP nor moves it.
    model._is_distributed_loading_by_transformers = True
    return len(layers)


def full_state_dict(model) -> dict[str, Any] | None:
    """The whole model's weights gathered on rank 0 (collective: every rank calls it);
    ``None`` on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main_process() else None
