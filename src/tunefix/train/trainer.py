"""The training path, top to bottom: config -> model (fixed) -> rows -> LoRA -> Trainer -> run dir.

We train with transformers' ``Trainer`` (not TRL's ``SFTTrainer``): tunefix tokenises
and masks the rows itself (one BOS, response-only labels that survive BPE merges), so
SFTTrainer's data handling would only be a second, disagreeing copy of it; Trainer brings
what we want from the field unchanged: accumulation, schedules, checkpoints with RNG state
(resume continues the same curve), TensorBoard/W&B, DDP/FSDP through accelerate. The one
thing we replace is the loss, through ``compute_loss``, with the chunked loss that never
holds the full-vocabulary logits.

``train()`` reads as its steps: check every input (nothing loaded, nothing written), load
the model with the doctor's fixes, make the rows (``train/rows.py``), open the run
directory, make the model trainable, build the Trainer (``train/arguments.py`` gives its
arguments and optimizer), fit, save.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError
from tunefix.progress import Reporter, Silent
from tunefix.train.arguments import build_optimizer, report_to, training_arguments
from tunefix.train.config import RunConfig
from tunefix.train.distributed import is_main_process, uses_fsdp
from tunefix.train.methods import method_of
from tunefix.train.rows import Collator, load_rows, prepare_data, tokenize


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


def _log_into_run_dir(trainer, run_dir: Path) -> None:
    """TensorBoard events in RUN_DIR/tensorboard (not in the current directory)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:
            cb.logging_dir = str(run_dir / "tensorboard")


def _cpu_allocator(cfg: RunConfig):
    """The lean CPU allocator's tuning when it applies (logs what it set), else None."""
    import torch

    if torch.cuda.is_available():
        return None
    from tunefix.model.allocator import resolve_cpu_allocator, tune_cpu_allocator

    return tune_cpu_allocator() if resolve_cpu_allocator(cfg.cpu_allocator) == "lean" else None


@contextlib.contextmanager
def _scoped_process_state(cfg: RunConfig, loggers: list[str], run_dir: Path) -> Iterator[Any]:
    """What training changes in the process, undone when it ends (a notebook runs train()
    many times); yields the lean CPU allocator's tuning (None: not used) for the Trainer.

    W&B: a run of our own in RUN_DIR/wandb, finished at the end. transformers' callback
    would open one (into a directory wandb caches process-wide at its first init) and leave
    it open, so the next train() logged into the first run's folder; it takes an open run
    as given, so it logs into ours. A run the user opened is used and left open. The lean
    CPU allocator gets glibc's defaults back."""
    allocator = _cpu_allocator(cfg)
    run = None
    try:
        if "wandb" in loggers:
            import wandb

            if wandb.run is None:
                run = wandb.init(dir=str(run_dir), name=run_dir.name,
                                 project=os.getenv("WANDB_PROJECT", "huggingface"))
        yield allocator
    finally:
        if run is not None:
            run.finish()
        if allocator:
            allocator.restore()


# --------------------------------------------------------------------------- train()


def train(cfg: RunConfig, *, progress: Reporter | None = None, console=None) -> RunResult:
    """Run a fine-tune; returns where everything went. Validation happens before any load.

    ``progress`` sees the doctor's fixes as notes and the fit as the stage "train" with
    counted steps (on the main process); ``console``, a rich Console, is short for
    ``progress=tunefix.console.RichReporter(console)``. Neither: nothing is shown.
    """
    progress = _reporter(progress, console)
    prepared = _check_inputs(cfg)
    model, tok, fixes = _load_model(cfg, progress)
    cfg = _packing_for(cfg, model, progress)
    template, train_rows, eval_rows = _rows(cfg, tok, prepared)
    run_dir, checkpoint, created = _open_run_dir(cfg)
    on_trl = method_of(cfg).trl is not None
    if on_trl:  # TRL wraps the model with the LoRA config itself (see train/preference.py)
        from tunefix.train.preference import trl_arguments

        model, peft_config = _trainable_on_trl(cfg, model)
        args = trl_arguments(cfg, run_dir, bool(eval_rows), tok)
    else:
        model, peft_config = _trainable(cfg, model), None
        args = training_arguments(cfg, run_dir, bool(eval_rows))
    main = is_main_process()
    with _scoped_process_state(cfg, args.report_to, run_dir) as allocator:
        trainer, loss_log, stop = _build_trainer(cfg, model, tok, args, train_rows, eval_rows,
                                                 allocator=allocator, progress=progress, peft_config=peft_config)
        with (progress if main else Silent()).stage("train"):
            _fit(cfg, trainer, run_dir, created, checkpoint)
        if stop.bad_step is not None:
            raise TunefixError(f"the loss became {stop.bad_value} at step {stop.bad_step}; training stopped",
                               likely_cause(model, tok, cfg))
        if eval_rows and not cfg.eval_steps:
            metrics = trainer.evaluate()
            loss_log.record_eval(trainer.state.global_step, metrics.get("eval_loss"))
    result = RunResult(run_dir, trainer.state.global_step, loss_log.train, loss_log.eval,
                       len(train_rows), len(eval_rows), fixes,
                       "fsdp" if uses_fsdp(cfg.finetune) else str(trainer.accelerator.distributed_type.value).lower())
    _save(cfg, trainer, tok, template, loss_log, result)
    return result


def _rows(cfg: RunConfig, tok, prepared) -> tuple[Any, list[dict], list[dict]]:
    """(template, train rows, eval rows), tokenised for the run's method."""
    if method_of(cfg).trl is not None:
        from tunefix.train.preference import preference_rows

        return preference_rows(cfg, tok, prepared)[:3]
    template, train_conv, eval_conv = prepare_data(cfg, tok, prepared)
    train_rows = tokenize(cfg, tok, template, train_conv)
    eval_rows = tokenize(cfg, tok, template, eval_conv, warn=False) if eval_conv else []
    return template, train_rows, eval_rows


def _reporter(progress: Reporter | None, console) -> Reporter:
    if progress is not None:
        return progress
    if console is not None:
        from tunefix.console import RichReporter

        return RichReporter(console)
    return Silent()


def _check_inputs(cfg: RunConfig):
    """Every check that can fail on the user's input, before the model loads and before the
    run directory is created (a mistake leaves nothing behind); the data, standardised."""
    from tunefix import assets
    from tunefix.train.rundir import check_run_dir

    cfg.model = cfg.model or str(assets.smollm2())
    cfg.validate()
    report_to(cfg)  # an asked-for logger that is not installed: said before anything loads
    if is_main_process():  # under torchrun/accelerate only rank 0 owns the run directory
        check_run_dir(Path(cfg.output_dir), cfg.resume)
    if cfg.resume and uses_fsdp(cfg.finetune):
        raise TunefixError("resuming a full fine-tune run in several processes is not supported (its "
                           "checkpoints hold the weights only, not the sharded optimizer state)",
                           f"Resume it in one process, or start again with another {RunConfig.option('output_dir')}")
    if method_of(cfg).trl is not None:
        from tunefix.train.preference import load_preference_rows

        prepared = load_preference_rows(cfg)
    else:
        prepared = load_rows(cfg)  # data and template name first (no model)
    if cfg.template:
        from tunefix.templates import get_template

        get_template(cfg.template)
    check_against_model_config(cfg)
    return prepared


def _packing_for(cfg: RunConfig, model, progress: Reporter) -> RunConfig:
    """``cfg`` without packing where the family's layers would carry state across packed rows."""
    from dataclasses import replace

    from tunefix.families import family_of

    family = family_of(getattr(model.config, "model_type", None))
    if not cfg.packing or family is None or family.packs:
        return cfg
    progress.note(f"packing is off: {family.name}'s linear-attention layers would carry state from one "
                  "packed row into the next (rows train unpacked, with dynamic padding)")
    return replace(cfg, packing=False)


def _load_model(cfg: RunConfig, progress: Reporter):
    """The model and tokenizer with the doctor's fixes applied; each fix a note. (model, tok, fixes)"""
    from tunefix.model.load import load_model
    from tunefix.train.run import is_run, load_run

    if is_run(cfg.model):  # a later stage (DPO after SFT): the earlier run's adapter merged in
        model, tok, _, _ = load_run(cfg.model, merge=True)
        progress.note(f"starting from the run {cfg.model} (its adapter merged into its base model)")
        return model, tok, []
    fixes: list[str] = []
    model, tok = load_model(cfg.model, max_seq_length=cfg.max_seq_length, load_in_4bit=cfg.load_in_4bit,
                            template=None, trust_remote_code=cfg.trust_remote_code,
                            allow_pickle=cfg.allow_pickle, lora_targets=cfg.target_modules,
                            report=fixes.append)
    for line in fixes:
        progress.note(line)
    return model, tok, fixes


def _open_run_dir(cfg: RunConfig) -> tuple[Path, Path | None, Path | None]:
    """The run directory, created with its config.json (rank 0); (it, the checkpoint to resume
    from or None, the first directory this run creates: removed again on an early OOM)."""
    from tunefix.train.rundir import first_missing, prepare_resume

    run_dir = Path(cfg.output_dir)
    main = is_main_process()
    checkpoint = prepare_resume(run_dir, owner=main) if cfg.resume else None
    created = first_missing(run_dir)
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TunefixError(f"cannot create the run directory {run_dir} ({e.strerror or e})",
                               f"Choose another {RunConfig.option('output_dir')}") from None
        _write_json(run_dir / "config.json", {k: v for k, v in asdict(cfg).items() if k != "extra"})
    return run_dir, checkpoint, created


def _trainable(cfg: RunConfig, model):
    """Every weight (full) or LoRA adapters, then checkpointing, then FSDP (several processes)."""
    import torch

    from tunefix.model.checkpointing import apply_checkpointing, resolve_checkpointing

    torch.manual_seed(cfg.seed)
    if cfg.finetune == "full":
        model.requires_grad_(True)
    else:
        from tunefix.model.fused_lora import fuse_lora_forward
        from tunefix.model.lora import add_lora

        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.target_modules, use_rslora=cfg.use_rslora,
                         train_embeddings=cfg.train_embeddings or cfg.method == "cpt")
        fuse_lora_forward(model, enabled=cfg.fused_lora)
    apply_checkpointing(model, resolve_checkpointing(cfg.gradient_checkpointing, torch.cuda.is_available()))
    if uses_fsdp(cfg.finetune):  # after checkpointing: FSDP wraps the checkpointed layers
        from tunefix.train.distributed import shard_model

        shard_model(model)
    return model


def _trainable_on_trl(cfg: RunConfig, model):
    """(model, LoRA config for TRL to wrap it with; None: every weight trained)."""
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return model, None
    from tunefix.model.lora import lora_config

    return model, lora_config(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              target_modules=cfg.target_modules, use_rslora=cfg.use_rslora,
                              train_embeddings=cfg.train_embeddings)


def _after_trl_wraps(cfg: RunConfig, model) -> None:
    """What ``_trainable`` does after PEFT wraps the model: the fused LoRA forward, checkpointing."""
    import torch

    from tunefix.model.checkpointing import apply_checkpointing, resolve_checkpointing
    from tunefix.model.fused_lora import fuse_lora_forward

    fuse_lora_forward(model, enabled=cfg.fused_lora and cfg.finetune == "lora")
    apply_checkpointing(model, resolve_checkpointing(cfg.gradient_checkpointing, torch.cuda.is_available()))


def _build_trainer(cfg: RunConfig, model, tok, args, train_rows: list, eval_rows: list, *, allocator,
                   progress: Reporter, peft_config=None):
    """The Trainer with tunefix's options and callbacks: (trainer, loss log, NaN stop). Only
    the main process writes metrics.jsonl and reports the steps to ``progress``."""
    from transformers.trainer_callback import PrinterCallback

    from tunefix.train.callbacks import LossLog, NonFiniteStop, ReportProgress

    run_dir, main = Path(cfg.output_dir), is_main_process()
    loss_log = LossLog(run_dir / "metrics.jsonl" if main else None)
    stop = NonFiniteStop()
    callbacks = [loss_log, stop] + ([ReportProgress(progress)] if main else [])
    if method_of(cfg).trl is not None:
        from tunefix.train.preference import build_trainer

        trainer = build_trainer(cfg, model, tok, args, train_rows, eval_rows, peft_config=peft_config,
                                callbacks=callbacks)
        _after_trl_wraps(cfg, trainer.model)
    else:
        trainer = _sft_trainer(cfg, model, tok, args, train_rows, eval_rows, allocator, callbacks)
    _log_into_run_dir(trainer, run_dir)
    trainer.remove_callback(PrinterCallback)  # the progress reporter shows the logs
    loss_log.trainer = trainer
    return trainer, loss_log, stop


def _sft_trainer(cfg: RunConfig, model, tok, args, train_rows: list, eval_rows: list, allocator, callbacks):
    from tunefix.train.hf_trainer import TunefixTrainer

    return TunefixTrainer(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows or None,
        data_collator=Collator(tok.pad_token_id), optimizers=(build_optimizer(model, cfg), None),
        callbacks=callbacks, loss_impl=cfg.loss, sharded=uses_fsdp(cfg.finetune),
        drop_mask=cfg.drop_padding_mask, padding_free=cfg.padding_free, allocator=allocator)


def _fit(cfg: RunConfig, trainer, run_dir: Path, created: Path | None, checkpoint: Path | None) -> None:
    """trainer.train(), with running out of memory or disk as one-line errors."""
    from tunefix.train.memory import out_of_memory_as_error
    from tunefix.train.rundir import disk_full_as_error

    main = is_main_process()
    with out_of_memory_as_error(cfg, trainer, run_dir, created, owner=main), disk_full_as_error(run_dir, main):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)


def _save(cfg: RunConfig, trainer, tok, template, loss_log, result: RunResult) -> None:
    """The run directory's weights, tokenizer, template, loss plot and summary (rank 0)."""
    from tunefix.train.plot import plot_losses

    # Under FSDP every process holds a shard: gathering the full weights is collective.
    state = None
    if uses_fsdp(cfg.finetune):
        from tunefix.train.distributed import full_state_dict

        state = full_state_dict(trainer.model)
    if not is_main_process():
        return
    run_dir = result.run_dir
    save_run(run_dir, trainer.accelerator.unwrap_model(trainer.model), tok, template, cfg, state_dict=state)
    plot_losses(loss_log.train, loss_log.eval, run_dir / "loss.png", title=f"tunefix: {Path(cfg.model).name}")
    _write_json(run_dir / "summary.json", {**asdict(result), "run_dir": str(run_dir), "base_model": cfg.model})


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

    weights = run_dir / ("model" if cfg.finetune == "full" else "adapter")
    if weights.exists():
        import shutil

        shutil.rmtree(weights)
    if template is not None:
        tok.chat_template = template.jinja
    with atomic_dir(weights) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        if cfg.finetune == "full":  # a whole Hugging Face model directory, loadable on its own
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
