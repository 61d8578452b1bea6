"""Chat with a run, a model directory or a GGUF file (``tunefix chat`` is
``tunefix.commands.chat``; ``open_chat`` picks the backend).

Each backend renders the conversation with the template the model was trained with,
tokenises it with exactly one BOS, and stops on the template's stop tokens; so a run and
its exported GGUF answer the same prompt with the same greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError


class TorchChat:
    """A PyTorch model (a run with its adapter, or a model directory)."""

    def __init__(self, model, tokenizer, template):
        self.model, self.tok, self.template = model, tokenizer, template

    @property
    def default_system(self) -> str | None:
        return self.template.default_system

    def answer(self, messages: list[dict], max_new_tokens: int = 256) -> tuple[str, bool]:
        from tunefix.train.evaluate import generate_answers

        answers, stopped = generate_answers(self.model, self.tok, self.template, [messages],
                                            max_new_tokens=max_new_tokens, batch_size=1)
        return answers[0], stopped[0]

    def close(self) -> None:
        """Nothing to end (the model lives in this process); here so both backends close alike."""


class LlamaChat:
    """A GGUF file in llama.cpp (in a child process, ``tunefix.llamacpp``): its embedded
    template (or the export's record), its stops. ``close()`` or a ``with`` block ends it."""

    def __init__(self, gguf: Path, n_ctx: int = 2048):
        from tunefix.llamacpp import LlamaProcess

        self.llm = LlamaProcess(gguf, n_ctx=n_ctx, n_threads=1)
        try:
            self._read_template(gguf)
        except BaseException:
            self.llm.close()
            raise

    def _read_template(self, gguf: Path) -> None:
        record = _export_template(gguf)
        meta = self.llm.metadata
        self.jinja = record["jinja"] if record else meta.get("tokenizer.chat_template")
        if not self.jinja:
            raise TunefixError(f"{gguf} carries no chat template", "Export it with tunefix, or pass a model directory")
        self.default_system = record.get("default_system") if record else None
        self.add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.bos, eos = self.llm.info["bos"], self.llm.info["eos"]
        self.bos_text, self.eos_text = self._piece(self.bos), self._piece(eos)
        self.eog = self.llm.eog

    def __enter__(self) -> LlamaChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.llm.close()

    def _piece(self, token: int) -> str:
        return "" if token < 0 else self.llm.call("detokenize", [token], True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The token policy's prompt with llama.cpp's tokenizer: the strict sandbox, no special
        tokens added by the tokenizer, one BOS where the GGUF adds one."""
        from tunefix.templates.policy import IGNORE, one_bos
        from tunefix.templates.render import render_jinja

        text = render_jinja(self.jinja, messages, add_generation_prompt=True, bos_token=self.bos_text,
                            eos_token=self.eos_text)
        ids = self.llm.tokenize(text, add_bos=False)
        bos = self.bos if self.add_bos and self.bos >= 0 else None
        return one_bos(ids, [IGNORE] * len(ids), bos)[0]

    def answer(self, messages: list[dict], max_new_tokens: int = 256) -> tuple[str, bool]:
        """Greedy, as the PyTorch side: the stop token ends the answer and is not part of it."""
        out = self.llm.call("generate", self.prompt_ids(messages), sorted(self.eog), max_new_tokens)
        stopped = bool(out) and out[-1] in self.eog
        if stopped:
            out = out[:-1]
        return self.llm.call("detokenize", out, False), stopped


def _export_template(gguf: Path) -> dict | None:
    """The template record of a tunefix export (export.json next to the file), if any."""
    for manifest in (gguf.parent / "export.json", gguf.parent.parent / "export.json"):
        if manifest.exists():
            data = json.loads(manifest.read_text())
            template = data.get("template")
            if isinstance(template, dict) and template.get("jinja"):
                return template
    return None


def open_chat(target: str) -> Any:
    path = Path(target)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TunefixError(f"{path}: no such file")
        from tunefix.model.files import check_gguf_magic

        check_gguf_magic(path)  # a one-line error before llama.cpp sees the file
        return LlamaChat(path)
    if (path / "summary.json").exists():
        from tunefix.train.run import load_run

        model, tok, template, _ = load_run(path)
        return TorchChat(model, tok, template)
    from tunefix.model.load import load_model
    from tunefix.templates import template_for

    model, tok = load_model(target, report=None)
    model.eval()
    return TorchChat(model, tok, template_for(tok))

