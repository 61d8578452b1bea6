"""Per-architecture quirks of the pinned llama.cpp that an export must work around or refuse.

Each check returns None when it does not apply (design.md, habit 5). Measured on the
tiny models of ``tunefix.tiny`` against their fp32 PyTorch logits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tunefix.errors import TunefixError
from tunefix.families import family_of


# llama.cpp scales Gemma 2/3 attention by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for
# the 27B models it recognises by layer count, and never reads query_pre_attn_scalar
# (the converter does not write it). Measured: a tiny Gemma 3 with head_dim 64 and
# transformers' default query_pre_attn_scalar 256 gave top-1 agreement 31% and max abs
# diff 0.87; with 64, 100% and 0.0017. Real checkpoints satisfy the rule.
def gemma_attention_scale_problem(cfg: dict) -> str | None:
    model_type = cfg.get("model_type")
    family = family_of(model_type)
    if family is None or family.layers_27b is None:
        return None
    text = cfg.get("text_config") or cfg  # Gemma 3 multimodal configs nest it
    scalar = text.get("query_pre_attn_scalar")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    llama_dim = head_dim
    if text.get("num_hidden_layers") == family.layers_27b:
        llama_dim = text["hidden_size"] // text["num_attention_heads"]
    if scalar is None or scalar == llama_dim:
        return None
    return (f"{model_type}: query_pre_attn_scalar is {scalar}, but llama.cpp scales attention "
            f"by 1/sqrt({llama_dim}) and ignores it, so the GGUF would compute other logits")


# llama.cpp's Qwen3.5 and Qwen3-Next converters export the multi-token-prediction (MTP) head
# unless told ``--no-mtp``, and count its layers from the checkpoint's ``mtp.*`` tensors when
# the config does not say; with none they stop (measured on the tiny Qwen3.5:
# "assert self.opt_num_mtp_layers != 0"). transformers drops ``mtp.*`` on load, so no model
# tunefix trains or merges carries them, while the config may still say
# ``mtp_num_hidden_layers: 1``. The flag is the converter's own; other converters refuse it.
_MTP_ARCHES = ("qwen35", "qwen35moe", "qwen3next")


def converter_flags(cfg: dict, tensor_names: Iterable[str]) -> list[str]:
    """Extra converter arguments for this checkpoint: ``--no-mtp`` where an MTP-aware
    converter would look for a multi-token-prediction head that is not there."""
    family = family_of(cfg.get("model_type"))
    if family is None or family.gguf_arch not in _MTP_ARCHES:
        return []
    if any(n.startswith(("mtp.", "model.mtp.")) for n in tensor_names):
        return []
    return ["--no-mtp"]


def check_config(cfg: dict) -> None:
    """Refuse, before converting, a config that llama.cpp would run differently."""
    problem = gemma_attention_scale_problem(cfg)
    if problem:
        raise TunefixError(problem, "Export a model whose query_pre_attn_scalar equals its head_dim")


# llama.cpp emulates Phi-3's tokenizer, whose special tokens strip the whitespace after
# them (AddedToken rstrip=True), only when general.name contains "phi-3" or "phi3"
# (lower-cased); the converter writes the directory name there. Measured: a tiny Phi-3
# named "Tiny Phi3 ..." whose Hugging Face tokenizer does not strip diverged on every
# rendered conversation; renamed, it matched. A fine-tune in a directory named otherwise
# would diverge the other way.
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


def _special_strips(tok) -> bool | None:
    """Whether the tokenizer drops a newline after its chat special tokens (measured)."""
    skip = {tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token}
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    marks = [t.content for t in tok.added_tokens_decoder.values()
             if t.special and t.content not in skip and t.content in template]
    if not marks:
        return None
    with_nl = tok(f"{marks[0]}\nx", add_special_tokens=False)["input_ids"]
    without = tok(f"{marks[0]}x", add_special_tokens=False)["input_ids"]
    return with_nl == without


def phi3_name(arch: str, name: str, tok) -> str | None:
    """A general.name under which llama.cpp strips like ``tok`` does, if ``name`` is not one."""
    if arch != "phi3":
        return None
    strips = _special_strips(tok)
    named = bool(_PHI3_NAME.search(name or ""))
    if strips is None or strips == named:
        return None
    return f"{name} (phi3)" if strips else _PHI3_NAME.sub("Phi 3", name)
