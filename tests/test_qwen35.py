"""Qwen3.5, what its family record alone does not show: its tokenizer against llama.cpp's own
reference ids, LoRA on the Gated DeltaNet (linear attention) layers, and the converter's MTP
switch. Loading, the doctor, training, fast paths, the token policy and the GGUF export are the
parametrised family tests' (tests/test_families.py, test_fast_paths.py, test_policy.py,
test_export_gguf.py, test_export_families.py)."""

from __future__ import annotations

import tarfile
import unicodedata

import pytest

from tunefix import assets, tiny


def _llama_cpp_reference(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test cases for a vocab file (``.inp`` texts, ``.out`` ids), read
    from the pinned sdist next to the vocab GGUF."""
    member = assets._SDIST_ROOT + f"models/ggml-vocab-{name}.gguf"
    with tarfile.open(assets.download(assets.LLAMA_CPP_SDIST)) as t:
        def read(suffix: str) -> str:
            f = t.extractfile(member + suffix)
            assert f is not None
            return f.read().decode("utf-8")

        texts = read(".inp").split("\n__ggml_vocab_test__\n")
        ids = read(".out").split("\n")
    assert texts[-1] == "" and ids[-1] == ""  # both end with their separator
    pairs = [(text, [int(i) for i in line.split()]) for text, line in zip(texts[:-1], ids[:-1], strict=True)]
    assert len(pairs) > 40
    return pairs


def test_tokenizer_gives_llama_cpps_reference_ids():
    """Every reference text in NFC gets llama.cpp's ids. The others (decomposed accents: "e" +
    U+0301) differ, as they do with the real checkpoint: Qwen's tokenizers NFC-normalise
    (transformers' Qwen3_5Tokenizer, like Qwen2's), llama.cpp does not normalise."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.tokenizer("qwen35"))
    assert type(tok).__name__ == "Qwen3_5Tokenizer" and tok.bos_token is None
    differ = []
    for text, ids in _llama_cpp_reference("qwen35"):
        got = tok(text, add_special_tokens=False)["input_ids"]
        if unicodedata.is_normalized("NFC", text):
            assert got == ids, ascii(text)
        elif got != ids:
            differ.append(text)
    assert len(differ) == 3, [ascii(t) for t in differ]  # e+U+0301, résumé, (a+U+0300)*N
    assert tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # no BOS


def test_tokenizer_is_qwen2s_vocabulary_with_qwen35s_split():
    """llama.cpp's qwen35 vocab file holds the Qwen2 vocabulary and merges (not the real 248k
    one); only the pre-tokenizer differs: combining marks stay with their letter. Thai shows it
    (its vowel and tone marks are category M); the asset follows llama.cpp there."""
    from transformers import AutoTokenizer

    from tunefix.assets_build import read_gguf_vocab
    from tunefix.llamacpp import LlamaProcess

    q2, q35 = (read_gguf_vocab(assets.vocab_gguf(n)) for n in ("qwen2", "qwen35"))
    assert q2["tokens"] == q35["tokens"] and q2["token_type"] == q35["token_type"]
    thai = "ภาษาไทยง่ายนิดเดียว"
    tok2, tok35 = (AutoTokenizer.from_pretrained(assets.tokenizer(n)) for n in ("qwen2", "qwen35"))
    with LlamaProcess(assets.vocab_gguf("qwen35"), vocab_only=True) as llm:
        [theirs] = llm.call("tokenize", [(thai, False)])
    assert tok35(thai)["input_ids"] == theirs != tok2(thai)["input_ids"]


def test_tiny_model_has_both_layer_types():
    import json

    cfg = json.loads((tiny.tiny_model("qwen3_5") / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_text" and cfg["architectures"] == ["Qwen3_5ForCausalLM"]
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    # V heads grouped by K head: the converter reorders them (num_v != num_k exercises it).
    assert cfg["linear_num_value_heads"] > cfg["linear_num_key_heads"]


def test_lora_adapts_every_linear_layer_and_not_the_conv():
    """tunefix's default targets adapt every Linear but lm_head, in the DeltaNet layers too
    (in_proj_qkv/z/a/b, out_proj): the same set as PEFT's "all-linear" on this model. The
    DeltaNet's depthwise conv1d is an nn.Conv1d and stays frozen."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from tunefix.model.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny.tiny_model("qwen3_5"), dtype=torch.float32)
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    peft = add_lora(model, r=4)
    adapted = {n.removeprefix("base_model.model.").split(".lora_A.")[0].replace(".base_layer", "")
               for n, _ in peft.named_parameters() if ".lora_A." in n}
    assert adapted == linear
    assert {n.rsplit(".", 1)[-1] for n in adapted if ".linear_attn." in n} == {
        "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj"}
    conv = [p for n, p in peft.named_parameters() if "conv1d" in n]
    assert conv and not any(p.requires_grad for p in conv)


@pytest.mark.parametrize(("model_type", "names", "flags"), [
    ("qwen3_5_text", ["model.layers.0.linear_attn.in_proj_qkv.weight"], ["--no-mtp"]),
    ("qwen3_5", ["model.language_model.embed_tokens.weight"], ["--no-mtp"]),
    ("qwen3_5_text", ["model.embed_tokens.weight", "mtp.fc.weight"], []),  # an MTP head to export
    ("qwen3", ["model.embed_tokens.weight"], []),  # its converter refuses the flag
])
def test_the_converter_is_told_when_there_is_no_mtp_head(model_type, names, flags):
    """transformers drops Qwen3.5's multi-token-prediction weights on load, so merged models
    have none; llama.cpp's converter then stops unless given --no-mtp (measured)."""
    from tunefix.export.gguf_arch import converter_flags

    assert converter_flags({"model_type": model_type}, names) == flags


def test_packed_rows_leak_through_linear_attention_so_training_does_not_pack():
    """The block-diagonal mask keeps packed rows apart in attention layers but not in Gated
    DeltaNet's recurrent state: the second packed row's logits differ from the row alone (as
    they do not for Qwen3). So a Qwen3.5 run with ``packing: true`` trains unpacked, and says so."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunefix.progress import Recorder
    from tunefix.train.config import RunConfig
    from tunefix.train.rows import Collator
    from tunefix.train.trainer import _packing_for

    def leak(family: str) -> float:
        model = AutoModelForCausalLM.from_pretrained(str(tiny.tiny_model(family)), dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randint(10, 1000, (n,), generator=g).tolist() for n in (12, 9))
        packed = Collator(pad_id=0)([{"input_ids": a + b, "labels": a + b, "position_ids": list(range(12)) +
                                      list(range(9)), "seq_lens": [12, 9]}])
        with torch.no_grad():
            together = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, 12:]
            alone = model(input_ids=torch.tensor([b])).logits[0]
        return float((together - alone).abs().max())

    assert leak("qwen3") < 1e-4 < 0.01 < leak("qwen3_5")
    model = AutoModelForCausalLM.from_pretrained(str(tiny.tiny_model("qwen3_5")), dtype=torch.float32)
    recorder = Recorder()
    cfg = RunConfig(model="m", data="d", packing=True)
    assert _packing_for(cfg, model, recorder).packing is False and "packing is off" in recorder.notes[0]
    llama = AutoModelForCausalLM.from_pretrained(str(tiny.tiny_model("llama")), dtype=torch.float32)
    assert _packing_for(cfg, llama, Recorder()) is cfg
