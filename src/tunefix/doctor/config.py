"""Checks on the model config: activation, sliding window, fused projections."""

from __future__ import annotations

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding

GEMMA_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def unsupported_family(p: Probe) -> Finding | None:
    """The doctor still examines a model of another family (its tokenizer, template and
    embeddings are checked the same way), but says that train and export will refuse it."""
    from tunefix.model.files import SUPPORTED

    family = p.s.model_type
    if not family or family in SUPPORTED:
        return None
    return Finding("unsupported-family", "warning",
                   f"model family {family!r} is not supported by tunefix train and export; the checks "
                   "here still apply", {"model_type": family, "architectures": p.s.config.get("architectures")},
                   fix=f"none: tunefix trains and exports {', '.join(SUPPORTED)}")


def gemma_exact_gelu(p: Probe) -> Finding | None:
    c = p.s.config
    if p.s.model_type not in GEMMA_TYPES:
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
    if p.s.model_type != "phi3" or c.get("sliding_window") != 2047:
        return None
    return Finding("sliding-window-off-by-one", "error",
                   "Phi-3's sliding window is 2048 tokens; this config says 2047",
                   {"sliding_window": 2047}, fix="set sliding_window to 2048", fixer="fix_sliding_window")


def fused_projections(p: Probe) -> Finding | None:
    fused = sorted({n.split(".")[-2] for n in p.s.tensor_names
                    if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))})
    if not fused:
        return None
    return Finding("fused-projections", "info",
                   f"fused projections ({', '.join(fused)}): LoRA on them shares one adapter across "
                   "q, k, v (and gate, up)",
                   {"fused": fused}, fix="tunefix's training unfuses them before LoRA and refuses them for export")
