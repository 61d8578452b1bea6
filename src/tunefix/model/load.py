"""``load_model``: a model and tokenizer with the doctor's fixes applied and reported."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunefix.errors import TunefixError
from tunefix.model.files import (
    SUPPORTED,
    check_model_code,
    check_model_family,
    quiet_loading,
    read_gguf_model,
    resolve_model_path,
    unsupported_family,
    weights_kind,
)


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


def load_model(name_or_path: str, *, max_seq_length: int = 2048, load_in_4bit: bool = False,
               dtype: Any = None, template: str | None = None, fix: bool = True,
               trust_remote_code: bool = False, allow_pickle: bool = False,
               lora_targets: list[str] | None = None,
               report: Callable[[str], None] | None = print) -> tuple[Any, Any]:
    """Load a causal LM (HF directory, cached hub id or GGUF) with its silent bugs fixed.

    dtype: weight dtype; None keeps fp32 master weights on a CPU (compute runs under bf16
        autocast where the CPU has it) and the checkpoint's dtype on CUDA.
    template: a registry name or file; it becomes the tokenizer's chat template.
    trust_remote_code: allow Python code shipped with the model (config ``auto_map``);
        without it such a model is refused with a message naming the flag.
    allow_pickle: accept pickle weights (``.bin``/``.pt``), read with ``weights_only=True``;
        without it only safetensors are loaded.
    lora_targets: the LoRA targets the run will ask for (None: tunefix's default), so that the
        doctor judges a MoE router or unadapted experts against them.
    Every fix the doctor applies is reported as one line through ``report``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunefix.doctor import apply_fixes, examine

    say = report or (lambda _line: None)
    path = resolve_model_path(name_or_path)
    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = "auto" if cuda else torch.float32
    # An fp16 run: fp16 weights asked for, or a GPU without bf16 (compute_dtype). The doctor's
    # fp16 probe makes overflowing layers an error there, and its fix keeps them in fp32.
    fp16_run = dtype in (torch.float16, "float16") or (cuda and dtype == "auto"
                                                       and compute_dtype("cuda") == torch.float16)
    if path.suffix == ".gguf":
        if load_in_4bit:
            raise TunefixError("load_in_4bit from a GGUF file is not supported",
                               "Load the original Hugging Face checkpoint in 4-bit instead")
        model, tok = read_gguf_model(path, torch.float32 if dtype == "auto" else dtype)
        if fix:  # transformers' GGUF reader drops RoPE scaling (llama3, YaRN, linear): doctor/rope.py
            from tunefix.doctor.rope import restore_gguf_rope

            if (line := restore_gguf_rope(model, path)) is not None:
                say(f"tunefix fixed: {line}")
    else:
        if not path.is_dir():
            raise TunefixError(f"{path} is neither a model directory nor a .gguf file",
                               "Pass a Hugging Face model directory or a .gguf file")
        if not (path / "config.json").exists():
            raise TunefixError(f"{path} has no config.json", "Pass a Hugging Face model directory or a .gguf file")
        check_model_code(path, trust_remote_code)
        check_model_family(path)
        safetensors = weights_kind(path, allow_pickle) == "safetensors"
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # a broken config.json: transformers raises several types
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise TunefixError(f"cannot read {path / 'config.json'} ({first[:160]})",
                               "Fix or restore the model's config.json") from None
        if config.model_type not in SUPPORTED:  # e.g. remote code registering its own type
            raise unsupported_family(config.model_type)
        quantization = _quantization_config(load_in_4bit)
        try:
            # weights_only=True: opted-in pickle weights may hold tensors and plain containers only.
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=dtype, quantization_config=quantization,
                    trust_remote_code=trust_remote_code, use_safetensors=safetensors, weights_only=True)
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # truncated/corrupt weights, missing tokenizer files, refused pickles
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise TunefixError(f"cannot load {path} ({type(e).__name__}: {first[:160]})",
                               "A weights or tokenizer file is missing, truncated or corrupt: "
                               "download or save the model again") from None
    if template:
        from tunefix.templates import get_template

        tok.chat_template = get_template(template).jinja
    tok.model_max_length = max_seq_length
    if fix:
        report_ = examine(model, tok, run_dtype=torch.float16 if fp16_run else None, lora_targets=lora_targets)
        for line in apply_fixes(model, tok, report_):
            say(f"tunefix fixed: {line}")
    return model, tok
