"""The private parts of other libraries that tunefix uses (``tunefix._hooks``) are all there."""

from __future__ import annotations

from tunefix._hooks import HOOKS, Hook, missing


def test_every_private_hook_is_still_there():
    assert missing() == []


def test_a_vanished_hook_is_reported_with_what_it_breaks():
    gone = (Hook("transformers.Trainer._no_such_method", "train/trainer.py: something", "transformers 5.24"),
            Hook("transformers.Trainer._save", "x", "y", mentions="no_such_name_in_the_source"))
    report = missing(gone)
    assert len(report) == 2 and "breaks train/trainer.py: something" in report[0]
    assert "no longer mentions no_such_name_in_the_source" in report[1]


def test_the_fused_forward_reads_only_what_a_peft_lora_layer_has():
    """The attributes fused_lora reads, on a real PEFT LoRA Linear."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear
    from torch import nn

    layer = LoraLinear(nn.Linear(8, 8), adapter_name="default", config=LoraConfig(r=2), r=2)
    for name in ("lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "merged",
                 "disable_adapters", "base_layer"):
        assert hasattr(layer, name), name
    assert "fused_lora" in next(h.used_by for h in HOOKS if h.path.startswith("peft.tuners.lora.Linear.forward"))
