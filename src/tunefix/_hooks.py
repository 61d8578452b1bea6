"""Every private part of transformers, PEFT, datasets and torch that tunefix relies on, in one
list, with the versions it was checked on. ``tests/test_hooks.py`` fails when one disappears
(an upgrade then breaks a test here, not a user's run in silence).

Each hook is a dotted path to an attribute that must exist; ``reads`` lists attributes an
instance must have (checked on a tiny instance), and ``mentions`` a name the attribute's
source must contain (for hooks that are a protocol rather than an attribute).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Hook:
    path: str          # module.attr.attr...
    used_by: str       # the tunefix module and what for
    checked_on: str    # the versions the use was written and tested against
    mentions: str = ""  # a name the attribute's source must contain


HOOKS = (
    Hook("transformers.modeling_layers.GradientCheckpointingLayer",
         "model/checkpointing.py: each layer's _gradient_checkpointing_func is swapped for "
         "selective or offloaded checkpointing", "transformers 5.24", mentions="_gradient_checkpointing_func"),
    Hook("transformers.Trainer._save", "train/hf_trainer.py: FSDP gathers full weights before the save",
         "transformers 5.24"),
    Hook("transformers.Trainer._prepare_inputs", "train/hf_trainer.py: prediction_step with the chunked loss",
         "transformers 5.24"),
    Hook("transformers.Trainer.compute_loss_context_manager", "train/hf_trainer.py: prediction_step",
         "transformers 5.24"),
    Hook("transformers.PreTrainedModel._is_distributed_loading_by_transformers", "train/distributed.py: set on "
         "an FSDP2 model so that Trainer neither wraps it in DDP nor moves it", "transformers 5.24"),
    Hook("transformers.Trainer.__init__", "train/distributed.py: Trainer reads the flag above",
         "transformers 5.24", mentions="is_distributed_loading_by_transformers"),
    Hook("peft.tuners.lora.Linear.forward", "model/fused_lora.py: the fused forward replaces it per layer and "
         "reads lora_A, lora_B, lora_dropout, scaling, active_adapters, merged, disable_adapters, lora_variant",
         "peft 0.21", mentions="lora_dropout"),
    Hook("peft.tuners.lora.Linear.update_layer", "model/fused_lora.py: lora_variant (DoRA and other "
         "variants keep PEFT's forward)", "peft 0.21", mentions="lora_variant"),
    Hook("datasets.config.HF_UPDATE_DOWNLOAD_COUNTS", "data/load.py: no download-counter request for a "
         "local file", "datasets 5.2"),
    Hook("torch.utils.checkpoint.create_selective_checkpoint_contexts", "model/selective.py: attention "
         "outputs kept through a checkpointed layer", "torch 2.13"),
    Hook("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu", "model/selective.py: the CPU attention "
         "kernel whose outputs are kept", "torch 2.13"),
)


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def missing(hooks: tuple[Hook, ...] = HOOKS) -> list[str]:
    """The hooks the installed libraries no longer have, each with what breaks."""
    out = []
    for hook in hooks:
        try:
            obj = _resolve(hook.path)
            if hook.mentions and hook.mentions not in inspect.getsource(obj):
                raise AttributeError(f"no longer mentions {hook.mentions}")
        except (ImportError, AttributeError, TypeError, OSError) as e:
            out.append(f"{hook.path} ({type(e).__name__}: {e}): breaks {hook.used_by} (checked on {hook.checked_on})")
    return out
