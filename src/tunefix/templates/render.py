"""Render a Jinja chat template exactly as Hugging Face's ``apply_chat_template`` does.

Written by hand (not a call into transformers) so that rendering needs neither torch nor a
tokenizer, and so that the environment is ours to audit: chat templates come from model
repositories and are untrusted code, hence the immutable sandbox. The settings mirror
Hugging Face's (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that does
not escape HTML, ``raise_exception`` and ``strftime_now``); a test checks byte equality with
``tokenizer.apply_chat_template(..., tokenize=False)`` on real tokenizers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tunefix.errors import TunefixError

Message = Mapping[str, Any]


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & for HTML, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# Limits on what an untrusted template may build: a string, list or power larger than
# this is refused (Jinja's sandbox already caps range() at 100,000 items).
MAX_SIZE = 10_000_000


def _environment():
    """Jinja's immutable sandbox, made strict: a reach for Python internals is an error.

    The stock sandbox turns ``''.__class__`` into an undefined value that renders as
    nothing, so a hostile template would "work" silently; here every unsafe attribute
    raises ``SecurityError`` and the render is refused with a TunefixError. ``*`` and
    ``**`` are intercepted so that ``'x' * 10**12`` cannot exhaust memory.
    """
    import jinja2
    import jinja2.ext
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _StrictSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj: Any, attribute: str):
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} "
                                "object is unsafe")

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024 \
                    and isinstance(left, (int, float)) and abs(left) > 1:
                raise SecurityError("the template computes a power that is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SIZE:
                        raise SecurityError("the template builds a sequence that is too large")
            return super().call_binop(context, operator, left, right)

    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    del jinja2
    return env


@functools.lru_cache(maxsize=64)
def compile_jinja(source: str):
    """Compile once per template text; a syntax error becomes a TunefixError."""
    import jinja2

    env = _environment()
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TunefixError(f"chat template has a Jinja syntax error on line {e.lineno}: {e.message}",
                           "Fix the template or choose a registry one with --template") from e
    except (RecursionError, MemoryError, ValueError, TypeError) as e:  # pathological sources
        raise TunefixError(f"chat template cannot be compiled ({type(e).__name__})",
                           "Fix the template or choose a registry one with --template") from e


# The names under which chat templates read an assistant's reasoning: Qwen3/3.5 and Gemma 4
# read ``reasoning_content`` (Gemma 4 also ``reasoning``), gpt-oss reads ``thinking``.
# tunefix's own field is ``reasoning``; Ollama's is ``Thinking`` (``gorender``).
REASONING_ALIASES = ("reasoning_content", "thinking")


def template_message(message: Message) -> dict[str, Any]:
    """A message as a Jinja template reads it: tunefix's ``reasoning`` also under the names
    real templates use, so that a model-carried template and a registry entry both see it."""
    out = dict(message)
    if isinstance(out.get("reasoning"), str):
        for name in REASONING_ALIASES:
            out.setdefault(name, out["reasoning"])
    return out


def render_jinja(source: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                 **variables: Any) -> str:
    """Render ``messages`` with the Jinja template ``source``.

    ``variables`` are what Hugging Face passes besides the messages: the tokenizer's special
    tokens (``bos_token``, ``eos_token``, ...) and any extra keyword (``date_string``,
    ``enable_thinking``, ...). An assistant's ``reasoning`` is passed as ``template_message`` says.
    """
    import jinja2
    from jinja2.exceptions import SecurityError

    template = compile_jinja(source)
    try:
        return template.render(messages=[template_message(m) for m in messages], tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except SecurityError as e:
        raise TunefixError(f"chat template refused by the sandbox: {e}",
                           "Chat templates may not reach Python internals; use a registry "
                           "template with --template") from e
    except jinja2.exceptions.TemplateError as e:
        raise TunefixError(f"chat template refused the conversation: {e}",
                           "Check the roles and their order, or choose another --template") from e
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, RecursionError) as e:
        # A template is untrusted code: its own bugs ({{ 1/0 }}, {{ messages + 1 }}) are the
        # template's fault, reported as such.
        raise TunefixError(f"chat template failed while rendering ({type(e).__name__}: {e})",
                           "Fix the template or choose a registry one with --template") from e
