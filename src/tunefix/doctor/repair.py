"""``tunefix doctor --fix OUT_DIR``: a repaired copy on disk. The input is only read."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunefix._io import atomic_dir, check_output_dir
from tunefix.doctor.report import Report


def check_out_dir(out_dir: Path) -> None:
    """A repaired copy never overwrites anything: an empty or new directory only."""
    check_output_dir(out_dir, "--fix")


def load_for_fix(path: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """The whole model and tokenizer, in the checkpoint's own dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix == ".gguf":
        from tunefix.model.files import dequantized_gguf_model

        model = dequantized_gguf_model(path, torch.float32)
        return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from tunefix.model.files import check_model_code, quiet_loading, weights_kind

    check_model_code(path, trust_remote_code)
    safetensors = weights_kind(path, allow_pickle) == "safetensors"
    # weights_only=True: pickle weights (opted in) may hold tensors and plain containers only.
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", use_safetensors=safetensors,
                                                     weights_only=True, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tok


def write_fixed(model_path: str, out_dir: str, report: Report, *,
                trust_remote_code: bool = False, allow_pickle: bool = False) -> list[str]:
    from tunefix.doctor.fixes import apply_fixes

    out = Path(out_dir).expanduser()
    check_out_dir(out)
    subject = report.subject  # type: ignore[attr-defined]
    src = subject.path
    model, tok = load_for_fix(src, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    lines = apply_fixes(model, tok, report, template=subject.template, data_texts=subject.data_texts)
    if out.exists():  # empty (check_out_dir): atomic_dir needs the final name free
        out.rmdir()
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if src.is_dir() and (src / "tokenizer.model").exists():
            shutil.copy2(src / "tokenizer.model", tmp / "tokenizer.model")
    return lines
