"""The family table (``tunefix.families``) is the one source: each record is consistent with
transformers and llama.cpp, and the modules that used to keep their own lists read it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunefix import families
from tunefix.families import FAMILIES


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_record_matches_transformers_and_llama_cpp(name):
    import gguf
    import transformers

    f = FAMILIES[name]
    config = getattr(transformers, f.tiny.config_class)(**f.tiny.config)
    assert config.model_type in f.model_types  # the tiny model is of the family it tests
    assert f.gguf_arch in gguf.MODEL_ARCH_NAMES.values()  # llama.cpp's converter writes this arch
    if f.tanh_gelu:
        assert f.tiny.config["hidden_activation"] == "gelu_pytorch_tanh"
    if f.window_fix:
        assert config.sliding_window == f.window_fix[1] or f.tiny.config.get("sliding_window") == f.window_fix[1]


def test_derived_lists_cover_every_family_once():
    types = [t for f in FAMILIES.values() for t in f.model_types]
    assert len(types) == len(set(types)) and families.SUPPORTED == tuple(types)
    assert set(families.GGUF_ARCHES) == {f.gguf_arch for f in FAMILIES.values()}
    assert families.family_of("gemma3_text").name == "gemma3" and families.family_of("mamba") is None


def test_the_modules_read_the_table():
    from tunefix import tiny
    from tunefix.export import lora_gguf
    from tunefix.model import files, lora

    assert files.SUPPORTED is families.SUPPORTED and files.GGUF_ARCHES is families.GGUF_ARCHES
    assert lora.FUSED is families.FUSED is lora_gguf.FUSED
    assert tiny.FAMILIES == {n: f.tiny for n, f in FAMILIES.items()}


def test_a_quirk_comes_from_the_record(monkeypatch):
    """The doctor's window check reads the record: a new family's quirk is one field."""
    from tunefix.doctor import config as checks
    from tunefix.families import Family, Tiny

    fake = Family("newfam", ("newfam",), "llama", Tiny("llama-bpe", tied=False, config_class="LlamaConfig"),
                  window_fix=(4095, 4096))
    monkeypatch.setitem(FAMILIES, "newfam", fake)

    class Subject:
        model_type = "newfam"
        config = {"sliding_window": 4095}

    class Probe:
        s = Subject()

    finding = checks.sliding_window_off_by_one(Probe())
    assert finding is not None and "4096" in finding.message


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_doctor_examines_each_family_without_errors(name):
    """Each family's tiny model (random weights, real tokenizer) is supported and clean: no
    error-severity finding, no unsupported-family (the README's family table, "doctor")."""
    from tunefix import tiny
    from tunefix.doctor import examine

    report = examine(tiny.tiny_model(name), template="chatml" if name.startswith(("qwen", "smollm")) else None)
    assert report.get("unsupported-family") is None, report.summary()
    assert not report.errors, [(f.code, f.message) for f in report.errors]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_fine_tuning_in_each_family(name, tmp_path):
    """``--method full`` trains every weight of each family and the run loads back (the README's
    family table, "full")."""
    import torch
    from safetensors.torch import load_file

    from tunefix import tiny
    from tunefix.train.config import RunConfig
    from tunefix.train.run import load_run
    from tunefix.train.trainer import train

    alpaca = Path(__file__).resolve().parents[1] / "examples" / "alpaca_sample.json"
    cfg = RunConfig(model=str(tiny.tiny_model(name)), data=str(alpaca), template=FAMILIES[name].tiny.template,
                    output_dir=str(tmp_path / "run"), finetune="full", max_steps=1, batch_size=2,
                    gradient_accumulation=1, warmup_steps=0, learning_rate=1e-3, max_seq_length=64,
                    precision="fp32", report_to="none")
    run = train(cfg).run_dir
    trained = load_file(str(run / "model" / "model.safetensors"))
    base = load_file(str(tiny.tiny_model(name) / "model.safetensors"))
    changed = [k for k in base if k in trained and not torch.equal(base[k].float(), trained[k].float())]
    assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed), changed[:6]
    model, _, _, loaded = load_run(run)
    assert loaded.finetune == "full" and not hasattr(model, "peft_config")


def test_a_changed_record_rebuilds_its_tiny_model():
    """The cached tiny model is keyed by what its record says (a stale SmolLM3 with the old
    NoPE interval once survived a record change)."""
    import dataclasses

    from tunefix import tiny

    spec = FAMILIES["smollm3"].tiny
    changed = dataclasses.replace(spec, config={**spec.config, "no_rope_layer_interval": 2})
    assert tiny._spec_digest(changed) != tiny._spec_digest(spec)
    assert tiny._spec_digest(dataclasses.replace(spec, template="chatml")) == tiny._spec_digest(spec)
    assert tiny.tiny_model("smollm3").name.endswith("-l4-s0")  # its record's 4 layers: one NoPE layer
