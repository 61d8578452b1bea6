"""The model families tunefix trains and exports: one record each, read by every module.

Adding a family is one ``Family`` record here plus its tests (design.md, "Adding a family",
says exactly which). Nothing else in tunefix names a family's model types, its GGUF
architecture, its fused projections or its config quirks. Stdlib only: importing this is free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Phi-3 computes q, k, v with one Linear and gate, up with another (see model/lora.py).
PHI3_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Tiny:
    """The tiny random test model of a family: its real tokenizer (a ``tunefix.assets``
    name), tied embeddings, and the transformers config class with its family settings."""

    tokenizer: str
    tied: bool
    config_class: str
    config: dict = field(default_factory=dict)
    template: str = "chatml"  # a registry template its tokenizer can train on (tests train with it)
    layers: int = 2  # more where a family's quirk needs them (SmolLM3's NoPE: every 4th layer)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers' config.model_type values
    gguf_arch: str                # llama.cpp's general.architecture (Mistral's GGUFs say "llama")
    tiny: Tiny
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused Linear -> its parts
    tanh_gelu: bool = False       # trained with the tanh-approximate GELU (Gemma)
    window_fix: tuple[int, int] | None = None  # (a wrong sliding window seen in configs, the right one)
    layers_27b: int | None = None  # llama.cpp tells the 27B model (its own attention scale) by this
    # llama.cpp skips RoPE on every Nth layer of this architecture and reads nothing else from
    # the config (SmolLM3: 4); a config that skips others converts, then answers differently.
    nope_every: int | None = None
    # Texts that end a turn or the text in the family's models and templates: the doctor never
    # makes one of them the pad token (a pad is masked from the loss: the model would never stop).
    stop_texts: tuple[str, ...] = ()


# Gemma 2/3 scale attention by query_pre_attn_scalar ** -0.5. Real checkpoints set it to
# head_dim (the 27B models aside), which is what llama.cpp uses; transformers' default 256
# would make the tiny models disagree with their own exports (export/gguf_arch.py).
_GEMMA_TINY = {"head_dim": 64, "hidden_activation": "gelu_pytorch_tanh"}
_GEMMA_STOPS = ("<end_of_turn>", "<eos>")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",), "llama",  # Llama 2/3, SmolLM2
           Tiny("llama-bpe", tied=False, config_class="LlamaConfig", config={"rope_theta": 500000.0},
                template="llama-3"),
           stop_texts=("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|endoftext|>")),
    Family("mistral", ("mistral",), "llama",
           Tiny("llama-spm", tied=False, config_class="MistralConfig", config={"sliding_window": None},
                template="mistral"),
           stop_texts=("</s>",)),
    Family("qwen2", ("qwen2",), "qwen2", Tiny("qwen2", tied=True, config_class="Qwen2Config", template="qwen-2.5"),
           stop_texts=("<|im_end|>", "<|endoftext|>")),
    Family("qwen3", ("qwen3",), "qwen3",
           Tiny("qwen2", tied=True, config_class="Qwen3Config", config={"head_dim": 64}),
           stop_texts=("<|im_end|>", "<|endoftext|>")),
    Family("qwen3_moe", ("qwen3_moe",), "qwen3moe",
           Tiny("qwen2", tied=False, config_class="Qwen3MoeConfig",
                config={"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                        "norm_topk_prob": True}),
           stop_texts=("<|im_end|>", "<|endoftext|>")),
    Family("smollm3", ("smollm3",), "smollm3",
           Tiny("llama-bpe", tied=True, config_class="SmolLM3Config",
                config={"rope_theta": 2000000.0, "no_rope_layer_interval": 4}, template="llama-3", layers=4),
           nope_every=4, stop_texts=("<|im_end|>", "<|end_of_text|>", "<|eot_id|>")),
    Family("phi3", ("phi3",), "phi3",
           Tiny("phi-3", tied=False, config_class="Phi3Config", config={"sliding_window": 2048}, template="phi-3"),
           fused=PHI3_FUSED, window_fix=(2047, 2048), stop_texts=("<|end|>", "<|endoftext|>")),
    Family("gemma", ("gemma",), "gemma",
           Tiny("llama-spm", tied=True, config_class="GemmaConfig", config=_GEMMA_TINY, template="mistral"), tanh_gelu=True,
           stop_texts=_GEMMA_STOPS),
    Family("gemma2", ("gemma2",), "gemma2",
           Tiny("llama-spm", tied=True, config_class="Gemma2Config", config={**_GEMMA_TINY, "query_pre_attn_scalar": 64}, template="mistral"),
           tanh_gelu=True, layers_27b=46, stop_texts=_GEMMA_STOPS),
    Family("gemma3", ("gemma3", "gemma3_text"), "gemma3",
           Tiny("llama-spm", tied=True, config_class="Gemma3TextConfig",
                config={**_GEMMA_TINY, "query_pre_attn_scalar": 64}, template="mistral"),
           tanh_gelu=True, layers_27b=62, stop_texts=_GEMMA_STOPS),
)}

SUPPORTED: tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in f.model_types)
GGUF_ARCHES: tuple[str, ...] = tuple(dict.fromkeys(f.gguf_arch for f in FAMILIES.values()))
FUSED: dict[str, tuple[str, ...]] = {k: v for f in FAMILIES.values() for k, v in f.fused.items()}
STOP_TEXTS: frozenset[str] = frozenset(t for f in FAMILIES.values() for t in f.stop_texts)


def family_of(model_type: str | None) -> Family | None:
    """The family whose transformers model type this is; None for an unsupported one."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
