"""The family table (``tunefix.families``) is the one source: each record is consistent with
transformers and llama.cpp, and the modules that used to keep their own lists read it."""

from __future__ import annotations

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
