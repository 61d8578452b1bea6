"""Tiny random-initialised models of each supported family, around real tokenizers.

Every later test runs the production code on these in seconds on a CPU. Hidden sizes
are multiples of 256 because llama.cpp's K-quants work in blocks of 256.

The tokenizers are real (from ``tunefix.assets``). Gemma models use the Llama 2
SentencePiece tokenizer: the only Gemma vocab that llama.cpp ships (gemma-4) cannot be
read by transformers 5.24 (see design.md), and the Gemma checks are about the config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunefix.errors import TunefixError
from tunefix.families import FAMILIES as FAMILY_RECORDS
from tunefix.families import Tiny
from tunefix.progress import Reporter, or_silent

FAMILIES = {name: f.tiny for name, f in FAMILY_RECORDS.items()}  # family -> its tiny spec


STOP_IDS = {
    "qwen2": [151645, 151643],          # <|im_end|>, <|endoftext|> (Qwen2.5-Instruct)
    "qwen35": [151645, 151643],         # the same tokens in the Qwen3.5 vocab file
    "phi-3": [32000, 32001, 32007],     # <|endoftext|>, <|assistant|>, <|end|> (Phi-3-mini)
    "llama-bpe": [128001],              # <|end_of_text|> (Llama 3 base)
    "llama-spm": [2],                   # </s>
}


def _spec(family: str) -> Tiny:
    if family not in FAMILIES:
        raise TunefixError(f"unknown tiny family {family!r}", f"Choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _config(spec: Tiny, vocab_size: int, hidden: int, layers: int, tok):
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048, tie_word_embeddings=spec.tied,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return getattr(tf, spec.config_class)(**common, **spec.config)


def build_tiny(family: str, out: Path, *, hidden: int = 256, layers: int | None = None, seed: int = 0) -> Path:
    """Write a tiny random model of ``family`` with its real tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefix import assets

    spec = _spec(family)
    if hidden % 256:
        raise TunefixError(f"hidden size {hidden} is not a multiple of 256 (llama.cpp K-quants need it)")
    layers = layers or spec.layers
    tok = AutoTokenizer.from_pretrained(str(assets.tokenizer(spec.tokenizer)))
    torch.manual_seed(seed)
    config = _config(spec, len(tok), hidden, layers, tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random init gives every embedding row a similar norm, like a trained model.
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16)
    # Stop ids as the real checkpoints of each family ship them: instruct-style where the
    # tokenizer carries a chat template (Qwen2, Phi-3), base-style otherwise.
    model.generation_config.eos_token_id = STOP_IDS.get(spec.tokenizer, [tok.eos_token_id])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    tokenizer_model = assets.tokenizer(spec.tokenizer) / "tokenizer.model"
    if tokenizer_model.exists():
        (out / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (out / "tunefix-asset.json").write_text(json.dumps(
        {"tiny_family": family, "tokenizer": spec.tokenizer, "hidden": hidden, "layers": layers,
         "seed": seed}, indent=1))
    return out


def _spec_digest(spec: Tiny) -> str:
    """What the built model depends on: a changed family record rebuilds its cached tiny model."""
    from tunefix.assets import tokenizer_version

    key = repr((spec.tokenizer, tokenizer_version(spec.tokenizer), spec.tied, spec.config_class,
                sorted(spec.config.items())))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def tiny_model(family: str, *, hidden: int = 256, layers: int | None = None, seed: int = 0) -> Path:
    """A cached tiny model directory (built on first use, checked by manifest after; rebuilt
    when the family's record changes). ``layers`` defaults to the family's own."""
    from tunefix import assets

    spec = _spec(family)
    layers = layers or spec.layers
    name = f"tiny-{family}-h{hidden}-l{layers}-s{seed}"
    return assets.cached_dir(name, lambda tmp: build_tiny(family, tmp, hidden=hidden, layers=layers,
                                                          seed=seed), version=f"4-{_spec_digest(spec)}")


def fetch_tiny(progress: Reporter | None = None) -> dict[str, Path]:
    """Build every family's tiny model ahead of time (``tunefix assets fetch``); the paths.
    Each model is one stage of ``progress``."""
    progress = or_silent(progress)
    out = {}
    for family in FAMILIES:
        label = f"tiny {family} model"
        with progress.stage(label):
            out[label] = tiny_model(family)
    return out
