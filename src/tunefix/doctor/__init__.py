"""The doctor: find (and fix) the silent bugs of a model, its tokenizer and its template.

``examine(model_or_path, tokenizer=None, template=None, data=None) -> Report`` runs every
check in ``CHECKS``; checks are plain functions of a ``Probe`` returning a ``Finding`` or
None; fixes live in ``doctor.fixes`` and are applied by ``apply_fixes`` (in memory) or
``write_fixed`` (a repaired copy on disk, never the input).
"""

from __future__ import annotations

from tunefix.doctor import (
    config,
    embeddings,
    history,
    moe,
    precision,
    rope,
    stops,
    template,
    tokenizer,
)
from tunefix.doctor.report import Finding, Report

CHECKS = [
    template.template_render_error,
    template.missing_chat_template,
    tokenizer.double_bos,
    tokenizer.bos_missing,
    tokenizer.pad_token,
    template.eos_not_end_of_turn,
    template.no_end_of_turn,
    template.no_generation_prompt,
    history.reasoning_in_history,
    stops.stop_inside_answer,
    tokenizer.vocab_size_mismatch,
    embeddings.untrained_tokens,
    embeddings.template_untrained_token,
    embeddings.nonfinite_weights,
    config.unsupported_family,
    config.gemma_exact_gelu,
    config.sliding_window_off_by_one,
    config.nope_layers_differ_in_gguf,
    config.fused_projections,
    rope.rope_scaling_missing,
    rope.rope_scaling_not_applied,
    precision.fp16_overflow,
    moe.moe_router_targets,
    moe.moe_experts_unadapted,
]

__all__ = ["CHECKS", "Finding", "Report", "examine", "apply_fixes", "write_fixed"]


def examine(model_or_path, tokenizer=None, template: str | None = None, data: str | None = None, *,
            trust_remote_code: bool = False, allow_pickle: bool = False, run_dtype=None,
            lora_targets: list[str] | str | None = None) -> Report:
    """Run every check. ``model_or_path``: a path/hub id, or a model in memory (with ``tokenizer``).

    ``run_dtype``: the compute dtype the model is loaded for (fp16 overflow is an error for
    ``torch.float16``); ``lora_targets``: the LoRA targets a run will use (MoE checks).

    ``trust_remote_code``/``allow_pickle``: the opt-ins for model files that can run code.
    """
    from tunefix.doctor.probe import Probe
    from tunefix.doctor.subject import (
        from_model,
        load_subject,
        read_data_sample,
        read_template_argument,
    )

    if isinstance(model_or_path, str) or hasattr(model_or_path, "__fspath__"):
        subject = load_subject(model_or_path, template=template, data=data,
                               trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    else:
        subject = from_model(model_or_path, tokenizer)
        if template:
            subject.template = read_template_argument(template)
        if data:
            from pathlib import Path

            subject.data_texts = read_data_sample(Path(data))
    model = None if isinstance(model_or_path, str) or hasattr(model_or_path, "__fspath__") else model_or_path
    probe = Probe(subject, model=model, run_dtype=run_dtype, lora_targets=lora_targets)
    report = Report(model=subject.name)
    for check in CHECKS:
        report.add(check(probe))
    report.subject = subject  # type: ignore[attr-defined]  (kept for fixes; not serialised)
    return report


def apply_fixes(model, tokenizer, report: Report, template: str | None = None, data_texts=None) -> list[str]:
    from tunefix.doctor.fixes import apply_fixes as _apply

    return _apply(model, tokenizer, report, template=template, data_texts=data_texts)


def write_fixed(model_path: str, out_dir: str, report: Report, *, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> list[str]:
    """A repaired copy of the model in ``out_dir`` (new or empty; nothing is overwritten)."""
    from tunefix.doctor.repair import write_fixed as _write

    return _write(model_path, out_dir, report, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
