"""One typed run config: a dataclass, loadable from YAML, overridable with key=value,
validated before any model is loaded. Errors speak the CLI's spelling (``--lora-r``)."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from tunefix.errors import TunefixError


@dataclass
class RunConfig:
    """A fine-tuning run. Each field is also a command-line option (``lora_r`` -> ``--lora-r``)."""

    model: str = ""
    """model directory, .gguf file or cached hub id (default: the built-in SmolLM2-135M-Instruct)"""
    data: str = ""
    """training data: CSV, TSV, JSON, JSONL, Parquet or a save_to_disk directory"""
    output_dir: str = "runs/run"
    """the run directory (created; never overwritten unless resume)"""
    template: str | None = None
    """chat template: registry name or file (default: the model's own)"""
    format: str | None = None
    """data format (default: detected)"""
    merge: str | None = None
    """merge template over table columns, e.g. "{sex}, {age} years old[[, deck {deck}]]" """
    output: str | None = None
    """the answer of a table row: a column or a template such as {alive}"""
    reasoning: str | None = None
    """the reasoning (thinking before the answer) of a table row: a column or a template such as {why}"""
    train_turns: Literal["auto", "per-turn", "last"] = "auto"
    """auto (every assistant turn, each in the context the chat template gives it at inference: one
    sequence per turn where the template renders earlier turns otherwise, as reasoning templates
    do), per-turn (always one sequence per assistant turn) or last (only each row's last turn)"""
    system: str | None = None
    """system prompt added to every conversation"""
    chosen: str | None = None
    """dpo, orpo: the preferred answer of a table row: a column or a template such as {good}"""
    rejected: str | None = None
    """dpo, orpo: the rejected answer of a table row: a column or a template"""
    label: str | None = None
    """kto: the column saying whether a row's answer is desirable (true/false, 1/0)"""
    beta: float = 0.1
    """dpo, kto: how far the model may move from the reference (higher: closer); orpo: the weight
    of the odds-ratio term beside the answer's own loss"""
    loss_type: str | None = None
    """dpo: TRL's DPO loss (sigmoid, ipo, hinge, robust...; default sigmoid); kto: kto or
    apo_zero_unpaired (default kto)"""
    desirable_weight: float = 1.0
    """kto: weight of the desirable answers' loss"""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable answers' loss"""
    rewards: list[str] | None = None
    """grpo: the rewards, e.g. exact_match:alive, regex:PATTERN, json, length:N, stopped, or
    your own function as path/to/file.py:function"""
    reward_weights: list[float] | None = None
    """grpo: one weight per reward (default: all 1)"""
    num_generations: int = 4
    """grpo: answers sampled per prompt (each group's rewards are compared with each other)"""
    max_completion_length: int = 64
    """grpo: the longest sampled answer, in tokens"""
    temperature: float = 1.0
    """grpo: sampling temperature of the answers"""
    top_p: float = 1.0
    """grpo: nucleus sampling of the answers (1: off)"""
    max_seq_length: int = 2048
    """longest training row in tokens; longer rows are truncated"""
    method: Literal["sft", "cpt", "dpo", "orpo", "kto", "grpo"] = "sft"
    """sft (answers to prompts), cpt (continued pretraining on raw text: embed_tokens and lm_head
    trained too, at embedding_learning_rate), dpo or orpo (from pairs of a chosen and a rejected
    answer), kto (from answers labelled desirable or not) or grpo (from rewards on sampled answers)"""
    finetune: Literal["lora", "full"] = "lora"
    """lora (adapters on a frozen base) or full (every weight trained; FSDP under torchrun)"""
    load_in_4bit: bool = False
    """load the base weights in 4-bit NF4 (QLoRA; bitsandbytes, on CUDA or a CPU)"""
    lora_r: int = 16
    """LoRA rank: the width of each adapter's two low-rank matrices"""
    lora_alpha: int | None = None
    """default 2 * lora_r"""
    lora_dropout: float = 0.0
    """dropout on the LoRA path's input, in [0, 1)"""
    target_modules: list[str] | None = None
    """default: all of q, k, v, o, gate, up, down"""
    use_rslora: bool = False
    """rank-stabilised LoRA: scale the update by lora_alpha / sqrt(lora_r) instead of / lora_r"""
    train_embeddings: bool = False
    """continued pretraining: train embed_tokens and lm_head in full"""
    embedding_learning_rate: float | None = None
    """default learning_rate / 10"""
    batch_size: int = 2
    """rows per batch (per device)"""
    gradient_accumulation: int = 4
    """batches per optimizer step (the effective batch is batch_size times this)"""
    learning_rate: float = 2e-4
    """peak learning rate, in (0, 1]; linear warm-up, then linear decay"""
    epochs: float = 1.0
    """passes over the training rows (fractions allowed); max_steps, when set, wins"""
    max_steps: int = -1
    """stop after this many optimizer steps (-1: run the epochs)"""
    warmup_steps: int = 5
    """optimizer steps of linear learning-rate warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    seed: int = 3407
    """random seed of the weights' initialisation, the shuffling and the held-out split"""
    eval_fraction: float = 0.0
    """hold out this fraction of the rows for eval loss and accuracy"""
    eval_steps: int = 0
    """evaluate every N steps (0: at the end only)"""
    save_steps: int = 50
    """write a checkpoint every N optimizer steps (resume continues from the newest)"""
    logging_steps: int = 1
    """log loss and learning rate every N optimizer steps"""
    report_to: str = "auto"
    """where metrics go besides metrics.jsonl: auto (TensorBoard when installed, W&B when installed
    and logged in or WANDB_MODE=offline), none, or a list: tensorboard,wandb"""
    gradient_checkpointing: Literal["auto", "off", "on", "offload", "selective"] = "auto"
    """auto (selective on a CPU, on with CUDA), off, on, offload (layer inputs in CPU memory on
    CUDA) or selective (attention outputs kept: no attention recompute in the backward)"""
    fused_lora: bool = True
    """each LoRA update accumulated into its base layer's output in one matmul (no output-sized
    temporaries; same outputs and gradients as PEFT's forward)"""
    drop_padding_mask: bool = True
    """right-padded batches with unscored padding run causal attention without a mask (faster;
    same loss and gradients)"""
    padding_free: bool = True
    """the rows of a right-padded batch run in groups of similar length, each cut to its own
    longest row, so no padding is computed (same loss and gradients; one process only)"""
    cpu_allocator: Literal["auto", "default", "lean"] = "auto"
    """auto (lean where torch's huge pages are on, as ``tunefix train`` and ``tunefix demo`` set
    them; else default), default (glibc's malloc as is), or lean (on a CPU, glibc tuned for each
    forward and its heap for each backward: a fraction of the peak memory at about the same
    speed with huge pages; slower forwards without them)"""
    loss: Literal["chunked", "fused", "reference"] = "chunked"
    """chunked (never materialises the full logits; a Triton kernel per chunk on CUDA), fused
    (insists on that kernel) or reference"""
    packing: bool = False
    """pack several rows into each max_seq_length sequence (no row attends to its neighbours)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto (bf16 where the hardware has it), bf16 or fp32"""
    resume: bool = False
    """continue from the last checkpoint in output_dir"""
    trust_remote_code: bool = False
    """run Python code shipped with the model (config auto_map); off: such models are refused"""
    allow_pickle: bool = False
    """load pickle weights (.bin/.pt; with torch's weights_only=True); off: safetensors only"""
    limit_rows: int | None = None
    """use only the first N rows of the data (quick runs)"""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"cli": False})

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def option(name: str) -> str:
        return "--" + name.replace("_", "-")

    def validate(self) -> None:
        """Checks that need no model. Raises TunefixError in CLI spelling."""
        o = self.option
        if not self.data:
            raise TunefixError(f"no training data: {o('data')} is required")
        if not Path(self.data).exists():
            raise TunefixError(f"{o('data')} {self.data}: no such file or directory")
        positive = ("max_seq_length", "lora_r", "batch_size", "gradient_accumulation", "logging_steps", "save_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TunefixError(f"{o(name)} must be a positive number, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.learning_rate > 1:
            raise TunefixError(f"{o('learning_rate')} must be in (0, 1], got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise TunefixError(f"{o('lora_dropout')} must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.eval_fraction < 1:
            raise TunefixError(f"{o('eval_fraction')} must be in [0, 1), got {self.eval_fraction}")
        if self.method in ("lora", "full"):  # the spelling of tunefix 0.x, before preference training
            raise TunefixError(f"{o('method')} {self.method} is now {o('finetune')} {self.method}",
                               f"{o('method')} names what is learnt: sft, cpt, dpo, orpo, kto or grpo")
        for name, choices in CHOICES.items():  # the Literal fields: method, loss, precision...
            if getattr(self, name) not in choices:
                raise TunefixError(f"{o(name)} must be {', '.join(choices[:-1])} or {choices[-1]}, "
                                   f"got {getattr(self, name)!r}")
        if self.finetune == "full" and self.load_in_4bit:
            raise TunefixError(f"{o('finetune')} full cannot train 4-bit weights",
                               f"Use {o('finetune')} lora with {o('load_in_4bit')} (QLoRA), or drop "
                               f"{o('load_in_4bit')}")
        from tunefix.train.methods import validate_method

        validate_method(self)
        reporters = [r.strip() for r in self.report_to.split(",") if r.strip()]
        if self.report_to not in ("auto", "none") and (not reporters or set(reporters) - {"tensorboard", "wandb"}):
            raise TunefixError(f"{o('report_to')} must be auto, none or a list of tensorboard and wandb, "
                               f"got {self.report_to!r}")
        for name in ("warmup_steps", "eval_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise TunefixError(f"{o(name)} must be zero or more, got {getattr(self, name)}")
        for name in ("lora_alpha", "limit_rows", "embedding_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise TunefixError(f"{o(name)} must be a positive number, got {value}")
        if self.max_steps < -1 or self.epochs < 0:
            raise TunefixError(f"{o('max_steps')} must be -1 (use {o('epochs')}) or positive, "
                               f"and {o('epochs')} not negative")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise TunefixError(f"set {o('epochs')} or {o('max_steps')} to a positive number")


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "extra"}
CHOICES = {name: get_args(hint) for name, hint in get_type_hints(RunConfig).items()
           if get_origin(hint) is Literal}
"""Each choice field's allowed values, in order (from its ``Literal`` annotation)."""


def _coerce(name: str, value: Any) -> Any:
    hint = get_type_hints(RunConfig)[name]
    text = str(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in text):
        return None
    if get_origin(hint) is Literal:  # a choice: validate() names the allowed values
        return str(value)
    try:
        if "list" in text:
            items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
            return [float(v) for v in items] if "list[float]" in text else [str(v) for v in items]
        if "bool" in text:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1", "on"):
                return True
            if str(value).lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(value)
        if "int" in text and "float" not in text:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if "float" in text:
            return float(value)
    except (TypeError, ValueError):
        kind = re.sub(r"<class '(\w+)'>", r"\1", text.replace("typing.", ""))
        raise TunefixError(f"{RunConfig.option(name)}: {value!r} is not a valid {kind}",
                           f"Give {RunConfig.option(name)} a {kind} value") from None
    return value if isinstance(value, str) or value is None else str(value)


def _unknown(key: str, yaml_file: str | None = None) -> TunefixError:
    """Named as the user wrote it: ``lora_rr`` in a YAML file, ``--lora-rr`` on the command line."""
    close = difflib.get_close_matches(key.replace("-", "_"), list(_FIELDS), n=1)
    if yaml_file is not None:
        hint = f"Did you mean {close[0]}?" if close else "See `tunefix train --help` for the keys"
        return TunefixError(f"unknown key {key} in {yaml_file}", hint)
    hint = f"Did you mean {RunConfig.option(close[0])}?" if close else "See `tunefix train --help`"
    return TunefixError(f"unknown config key {RunConfig.option(key.replace('-', '_'))}", hint)


def build_config(values: dict[str, Any]) -> RunConfig:
    kwargs = {}
    for key, value in values.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in _FIELDS:
            raise _unknown(key)
        if name == "method" and str(value) in LEGACY_METHODS:  # a config of tunefix 0.x, or its run's config.json
            name = "finetune"
        kwargs[name] = _coerce(name, value)
    return RunConfig(**kwargs)


LEGACY_METHODS = ("lora", "full")
"""``method: lora|full`` was the name of ``finetune`` before preference training: still read."""


def load_config(yaml_file: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) plus ``key=value`` / ``--key value`` overrides."""
    values: dict[str, Any] = {}
    if yaml_file:
        import yaml

        path = Path(yaml_file)
        if not path.is_file():
            raise TunefixError(f"config file {yaml_file}: no such file", "Check the path of the YAML config")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise TunefixError(f"{yaml_file} is not valid YAML ({str(e).splitlines()[0]})",
                               "Fix the YAML (key: value per line); see examples/*.yaml") from None
        if not isinstance(loaded, dict):
            raise TunefixError(f"{yaml_file} must hold a mapping of config keys",
                               "Write one `key: value` per line; see examples/*.yaml")
        unknown = next((k for k in loaded if str(k) not in _FIELDS), None)
        if unknown is not None:
            raise _unknown(str(unknown), yaml_file)
        base = path.parent
        for key in ("data",):  # paths in a config file are relative to the file
            if key in loaded and not Path(str(loaded[key])).is_absolute():
                candidate = base / str(loaded[key])
                if candidate.exists():
                    loaded[key] = str(candidate)
        values.update(loaded)
    values.update(parse_overrides(overrides or []))
    return build_config(values)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                value = items[i + 1]
                i += 1
            else:
                value = "true"
        elif "=" in item:
            key, value = item.split("=", 1)
        else:
            raise TunefixError(f"cannot read {item!r} as an option", "Use key=value or --key value")
        out[key] = value
        i += 1
    return out


def config_help() -> str:
    lines = []
    for name, f in _FIELDS.items():
        lines.append(f"  {RunConfig.option(name):28s} (default: {f.default if f.default is not dataclasses.MISSING else '[]'})")
    return "\n".join(lines)
