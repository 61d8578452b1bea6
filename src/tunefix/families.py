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
    # Packed rows stay apart only through the attention mask; a layer with recurrent state
    # (linear attention) carries it from one packed row into the next (measured on the tiny
    # Qwen3.5: the second row's logits off by up to 0.54). Such families train unpacked.
    packs: bool = True


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
    # Ministral 3 (text model): Mistral's layers with YaRN RoPE and Llama 4's attention
    # temperature (llama_4_scaling_beta, over original_max_position_embeddings), both of which
    # the converter requires. As in the real config (factor 16 over 16384 of 262144) but 16
    # over 128, so that the tiny's 2048 positions are the scaled context. Tekken's 131k
    # vocabulary, tied as in Ministral-3-3B: 33.6M of the tiny's 35M parameters.
    Family("ministral3", ("ministral3",), "mistral3",
           Tiny("tekken", tied=True, config_class="Ministral3Config",
                config={"head_dim": 64, "rope_parameters": {
                    "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                    "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                    "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}},
                template="ministral-3"),
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
    # Qwen3.5: Gated DeltaNet (linear attention) layers with a full-attention layer every 4th
    # (layer_types); 4 tiny layers hold both. llama.cpp reads one head width for the DeltaNet's
    # keys and values (ssm.state_size), so they are equal here, as in every real checkpoint.
    Family("qwen3_5", ("qwen3_5", "qwen3_5_text"), "qwen35",
           Tiny("qwen35", tied=True, config_class="Qwen3_5TextConfig",
                config={"head_dim": 64, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                        "linear_num_key_heads": 2, "linear_num_value_heads": 4}, layers=4),
           stop_texts=("<|im_end|>", "<|endoftext|>"), packs=False),
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
    # Gemma 4 31B-style (the 26B-A4B whose vocab GGUF llama.cpp ships has the same attention):
    # sliding layers with head_dim 64, the full layer with its own head_dim and KV heads, keys
    # reused as values there (attention_k_eq_v), logits softcapped at 30. Its real 262k
    # vocabulary (tied: 67M of the tiny's 68M parameters, 137 MB in bf16). No per-layer
    # embeddings (E2B/E4B have them: 262144 x layers x 256 more parameters).
    Family("gemma4", ("gemma4", "gemma4_text"), "gemma4",
           Tiny("gemma-4", tied=True, config_class="Gemma4TextConfig",
                config={"head_dim": 64, "global_head_dim": 128, "num_global_key_value_heads": 1,
                        "attention_k_eq_v": True, "hidden_size_per_layer_input": 0,
                        "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"},
                template="gemma-4"),
           tanh_gelu=True, stop_texts=("<turn|>", "<eos>")),
    # gpt-oss: MoE (4 tiny experts, top 2) with attention sinks and biases, sliding layers
    # alternating with full ones, YaRN RoPE as the real config (factor 32 over 4096 original
    # positions, truncate false). Over 64 original positions llama.cpp's f16 logits differed
    # from transformers' by up to 0.84 (0.001 over 4096): llama.cpp seems not to honour
    # truncate=false, which shifts the YaRN ramp most when the original context is short. Real
    # checkpoints keep experts in MXFP4; the tiny is bf16. <|end|> closes analysis messages
    # and history turns: never a pad, never a stop (templates/harmony.py).
    Family("gpt_oss", ("gpt_oss",), "gpt-oss",
           Tiny("o200k-harmony", tied=False, config_class="GptOssConfig",
                config={"head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 128,
                        "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                            "rope_theta": 150000.0}},
                # harmony's fixed system message alone is 61 tokens, beyond the family tests'
                # 64-token rows; the gpt-oss template is tested in tests/test_gpt_oss.py
                template="zephyr"),
           stop_texts=("<|return|>", "<|call|>", "<|end|>")),
)}

SUPPORTED: tuple[str, ...] = tuple(t for f in FAMILIES.values() for t in f.model_types)
GGUF_ARCHES: tuple[str, ...] = tuple(dict.fromkeys(f.gguf_arch for f in FAMILIES.values()))
FUSED: dict[str, tuple[str, ...]] = {k: v for f in FAMILIES.values() for k, v in f.fused.items()}
STOP_TEXTS: frozenset[str] = frozenset(t for f in FAMILIES.values() for t in f.stop_texts)


def family_of(model_type: str | None) -> Family | None:
    """The family whose transformers model type this is; None for an unsupported one."""
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)
