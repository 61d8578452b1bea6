"""Checks on the model config: activation, sliding window, NoPE layers, fused projections."""

from __future__ import annotations

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding
from tunefix.families import SUPPORTED, family_of


def unsupported_family(p: Probe) -> Finding | None:
    """The doctor still examines a model of another family (its tokenizer, template and
    embeddings are checked the same way), but says that train and export will refuse it."""
    family = p.s.model_type
    if not family or family in SUPPORTED:
        return None
    return Finding("unsupported-family", "warning",
                   f"model family {family!r} is not supported by tunefix train and export; the checks "
                   "here still apply", {"model_type": family, "architectures": p.s.config.get("architectures")},
                   fix=f"none: tunefix trains and exports {', '.join(SUPPORTED)}")


def gemma_exact_gelu(p: Probe) -> Finding | None:
    c = p.s.config
    family = family_of(p.s.model_type)
    if family is None or not family.tanh_gelu:
        return None
    act = c.get("hidden_activation") or c.get("hidden_act")
    if act not in ("gelu", "gelu_python"):
        return None
    return Finding("gemma-exact-gelu", "error",
                   f"Gemma was trained with the tanh-approximate GELU but the config asks for exact {act!r}",
                   {"hidden_act": c.get("hidden_act"), "hidden_activation": c.get("hidden_activation")},
                   fix="set hidden_act (and hidden_activation) to gelu_pytorch_tanh", fixer="fix_gemma_gelu")


def sliding_window_off_by_one(p: Probe) -> Finding | None:
    c = p.s.config
    family = family_of(p.s.model_type)
    if family is None or family.window_fix is None or c.get("sliding_window") != family.window_fix[0]:
        return None
    wrong, right = family.window_fix
    return Finding("sliding-window-off-by-one", "error",
                   f"{family.name}'s sliding window is {right} tokens; this config says {wrong}",
                   {"sliding_window": wrong}, fix=f"set sliding_window to {right}", fixer="fix_sliding_window")


def nope_layers_differ_in_gguf(p: Probe) -> Finding | None:
    """Layers without RoPE (SmolLM3) that llama.cpp would place elsewhere: the converter writes
    none of them, llama.cpp assumes every Nth. Measured on a tiny SmolLM3 with every 2nd layer
    NoPE: the f16 GGUF's logits differed by 0.055 (top-1 99.5%)."""
    family = family_of(p.s.model_type)
    layers = p.s.config.get("no_rope_layers")
    if family is None or family.nope_every is None or not isinstance(layers, list):
        return None
    llama_cpp = [int((i + 1) % family.nope_every != 0) for i in range(len(layers))]
    if layers == llama_cpp:
        return None
    differ = [i for i, (a, b) in enumerate(zip(layers, llama_cpp, strict=True)) if a != b]
    return Finding("nope-layers-differ-in-gguf", "warning",
                   f"this config skips RoPE on other layers than llama.cpp's {family.name} (every "
                   f"{family.nope_every}th): a GGUF export would compute layers {differ[:8]} differently",
                   {"no_rope_layers": layers, "llama_cpp": llama_cpp},
                   fix="none for GGUF (its verification fails); training and PyTorch inference are unaffected")


def fused_projections(p: Probe) -> Finding | None:
    fused = sorted({n.split(".")[-2] for n in p.s.tensor_names
                    if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))})
    if not fused:
        return None
    return Finding("fused-projections", "info",
                   f"fused projections ({', '.join(fused)}): LoRA on them shares one adapter across "
                   "q, k, v (and gate, up)",
                   {"fused": fused}, fix="tunefix's training unfuses them before LoRA and refuses them for export")
