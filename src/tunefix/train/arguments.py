"""What Trainer is given besides the model and the rows: its ``TrainingArguments``, the
optimizer, and the metric loggers asked for (checked before anything loads)."""

from __future__ import annotations

import os
from pathlib import Path

from tunefix.errors import TunefixError
from tunefix.train.config import RunConfig
from tunefix.train.distributed import uses_fsdp


def build_optimizer(model, cfg: RunConfig):
    """AdamW with the embeddings (continued pretraining) in their own, lower-lr group."""
    import torch

    emb_lr = cfg.embedding_learning_rate or cfg.learning_rate / 10
    # LoRA: trained embeddings are continued pretraining, always at their lower rate. Full
    # fine-tuning: one rate for all, unless the user asks for the split.
    split = cfg.finetune == "lora" or cfg.train_embeddings or cfg.method == "cpt" or cfg.embedding_learning_rate is not None
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
    from transformers import TrainingArguments

    return TrainingArguments(**training_kwargs(cfg, run_dir, has_eval))


def training_kwargs(cfg: RunConfig, run_dir: Path, has_eval: bool) -> dict:
    """The ``TrainingArguments`` of a run, as keywords (TRL's configs extend them)."""
    import torch

    from tunefix._optional import has_bitsandbytes
    from tunefix.model.load import compute_dtype

    cuda = torch.cuda.is_available()
    dtype = compute_dtype("cuda" if cuda else "cpu", cfg.precision)
    optim = "adamw_8bit" if cuda and has_bitsandbytes() else "adamw_torch"
    fsdp = uses_fsdp(cfg.finetune)
    return dict(
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

