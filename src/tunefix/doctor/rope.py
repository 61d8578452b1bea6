"""RoPE scaling (Llama 3.1's ``llama3``, YaRN, linear) that goes missing between a config, the
model transformers builds, and a GGUF.

Measured (transformers 5.24, the pinned converter), on a tiny Llama with Llama 3.1's scaling:
the converter writes ``llama3`` scaling as a ``rope_freqs.weight`` tensor (one divisor per
frequency; no ``rope.scaling.*`` key), and transformers' GGUF reader ignores that tensor and
every ``rope.scaling.*`` key but gpt-oss's, so a model loaded from such a GGUF has plain RoPE
(``rope_type`` "default"): every position's low frequencies rotate 8x too fast.

A setting is one plain dict (``type``, ``factor``, ``original_context``, ``theta``) whichever
side it comes from, so the config file, a model in memory and a GGUF compare key by key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding

SCALED = ("llama3", "yarn", "linear", "longrope", "dynamic")
# Llama 3 was pretrained at 8,192 tokens with rope_theta 500,000; a config of that signature
# that claims a longer context without scaling lost its ``rope_scaling`` (3.1+ ship llama3).
LLAMA3_THETA, LLAMA3_CONTEXT = 500000.0, 8192
# The llama3 settings every Llama 3.1/3.2/3.3 checkpoint ships (factor 8 or 32): tried when a
# GGUF's rope_freqs tensor is turned back into the config transformers needs.
LLAMA3_LOW, LLAMA3_HIGH = (1.0, 2.0), (4.0, 8.0)
LLAMA3_ORIGINAL = (8192, 4096, 16384, 32768)


def config_rope(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings a config states: transformers 5's ``rope_parameters`` or the older
    ``rope_scaling`` plus top-level ``rope_theta`` (both spellings of the type key)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = params.get("full_attention", params)  # per-layer-type settings: the global layers
    kind = params.get("rope_type") or params.get("type") or "default"
    return {"type": str(kind).lower(), "factor": params.get("factor"),
            "original_context": params.get("original_max_position_embeddings",
                                           config.get("original_max_position_embeddings")),
            "theta": params.get("rope_theta", config.get("rope_theta")),
            "low_freq_factor": params.get("low_freq_factor"), "high_freq_factor": params.get("high_freq_factor"),
            "context": config.get("max_position_embeddings")}


def gguf_rope(path: Path, tensor_names: list[str] | None = None) -> dict[str, Any]:
    """The same settings from a GGUF's header (and its ``rope_freqs.weight``, llama3's form)."""
    from tunefix.model.files import gguf_architecture, gguf_header_values

    arch = gguf_architecture(path) or ""
    keys = {k: f"{arch}.{k}" for k in ("rope.scaling.type", "rope.scaling.factor",
                                        "rope.scaling.original_context_length", "rope.freq_base",
                                        "context_length", "rope.dimension_count")}
    v = gguf_header_values(path, set(keys.values()))
    kind = str(v.get(keys["rope.scaling.type"], "none")).lower()
    if tensor_names is None:
        tensor_names = gguf_tensor_names(path)
    if "rope_freqs.weight" in tensor_names and not arch.startswith("gemma"):  # Gemma 4's are its own
        kind = "llama3"
    return {"type": "default" if kind == "none" else kind, "factor": v.get(keys["rope.scaling.factor"]),
            "original_context": v.get(keys["rope.scaling.original_context_length"]),
            "theta": v.get(keys["rope.freq_base"]), "context": v.get(keys["context_length"]),
            "dim": v.get(keys["rope.dimension_count"])}


def gguf_tensor_names(path: Path) -> list[str]:
    from tunefix.model.files import gguf_tensors

    return list(gguf_tensors(path))


def gguf_rope_freqs(path: Path, n: int | None = None):
    """llama.cpp's per-frequency divisors (``rope_freqs.weight``, F32, one per frequency pair:
    ``rope.dimension_count / 2``), or None."""
    import torch

    from tunefix.model.files import gguf_tensors

    entry = gguf_tensors(path).get("rope_freqs.weight")
    if entry is None or entry[0] != 0:  # 0: F32, as the converter writes it
        return None
    n = n or int(gguf_rope(path, ["rope_freqs.weight"])["dim"]) // 2
    with open(path, "rb") as f:
        f.seek(entry[1])
        return torch.frombuffer(bytearray(f.read(4 * n)), dtype=torch.float32)


def llama3_divisors(theta: float, dim: int, factor: float, low: float, high: float, original: int):
    """The divisors llama.cpp's converter writes for ``llama3`` scaling (its formula, the same
    one transformers applies to ``inv_freq``): 1 for short wavelengths, ``factor`` for long ones,
    a smooth blend between."""
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def llama3_parameters(divisors, theta: float, dim: int) -> dict[str, Any] | None:
    """The ``rope_parameters`` whose llama3 divisors are ``divisors``; None if no standard
    setting gives them (the tensor alone does not determine them, the shipped ones are few)."""
    import torch

    factor = float(divisors.max())
    for original in LLAMA3_ORIGINAL:
        for low in LLAMA3_LOW:
            for high in LLAMA3_HIGH:
                if torch.allclose(llama3_divisors(theta, dim, factor, low, high, original), divisors, rtol=1e-5):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": original,
                            "rope_theta": theta}
    return None


def _differences(stated: dict[str, Any], built: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    out = {}
    for key in ("type", "factor", "original_context"):
        a, b = stated.get(key), built.get(key)
        if stated["type"] == "default" or (a is None and key != "type"):
            continue
        if key == "factor" and a is not None and b is not None and math.isclose(float(a), float(b)):
            continue
        if a != b:
            out[key] = (a, b)
    return out


# ----------------------------------------------------------------------------- checks


def rope_scaling_missing(p: Probe) -> Finding | None:
    """A config (or GGUF) of Llama 3's signature that claims more than 8,192 tokens of context
    with plain RoPE: its scaling was dropped (an edited config, an old conversion)."""
    from tunefix.families import family_of

    s = p.s
    rope = gguf_rope(s.path, s.tensor_names) if s.kind == "gguf" and s.path else config_rope(s.config)
    family = family_of(s.model_type)
    if rope["type"] != "default" or family is None or family.gguf_arch != "llama":
        return None
    context, theta = rope.get("context"), rope.get("theta")
    if theta is None or not math.isclose(float(theta), LLAMA3_THETA) or not context or context <= LLAMA3_CONTEXT:
        return None
    return Finding("rope-scaling-missing", "warning",
                   f"Llama 3 RoPE (theta {theta:g}, pretrained at {LLAMA3_CONTEXT} tokens) with a context of "
                   f"{context} but no RoPE scaling: Llama 3.1+ ship 'llama3' scaling, without it every prompt "
                   "is computed with other rotations than the model was trained with",
                   {"rope_theta": theta, "context": context, "rope_type": rope["type"]},
                   fix="restore rope_parameters from the original checkpoint's config.json (Llama 3.1: "
                       "rope_type llama3, factor 8, low_freq_factor 1, high_freq_factor 4, "
                       "original_max_position_embeddings 8192)")


def rope_scaling_not_applied(p: Probe) -> Finding | None:
    """The model transformers builds computes other rotations than the file states: a GGUF
    whose scaling transformers' reader drops, or a model in memory whose rotary embedding does
    not follow its config (``rope_parameters`` changed after loading)."""
    s = p.s
    if s.kind == "gguf" and s.path is not None:
        stated = gguf_rope(s.path, s.tensor_names)
        if stated["type"] == "default":
            return None
        from tunefix.model.files import gguf_config

        built = config_rope(gguf_config(s.path).to_dict())
        where, fix = "transformers' GGUF reader", "tunefix's load_model restores it from the GGUF (rope_freqs / " \
                                                   "rope.scaling keys); plain transformers does not"
    elif p.model is not None:
        stated, built = config_rope(s.config), model_rope(p.model)
        if built is None:
            return None
        where, fix = "the loaded model's rotary embedding", "set rope_parameters before loading, not after"
    else:
        return None
    diff = _differences(stated, built)
    if not diff:
        return None
    return Finding("rope-scaling-not-applied", "error",
                   f"the file states {stated['type']} RoPE scaling but {where} computes {built['type']}: "
                   "positions are rotated differently than in training",
                   {k: {"stated": a, "built": b} for k, (a, b) in diff.items()}, fix=fix)


def model_rope(model) -> dict[str, Any] | None:
    """The RoPE a model in memory computes: its rotary embedding's ``inv_freq`` compared with
    the plain (unscaled) frequencies of its theta; a factor of 1 everywhere reads as default."""
    import torch

    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb") and hasattr(m, "inv_freq")), None)
    theta = (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta")
    if rotary is None or theta is None:
        return None
    inv = rotary.inv_freq.detach().float().cpu()
    dim = 2 * inv.numel()
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    ratio = plain / inv  # (dim/2,) the divisor applied to each frequency
    if torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-4):
        return {"type": "default", "factor": None, "original_context": None}
    stated = config_rope(model.config.to_dict())
    return {**stated, "factor": float(ratio.max())} if stated["type"] != "default" else \
        {"type": "scaled", "factor": float(ratio.max()), "original_context": None}


# ------------------------------------------------------------------------------ fixes


def restore_gguf_rope(model, path: Path) -> str | None:
    """Give a model read from ``path`` the RoPE scaling its GGUF states and transformers' reader
    dropped (llama3 from ``rope_freqs.weight``, linear/YaRN from ``rope.scaling.*``). Rebuilds
    the model's rotary embedding from the corrected config (a new instance of its own class).
    One line saying what changed, or None when nothing was missing."""
    stated = gguf_rope(path)
    current = config_rope(model.config.to_dict())
    if stated["type"] == "default" or current["type"] == stated["type"]:
        return None
    theta = float(stated["theta"] or current["theta"])
    if stated["type"] == "llama3":
        divisors = gguf_rope_freqs(path)
        params = llama3_parameters(divisors, theta, 2 * divisors.numel())
    elif stated["type"] in ("linear", "yarn") and stated["factor"]:
        params = {"rope_type": stated["type"], "factor": float(stated["factor"]), "rope_theta": theta}
        if stated["original_context"]:
            params["original_max_position_embeddings"] = int(stated["original_context"])
    else:
        params = None
    if params is None:
        return None
    model.config.rope_parameters = params
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb") and hasattr(module, "inv_freq"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            rebuilt = type(module)(model.config).to(module.inv_freq.device)
            setattr(parent, name.rsplit(".", 1)[-1], rebuilt)
    return f"RoPE scaling restored from the GGUF ({params['rope_type']}, factor {params['factor']:g})"
