"""An Ollama Modelfile (and README) next to the exported GGUF files.

The TEMPLATE is the Go form of the very template the run trained with (the run's
``template.json`` record, bound to the tokenizer's EOS), never a re-guess from the
GGUF's Jinja; ``verify.template_parity`` proves it renders like the Jinja one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunefix._io import inside, write_text
from tunefix.errors import TunefixError


@dataclass(frozen=True)
class OllamaSpec:
    """What goes into a Modelfile, apart from the file it points at."""

    template: str
    system: str | None
    stops: tuple[str, ...]
    num_ctx: int | None


def spec_for(template, tok, *, system: str | None = None, num_ctx: int | None = None) -> OllamaSpec:
    """The Modelfile content for ``template`` (a ``ChatTemplate``) and ``tok``.

    ``system``: the run's system prompt (every training conversation had it); else the
    template's default system prompt, if any.
    """
    from tunefix.templates import stop_tokens

    bound = template.bind(tok.eos_token or "")
    if not bound.ollama:
        raise TunefixError(f"template {template.name!r} has no Ollama (Go) form",
                           "Train with a registry template or a custom example template, or export without --ollama")
    return OllamaSpec(bound.ollama, system or bound.default_system or None,
                      tuple(stop_tokens(template, tok)), num_ctx)


def _check_triple(value: str, what: str) -> None:
    # Ollama's parser ends a """ string at the first """: the value may not hold one, nor
    # end with " (it would read as """" and close early).
    if '"""' in value or value.endswith('"'):
        raise TunefixError(f'the {what} contains """ or ends with ", which a Modelfile cannot quote',
                           "Change the template or system prompt")


def _quoted(value: str, what: str = "value") -> str:
    # Ollama's Modelfile parser: "..." for one-line values, """...""" for any other.
    if "\n" in value or '"' in value or "\\" in value:
        _check_triple(value, what)
        return f'"""{value}"""'
    return f'"{value}"'


def modelfile_text(spec: OllamaSpec, from_: str, adapter: str | None = None) -> str:
    lines = [f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    _check_triple(spec.template, "Ollama template")
    lines.append(f'TEMPLATE """{spec.template}"""')
    if spec.system:
        lines.append(f"SYSTEM {_quoted(spec.system, 'system prompt')}")
    lines += [f"PARAMETER stop {_quoted(s, 'stop token')}" for s in spec.stops]
    if spec.num_ctx:
        lines.append(f"PARAMETER num_ctx {int(spec.num_ctx)}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """The instructions of a Modelfile written by ``modelfile_text`` (name -> values)."""
    out: dict[str, list[str]] = {}
    i = 0
    while i < len(text):
        end = text.find("\n", i)
        line = text[i:] if end < 0 else text[i:end]
        if not line.strip() or line.startswith("#"):
            i = len(text) if end < 0 else end + 1
            continue
        key, _, rest = line.partition(" ")
        if key.upper() == "PARAMETER":
            pname, _, rest = rest.partition(" ")
            key = f"PARAMETER {pname}"
        start = i + len(line) - len(rest)
        if rest.startswith('"""'):
            close = text.index('"""', start + 3)
            value, i = text[start + 3:close], close + 3
            i = text.find("\n", i) + 1 or len(text)
        else:
            value = rest[1:-1] if rest.startswith('"') and rest.endswith('"') and len(rest) > 1 else rest
            i = len(text) if end < 0 else end + 1
        out.setdefault(key.upper() if not key.startswith("PARAMETER") else key, []).append(value)
    return out


def write_modelfile(out_dir: str | os.PathLike, gguf_file: str, spec: OllamaSpec,
                    adapter: str | None = None, name: str = "Modelfile") -> Path:
    """Write ``out_dir/Modelfile`` (atomically) pointing at ``./gguf_file``."""
    return write_text(inside(out_dir, name), modelfile_text(spec, f"./{gguf_file}",
                                                           f"./{adapter}" if adapter else None))


def readme_text(name: str, *, files: Sequence[tuple[str, str]], modelfile: str | None,
                gguf_from: str | None, merged: bool, lora: Sequence[str] = (), source: str = "") -> str:
    """The export folder's README: what is here and the commands to use it."""
    out = [f"# {name}", "", f"Exported by tunefix from `{source}`." if source else "Exported by tunefix.", ""]
    out += ["| file | type |", "|---|---|"] + [f"| `{f}` | {t} |" for f, t in files] + [""]
    if modelfile:
        out += ["## Ollama", "", "```sh", f"ollama create {name} -f {modelfile}", f"ollama run {name}", "```", "",
                f"The Modelfile uses `{gguf_from}`; edit its `FROM` line to use another GGUF file of this folder.",
                "Its TEMPLATE is the chat template the model was trained with (verified against the Jinja one).",
                ""]
    if lora:
        out += ["## LoRA adapter", "",
                "`adapter/` is the PEFT adapter; "
                + ", ".join(f"`{f}`" for f in lora if f.endswith(".gguf"))
                + " is the same adapter for llama.cpp (`--lora`) and Ollama (`ADAPTER`). Both apply to the "
                "run's base model, converted with the same tokenizer fixes:", "",
                "```", "FROM ./base-model.gguf", f"ADAPTER ./{next((f for f in lora if f.endswith('.gguf')), '')}",
                "```", ""]
    if merged:
        out += ["## Merged model", "",
                "`merged/` is the Hugging Face model (LoRA merged, 16-bit) every GGUF file was converted from. "
                "`tunefix verify .` re-runs the verification and needs it.", ""]
    out += ["## Checking", "", "`export.json` lists the files, the template, the stop tokens and the results of "
            "the verification (tokenisation, logits, template and stop parity).", ""]
    return "\n".join(out)
