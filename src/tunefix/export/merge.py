"""A training run -> one Hugging Face directory: LoRA merged into 16-bit weights.

The adapter is merged into the base model's original weights, loaded unquantised (in
fp32 on a CPU), even when the run trained on a 4-bit base: merging into dequantised
4-bit weights would bake the quantisation error into every merged matrix. The merged
model is then cast to bf16 (or f16) once.

The directory carries the run's fixed tokenizer with the chat template it trained with,
and a generation config whose ``eos_token_id`` lists the end-of-turn token, so that
``generate`` (and the GGUF converter, which reads it) stops where training taught the
model to stop. Nothing in the run directory is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tunefix._io import atomic_dir
from tunefix.errors import TunefixError
from tunefix.model.files import quiet_loading

log = logging.getLogger(__name__)

DTYPES = ("bf16", "f16")


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise TunefixError(f"cannot merge into {name!r}", f"Choose one of {', '.join(DTYPES)}")
    return torch.bfloat16 if name == "bf16" else torch.float16


def base_is_prequantized(base: str | os.PathLike) -> bool:
    """True when the base checkpoint itself is stored in 4/8-bit (bitsandbytes & co., or a
    quantised GGUF file: its weights were dequantised to train, there is no 16-bit original)."""
    if Path(base).suffix == ".gguf" and Path(base).is_file():
        from gguf import GGMLQuantizationType as T
        from gguf import GGUFReader

        plain = {T.F32, T.F16, T.BF16}
        return any(t.tensor_type not in plain for t in GGUFReader(str(base)).tensors)
    cfg_file = Path(base) / "config.json"
    if not cfg_file.is_file():
        return False
    q = json.loads(cfg_file.read_text(encoding="utf-8")).get("quantization_config")
    # A "gguf" record only says where plain 16-bit weights came from (see gguf.py).
    return isinstance(q, dict) and q.get("quant_method") not in (None, "gguf")


def _generation_config(model, tok, template) -> Any:
    gen = model.generation_config
    old = gen.eos_token_id
    old = old if isinstance(old, list) else [old] if old is not None else []
    from tunefix.templates.policy import stop_ids

    ids = stop_ids(tok, template)
    gen.eos_token_id = list(dict.fromkeys([*ids, *old]))
    if tok.pad_token_id is not None:
        gen.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id
    return gen


SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def _copy_sentencepiece(base: Path, out: Path) -> list[str]:
    """The base model's SentencePiece file, when the saved tokenizer has none.

    transformers 5 saves fast tokenizers as tokenizer.json only, but llama.cpp's
    converters for SentencePiece families (Phi-3, Llama 2/Mistral, Gemma) read
    tokenizer.model; added tokens come from tokenizer_config.json, which we write.
    """
    copied = []
    if base.is_dir():
        for name in SENTENCEPIECE_FILES:
            if (base / name).is_file() and not (out / name).exists():
                shutil.copyfile(base / name, out / name)
                copied.append(name)
    return copied


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "bf16",
              loaded: tuple | None = None) -> Path:
    """Merge ``run_dir``'s adapter into its base and save a Hugging Face directory at ``out_dir``.

    ``out_dir`` must not exist; it appears complete or not at all. ``loaded`` may pass the
    result of ``load_run(run_dir, merge=True)`` to avoid loading twice.
    Returns ``out_dir``.
    """
    from tunefix.model.lora import fuse_projections
    from tunefix.train.run import load_run, read_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    torch_dtype = _torch_dtype(dtype)
    cfg, summary = read_run(run_dir)
    base = summary.get("base_model") or cfg.model
    if base_is_prequantized(base):
        log.warning("the base model %s is stored quantised: the adapter is merged into its dequantised "
                    "weights. Export from the original 16-bit checkpoint for an exact merge.", base)
    elif cfg.load_in_4bit:
        log.info("the run trained on a 4-bit base; merging into the original 16-bit weights of %s", base)
    model, tok, template, _ = loaded or load_run(run_dir, merge=True)
    fused = fuse_projections(model)
    if fused:
        log.info("re-fused %d projection(s) split for LoRA", fused)
    model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # plain 16-bit tensors now
    tok.chat_template = template.jinja
    _generation_config(model, tok, template)
    with atomic_dir(out_dir) as tmp:
        with quiet_loading():
            model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        _copy_sentencepiece(Path(base), tmp)
        cfg_file = tmp / "config.json"
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        if data.pop("quantization_config", None) is not None:
            cfg_file.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return out_dir
