"""The ``ChatTemplate`` record: one chat format in both of its forms, and what goes with it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from tunefix.errors import TunefixError
from tunefix.templates.render import Message, render_jinja

# Stands for "the tokenizer's EOS token" in the Ollama template and the stop list of
# templates that have no end-of-turn token of their own (alpaca, vicuna, zephyr, custom
# templates whose example ends OUTPUT with nothing). Their Jinja uses ``{{ eos_token }}``,
# which Hugging Face fills in; the Go side has no such variable, so ``bind`` writes it in.
EOS = "@EOS@"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format: Jinja (as Hugging Face tokenizers carry it) and Ollama TEMPLATE (Go).

    Contract between the two forms: for a conversation whose system message (if any) comes
    first, ``render(msgs, add_generation_prompt=last role != "assistant", bos_token="")`` is
    byte-identical to Ollama's rendering of the Go template. Every assistant turn, the last
    included, ends with ``eot``; so the training text and the inference prompt agree.

    ``bos`` says whether the Jinja writes ``{{ bos_token }}`` itself (as the family's official
    template does). The Go form never writes BOS: llama.cpp adds it from the GGUF's
    ``add_bos_token``. Either way tunefix's tokenisation yields exactly one BOS.

    ``variables`` are the Jinja variables this record renders with (``{"enable_thinking":
    False}``): passed on every render (``policy.render``), stored in ``template.json``, and
    written into the Jinja itself as defaults (``jinja_defaults``) so that a path that carries
    only the Jinja (a model directory, a GGUF, ``apply_chat_template``) renders the same. The
    Go form renders the same with Ollama's ``think`` unset (``templates/reasoning.py`` says how
    ``think`` maps to them and what holds for reasoning templates).
    """

    name: str
    jinja: str
    ollama: str | None
    eot: str
    stop: tuple[str, ...]
    default_system: str | None = None
    bos: bool = False
    description: str = ""
    variables: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @property
    def needs_eos(self) -> bool:
        """True when the template uses the tokenizer's EOS (``bind`` must be called for Go)."""
        return EOS in self.eot or "eos_token" in self.jinja

    def bind(self, eos_token: str) -> ChatTemplate:
        """This template with the tokenizer's EOS written into its Go form and stop tokens."""
        if not self.needs_eos:
            return self
        if not eos_token:
            raise TunefixError(f"template {self.name!r} ends turns with the tokenizer's EOS, "
                               "but the tokenizer has no eos_token", "Set eos_token or pick another template")
        ollama = self.ollama.replace(EOS, eos_token) if self.ollama else None
        return dataclasses.replace(self, ollama=ollama, eot=self.eot.replace(EOS, eos_token),
                                   stop=tuple(s.replace(EOS, eos_token) for s in self.stop))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
               bos_token: str = "", eos_token: str = "", **variables: Any) -> str:
        """Render with the Jinja form (``bos_token=""`` leaves BOS to the tokenizer)."""
        if self.needs_eos and not eos_token and EOS not in self.eot:
            eos_token = self.eot  # already bound
        if self.needs_eos and not eos_token:
            raise TunefixError(f"template {self.name!r} needs the tokenizer's eos_token to render",
                               "Pass eos_token= (render_for(tokenizer, ...) does)")
        return render_jinja(self.jinja, messages, add_generation_prompt=add_generation_prompt,
                            bos_token=bos_token, eos_token=eos_token, **{**self.variables, **variables})


def jinja_defaults(variables: dict[str, Any]) -> str:
    """Jinja that gives each of ``variables`` its value unless the caller passes one (what
    ``ChatTemplate.variables`` writes in front of a template)."""
    # JSON literals (true, false, numbers, strings) are Jinja literals too.
    return "".join(f"{{%- if {k} is not defined %}}{{%- set {k} = {json.dumps(v)} %}}{{%- endif %}}"
                   for k, v in variables.items())
