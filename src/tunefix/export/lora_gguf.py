"""LoRA-only export: the PEFT adapter as it is, and as a GGUF LoRA adapter.

The GGUF adapter is written by the pinned llama.cpp's ``convert_lora_to_gguf.py``
(llama.cpp ``--lora``, Ollama ``ADAPTER``). Two things are staged first, in a temporary
copy (the run's adapter is never written):

- llama.cpp scales every LoRA tensor by ``alpha / rank`` of that tensor. PEFT scales by
  ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA, or per-module patterns). The staged
  config gets ``lora_alpha = scale * r`` so llama.cpp applies PEFT's scale.
- Phi-3 adapters are trained on split q/k/v and gate/up parts (``tunefix.model.lora``),
  which have no tensor in a Phi-3 GGUF. They are fused exactly: ``A = [A_q; A_k; A_v]``
  and ``B = blockdiag(B_q, B_k, B_v)`` give ``B A = [B_q A_q; B_k A_k; B_v A_v]``; the
  rank triples, so B is multiplied by 3 (2 for gate/up) to keep ``alpha / rank`` right.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tunefix._io import atomic_path
from tunefix.errors import TunefixError
from tunefix.families import FUSED

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def copy_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A copy of the PEFT adapter directory (config and weights; README etc. too)."""
    src, out = Path(adapter_dir), Path(out_dir)
    if not (src / "adapter_config.json").is_file():
        raise TunefixError(f"{src} holds no PEFT adapter (no adapter_config.json)")
    shutil.copytree(src, out)
    return out


def _peft_scale(conf: dict) -> float:
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise TunefixError("the adapter has per-module ranks or alphas, which a GGUF adapter cannot carry",
                           "Export the merged model instead")
    r, alpha = conf["r"], conf.get("lora_alpha") or conf["r"]
    return alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r


def stage_adapter(adapter_dir: Path, out: Path) -> dict:
    """Write an adapter llama.cpp's converter reads correctly into ``out``; return its config."""
    import torch
    from safetensors.torch import load_file, save_file

    conf = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise TunefixError(f"{adapter_dir} has no adapter_model.safetensors")
    scale, r = _peft_scale(conf), conf["r"]
    tensors = load_file(str(weights))
    extra = [k for k in tensors if "lora_A" not in k and "lora_B" not in k]
    if extra:
        raise TunefixError(f"the adapter also trains full tensors ({extra[0]}), which a GGUF LoRA adapter "
                           "cannot carry", "Export the merged model instead (without --lora-only)")
    out_tensors: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key in sorted(tensors):
        for fused, parts in FUSED.items():
            marker = f".{fused}."
            if marker not in key or key in done:
                continue
            prefix, rest = key.split(marker, 1)
            part = rest.split(".", 1)[0]
            if part not in parts:
                continue
            names = [f"{prefix}{marker}{p}" for p in parts]
            a = [tensors[f"{n}.lora_A.weight"] for n in names]
            b = [tensors[f"{n}.lora_B.weight"] for n in names]
            out_tensors[f"{prefix}.{fused}.lora_A.weight"] = torch.cat(a, dim=0).contiguous()
            out_tensors[f"{prefix}.{fused}.lora_B.weight"] = (torch.block_diag(*b) * len(parts)).contiguous()
            done.update(f"{n}.lora_{w}.weight" for n in names for w in "AB")
            break
        else:
            if key not in done:
                out_tensors[key] = tensors[key].contiguous()
    conf = {**conf, "lora_alpha": scale * r, "use_rslora": False}
    if done:
        conf["target_modules"] = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in out_tensors})
        log.info("fused %d split LoRA projections for the GGUF adapter", len(done) // 2)
    out.mkdir(parents=True, exist_ok=True)
    save_file(out_tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=1), encoding="utf-8")
    return conf


def convert_lora(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, out_file: str | os.PathLike,
                 outtype: str = "f16") -> Path:
    """``adapter_dir`` (PEFT) -> one GGUF LoRA adapter for the base model at ``base_dir``."""
    from tunefix import assets
    from tunefix.export.gguf import _converter_input, run_converter

    adapter_dir, base_dir, out_file = Path(adapter_dir), Path(base_dir), Path(out_file)
    if outtype not in ("f32", "f16", "bf16", "q8_0"):
        raise TunefixError(f"a GGUF LoRA adapter cannot be {outtype!r}", "Use f16, bf16, f32 or q8_0")
    src = assets.llama_cpp_source()
    log.info("converting LoRA adapter -> GGUF (%s)", outtype)
    with tempfile.TemporaryDirectory(prefix="tunefix-lora-") as tmp, \
            _converter_input(base_dir) as base, atomic_path(out_file) as out_tmp:
        staged = Path(tmp) / "adapter"
        stage_adapter(adapter_dir, staged)
        cmd = [sys.executable, str(src / "convert_lora_to_gguf.py"), str(staged), "--base", str(base),
               "--outtype", outtype, "--outfile", str(out_tmp)]
        run_converter(cmd, src, "llama.cpp's LoRA converter failed", "Export the merged model instead",
                      writes=out_tmp)
    return out_file


def read_adapter_info(gguf_file: str | os.PathLike) -> dict:
    """general.type, adapter.type, adapter.lora.alpha and the tensor count of a GGUF adapter."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return {"general.type": value("general.type"), "adapter.type": value("adapter.type"),
            "adapter.lora.alpha": value("adapter.lora.alpha"), "tensors": len(reader.tensors)}
