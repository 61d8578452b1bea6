"""A finished run directory, loaded back: base model (fixed) + adapter + tokenizer + template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError
from tunefix.train.config import RunConfig, build_config


def read_run(run_dir: str | Path) -> tuple[RunConfig, dict]:
    run_dir = Path(run_dir)
    summary_file = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise TunefixError(f"run directory {run_dir} does not exist",
                           "Pass the output_dir of a completed `tunefix train`")
    if not summary_file.exists() or not ((run_dir / "adapter").is_dir() or (run_dir / "model").is_dir()):
        raise TunefixError(f"{run_dir} is not a finished tunefix run (no summary.json, adapter/ or model/)",
                           "Pass the output_dir of a completed `tunefix train`")
    try:
        cfg_data = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        if not isinstance(cfg_data, dict) or not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise TunefixError(f"{run_dir}: config.json or summary.json is unreadable ({e})",
                           "The run directory is damaged; train again into a new --output-dir") from None
    return build_config(cfg_data), summary


def is_run(path: str | Path) -> bool:
    """``path`` is a finished tunefix run directory (a model a later stage can start from)."""
    p = Path(path)
    return (p / "summary.json").is_file() and ((p / "adapter").is_dir() or (p / "model").is_dir())


def is_full(run_dir: str | Path) -> bool:
    """A run of ``--finetune full``: ``model/`` holds every weight, there is no adapter."""
    return (Path(run_dir) / "model").is_dir() and not (Path(run_dir) / "adapter").is_dir()


def load_template(run_dir: Path):
    from tunefix.templates.record import ChatTemplate

    data = json.loads((run_dir / "template.json").read_text())
    fields = ChatTemplate.__dataclass_fields__
    return ChatTemplate(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fields})


def load_run(run_dir: str | Path, *, merge: bool = False) -> tuple[Any, Any, Any, RunConfig]:
    """(model with adapter, tokenizer, template, config). ``merge``: fold the adapter in."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from tunefix.model.load import load_model
    from tunefix.model.lora import peft_quietly, unfuse_projections

    run_dir = Path(run_dir)
    cfg, summary = read_run(run_dir)
    tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    if is_full(run_dir):  # full fine-tuning: the trained weights are the whole model
        model, _ = load_model(str(run_dir / "model"), max_seq_length=cfg.max_seq_length, report=None)
        model.eval()
        return model, tok, load_template(run_dir), cfg
    if is_run(summary["base_model"]):  # a stage trained on an earlier run (e.g. DPO after SFT)
        model = load_run(summary["base_model"], merge=True)[0]
    else:
        model, _ = load_model(summary["base_model"], max_seq_length=cfg.max_seq_length, report=None)
    if model.get_input_embeddings().weight.shape[0] < len(tok):  # the doctor added a pad token
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    unfuse_projections(model)  # adapters of fused models were trained on the split parts
    with peft_quietly():
        model = PeftModel.from_pretrained(model, str(run_dir / "adapter"))
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model, tok, load_template(run_dir), cfg
