"""The training path, top to bottom: config -> model (fixed) -> rows -> LoRA -> Trainer -> run dir.

We train with transformers' ``Trainer`` (not TRL's ``SFTTrainer``): tunefix tokenises
and masks the rows itself (one BOS, response-only labels that survive BPE merges), so
SFTTrainer's data handling would only be a second, disagreeing copy of it; Trainer brings
what we want from the field unchanged: accumulation, schedules, checkpoints with RNG state
(resume continues the same curve), TensorBoard/W&B, DDP/FSDP through accelerate. The one
thing we replace is the loss, through ``compute_loss``, with the chunked loss that never
holds the full-vocabulary logits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError
from tunefix.train.config import RunConfig
from tunefix.train.distributed import is_main_process, uses_fsdp

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    fixes: list[str] = field(default_factory=list)
    distributed: str = "no"
    """how the processes shared the work: no (one process), multi_cpu/multi_gpu (DDP) or fsdp"""


# ------------------------------------------------------------------------------ data


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out split; the same config always holds out the same rows."""
    if fraction <= 0:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_rows(cfg: RunConfig):
    """The config's data, standardised (no model needed): a ``tunefix.data.Prepared``."""
    from tunefix.data import prepare

    return prepare(cfg.data, fmt=cfg.format, merge=cfg.merge, output=cfg.output, system=cfg.system,
                   limit=cfg.limit_rows, seed=cfg.seed)


def prepare_data(cfg: RunConfig, tokenizer, prepared=None):
    """Rows of the config's data: (template, train conversations, eval conversations)."""
    from tunefix.templates import template_for

    prepared = prepared if prepared is not None else load_rows(cfg)
    template = template_for(tokenizer, cfg.template) if prepared.kind == "chat" else None
    train_rows, eval_rows = split_rows(prepared.rows, cfg.eval_fraction, cfg.seed)
    return template, train_rows, eval_rows


def tokenize(cfg: RunConfig, tokenizer, template, rows: list, *, warn: bool = True) -> list[dict]:
    from tunefix.data import pack, tokenize_rows

    out = tokenize_rows(tokenizer, template, rows, max_seq_length=cfg.max_seq_length)
    if out.truncated or out.dropped:
        log.warning("%d rows truncated to %d tokens; %d rows dropped (no trainable token left)",
                    out.truncated, cfg.max_seq_length, out.dropped)
    if not out.rows:
        raise TunefixError("no trainable rows", f"Check {RunConfig.option('max_seq_length')} and the data")
    longest = max(len(r["input_ids"]) for r in out.rows)
    if warn and cfg.max_seq_length > 8 * longest and cfg.max_seq_length > 512:
        # Dynamic padding makes this harmless for unpacked batches, but packs, position
        # tables and any non-dynamic consumer (an exported num_ctx) pay for it.
        log.warning("--max-seq-length %d is far beyond the longest row (%d tokens); lower it to "
                    "save memory", cfg.max_seq_length, longest)
    if cfg.packing:
        return pack(out.rows, cfg.max_seq_length)  # with position_ids and seq_lens per pack
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in out.rows]


class Collator:
    """Dynamic padding to the longest row of the batch; labels padded with -100.

    Packed rows (``seq_lens`` present) get a 4-D block-diagonal causal mask (B, 1, T, T)
    and positions restarting at 0 for every row, so no row attends to its neighbours.
    Measured: transformers' sdpa path ignores restarting ``position_ids`` alone (packed
    logits differ from the rows' own), while an explicit boolean 4-D mask is honoured.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if "seq_lens" in rows[0]:
            batch.update(packed_mask(rows, width))
        return batch


def packed_mask(rows: list[dict], width: int) -> dict:
    """Block-diagonal causal attention and per-row positions for packed sequences."""
    import torch

    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    masks, positions = [], torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        segment = torch.full((width,), -1, dtype=torch.long)  # -1: padding, attends nowhere
        start = 0
        for k, n in enumerate(r["seq_lens"]):
            segment[start:start + n] = k
            positions[i, start:start + n] = torch.arange(n)
            start += n
        same = (segment[:, None] == segment[None, :]) & (segment[:, None] >= 0)
        masks.append(causal & same)
    mask = torch.stack(masks)[:, None]  # (B, 1, T, T) bool
    # A padding query row with no key at all would give NaN in softmax: let it see itself.
    mask |= torch.eye(width, dtype=torch.bool)[None, None]
    return {"attention_mask": mask, "position_ids": positions}


# ----------------------------------------------------------------------------- trainer


def _trainer_class():
    import torch
    from transformers import Trainer

    from tunefix.model.loss import model_loss
    from tunefix.model.padding import padding_free_loss

    class TunefixTrainer(Trainer):
        """transformers' Trainer with tunefix's loss; everything else unchanged."""

        loss_impl = "chunked"
        tokens_seen = 0
        sharded = False  # the model is FSDP-sharded (full fine-tuning in several processes)
        drop_mask = True  # causal attention without the padding mask where that changes nothing
        padding_free = True  # rows in groups cut to their own length (one process only)
        allocator = None  # the lean CPU allocator's AllocatorTuning: switched per phase

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
                loss = model_loss(model, inputs, impl=self.loss_impl)
            return loss.detach(), None, None

    return TunefixTrainer


def _optimizer(model, cfg: RunConfig):
    """AdamW with the embeddings (continued pretraining) in their own, lower-lr group."""
    import torch

    emb_lr = cfg.embedding_learning_rate or cfg.learning_rate / 10
    # LoRA: trained embeddings are continued pretraining, always at their lower rate. Full
    # fine-tuning: one rate for all, unless the user asks for the split.
    split = cfg.method == "lora" or cfg.train_embeddings or cfg.embedding_learning_rate is not None
    main, emb = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (emb if split and ("embed_tokens" in name or "lm_head" in name) else main).append(p)
    groups = [{"params": main, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}]
    if emb:
        groups.append({"params": emb, "lr": emb_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


def _wandb_configured() -> bool:
    """W&B can start without asking: an API key, a netrc login, or an offline mode. (Without
    them wandb.init prompts, or fails in a script, after the model has loaded.)"""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False
    if os.environ.get("WANDB_API_KEY") or mode in ("offline", "dryrun"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def report_to(cfg: RunConfig) -> list[str]:
    """The metric loggers of ``cfg.report_to``; an asked-for one that is missing is an error."""
    from tunefix._optional import has_tensorboard, has_wandb

    installed = {"tensorboard": has_tensorboard(), "wandb": has_wandb()}
    if cfg.report_to == "none":
        return []
    if cfg.report_to == "auto":
        return [n for n in ("tensorboard", "wandb") if installed[n] and (n != "wandb" or _wandb_configured())]
    wanted = [r.strip() for r in cfg.report_to.split(",") if r.strip()]
    for name in wanted:
        if not installed[name]:
            raise TunefixError(f"{RunConfig.option('report_to')} {name}: {name} is not installed",
                               f"pip install {name} (or pip install 'tunefix[logging]'), or drop it")
    return wanted


def training_arguments(cfg: RunConfig, run_dir: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    from tunefix._optional import has_bitsandbytes
    from tunefix.model.load import compute_dtype

    cuda = torch.cuda.is_available()
    dtype = compute_dtype("cuda" if cuda else "cpu", cfg.precision)
    optim = "adamw_8bit" if cuda and has_bitsandbytes() else "adamw_torch"
    fsdp = uses_fsdp(cfg.method)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation,
        learning_rate=cfg.learning_rate, lr_scheduler_type="linear", warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, weight_decay=cfg.weight_decay, optim=optim,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps, save_steps=cfg.save_steps,
        save_total_limit=3, save_only_model=fsdp, eval_strategy=("steps" if has_eval and cfg.eval_steps else "no"),
        eval_steps=cfg.eval_steps or None, prediction_loss_only=True, report_to=report_to(cfg),
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu=not cuda, disable_tqdm=True, remove_unused_columns=False,
        dataloader_num_workers=0, logging_nan_inf_filter=False,  # a NaN must reach our stop
    )


def _log_into_run_dir(trainer, run_dir: Path) -> None:
    """TensorBoard events in RUN_DIR/tensorboard (not in the current directory)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(run_dir / "tensorboard")


@contextlib.contextmanager
def _scoped_process_state(trainer, run_dir: Path) -> Iterator[None]:
    """What training changes in the process, undone when it ends (a notebook runs train()
    many times). W&B: a run of our own in RUN_DIR/wandb, finished at the end. transformers'
    callback would open one (into a directory wandb caches process-wide at its first init)
    and leave it open, so the next train() logged into the first run's folder; it takes an
    open run as given, so it logs into ours. A run the user opened is used and left open.
    The lean CPU allocator gets glibc's defaults back."""
    run = None
    if "wandb" in trainer.args.report_to:
        import wandb

        if wandb.run is None:
            run = wandb.init(dir=str(run_dir), name=run_dir.name, project=os.getenv("WANDB_PROJECT", "huggingface"))
    try:
        yield
    finally:
        if run is not None:
            run.finish()
        if trainer.allocator:
            trainer.allocator.restore()


def train(cfg: RunConfig, *, console=None) -> RunResult:
    """Run a fine-tune; returns where everything went. Validation happens before any load."""
    import torch

    from tunefix import assets
    from tunefix.model.checkpointing import apply_checkpointing, resolve_checkpointing
    from tunefix.model.load import load_model
    from tunefix.model.lora import add_lora
    from tunefix.train.callbacks import LossLog, NonFiniteStop, RichProgress
    from tunefix.train.memory import out_of_memory_as_error
    from tunefix.train.plot import plot_losses
    from tunefix.train.rundir import (
        check_run_dir,
        disk_full_as_error,
        first_missing,
        prepare_resume,
    )

    cfg.model = cfg.model or str(assets.smollm2())
    cfg.validate()
    report_to(cfg)  # an asked-for logger that is not installed: said before anything loads
    run_dir = Path(cfg.output_dir)
    main = is_main_process()  # under torchrun/accelerate only rank 0 owns the run directory
    if main:
        check_run_dir(run_dir, cfg.resume)
    # Every check that can fail on the user's input runs before the run directory is
    # created: a mistake leaves nothing behind. Data and template name first (no model).
    if cfg.resume and uses_fsdp(cfg.method):
        raise TunefixError("resuming a full fine-tune run in several processes is not supported (its "
                           "checkpoints hold the weights only, not the sharded optimizer state)",
                           f"Resume it in one process, or start again with another {RunConfig.option('output_dir')}")
    prepared = load_rows(cfg)
    if cfg.template:
        from tunefix.templates import get_template

        get_template(cfg.template)
    check_against_model_config(cfg)

    fixes: list[str] = []
    model, tok = load_model(cfg.model, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit,
                            template=None, trust_remote_code=cfg.trust_remote_code,
                            allow_pickle=cfg.allow_pickle, report=fixes.append)
    for line in fixes:
        (console.print if console else print)(line)
    template, train_conv, eval_conv = prepare_data(cfg, tok, prepared)
    train_rows = tokenize(cfg, tok, template, train_conv)
    eval_rows = tokenize(cfg, tok, template, eval_conv, warn=False) if eval_conv else []
    checkpoint = prepare_resume(run_dir, owner=main) if cfg.resume else None
    created = first_missing(run_dir)  # removed again if training runs out of memory early
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TunefixError(f"cannot create the run directory {run_dir} ({e.strerror or e})",
                               f"Choose another {RunConfig.option('output_dir')}") from None
        _write_json(run_dir / "config.json", {k: v for k, v in asdict(cfg).items() if k != "extra"})
    torch.manual_seed(cfg.seed)
    if cfg.method == "full":
        model.requires_grad_(True)
    else:
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.target_modules, use_rslora=cfg.use_rslora,
                         train_embeddings=cfg.train_embeddings)
        from tunefix.model.fused_lora import fuse_lora_forward

        fuse_lora_forward(model, enabled=cfg.fused_lora)
    apply_checkpointing(model, resolve_checkpointing(cfg.gradient_checkpointing, torch.cuda.is_available()))
    if uses_fsdp(cfg.method):  # after checkpointing: FSDP wraps the checkpointed layers
        from tunefix.train.distributed import shard_model

        shard_model(model)

    args = training_arguments(cfg, run_dir, bool(eval_rows))
    loss_log = LossLog(run_dir / "metrics.jsonl" if main else None)
    stop = NonFiniteStop()
    trainer_cls = _trainer_class()
    callbacks = [loss_log, stop] + ([RichProgress(console)] if main else [])
    trainer = trainer_cls(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows or None,
                          data_collator=Collator(tok.pad_token_id), optimizers=(_optimizer(model, cfg), None),
                          callbacks=callbacks)
    trainer.loss_impl = cfg.loss
    _log_into_run_dir(trainer, run_dir)
    trainer.sharded = uses_fsdp(cfg.method)
    trainer.drop_mask = cfg.drop_padding_mask
    trainer.padding_free = cfg.padding_free
    if not torch.cuda.is_available():
        from tunefix.model.allocator import resolve_cpu_allocator, tune_cpu_allocator

        if resolve_cpu_allocator(cfg.cpu_allocator) == "lean":
            trainer.allocator = tune_cpu_allocator()  # logs what it set
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our progress bar shows the logs
    loss_log.trainer = trainer
    with _scoped_process_state(trainer, run_dir):
        with out_of_memory_as_error(cfg, trainer, run_dir, created, owner=main), disk_full_as_error(run_dir, main):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.bad_step is not None:
            raise TunefixError(f"the loss became {stop.bad_value} at step {stop.bad_step}; training stopped",
                               likely_cause(model, tok, cfg))
        if eval_rows and not cfg.eval_steps:
            metrics = trainer.evaluate()
            loss_log.record_eval(trainer.state.global_step, metrics.get("eval_loss"))
    result = RunResult(run_dir, trainer.state.global_step, loss_log.train, loss_log.eval,
                       len(train_rows), len(eval_rows), fixes,
                       "fsdp" if uses_fsdp(cfg.method) else str(trainer.accelerator.distributed_type.value).lower())
    # Under FSDP every process holds a shard: gathering the full weights is collective.
    state = None
    if uses_fsdp(cfg.method):
        from tunefix.train.distributed import full_state_dict

        state = full_state_dict(trainer.model)
    if main:
        save_run(run_dir, trainer.accelerator.unwrap_model(trainer.model), tok, template, cfg, state_dict=state)
        plot_losses(loss_log.train, loss_log.eval, run_dir / "loss.png", title=f"tunefix: {Path(cfg.model).name}")
        _write_json(run_dir / "summary.json", {**asdict(result), "run_dir": str(run_dir),
                                                "base_model": cfg.model})
    return result


def check_against_model_config(cfg: RunConfig) -> None:
    """Checks that need the model's config.json only (no weights): a LoRA rank above the
    hidden size (the adapter would be larger than the layer it adapts)."""
    from tunefix.model.files import resolve_model_path

    path = resolve_model_path(cfg.model)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.exists():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_model reports an unreadable config with its own message
    hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    if isinstance(hidden, int) and cfg.lora_r > hidden:
        raise TunefixError(f"{RunConfig.option('lora_r')} {cfg.lora_r} is larger than the model's hidden size "
                           f"({hidden})", f"Use a rank of at most {hidden}; 8 to 64 is usual")


def likely_cause(model, tok, cfg: RunConfig) -> str:
    """The doctor's best guess at why the loss went NaN/Inf."""
    from tunefix.doctor import examine

    try:
        report = examine(model.get_base_model() if hasattr(model, "get_base_model") else model, tok,
                         data=cfg.data)
    except TunefixError:
        report = None
    if report is not None:
        for code in ("template-untrained-token", "untrained-tokens", "nonfinite-weights"):
            f = report.get(code)
            if f is not None:
                return f"Likely cause (doctor): {f.code}: {f.message}"
    return (f"Likely cause: the learning rate ({cfg.learning_rate}) is too high, or fp16 overflow; "
            f"try a lower {RunConfig.option('learning_rate')} or {RunConfig.option('precision')} fp32")


def save_run(run_dir: Path, model, tok, template, cfg: RunConfig, state_dict=None) -> None:
    """The adapter (PEFT format; ``model/`` for full fine-tuning), the fixed tokenizer with its
    template, the template record."""
    from tunefix._io import atomic_dir, write_text

    weights = run_dir / ("model" if cfg.method == "full" else "adapter")
    if weights.exists():
        import shutil

        shutil.rmtree(weights)
    if template is not None:
        tok.chat_template = template.jinja
    with atomic_dir(weights) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        if cfg.method == "full":  # a whole Hugging Face model directory, loadable on its own
            tok.save_pretrained(str(tmp))
    tok_dir = run_dir / "tokenizer"
    if tok_dir.exists():
        import shutil

        shutil.rmtree(tok_dir)
    with atomic_dir(tok_dir) as tmp:
        tok.save_pretrained(str(tmp))
    if template is not None:
        record = {k: v for k, v in asdict(template).items()}
        write_text(run_dir / "template.json", json.dumps(record, indent=1, default=str))


def _write_json(path: Path, data: Any) -> None:
    from tunefix._io import write_text

    write_text(path, json.dumps(data, indent=1, default=str))


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
