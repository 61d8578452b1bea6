"""Issue 3: the doctor, on the real SmolLM2 and on tiny models with real tokenizers."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from tunefix import assets, tiny
from tunefix.cli import main
from tunefix.doctor import examine
from tunefix.doctor.fixes import trained_mean

# Llama 3 Instruct's template in its 3.0 form (the official one writes BOS itself).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _dir_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _doctor_json(capsys, *args) -> tuple[int, dict]:
    code = main(["doctor", *map(str, args), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _greedy(path, max_new_tokens=12) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:])


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_pad_is_eos_found_and_fixed(tmp_path, capsys):
    from transformers import AutoTokenizer

    src = assets.smollm2()
    before = _dir_digest(src)
    code, report = _doctor_json(capsys, src)
    assert code == 1
    pad = next(f for f in report["findings"] if f["code"] == "pad-is-eos")
    assert pad["severity"] == "error" and pad["evidence"]["pad"] == "<|im_end|>"

    out = tmp_path / "fixed"
    code, _ = _doctor_json(capsys, src, "--fix", out)
    assert _dir_digest(src) == before, "the input directory must be byte-identical after --fix"

    tok = AutoTokenizer.from_pretrained(out)
    rendered = tok.apply_chat_template(CHAT + [{"role": "assistant", "content": "Paris."}], tokenize=False)
    rendered_ids = set(tok(rendered, add_special_tokens=False)["input_ids"])
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token_id not in rendered_ids

    code, again = _doctor_json(capsys, out)
    assert code == 0
    assert not [f for f in again["findings"] if f["severity"] == "error"]
    assert _greedy(out) == _greedy(src)


# ----------------------------------------------------------------------- tiny Llama 3


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory):
    """Tiny Llama with the real Llama 3 tokenizer and Llama 3 base's untrained rows:
    every special token but <|begin_of_text|> and <|end_of_text|> is zero in embed_tokens
    and lm_head (the reserved tokens, <|eot_id|>, <|start_header_id|>, <|end_header_id|>)."""
    from transformers import AutoModelForCausalLM

    path = _copy(tiny.tiny_model("llama"), tmp_path_factory.mktemp("llama3") / "base")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    zero = list(range(128002, 128256))
    with torch.no_grad():
        model.get_input_embeddings().weight[zero] = 0
        model.get_output_embeddings().weight[zero] = 0
    model.save_pretrained(path)
    return path, zero


def test_untrained_tokens_exact_count_and_names(llama3_base):
    path, zero = llama3_base
    report = examine(path)
    f = report.get("untrained-tokens")
    assert f is not None and f.evidence["count"] == len(zero) == 254
    for name in ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"):
        assert name in f.evidence["special_tokens"]
    assert report.get("template-untrained-token") is None  # no template yet
    missing = report.get("missing-chat-template")
    assert missing is not None and "llama-3" not in missing.evidence["suggested"]


def test_instruct_template_on_base_is_an_error(llama3_base, tmp_path):
    path, _ = llama3_base
    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3_TEMPLATE)
    report = examine(path, template=str(template))
    f = report.get("template-untrained-token")
    assert f is not None and f.severity == "error"
    assert {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"} <= set(f.evidence["tokens"])


def test_untrained_fix_is_the_masked_mean(llama3_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefix.doctor import apply_fixes

    path, zero = llama3_base
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    emb = model.get_input_embeddings().weight.detach().clone()
    report = examine(model, tok)
    lines = apply_fixes(model, tok, report)
    assert any("254 rows of embed_tokens" in line and "254 rows of lm_head" in line for line in lines)

    trained = torch.ones(emb.shape[0], dtype=torch.bool)
    trained[zero] = False
    masked_mean = emb[trained].mean(dim=0)
    plain_mean = emb.mean(dim=0)  # the classic mistake: the untrained rows drag it down
    fixed = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(fixed[zero], masked_mean.expand(len(zero), -1))
    torch.testing.assert_close(trained_mean(emb, zero), masked_mean)
    assert not torch.allclose(fixed[zero[0]], plain_mean)
    assert examine(model, tok).get("untrained-tokens") is None


def test_double_bos_found_and_fixed_on_every_path(tmp_path, capsys):
    from transformers import AutoTokenizer

    path = _copy(tiny.tiny_model("llama"), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(path)
    report = examine(path)
    f = report.get("double-bos")
    assert f is not None and f.evidence["leading_bos_via_tokenizer"] == 2

    out = tmp_path / "fixed"
    main(["doctor", str(path), "--fix", str(out)])
    capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(out)
    bos = tok.bos_token_id
    conv = CHAT + [{"role": "assistant", "content": "Paris."}]
    rendered = tok.apply_chat_template(conv, tokenize=False)
    paths = {
        "training (rendered, no special tokens)": tok(rendered, add_special_tokens=False)["input_ids"],
        "tokenizer(rendered)": tok(rendered)["input_ids"],
        "generation prompt": tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"],
    }
    for name, ids in paths.items():
        assert ids.count(bos) == 1 and ids[0] == bos, name
    assert examine(out).get("double-bos") is None


def test_eos_not_end_of_turn(tmp_path):
    path = _copy(tiny.tiny_model("llama"), tmp_path / "m")
    template = tmp_path / "t.jinja"
    template.write_text(LLAMA3_TEMPLATE)
    report = examine(path, template=str(template))  # stop ids: <|end_of_text|> only
    f = report.get("eos-not-end-of-turn")
    assert f is not None and f.severity == "error" and f.evidence["end_of_turn"] == "<|eot_id|>"
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [128001, 128009]
    (path / "generation_config.json").write_text(json.dumps(gen))
    assert examine(path, template=str(template)).get("eos-not-end-of-turn") is None


# ---------------------------------------------------------------------------- configs


def _with_config(tmp_path, family, **changes) -> Path:
    path = _copy(tiny.tiny_model(family), tmp_path / family)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_gemma_exact_gelu(tmp_path, capsys):
    path = _with_config(tmp_path, "gemma", hidden_act="gelu", hidden_activation="gelu")
    f = examine(path).get("gemma-exact-gelu")
    assert f is not None and f.severity == "error"
    out = tmp_path / "fixed"
    main(["doctor", str(path), "--fix", str(out)])
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    assert examine(out).get("gemma-exact-gelu") is None
    assert examine(tiny.tiny_model("gemma2")).get("gemma-exact-gelu") is None


def test_phi3_sliding_window_and_fused_projections(tmp_path):
    path = _with_config(tmp_path, "phi3", sliding_window=2047)
    report = examine(path)
    assert report.get("sliding-window-off-by-one").severity == "error"
    fused = report.get("fused-projections")
    assert fused.severity == "info" and fused.evidence["fused"] == ["gate_up_proj", "qkv_proj"]
    assert examine(tiny.tiny_model("phi3")).get("sliding-window-off-by-one") is None


def test_smollm3_nope_layers_llama_cpp_would_place_elsewhere(tmp_path):
    """llama.cpp's SmolLM3 skips RoPE on every 4th layer whatever the config says."""
    assert examine(tiny.tiny_model("smollm3")).get("nope-layers-differ-in-gguf") is None
    f = examine(_with_config(tmp_path, "smollm3", no_rope_layers=[1, 0, 1, 0])).get("nope-layers-differ-in-gguf")
    assert f is not None and f.severity == "warning" and f.evidence["llama_cpp"] == [1, 1, 1, 0], f


# ---------------------------------------------------------------- no false positives


@pytest.mark.parametrize("family,template", [("mistral", MISTRAL_TEMPLATE), ("qwen2", None), ("phi3", None)])
def test_clean_setups_have_no_error(family, template, tmp_path):
    tpl = None
    if template:
        tpl = tmp_path / "t.jinja"
        tpl.write_text(template)
    report = examine(tiny.tiny_model(family), template=str(tpl) if tpl else None)
    assert report.errors == [], [(f.code, f.message) for f in report.errors]
    assert report.get("untrained-tokens") is None


def test_findings_quoting_brackets_print_as_text(capsys):
    """A Mistral template's "[/INST]" in a finding's evidence is text, not rich markup
    (it once crashed `tunefix doctor MODEL --template mistral` with a MarkupError). Mistral v3's
    reasoning-in-history evidence quotes it."""
    code = main(["doctor", str(tiny.tiny_model("mistral")), "--template", "mistral-v3"])
    out = capsys.readouterr().out
    assert code in (0, 1) and "[/INST]" in out and "summary:" in out


# ------------------------------------------------------------------------ bad inputs


def _bad_input_cases(tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    truncated = _copy(tiny.tiny_model("qwen2"), tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_text("this is not a gguf file\n")
    return {
        "missing path": tmp_path / "does-not-exist",
        "directory without weights": no_weights,
        "truncated safetensors": truncated,
        "text file named .gguf": fake_gguf,
    }


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    for label, path in _bad_input_cases(tmp_path).items():
        code = main(["doctor", str(path)])
        err = capsys.readouterr().err.strip()
        assert code == 2, label
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tunefix: error:"), (label, err)
        assert "Traceback" not in err


# ------------------------------------------------------------- GGUF files and hub ids


@pytest.mark.slow
def test_gguf_smollm2_pad_is_eos_found():
    report = examine(str(assets.smollm2_gguf()))
    assert report.get("pad-is-eos") is not None and report.get("pad-is-eos").severity == "error"
    assert report.get("nonfinite-weights") is None


@pytest.mark.slow
def test_gguf_add_bos_with_a_bos_template_is_an_error(tmp_path):
    from transformers import AutoTokenizer

    from tunefix.export.gguf import convert
    from tunefix.export.gguf_meta import patch_metadata

    path = _copy(tiny.tiny_model("llama"), tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(path)
    gguf = convert(path, tmp_path / "m.gguf", "f16")
    patch_metadata(gguf, {"tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": LLAMA3_TEMPLATE})
    f = examine(str(gguf)).get("double-bos")
    assert f is not None and f.severity == "error" and f.evidence["gguf_add_bos_token"] is True
    patch_metadata(gguf, {"tokenizer.ggml.add_bos_token": False})
    assert examine(str(gguf)).get("double-bos") is None


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    snapshot = tmp_path / "hub" / "models--acme--tiny-qwen" / "snapshots" / "0123abcd"
    shutil.copytree(tiny.tiny_model("qwen2"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    report = examine("acme/tiny-qwen")
    assert report.model == str(snapshot) and report.errors == []
    code = main(["doctor", "acme/not-cached"])
    assert code == 2
