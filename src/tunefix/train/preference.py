"""Preference and reward training (DPO, ORPO, KTO, GRPO) on TRL, with tunefix around it.

TRL brings each method's loss, its logging and its trainer loop; tunefix brings the rest,
the same as for SFT: the model with the doctor's fixes, the rows through the one token
policy (``data/preference.py``: prompt ids exactly as inference builds them, one BOS, the
answer ending with the template's end-of-turn token inside the scored part), LoRA (PEFT)
with its fused forward, checkpointing, the run directory, the loss log and plot.

Each TRL trainer is subclassed only where it would tokenise the rows itself: the rows arrive
tokenised, so its ``_prepare_dataset`` returns them as they are (TRL renders prompt and
answer separately with the tokenizer's own template; the seam between them is where BOS is
doubled or the end-of-turn token lost, see tests/test_preference_data.py).

The reference model (DPO, KTO) is the same fixed base with the adapter disabled: TRL is given
the LoRA config and wraps the model itself, so it has no second adapter to copy ("ref") and
computes the reference log-probabilities with adapters off, once before training
(``precompute_ref_log_probs``): no reference forward per step, so a step costs one forward
and one backward, and TRL never toggles checkpointing during training (its toggle re-enables
transformers' plain checkpointing, which would silently replace tunefix's selective mode).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import trl
from trl.import_utils import TRLExperimentalWarning

with warnings.catch_warnings():  # ORPO lives in trl.experimental in TRL 1.16: its notice on every import otherwise
    warnings.simplefilter("ignore", TRLExperimentalWarning)
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tunefix.train.config import RunConfig
from tunefix.train.methods import loss_type, method_of

log = logging.getLogger(__name__)


def preference_rows(cfg: RunConfig, tok, prepared) -> tuple[Any, list[dict], list[dict], list[dict]]:
    """(template, train rows, eval rows, held-out standardised rows) of a preference run; the
    rows tokenised through the one token policy, truncations and drops said once."""
    from tunefix.data import preference as pd
    from tunefix.errors import TunefixError
    from tunefix.train.rows import hold_out

    template = pd.template_for_rows(tok, prepared, cfg.template)
    train, held = hold_out(prepared.rows, cfg.eval_fraction, cfg.seed)
    tokenize = {"pairs": pd.tokenize_pairs, "kto": pd.tokenize_kto, "prompts": pd.tokenize_prompts}[prepared.kind]
    (rows, stats), (eval_rows, _) = (tokenize(tok, template, part, max_seq_length=cfg.max_seq_length)
                                     for part in (train, held))
    if stats.truncated or stats.dropped:
        log.warning("%d rows truncated to %d tokens; %d rows dropped (the prompt alone fills it)",
                    stats.truncated, cfg.max_seq_length, stats.dropped)
    if not rows:
        raise TunefixError("no trainable rows", f"Check {RunConfig.option('max_seq_length')} and the data")
    return template, rows, eval_rows, held


def load_preference_rows(cfg: RunConfig):
    """The config's data as the method's rows (no model needed)."""
    from tunefix.data.preference import load_preference

    return load_preference(cfg.data, method_of(cfg).data, merge=cfg.merge, chosen=cfg.chosen,
                           rejected=cfg.rejected, output=cfg.output, label=cfg.label, system=cfg.system,
                           limit=cfg.limit_rows)


def trl_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool, tok):
    """The method's TRL config: tunefix's training arguments plus the method's settings."""
    from tunefix.train.arguments import training_kwargs

    m = method_of(cfg)
    # activation_checkpointing (not TRL's gradient_checkpointing=True, a deprecated alias in
    # transformers 5): tunefix applies its own checkpointing once TRL has wrapped the model.
    common = {**training_kwargs(cfg, run_dir, has_eval), "activation_checkpointing": False,
              "model_init_kwargs": None}
    if m.name == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=cfg.beta, loss_type=[loss_type(cfg)], max_length=None,
                         precompute_ref_log_probs=True, padding_free=False)
    if m.name == "kto":
        from trl import KTOConfig

        return KTOConfig(**common, beta=cfg.beta, loss_type=loss_type(cfg), max_length=None,
                         desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
                         precompute_ref_log_probs=True)
    if m.name == "orpo":  # TRL's ORPO truncates in tokenize_row (replaced): the rows already fit
        return ORPOConfig(**common, beta=cfg.beta, max_length=cfg.max_seq_length)
    if m.name == "grpo":
        from tunefix.train.grpo import grpo_arguments

        return grpo_arguments(cfg, common, tok)
    raise NotImplementedError(f"method {m.name}")


def build_trainer(cfg: RunConfig, model, tok, args, train_rows: list[dict], eval_rows: list[dict], *,
                  peft_config, callbacks: list):
    """The method's TRL trainer over tokenised rows (``datasets.Dataset``s)."""
    from datasets import Dataset

    if method_of(cfg).name == "grpo":
        from tunefix.train.grpo import build_grpo

        return build_grpo(cfg, model, tok, args, train_rows, eval_rows, peft_config=peft_config,
                          callbacks=callbacks)
    from tunefix.model.lora import peft_quietly

    cls = TRAINERS[method_of(cfg).name]
    train = Dataset.from_list(train_rows)
    held = Dataset.from_list(eval_rows) if eval_rows else None
    with peft_quietly():  # TRL wraps with PEFT, and reads the deprecated checkpointing flag too
        return cls(model=model, args=args, train_dataset=train, eval_dataset=held, processing_class=tok,
                   peft_config=peft_config, callbacks=callbacks)


class TunefixDPOTrainer(trl.DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenised by tunefix (one token policy)


class TunefixKTOTrainer(trl.KTOTrainer):
    """KTO over tunefix's ``{"prompt_ids", "completion_ids", "label"}`` rows.

    TRL's ``_prepare_dataset`` tokenises and then adds the KL rows; only the KL rows are kept
    here. KTO estimates its KL term from mismatched pairs: within each batch of
    ``per_device_train_batch_size`` rows (in order: KTOConfig samples sequentially, so the
    batches trained are these), row k gets the completion of row k-1 and the first row that
    of the last (TRL's ``add_kl_completion_ids``, same rotation, same batches).
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:  # apo_zero_unpaired has no KL term
            return dataset
        return dataset.map(_mismatched_completions, batched=True, batch_size=args.per_device_train_batch_size,
                           desc=f"KL completions of the {dataset_name} rows")


def _mismatched_completions(batch: dict[str, list]) -> dict[str, list]:
    completions = batch["completion_ids"]
    return {"KL_completion_ids": completions[-1:] + completions[:-1]}


class TunefixORPOTrainer(ORPOTrainer):
    """ORPO over tunefix's ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` rows (DPO's rows).

    TRL 1.16 has ORPO only in ``trl.experimental``, in its older design: the trainer maps
    ``tokenize_row`` over the data itself (re-tokenising the rendered text, adding BOS and
    EOS where it thinks they are missing). Here ``tokenize_row`` only lays tunefix's ids out
    under the keys its collator (``DPODataCollatorWithPadding``) pads: each sequence is the
    prompt then the answer, labels ``IGNORE`` over the prompt. No reference model.

    TRL's odds-ratio term scores the answer (mean log-prob over the labels); its NLL term
    scores the whole chosen sequence, prompt included: TRL's choice, after ORPO's authors
    (trl#1516, reverted back in trl#2527), kept as it is.
    """

    def tokenize_row(self, feature, model=None) -> dict[str, list[int]]:
        from tunefix.templates.policy import IGNORE

        prompt = list(feature["prompt_ids"])
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            answer = list(feature[f"{name}_ids"])
            row |= {f"{name}_input_ids": prompt + answer, f"{name}_attention_mask": [1] * (len(prompt) + len(answer)),
                    f"{name}_labels": [IGNORE] * len(prompt) + answer}
        return row


TRAINERS = {"dpo": TunefixDPOTrainer, "kto": TunefixKTOTrainer, "orpo": TunefixORPOTrainer}
"""Each TRL method's trainer, taking rows tokenised by tunefix as they are."""
