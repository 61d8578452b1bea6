"""Gemma 4 (the ``gemma4`` family record): what its tiny model must carry to stand for the real
one, and what its GGUF round trip must keep. The parametrised family tests (loading, the doctor,
LoRA fast paths, full fine-tuning, the token policy, the GGUF exports) cover the rest."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tunefix import tiny


@pytest.fixture(scope="module")
def model_dir():
    return tiny.tiny_model("gemma4")


def test_the_tiny_model_has_gemma_4s_attention_and_vocabulary(model_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    # Sliding layers and a full layer with its own head_dim and KV heads, as in the 26B-A4B whose
    # vocab GGUF llama.cpp ships (KV heads 8 sliding / 2 full, head_dim 256 / 512).
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert (cfg["head_dim"], cfg["num_key_value_heads"]) == (64, 2)
    assert cfg["per_layer_config"] == {"1": {"head_dim": 128, "num_key_value_heads": 1}}
    assert cfg["attention_k_eq_v"] and cfg["final_logit_softcapping"] == 30.0
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh" and cfg["hidden_size_per_layer_input"] == 0
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.v_proj.weight" in names
    assert "model.layers.1.self_attn.v_proj.weight" not in names  # the full layer's keys are its values
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == cfg["vocab_size"] == 262144
    assert tok("<|turn>model\nHi<turn|>", add_special_tokens=False)["input_ids"][0] == 105
    assert tok.convert_tokens_to_ids(["<turn|>", "<eos>"]) == [106, 1]
    assert tok("Hi")["input_ids"][:1] == [2]  # BOS, once


def _with_layer_scales(src, out, scales):
    """A copy of the tiny model whose layers scale their outputs as a trained Gemma 4 does
    (random init leaves every ``layer_scalar`` at 1, which hides a loader that drops them)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    weights = load_file(str(src / "model.safetensors"))
    for i, s in enumerate(scales):
        weights[f"model.layers.{i}.layer_scalar"] = torch.tensor([s], dtype=torch.bfloat16)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_the_gguf_round_trip_keeps_the_config_and_the_layer_scales(model_dir, tmp_path):
    """llama.cpp applies each layer's output scale, and the GGUF read back through transformers
    (``model.files.read_gguf_model``) has the Hugging Face config and the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunefix.export import gguf, verify
    from tunefix.model.files import gguf_config, read_gguf_model

    hf = _with_layer_scales(model_dir, tmp_path / "hf", [0.5, 2.0])
    [f16] = gguf.export_gguf(hf, tmp_path / "gguf", ["f16"])
    tok = verify.load_tokenizer(hf)
    parity = verify.logits_parity(f16, hf, tok=tok, min_margin=0.01, max_abs=0.03,
                                  prompts=verify.prompt_ids(tok)[:2], threads=1)
    parity.raise_if_failed()

    # to_dict: a config with per-layer attributes refuses to read head_dim and the like directly
    want, got = AutoConfig.from_pretrained(str(hf)).to_dict(), gguf_config(f16).to_dict()
    for key in ("layer_types", "head_dim", "num_key_value_heads", "per_layer_config", "attention_k_eq_v",
                "final_logit_softcapping", "rope_parameters", "sliding_window", "hidden_size_per_layer_input"):
        assert got[key] == want[key], key

    model, gguf_tok = read_gguf_model(f16, torch.float32)
    assert [float(layer.layer_scalar) for layer in model.model.layers] == [0.5, 2.0]
    ids = tok("Hello there, how are you today?", return_tensors="pt")["input_ids"]
    assert gguf_tok("Hello there, how are you today?", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    ref = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model.eval()(ids).logits - ref(ids).logits).abs().max().item() < 0.01
