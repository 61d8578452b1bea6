"""Issue 18: the doctor's numeric checks: fp16 overflow, RoPE scaling, MoE LoRA targets.

Each on a tiny model with the bug and one without (``tunefix.tiny``, real tokenizers).
"""

import json
import shutil

import pytest
import torch

from tunefix import tiny
from tunefix.doctor import examine
from tunefix.doctor.probe import Probe
from tunefix.doctor.subject import Subject

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
TEXT = "The quick brown fox jumps over the lazy dog. Apollo 11 landed on the Moon in 1969."


def _model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)


def _logits(model, tok):
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------- fp16 overflow


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """Tiny Llama whose layer 1 MLP (up_proj and down_proj x1000) writes activations up to
    96,139 into the residual stream (measured, fp32; the unscaled model peaks at 4.0). Its
    largest weight is 98.6, so the weights themselves fit fp16."""
    out = tmp_path_factory.mktemp("fp16") / "overflowing"
    model, tok = _model(tiny.tiny_model("llama"))
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.up_proj.weight.mul_(1000.0)
        mlp.down_proj.weight.mul_(1000.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_fp16_probe_is_quiet_on_a_clean_model():
    model, tok = _model(tiny.tiny_model("llama"))
    report = examine(model, tok, run_dtype=torch.float16)
    assert "fp16-overflow" not in report.codes()


def test_fp16_overflow_names_the_layer(overflowing):
    model, tok = _model(overflowing)
    warning = examine(model, tok).get("fp16-overflow")
    assert warning.severity == "warning" and warning.evidence["layers"] == [1]
    assert 65504 < warning.evidence["largest"] < 2e5 and warning.evidence["peaks"][0] < 100
    error = examine(model, tok, run_dtype=torch.float16).get("fp16-overflow")
    assert error.severity == "error" and error.fixable
    assert examine(overflowing).get("fp16-overflow") is None, "the probe runs only on a loaded model"


def test_fp16_forward_overflows_without_the_fix(overflowing):
    model, tok = _model(overflowing)
    reference = _logits(model, tok)
    assert torch.isfinite(reference).all()
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 mixed precision, fp32 weights
        assert not torch.isfinite(_logits(model, tok)).all()
    assert not torch.isfinite(_logits(model.half(), tok)).all()  # fp16 weights


def test_load_model_keeps_the_overflowing_layer_in_fp32(overflowing):
    from tunefix.model.load import load_model

    reference = _logits(*_model(overflowing))
    lines: list[str] = []
    model, tok = load_model(str(overflowing), dtype=torch.float16, report=lines.append)
    assert any("decoder layers [1] computed in fp32" in line for line in lines), lines
    with torch.autocast("cpu", dtype=torch.float16):
        logits = _logits(model, tok)
        assert torch.is_autocast_enabled("cpu"), "the layer hooks must restore autocast"
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


def test_a_clean_fp16_load_changes_nothing():
    from tunefix.model.load import load_model

    lines: list[str] = []
    model, _ = load_model(str(tiny.tiny_model("llama")), dtype=torch.float16, report=lines.append)
    assert not any("fp32" in line for line in lines)
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float16


# ----------------------------------------------------------------------------- RoPE


def _with_rope(src, out, rope):
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"] = rope
    config["max_position_embeddings"] = 131072
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


@pytest.fixture(scope="module")
def rope_dirs(tmp_path_factory):
    """Tiny Llama with Llama 3.1's llama3 scaling, a copy with it dropped, and a GGUF of each
    (the pinned converter)."""
    from tunefix.export.gguf import convert

    root = tmp_path_factory.mktemp("rope")
    src = tiny.tiny_model("llama")
    scaled = _with_rope(src, root / "scaled", LLAMA3_ROPE)
    dropped = _with_rope(src, root / "dropped", {"rope_type": "default", "rope_theta": 500000.0})
    return {"scaled": scaled, "dropped": dropped,
            "scaled.gguf": convert(scaled, root / "scaled.gguf"), "dropped.gguf": convert(dropped, root / "dropped.gguf")}


def _gguf_probe(path) -> Probe:
    """The GGUF side of a subject, without its tokenizer (transformers reads a vocab GGUF for
    up to 40 s; the RoPE checks read the header and the tensor list)."""
    from tunefix.doctor.rope import gguf_tensor_names

    return Probe(Subject(name=str(path), kind="gguf", config={"model_type": "llama"}, tokenizer=None,
                         template=None, stop_ids=[], embed=None, lm_head=None,
                         tensor_names=gguf_tensor_names(path), path=path))


def test_rope_scaling_dropped_from_a_config_is_found(rope_dirs):
    from tunefix.doctor.rope import rope_scaling_missing

    assert "rope-scaling-missing" in examine(rope_dirs["dropped"]).codes()
    assert "rope-scaling-missing" not in examine(rope_dirs["scaled"]).codes()
    assert rope_scaling_missing(_gguf_probe(rope_dirs["dropped.gguf"])).evidence["context"] == 131072
    assert rope_scaling_missing(_gguf_probe(rope_dirs["scaled.gguf"])) is None


def test_the_converter_writes_llama3_as_rope_freqs(rope_dirs):
    from tunefix.doctor.rope import gguf_rope, gguf_rope_freqs, llama3_divisors

    assert gguf_rope(rope_dirs["scaled.gguf"])["type"] == "llama3"
    assert gguf_rope(rope_dirs["dropped.gguf"])["type"] == "default"
    freqs = gguf_rope_freqs(rope_dirs["scaled.gguf"])
    assert torch.allclose(freqs, llama3_divisors(500000.0, 64, 8.0, 1.0, 4.0, 8192))
    assert float(freqs.max()) == 8.0 and float(freqs.min()) == 1.0


def test_transformers_drops_a_gguf_s_rope_scaling_and_tunefix_restores_it(rope_dirs):
    from tunefix.doctor.rope import restore_gguf_rope, rope_scaling_not_applied
    from tunefix.model.files import dequantized_gguf_model

    finding = rope_scaling_not_applied(_gguf_probe(rope_dirs["scaled.gguf"]))
    assert finding.severity == "error" and finding.evidence["type"] == {"stated": "llama3", "built": "default"}
    assert rope_scaling_not_applied(_gguf_probe(rope_dirs["dropped.gguf"])) is None

    model = dequantized_gguf_model(rope_dirs["scaled.gguf"], torch.float32)
    assert model.config.rope_parameters["rope_type"] == "default"
    assert "llama3" in restore_gguf_rope(model, rope_dirs["scaled.gguf"])
    want, _ = _model(rope_dirs["scaled"])
    assert model.config.rope_parameters == {**LLAMA3_ROPE}
    assert torch.allclose(model.model.rotary_emb.inv_freq, want.model.rotary_emb.inv_freq)
    assert restore_gguf_rope(model, rope_dirs["scaled.gguf"]) is None  # nothing left to restore


def test_a_model_whose_rotary_embedding_ignores_its_config(rope_dirs):
    model, tok = _model(rope_dirs["dropped"])
    assert "rope-scaling-not-applied" not in examine(model, tok).codes()
    model.config.rope_parameters = dict(LLAMA3_ROPE)  # changed after loading: the buffer stays plain
    assert examine(model, tok).get("rope-scaling-not-applied").evidence["type"]["built"] == "default"


def test_export_verification_compares_rope_metadata(rope_dirs):
    from tunefix.errors import TunefixError
    from tunefix.export.verify import rope_parity

    assert rope_parity(rope_dirs["scaled.gguf"], rope_dirs["scaled"]).ok
    assert rope_parity(rope_dirs["dropped.gguf"], rope_dirs["dropped"]).ok
    lost = rope_parity(rope_dirs["dropped.gguf"], rope_dirs["scaled"])
    assert lost.failures == ["scaling llama3 in the config, default in the GGUF"]
    with pytest.raises(TunefixError, match="RoPE metadata differs"):
        lost.raise_if_failed()
    assert not rope_parity(rope_dirs["scaled.gguf"], rope_dirs["dropped"]).ok


# ------------------------------------------------------------------------------ MoE


def test_default_targets_skip_the_router_and_adapt_the_experts():
    path = tiny.tiny_model("qwen3_moe")
    codes = examine(path).codes()
    assert "moe-router-targeted" not in codes and "moe-experts-unadapted" not in codes
    from tunefix.model.lora import add_lora

    model, _ = _model(path)
    names = [n for n, _ in add_lora(model, r=4).named_parameters() if ".lora_A." in n]
    assert any(".mlp.experts." in n for n in names) and not any(".mlp.gate." in n for n in names)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "gate"]])
def test_router_targets_are_warned(targets):
    finding = examine(tiny.tiny_model("qwen3_moe"), lora_targets=targets).get("moe-router-targeted")
    assert finding.severity == "warning"
    assert finding.evidence["routers"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def _gpt_oss():
    """A tiny random gpt-oss model (no tokenizer needed): PEFT has no mapping of its experts."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    config = GptOssConfig(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
                          num_experts_per_tok=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_experts_without_adapters_are_warned_and_tunefix_adapts_them():
    from tunefix.model.lora import add_lora

    model = _gpt_oss()
    subject = Subject(name="gpt-oss", kind="memory", config=model.config.to_dict(), tokenizer=None, template=None,
                      stop_ids=[], embed=None, lm_head=None)
    from tunefix.doctor.moe import moe_experts_unadapted

    finding = moe_experts_unadapted(Probe(subject))
    assert finding.evidence["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert finding.evidence["expert_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert moe_experts_unadapted(Probe(subject, lora_targets=["q_proj", "v_proj"])) is None  # not all-linear

    wrapped = add_lora(model, r=4)
    adapted = {n.split(".lora_A.")[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    assert sum(".mlp.experts" in n for n in adapted) >= 2, adapted
    assert not any("router" in n for n in adapted)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = wrapped(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if ".experts." in n and ".lora_B." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
