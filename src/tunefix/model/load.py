"""``load_model``: a model and tokenizer with the doctor's fixes applied and reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError

SUPPORTED = ("llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gemma3", "gemma3_text")


def cpu_has_bf16() -> bool:
    """bf16 compute pays on a CPU with native bf16 instructions (AVX-512 BF16 / AMX)."""
    import torch

    check = getattr(torch.backends.cpu, "get_cpu_capability", None)
    capability = check() if check else ""
    if "AMX" in capability.upper():
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(device: str, precision: str = "auto"):
    """The autocast dtype for training: bf16 where the hardware has it, else fp32."""
    import torch

    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def _quantization_config(load_in_4bit: bool):
    if not load_in_4bit:
        return None
    from tunefix._optional import has_bitsandbytes

    if not has_bitsandbytes():
        raise TunefixError("load_in_4bit needs bitsandbytes, which is not installed",
                           "pip install 'tunefix[cuda]' (bitsandbytes >= 0.45 has CPU and CUDA backends)")
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _from_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantised: plain tensors now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_model(name_or_path: str, *, max_seq_length: int = 2048, load_in_4bit: bool = False,
               dtype: Any = None, template: str | None = None, fix: bool = True,
               trust_remote_code: bool = False,
               report: Callable[[str], None] | None = print) -> tuple[Any, Any]:
    """Load a causal LM (HF directory, cached hub id or GGUF) with its silent bugs fixed.

    dtype: weight dtype; None keeps fp32 master weights on a CPU (compute runs under bf16
        autocast where the CPU has it) and the checkpoint's dtype on CUDA.
    template: a registry name or file; it becomes the tokenizer's chat template.
    Every fix the doctor applies is reported as one line through ``report``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunefix.doctor import apply_fixes, examine
    from tunefix.doctor.subject import resolve_model_path

    say = report or (lambda _line: None)
    path = resolve_model_path(name_or_path)
    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = "auto" if cuda else torch.float32
    if path.suffix == ".gguf":
        if load_in_4bit:
            raise TunefixError("load_in_4bit from a GGUF file is not supported",
                               "Load the original Hugging Face checkpoint in 4-bit instead")
        model, tok = _from_gguf(path, torch.float32 if dtype == "auto" else dtype)
    else:
        if not (path / "config.json").exists():
            raise TunefixError(f"{path} has no config.json", "Pass a Hugging Face model directory or a .gguf file")
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if config.model_type not in SUPPORTED:
            raise TunefixError(f"model family {config.model_type!r} is not supported yet",
                               f"tunefix supports {', '.join(SUPPORTED)}")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, quantization_config=_quantization_config(load_in_4bit),
                trust_remote_code=trust_remote_code, use_safetensors=True)
        except OSError as e:
            raise TunefixError(f"cannot load {path}: {str(e).splitlines()[0]}",
                               "tunefix loads safetensors weights only (pickle files can run code)") from None
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if template:
        from tunefix.templates import get_template

        tok.chat_template = get_template(template).jinja
    tok.model_max_length = max_seq_length
    if fix:
        report_ = examine(model, tok)
        for line in apply_fixes(model, tok, report_):
            say(f"tunefix fixed: {line}")
    return model, tok
