"""Issue 9: untrusted inputs (remote code, pickles, templates, names) and full disks."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from tunefix import _io, tiny
from tunefix.errors import TunefixError

# ------------------------------------------------------------------ chat template sandbox

HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{% set x = messages.append({'role': 'user', 'content': 'x'}) %}",
    "{{ messages[0].update({'content': 'changed'}) }}",
    "{{ 'x' * 1000000000 }}",
    "{{ 7 ** 100000000 }}",
    "{% for i in range(1000000000) %}{% endfor %}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_templates_cannot_reach_python_internals(source, tmp_path, monkeypatch):
    from tunefix.templates.render import render_jinja

    monkeypatch.chdir(tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TunefixError) as err:
        render_jinja(source, messages, bos_token="<s>", eos_token="</s>")
    assert "sandbox" in err.value.message or "failed while rendering" in err.value.message
    assert messages == [{"role": "user", "content": "hi"}]
    assert not (tmp_path / "PWNED").exists()


def test_sandbox_refusal_reaches_every_template_source(tmp_path):
    """Registry names are safe by construction; files, examples and a model's own template
    all render through the same sandbox."""
    from tunefix.templates import ChatTemplate, get_template

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content.__class__ }}{% endfor %}")
    with pytest.raises(TunefixError, match="sandbox"):
        get_template(str(f)).render([{"role": "user", "content": "hi"}])
    own = ChatTemplate("model's own", "{{ cycler.__init__ }}{{ messages }}", None, "", ())
    with pytest.raises(TunefixError, match="sandbox"):
        own.render([{"role": "user", "content": "hi"}])


def test_ordinary_templates_still_render():
    from tunefix.templates import REGISTRY

    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    for t in REGISTRY.values():
        assert "u" in t.render(msgs, eos_token="</s>")


# ------------------------------------------------------------------ remote code and pickles


def _model_dir(tmp_path: Path, **config_update) -> Path:
    src = tiny.tiny_model("llama")
    out = tmp_path / "model"
    out.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_update)
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, out / name)
    return out


def test_remote_code_needs_the_flag(tmp_path):
    from tunefix.model.files import check_model_code
    from tunefix.model.load import load_model

    d = _model_dir(tmp_path, model_type="mystery", auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    (d / "modeling_x.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w').write('ran')\n")
    with pytest.raises(TunefixError) as err:
        load_model(str(d), report=None)
    assert "--trust-remote-code" in err.value.one_line()
    assert not (tmp_path / "PWNED").exists()
    check_model_code(d, trust_remote_code=True)  # the opt-in lets it through


def test_a_stale_auto_map_on_a_known_family_is_not_remote_code(tmp_path):
    from tunefix.model.files import check_model_code

    d = _model_dir(tmp_path, auto_map={"AutoConfig": "configuration_llama.LlamaConfig"})
    check_model_code(d, trust_remote_code=False)  # model_type llama: transformers' own class


def test_remote_tokenizer_code_needs_the_flag(tmp_path):
    from tunefix.model.files import check_model_code

    d = _model_dir(tmp_path)
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg.update(tokenizer_class="MysteryTokenizer", auto_map={"AutoTokenizer": ["tok.MysteryTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(TunefixError) as err:
        check_model_code(d, trust_remote_code=False)
    assert "--trust-remote-code" in err.value.one_line()


def _pickled_model(tmp_path: Path) -> Path:
    """Tiny Llama with its weights as pytorch_model.bin instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    d = _model_dir(tmp_path)
    weights = load_file(str(tiny.tiny_model("llama") / "model.safetensors"))
    torch.save(weights, str(d / "pytorch_model.bin"))
    return d


def test_pickle_weights_refused_then_loaded_weights_only(tmp_path, monkeypatch):
    import torch

    from tunefix.model.load import load_model

    d = _pickled_model(tmp_path)
    with pytest.raises(TunefixError) as err:
        load_model(str(d), report=None)
    assert "--allow-pickle" in err.value.one_line()

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model, _ = load_model(str(d), allow_pickle=True, report=None, fix=False)
    assert calls and all(w is True for w in calls), calls
    ref = real_load(str(d / "pytorch_model.bin"), weights_only=True)
    assert torch.equal(model.get_input_embeddings().weight.to(ref["model.embed_tokens.weight"].dtype),
                       ref["model.embed_tokens.weight"])


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_even_when_opted_in(tmp_path):
    import torch

    from tunefix.model.files import load_pickle_weights

    d = _model_dir(tmp_path)
    buf = io.BytesIO()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "evil": _Evil(str(tmp_path / "PWNED"))}, buf)
    (d / "pytorch_model.bin").write_bytes(buf.getvalue())
    with pytest.raises(TunefixError, match="refused or unreadable pickle"):
        load_pickle_weights(d)
    assert not (tmp_path / "PWNED").exists()


def test_doctor_reads_opted_in_pickles(tmp_path):
    from tunefix.doctor import examine

    d = _pickled_model(tmp_path)
    with pytest.raises(TunefixError) as err:
        examine(str(d))
    assert "--allow-pickle" in err.value.one_line()
    report = examine(str(d), allow_pickle=True)
    assert report.get("pad-missing") is not None  # the checks ran on the pickled weights


# ------------------------------------------------------------------ names from models


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", ".", "", "a/../../b",
                                  "..\\..\\windows", "org/Model-7B", "-rf", ".hidden", "x" * 500,
                                  "name\x00with-nul", "Ünïcödé model ☃", "~/evil", "$HOME"])
def test_names_from_models_stay_in_the_output_directory(name, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    safe = _io.safe_name(name)
    assert safe and "/" not in safe and "\\" not in safe and safe not in (".", "..")
    assert not safe.startswith((".", "-")) and len(safe) <= 120
    assert (out / safe).resolve().parent == out.resolve()
    assert _io.inside(out, name).parent == out.resolve()


def test_safe_name_keeps_ordinary_names():
    assert _io.safe_name("org/Model-7B") == "org-Model-7B"
    assert _io.safe_name("smollm2-135m.Q4_K_M.gguf") == "smollm2-135m.Q4_K_M.gguf"


# ------------------------------------------------------------------ full disk (ENOSPC)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "mkstemp"])
def test_enospc_in_atomic_path_is_one_line_and_leaves_nothing(where, tmp_path, monkeypatch):
    final = tmp_path / "out" / "model.gguf"
    final.parent.mkdir()
    if where == "fsync":
        monkeypatch.setattr(_io.os, "fsync", _no_space)
    elif where == "replace":
        monkeypatch.setattr(_io.os, "replace", _no_space)
    elif where == "mkstemp":
        monkeypatch.setattr(_io.tempfile, "mkstemp", _no_space)
    with pytest.raises(TunefixError) as err:
        with _io.atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            if where == "write":
                _no_space()
    line = err.value.one_line()
    assert line.startswith(f"no space left on device while writing {final}") and "\n" not in line
    assert _listing(tmp_path / "out") == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_enospc_in_atomic_dir_leaves_nothing(where, tmp_path, monkeypatch):
    final = tmp_path / "runs" / "adapter"
    if where == "fsync":
        monkeypatch.setattr(_io.os, "fsync", _no_space)
    elif where == "replace":
        monkeypatch.setattr(_io.os, "replace", _no_space)
    with pytest.raises(TunefixError, match="no space left on device"):
        with _io.atomic_dir(final) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"x" * 100)
            if where == "write":
                try:  # libraries wrap the OSError: the chain is searched
                    _no_space()
                except OSError as e:
                    raise RuntimeError("safetensors: write failed") from e
    assert _listing(tmp_path / "runs") == []


def test_enospc_during_a_real_save_through_the_cli(tmp_path, monkeypatch, capsys):
    """`tunefix doctor --fix` with the disk full at fsync: one line, exit 2, no output dir."""
    from tunefix.cli import main

    monkeypatch.setattr(_io.os, "fsync", _no_space)
    out = tmp_path / "fixed"
    code = main(["doctor", str(tiny.tiny_model("llama")), "--fix", str(out)])
    err = capsys.readouterr().err
    # transformers' loading/saving progress bars come first (the model loaded fine).
    errors = [line for line in err.splitlines() if line.startswith("tunefix: error")]
    assert code == 2 and len(errors) == 1 and "no space left on device" in errors[0], err
    assert "Traceback" not in err
    assert _listing(tmp_path) == []


def test_write_text_other_errors_pass_through(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(_io.os, "fsync", boom)
    with pytest.raises(OSError):
        _io.write_text(tmp_path / "x.json", "{}")
    assert _listing(tmp_path) == []


def test_atomic_path_under_a_file_is_a_clean_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(TunefixError, match="cannot create the output directory"):
        _io.write_text(f / "sub" / "x.json", "{}")
    assert f.read_text() == "x"


def test_atomic_artifacts_get_ordinary_permissions(tmp_path):
    # mkstemp/mkdtemp create private temporaries; the finished file must not stay 0600.
    mask = os.umask(0o022)
    try:
        f = _io.write_text(tmp_path / "Modelfile", "FROM x\n")
        with _io.atomic_dir(tmp_path / "merged") as d:
            (d / "config.json").write_text("{}")
    finally:
        os.umask(mask)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
