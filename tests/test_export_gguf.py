"""GGUF export (convert once, quantise many) and its verification against PyTorch.

Real assets: SmolLM2-135M-Instruct and tiny random models with real tokenizers. On the
random tiny models, top-1 is compared only where PyTorch's best two logits are at least
MARGIN apart: their logits are small and near-ties are common, and any rounding flips a
tie. The measured max abs difference (about 0.001 at f16) is far below MARGIN.
"""

from __future__ import annotations

import pytest

from _logs import log_lines
from tunefix.errors import TunefixError
from tunefix.export import gguf, gguf_arch, gguf_meta, verify
from tunefix.progress import Recorder

MARGIN = 0.01
# gemma2 and gemma3 export because their query_pre_attn_scalar equals head_dim (see
# test_gemma_attention_scale_mismatch_is_refused for the configs that do not).
TINY = ("llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "gemma3", "qwen3", "qwen3_moe", "smollm3",
        "gemma4", "qwen3_5", "ministral3", "gpt_oss")
# Gemma 4 scales attention by 1 after RMS-normed q and k (Gemma 3: 1/8 at head_dim 64): on the
# random tiny model its attention logits are 8x sharper, and llama.cpp's f16 KV cache moves the
# output logits by up to 0.017 (measured; 0.003 with an f32 cache, top-1 agreement 100% both).
MAX_ABS = {"gemma4": 0.03}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Measured on the shared 2-core machine: one thread is several times faster.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from tunefix import assets

    hf = assets.smollm2()
    out = tmp_path_factory.mktemp("smol")
    steps = Recorder()
    with log_lines("tunefix.export.gguf") as lines:
        files = gguf.export_gguf(hf, out, ["f16", "q8_0", "q4_k_m"], progress=steps)
    events = steps.steps
    tok = verify.load_tokenizer(hf)
    return {"hf": hf, "out": out, "files": files, "events": events, "log": lines,
            "tok": tok, "model": verify.load_reference(hf)}


@pytest.mark.slow
def test_smollm2_three_types_from_one_conversion(smol):
    conversions = [ln for ln in smol["log"] if ln.startswith("converting HF -> GGUF")]
    assert conversions == ["converting HF -> GGUF (f16)"]
    assert [e for e in smol["events"] if e[0] == "convert"] == [("convert", "f16")]
    assert [e for e in smol["events"] if e[0] == "quantize"] == [("quantize", "q8_0"), ("quantize", "q4_k_m")]
    assert [f.name for f in smol["files"]] == [f"smollm2-135m-instruct-{t}.gguf" for t in ("f16", "q8_0", "q4_k_m")]
    # llama.cpp's file types: 1 = F16, 7 = Q8_0, 15 = Q4_K_M.
    assert [gguf_meta.read_metadata(f).file_type for f in smol["files"]] == [1, 7, 15]
    assert not [p for p in smol["out"].iterdir() if p.name.startswith(".")], "temporary files left"


@pytest.mark.slow
def test_smollm2_metadata_matches_tokenizer(smol):
    for f in smol["files"]:
        assert gguf_meta.metadata_mismatches(f, smol["hf"], smol["tok"]) == {}
    meta = gguf_meta.read_metadata(smol["files"][0])
    assert meta.chat_template == smol["tok"].chat_template
    # SmolLM2's end of turn (<|im_end|>) is its EOS: the file names it once, as the converter
    # wrote it, with no metadata patch (a patch copies the whole file).
    assert (meta.add_bos, meta.eos_id, meta.eot_id, meta.pad_id) == (False, 2, None, 2)
    assert not [e for e in smol["events"] if e[0] == "patch"]
    from tunefix.templates import policy, template_for

    assert gguf_meta.stop_set(meta) == set(policy.stop_ids(smol["tok"], template_for(smol["tok"]))) == {2}


@pytest.mark.slow
def test_smollm2_f16_logits_match_pytorch(smol):
    result = verify.logits_parity(smol["files"][0], smol["hf"], model=smol["model"], tok=smol["tok"])
    assert result.compared == result.positions  # no margin: every position counts
    assert result.top1_agreement == 1.0, result.first_disagreement
    assert result.max_abs_diff < 0.25
    result.raise_if_failed()


@pytest.mark.slow
def test_smollm2_quantised_files_load_and_are_reported(smol):
    prompts = verify.prompt_ids(smol["tok"])[:2]
    for f in smol["files"][1:]:
        result = verify.logits_parity(f, smol["hf"], model=smol["model"], tok=smol["tok"],
                                      prompts=prompts, max_abs=None)
        assert result.ok and result.positions > 0
        assert result.top1_agreement > 0.8, (f.name, result)


@pytest.mark.slow
def test_smollm2_token_parity_one_bos(smol):
    result = verify.token_parity(smol["files"][0], smol["hf"], tok=smol["tok"])
    assert result.failures == [] and not result.double_bos
    result.raise_if_failed()


@pytest.mark.slow
def test_smollm2_stops_like_pytorch(smol):
    result = verify.stop_parity(smol["files"][0], smol["hf"], model=smol["model"], tok=smol["tok"])
    assert all(r.torch_stopped and r.llama_stopped for r in result.runs), result
    result.raise_if_failed()


# ------------------------------------------------------------------------ tiny models


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            from tunefix.tiny import tiny_model

            hf = tiny_model(family)
            [f16] = gguf.export_gguf(hf, tmp_path_factory.mktemp(family), ["f16"])
            cache[family] = {"hf": hf, "file": f16, "tok": verify.load_tokenizer(hf)}
        return cache[family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_tiny_logits_parity(tiny_exports, family):
    e = tiny_exports(family)
    result = verify.logits_parity(e["file"], e["hf"], tok=e["tok"], min_margin=MARGIN)
    assert result.compared >= result.positions // 4
    assert result.max_abs_diff < MAX_ABS.get(family, 0.01), result
    result.raise_if_failed()


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY)
def test_tiny_token_parity(tiny_exports, family):
    # Mistral and Gemma (the llama-spm tokenizer) included: leading spaces and text right
    # after special tokens are among the parity texts.
    e = tiny_exports(family)
    result = verify.token_parity(e["file"], e["hf"], tok=e["tok"])
    assert not result.double_bos
    result.raise_if_failed()


@pytest.mark.slow
def test_tiny_metadata_fixes(tiny_exports):
    gemma = gguf_meta.read_metadata(tiny_exports("gemma")["file"])
    assert gemma.eot_id is None  # the converter's hard-coded 107 is byte 'h' here
    assert gemma.add_space_prefix is True
    phi3 = gguf_meta.read_metadata(tiny_exports("phi3")["file"])
    assert "phi3" not in phi3.name.lower() and "phi-3" not in phi3.name.lower()
    assert phi3.eot_id == tiny_exports("phi3")["tok"].convert_tokens_to_ids("<|end|>")
    qwen2 = gguf_meta.read_metadata(tiny_exports("qwen2")["file"])
    assert qwen2.add_bos is False and qwen2.eot_id == 151645
    from tunefix.templates import policy

    for family in ("llama", "qwen2", "phi3", "gemma"):
        e = tiny_exports(family)
        assert gguf_meta.metadata_mismatches(e["file"], e["hf"], e["tok"]) == {}
        # The file's stop set is the token policy's (what training scores last, chat stops on).
        template = gguf_meta.template_of(e["tok"])
        assert gguf_meta.stop_set(gguf_meta.read_metadata(e["file"])) == set(policy.stop_ids(e["tok"], template))


@pytest.mark.slow
def test_double_bos_detector_sees_llama_cpp_warning(tiny_exports):
    # The only test that makes llama.cpp warn, on purpose: it proves the detector works.
    e = tiny_exports("llama")
    with verify.open_llama(e["file"], vocab_only=True) as llm:
        ids = llm.tokenize("<|begin_of_text|>hi", add_bos=True)
        logs = llm.call("logs")
    assert ids[:2] == [128000, 128000]
    assert any(verify.DOUBLE_BOS_WARNING in line for line in logs)


# ---------------------------------------------------------------------- fast checks


def test_unknown_type_is_a_one_line_error(tmp_path):
    with pytest.raises(TunefixError, match="unknown GGUF type 'q9_x'"):
        gguf.export_gguf(tmp_path, tmp_path / "out", ["f16", "q9_x"])
    assert not (tmp_path / "out").exists()


def test_missing_model_dir_is_an_error(tmp_path):
    with pytest.raises(TunefixError, match="no config.json"):
        gguf.export_gguf(tmp_path / "nothing", tmp_path / "out", ["f16"])


def test_failed_conversion_leaves_no_file(tmp_path, monkeypatch):
    import subprocess

    from tunefix.tiny import tiny_model

    def fail(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "Traceback ...\nKeyError: 'boom'")

    monkeypatch.setattr(gguf.subprocess, "run", fail)
    out = tmp_path / "out"
    with pytest.raises(TunefixError, match="KeyError: 'boom'"):
        gguf.export_gguf(tiny_model("llama"), out, ["f16", "q4_k_m"])
    assert list(out.iterdir()) == []


def test_stale_gguf_quantization_config_is_staged_away(tmp_path):
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "gguf"}, "a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with gguf._converter_input(tmp_path) as staged:
        assert staged != tmp_path
        assert "quantization_config" not in (staged / "config.json").read_text()
        assert (staged / "model.safetensors").read_bytes() == b"x"
    assert "quantization_config" in (tmp_path / "config.json").read_text()  # input untouched


def test_gemma_attention_scale_mismatch_is_refused():
    cfg = {"model_type": "gemma3_text", "hidden_size": 256, "num_attention_heads": 4,
           "head_dim": 64, "query_pre_attn_scalar": 256, "num_hidden_layers": 2}
    with pytest.raises(TunefixError, match="query_pre_attn_scalar"):
        gguf_arch.check_config(cfg)
    gguf_arch.check_config(cfg | {"query_pre_attn_scalar": 64})
    gguf_arch.check_config({"model_type": "llama"})


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_tiny_gemma_attention_scale_is_exportable(family):
    # The tiny models scale attention as real Gemma 2/3 checkpoints do, so they export.
    import json

    from tunefix.tiny import tiny_model

    cfg = json.loads((tiny_model(family) / "config.json").read_text())
    assert cfg["query_pre_attn_scalar"] == cfg["head_dim"] == 64
    gguf_arch.check_config(cfg)


def test_base_type_is_best_requested_or_checkpoint_dtype(tmp_path):
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    assert gguf.base_type(tmp_path, ["q4_k_m", "f16"]) == "f16"
    assert gguf.base_type(tmp_path, ["f16", "f32"]) == "f32"
    assert gguf.base_type(tmp_path, ["q4_k_m", "q6_k"]) == "bf16"


def _transformers_reads(family: str) -> bool:
    """transformers 5.24's GGUF loader knows the architecture. Not Qwen3.5's ("qwen35": no
    config mapping, no tensor processor for the DeltaNet's conv1d/A_log/reordered V heads),
    nor Ministral 3's ("mistral3": no config mapping), so their GGUFs are checked in llama.cpp
    only; nor gpt-oss's, which it maps but misreads (tunefix refuses it: test below)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from tunefix.families import FAMILIES
    from tunefix.model.files import GGUF_MISREAD

    record = FAMILIES[family]
    # Gemma 4's read-back (55 s: transformers parses its 262k vocabulary twice) is
    # tests/test_gemma4.py's round trip, with trained layer scales.
    return (record.model_types[0] in GGUF_CONFIG_MAPPING and record.gguf_arch not in GGUF_MISREAD
            and family != "gemma4")


@pytest.mark.slow
def test_a_gguf_transformers_misreads_is_refused_in_one_line(tiny_exports):
    from tunefix.errors import TunefixError
    from tunefix.model.load import load_model

    with pytest.raises(TunefixError, match="misreads its YaRN RoPE keys"):
        load_model(str(tiny_exports("gpt_oss")["file"]), report=None)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in TINY if _transformers_reads(f)])
def test_tiny_gguf_loads_back_as_the_same_model(tiny_exports, family):
    """A family's GGUF is a model tunefix can train on (README family table, "load"): read back
    through transformers, it computes the HF model's logits (f16 rounding aside)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunefix.model.files import read_gguf_model

    e = tiny_exports(family)
    model, tok = read_gguf_model(e["file"], torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(e["hf"]), dtype=torch.float32).eval()
    ids = e["tok"]("Hello there, how are you today?", return_tensors="pt")["input_ids"]
    # The tiny Gemmas carry the Llama 2 vocabulary (tunefix.tiny); transformers reads a gemma
    # GGUF's tokenizer as Gemma's own, without the dummy prefix that vocabulary adds, whatever
    # the file's add_space_prefix says. Real Gemma vocabularies add none: the model is compared.
    if not family.startswith("gemma"):
        assert tok("Hello there, how are you today?", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        got, want = model.eval()(ids).logits, ref(ids).logits
    assert (got - want).abs().max().item() < 0.01, family
