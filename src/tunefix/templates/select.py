"""Choosing a template: by name, from a file, or from a tokenizer's own chat template."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError
from tunefix.templates import policy
from tunefix.templates.custom import from_example
from tunefix.templates.probes import PROBES, wants_generation_prompt
from tunefix.templates.record import ChatTemplate
from tunefix.templates.registry import REGISTRY
from tunefix.templates.render import compile_jinja

log = logging.getLogger(__name__)


def get_template(name_or_file: str) -> ChatTemplate:
    """A registry template by name, or one read from a file.

    A file holding ``{INPUT}`` is an example conversation (see ``custom``); any other file is
    a Jinja chat template whose end-of-turn token is found once a tokenizer is known.
    """
    if name_or_file in REGISTRY:
        return REGISTRY[name_or_file]
    path = Path(name_or_file)
    if not path.is_file():
        raise TunefixError(f"unknown chat template {name_or_file!r} (not a registry name, not a file)",
                           f"Choose one of {', '.join(REGISTRY)}, or give a file; `tunefix templates` lists them")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TunefixError(f"{path}: not UTF-8 text (byte {e.start})", "Save the template as UTF-8") from e
    except OSError as e:
        raise TunefixError(f"cannot read template file {path} ({e.strerror or e})") from e
    if "{INPUT}" in text or "{OUTPUT}" in text:
        return from_example(text, name=path.stem)
    # A Jinja file: checked now, before any model is loaded, rather than at the first row.
    compile_jinja(text)
    if "messages" not in text:
        raise TunefixError(f"{path} is neither a Jinja chat template (it never reads `messages`) nor an "
                           "example conversation (it has no {INPUT}/{OUTPUT})",
                           "Write a Jinja template over `messages`, or an example with {INPUT} and {OUTPUT} twice")
    return ChatTemplate(path.stem, text, None, "", (), None, "bos_token" in text, f"Jinja from {path}")


# One renderer for every path (the strict sandbox, the tokenizer's special tokens): the policy's.
render_for = policy.render


def _infer_eot(tokenizer: Any, jinja: str) -> str:
    """The special token that a Jinja template writes right after an assistant's content."""
    eot = policy.end_of_turn_text(tokenizer, jinja)
    if eot is None:
        mark = "\ue000"
        text = render_for(tokenizer, jinja, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}])
        raise TunefixError(f"the chat template writes no special token after an assistant's answer "
                           f"(it writes {text.partition(mark)[2][:20]!r}): the model would never learn to stop",
                           "Choose a template with --template (`tunefix templates` lists them)")
    return eot


def _same_renders(a: ChatTemplate, b: ChatTemplate, tokenizer: Any, with_system: bool = True) -> bool:
    """True when ``a`` and ``b`` render every probe alike (BOS aside: ``b`` may leave it out)."""
    bos = tokenizer.bos_token or ""
    for msgs in PROBES:
        if not with_system and msgs[0]["role"] == "system":
            continue
        try:
            x = render_for(tokenizer, a, msgs, add_generation_prompt=wants_generation_prompt(msgs))
            y = render_for(tokenizer, b, msgs, add_generation_prompt=wants_generation_prompt(msgs))
        except TunefixError:
            return False
        if a.bos and not b.bos and bos:
            x = x.removeprefix(bos)
        if x != y:
            return False
    return True


_SYS, _IN, _OUT = ({"role": r, "content": c} for r, c in
                   (("system", "{SYSTEM}"), ("user", "{INPUT}"), ("assistant", "{OUTPUT}")))


def _implicit_system(tokenizer: Any, own: ChatTemplate, derived: ChatTemplate) -> str:
    """The system prompt ``own`` writes when a conversation has none ("" if none)."""
    mark, user = "\ue000", [{"role": "user", "content": "\ue001"}]
    bos = (tokenizer.bos_token or "") if own.bos else ""
    # With the generation prompt: derived templates close a user turn only when one follows.
    plain = render_for(tokenizer, own, user, add_generation_prompt=True).removeprefix(bos)
    marked = render_for(tokenizer, derived, [{"role": "system", "content": mark}] + user,
                        add_generation_prompt=True)
    before, _, after = marked.partition(mark)
    if plain == render_for(tokenizer, derived, user, add_generation_prompt=True) or not (plain.startswith(before) and plain.endswith(after)):
        return ""
    return plain[len(before): len(plain) - len(after)]


def _derive_ollama(tokenizer: Any, own: ChatTemplate) -> str | None:
    """An Ollama template equivalent to ``own``, derived through an example, or None.

    Renders ``own`` on an example conversation with ``{SYSTEM}``/``{INPUT}``/``{OUTPUT}`` and
    builds a custom template from it; kept only if it renders the probes as ``own`` does.
    """
    bos = (tokenizer.bos_token or "") if own.bos else ""
    eos = tokenizer.eos_token or ""
    for msgs in ([_SYS, _IN, _OUT, _IN, _OUT], [_IN, _OUT, _IN, _OUT]):
        try:
            example = render_for(tokenizer, own, msgs).removeprefix(bos)
            derived = from_example(example).bind(eos)
            default = _implicit_system(tokenizer, own, derived) if msgs[0] is _SYS else ""
            if default:
                derived = from_example(example, default_system=default).bind(eos)
        except TunefixError:
            continue
        if _same_renders(own, derived, tokenizer, with_system=msgs[0] is _SYS):
            if msgs[0] is not _SYS:
                log.warning("the model's own chat template has no system slot: system prompts are refused")
            return derived.ollama
    log.info("no Ollama template could be derived from the model's own chat template")
    return None


def from_tokenizer(tokenizer: Any) -> ChatTemplate:
    """The tokenizer's own chat template as a ``ChatTemplate`` (a registry one when identical)."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str) or not jinja:
        raise TunefixError("the model has no chat template of its own",
                           f"Choose one with --template: {', '.join(REGISTRY)}")
    own = ChatTemplate("model's own", jinja, None, _infer_eot(tokenizer, jinja), (), None,
                       "bos_token" in jinja, "the model's own chat template")
    for reg in REGISTRY.values():
        bound = reg.bind(tokenizer.eos_token or "")
        if _same_renders(own, bound, tokenizer):
            return dataclasses.replace(bound, jinja=jinja, description=f"the model's own ({reg.name})")
    stop = tuple(dict.fromkeys([own.eot, tokenizer.eos_token or own.eot]))
    return dataclasses.replace(own, ollama=_derive_ollama(tokenizer, own), stop=stop)


def template_for(tokenizer: Any, name_or_file: str | None = None) -> ChatTemplate:
    """The template to train and serve with, bound to ``tokenizer``'s EOS.

    ``name_or_file`` when given, else the model's own template.
    """
    if name_or_file is None:
        return from_tokenizer(tokenizer)
    template = get_template(name_or_file)
    if not template.eot:  # a bare Jinja file
        eot = _infer_eot(tokenizer, template.jinja)
        template = dataclasses.replace(template, eot=eot, stop=(eot,))
    return template.bind(tokenizer.eos_token or "")



def for_rows(tokenizer: Any, template: ChatTemplate, rows: Any, *, named: bool) -> ChatTemplate:
    """``template`` in the thinking mode the rows call for: a reasoning template (Qwen3, Qwen3.5,
    SmolLM3, Gemma 4) trained on rows without any reasoning is trained and served with thinking
    off (its ``-no-think`` entry), rows with reasoning with thinking on. A template the user
    ``named`` is kept, with a warning when its mode and the rows disagree."""
    from tunefix.templates import reasoning

    if "enable_thinking" not in template.variables:
        return template
    has = any(isinstance(m, dict) and m.get("reasoning") for row in rows if not isinstance(row, str) for m in row)
    if reasoning.is_thinking(template) == has:
        return template
    other = reasoning.variant(template, has)
    if named:
        log.warning("the rows %s reasoning but template %r is in the other thinking mode; %r matches them",
                    "carry" if has else "carry no", template.name, other)
        return template
    log.info("the rows %s reasoning: training and serving with %r", "carry" if has else "carry no", other)
    return template_for(tokenizer, other)

# Tokens that only Tekken v11 and later define (tool-call arguments and ids, thinking). Tekken
# v3 and v7 files share one special-token table, [SYSTEM_PROMPT] included (measured: Nemo's
# tekken_240911.json, a v3 file, has it at id 17), so only these, or a template that writes
# [SYSTEM_PROMPT], tell a v7+ Tekken tokenizer from Nemo's.
_TEKKEN_V11 = ("[ARGS]", "[CALL_ID]", "[THINK]")


def mistral_template(tokenizer: Any) -> str:
    """The registry's Mistral entry for this tokenizer's version (``templates/mistral.py``).

    No ``[INST]`` token: v1 (``mistral``, [INST] is text). SentencePiece (byte-fallback
    pieces such as ``<0x0A>``): v7 with ``[SYSTEM_PROMPT]``, else v3. Tekken (byte-level BPE):
    ``ministral-3`` (v7+) when the tokenizer shows a later version, else Nemo's v3.
    """
    vocab = tokenizer.get_vocab()
    if "[INST]" not in vocab:
        return "mistral"
    if "<0x0A>" in vocab:
        return "mistral-v7" if "[SYSTEM_PROMPT]" in vocab else "mistral-v3"
    own = getattr(tokenizer, "chat_template", None)
    v7 = (isinstance(own, str) and "[SYSTEM_PROMPT]" in own) or any(t in vocab for t in _TEKKEN_V11)
    return "ministral-3" if v7 else "mistral-v3-tekken"


# Where the end of turn and the stop tokens are decided (re-exported for callers).
end_of_turn = policy.end_of_turn
stop_tokens = policy.stop_tokens
