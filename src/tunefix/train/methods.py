"""What a run learns from: one record per training method, the table every path reads.

SFT and continued pretraining run on transformers' ``Trainer`` with tunefix's loss
(``train/hf_trainer.py``); the preference and reward methods run on TRL's trainers
(``train/preference.py``) with tunefix's data, token policy, model fixes and LoRA around
them. Adding a method is one record here, its trainer in ``train/preference.py`` and tests.

No torch, no TRL here: the config validates against this table before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunefix.errors import TunefixError


@dataclass(frozen=True)
class Method:
    name: str
    data: str
    """what a row holds: chat (conversations), text (raw text), pairs (prompt, chosen,
    rejected), kto (prompt, completion, label) or prompts (GRPO: a prompt and any columns)"""
    trl: str | None = None
    """the TRL trainer it runs on (None: tunefix's own Trainer)"""
    reference: bool = False
    """its loss compares with a reference model: the same fixed base, adapters disabled"""
    settings: tuple[str, ...] = ()
    """the config keys only this method (and others listing them) reads"""
    losses: tuple[str, ...] = ()
    """the loss_type values it accepts, its default first"""


# TRL 1.16's DPOConfig.loss_type values (tests/test_methods.py checks them against TRL's docs).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "chat"),
    Method("cpt", "text"),
    Method("dpo", "pairs", "DPOTrainer", reference=True, settings=("chosen", "rejected", "beta", "loss_type"),
           losses=DPO_LOSSES),
    Method("orpo", "pairs", "ORPOTrainer", settings=("chosen", "rejected", "beta")),
    Method("kto", "kto", "KTOTrainer", reference=True,
           settings=("label", "beta", "loss_type", "desirable_weight", "undesirable_weight"),
           losses=("kto", "apo_zero_unpaired")),
    Method("grpo", "prompts", "GRPOTrainer",
           settings=("rewards", "reward_weights", "num_generations", "max_completion_length", "temperature",
                     "top_p")),
)}

# Defaults of the settings (a setting another method reads must keep its default).
_UNSET = {"chosen": None, "rejected": None, "label": None, "beta": 0.1, "loss_type": None,
          "desirable_weight": 1.0, "undesirable_weight": 1.0, "rewards": None, "reward_weights": None,
          "num_generations": 4, "max_completion_length": 64, "temperature": 1.0, "top_p": 1.0}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")  # RunConfig.option (config.py imports this module)


def method_of(cfg) -> Method:
    return METHODS[cfg.method]


def loss_type(cfg) -> str | None:
    """The method's loss: the config's, else the method's default (None: it has no choice)."""
    m = method_of(cfg)
    return cfg.loss_type or (m.losses[0] if m.losses else None)


def validate_method(cfg) -> None:
    """The method's settings, in one line each, before anything loads."""
    o, m = _option, METHODS[cfg.method]
    for key, unset in _UNSET.items():
        if key not in m.settings and getattr(cfg, key) != unset:
            readers = [x.name for x in METHODS.values() if key in x.settings]
            raise TunefixError(f"{o(key)} is a setting of {' and '.join(readers)}, not of {o('method')} {m.name}",
                               f"Drop {o(key)}, or choose {o('method')} {readers[0]}")
    if cfg.loss_type is not None and cfg.loss_type not in m.losses:
        raise TunefixError(f"{o('loss_type')} must be one of {', '.join(m.losses)} for {m.name}, got {cfg.loss_type!r}")
    if not cfg.beta > 0:
        raise TunefixError(f"{o('beta')} must be a positive number, got {cfg.beta}")
    for name in ("desirable_weight", "undesirable_weight", "temperature"):
        if not getattr(cfg, name) > 0:
            raise TunefixError(f"{o(name)} must be a positive number, got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise TunefixError(f"{o('top_p')} must be in (0, 1], got {cfg.top_p}")
    if cfg.max_completion_length <= 0:
        raise TunefixError(f"{o('max_completion_length')} must be a positive number, got {cfg.max_completion_length}")
    if m.name == "grpo":
        _validate_grpo(cfg)
    if m.name == "cpt" and cfg.format not in (None, "text"):
        raise TunefixError(f"{o('method')} cpt trains on raw text, not on {o('format')} {cfg.format}",
                           f"Use {o('method')} sft for conversations")


def _validate_grpo(cfg) -> None:
    import math

    o = _option
    if not cfg.rewards:
        raise TunefixError(f"{o('method')} grpo needs {o('rewards')}",
                           f"e.g. {o('rewards')} exact_match:COLUMN, or your own path/to/file.py:function")
    if cfg.num_generations < 2:
        raise TunefixError(f"{o('num_generations')} must be 2 or more (GRPO compares the answers of each "
                           f"prompt with each other), got {cfg.num_generations}")
    weights = cfg.reward_weights
    if weights is not None and (len(weights) != len(cfg.rewards) or not all(math.isfinite(w) for w in weights)):
        raise TunefixError(f"{o('reward_weights')} must be {len(cfg.rewards)} finite numbers (one per reward), "
                           f"got {weights}")
    if (cfg.batch_size * cfg.gradient_accumulation) % cfg.num_generations:
        raise TunefixError(f"{o('batch_size')} x {o('gradient_accumulation')} "
                           f"({cfg.batch_size * cfg.gradient_accumulation}) must be a multiple of "
                           f"{o('num_generations')} ({cfg.num_generations}): each prompt's answers train together",
                           f"e.g. {o('batch_size')} {cfg.num_generations}")
