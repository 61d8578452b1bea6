"""transformers' ``Trainer`` with tunefix's loss: the one class of the training path.

Only ``compute_loss``, ``prediction_step`` and (under FSDP) ``_save`` are replaced; the
options come in through ``__init__`` as keywords, so a Trainer is whole once constructed.
This module imports transformers and torch: ``train()`` imports it only when it trains.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from tunefix.model import loss as lean  # looked up per call: a test's stand-in never sticks
from tunefix.model.padding import groups_pay_off, padding_free_loss


class TunefixTrainer(Trainer):
    """transformers' Trainer with tunefix's loss; everything else unchanged.

    Options (keywords, beyond Trainer's own): ``loss_impl`` (``tunefix.model.loss``'s
    implementation), ``sharded`` (the model is FSDP-sharded: full fine-tuning in several
    processes), ``drop_mask`` (causal attention without the padding mask where that
    changes nothing), ``padding_free`` (rows in groups cut to their own length, one
    process only), ``allocator`` (the lean CPU allocator's ``AllocatorTuning``, switched
    per phase; None: untouched).
    """

    def __init__(self, *args, loss_impl: str = "chunked", sharded: bool = False, drop_mask: bool = True,
                 padding_free: bool = True, allocator=None, **kwargs):
        # Set before Trainer's own __init__, so that nothing it calls sees them missing.
        self.loss_impl, self.sharded, self.drop_mask = loss_impl, sharded, drop_mask
        self.padding_free, self.allocator = padding_free, allocator
        self.tokens_seen = 0  # attention-mask tokens of every forward: the tok/s of the logs
        super().__init__(*args, **kwargs)
        self.padding_free = padding_free and groups_pay_off(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.tokens_seen += int(inputs["attention_mask"].sum())
        if self.allocator:
            self.allocator.forward_phase()
        # Several processes: DDP lets each parameter's gradient be ready once per backward,
        # so one forward per micro-batch there.
        free = self.padding_free and self.accelerator.num_processes == 1
        loss = padding_free_loss(model, inputs, enabled=free, drop_mask=self.drop_mask,
                                 num_items_in_batch=num_items_in_batch, impl=self.loss_impl)
        if self.allocator:
            self.allocator.backward_phase()  # Trainer runs the backward next
        # num_items_in_batch counts the tokens of all processes; DDP then averages the
        # gradients over processes, so each loss is scaled back up by their number (as
        # Trainer's own compute_loss does), or every update would be 1/world_size too small.
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _save(self, output_dir=None, state_dict=None):
        if not self.sharded:
            return super()._save(output_dir, state_dict)
        # FSDP: gather the full weights (every rank joins), rank 0 writes plain tensors.
        from tunefix.train.distributed import full_state_dict

        state = full_state_dict(self.model)
        if self.args.should_save:
            super()._save(output_dir, state)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = lean.model_loss(model, inputs, impl=self.loss_impl)
        return loss.detach(), None, None
