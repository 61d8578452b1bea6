"""Custom chat templates from one example conversation, the way users think of formats.

The user writes a conversation in which ``{INPUT}`` and ``{OUTPUT}`` stand for a user turn
and an assistant turn (``{SYSTEM}`` optionally, once, before the first ``{INPUT}``), with the
input/output pair written twice. Two repetitions are what make the format unambiguous: the
text between ``{OUTPUT}`` and the next ``{INPUT}`` is "end of the assistant turn" plus "start
of a user turn", and the text after the last ``{OUTPUT}`` says where the first part stops.

From that, tunefix derives a Jinja template, an Ollama template and the stop token. The
pieces are:

    head    text before the first {INPUT} (may hold {SYSTEM})
    user    text before every later {INPUT}          (between - tail)
    asst    text between {INPUT} and {OUTPUT}        (must be the same in both pairs)
    tail    text after {OUTPUT}: the end-of-turn token and what follows it
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from tunefix.errors import TunefixError
from tunefix.templates.record import EOS, ChatTemplate

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(INPUT|OUTPUT|SYSTEM)\}")
_HINT = ("Write one example conversation with {INPUT} and {OUTPUT} twice, in that order, "
         "e.g. '<|user|>{INPUT}<|end|><|bot|>{OUTPUT}<|end|><|user|>{INPUT}<|end|><|bot|>{OUTPUT}<|end|>'")


@dataclass(frozen=True)
class _Parts:
    sys_pre: str | None   # text before {SYSTEM}, None when the example has no {SYSTEM}
    sys_post: str         # text between {SYSTEM} and the first {INPUT}
    head: str             # text before the first {INPUT} when there is no {SYSTEM}
    user: str
    asst: str
    tail: str             # what follows every {OUTPUT}
    eot: str              # end-of-turn token (or EOS, appended by tunefix)


def _split(example: str) -> tuple[list[str], list[str]]:
    names = _PLACEHOLDER.findall(example)
    texts = _PLACEHOLDER.split(example)[::2]
    return names, texts


def _check_order(names: list[str]) -> None:
    pairs = [n for n in names if n != "SYSTEM"]
    n_in, n_out = pairs.count("INPUT"), pairs.count("OUTPUT")
    if n_in != 2 or n_out != 2:
        raise TunefixError(f"the example has {{INPUT}} {n_in} time(s) and {{OUTPUT}} {n_out} time(s); "
                           "the input/output pair must appear exactly twice so that turn separators "
                           "are unambiguous", _HINT)
    if pairs != ["INPUT", "OUTPUT", "INPUT", "OUTPUT"]:
        raise TunefixError(f"placeholders come in the order {', '.join(pairs)}; expected INPUT, OUTPUT, "
                           "INPUT, OUTPUT", _HINT)
    if names.count("SYSTEM") > 1 or ("SYSTEM" in names and names[0] != "SYSTEM"):
        raise TunefixError("{SYSTEM} may appear once, before the first {INPUT}", _HINT)


def _parts(example: str) -> _Parts:
    names, texts = _split(example)
    _check_order(names)
    if names[0] == "SYSTEM":
        sys_pre, sys_post, texts = texts[0], texts[1], texts[1:]
    else:
        sys_pre, sys_post = None, ""
    head, asst1, between, asst2, tail = texts
    if asst1 != asst2:
        raise TunefixError(f"the two repetitions disagree: the text between {{INPUT}} and {{OUTPUT}} is "
                           f"{asst1!r} the first time and {asst2!r} the second", _HINT)
    if not between.startswith(tail) and tail.rstrip("\n") and between.startswith(tail.rstrip("\n")):
        tail = tail.rstrip("\n")  # a newline that the editor added at the end of the file
    if not between.startswith(tail):
        raise TunefixError(f"the two repetitions disagree: the first {{OUTPUT}} is followed by {between!r}, "
                           f"which does not start with {tail!r}, the text after the second", _HINT)
    user = between[len(tail):]
    eot = tail.strip()
    if not eot:
        log.warning("nothing ends {OUTPUT} in the example: tunefix appends the tokenizer's EOS token "
                    "after every assistant turn, or the model would never learn to stop")
        eot = EOS
        tail = EOS + tail
    return _Parts(sys_pre, sys_post, head, user, asst1, tail, eot)


def _j(text: str) -> str:
    """A Jinja expression printing ``text`` literally (raw text would meet trim_blocks)."""
    if not text:
        return ""
    parts = text.split(EOS)
    exprs = [json.dumps(p, ensure_ascii=False) for p in parts]
    return "{{ " + " + eos_token + ".join(exprs) + " }}"


def _g(text: str) -> str:
    """Go template text printing ``text`` literally."""
    return text if "{{" not in text else "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _system_split(p: _Parts) -> tuple[str, str] | None:
    """(block before {SYSTEM}, block after) when the system block stands apart from the user prefix."""
    if p.sys_pre is None:
        return None
    if p.sys_post.endswith(p.user):
        return p.sys_pre, p.sys_post[: len(p.sys_post) - len(p.user)]
    return None


def _jinja(p: _Parts, default_system: str) -> str:
    split = _system_split(p)
    out = ["{% set ns = namespace(first=true) %}"]
    if split and default_system:
        out.append("{% if not messages or messages[0]['role'] != 'system' %}"
                   + _j(split[0] + default_system + split[1]) + "{% endif %}")
    out.append("{% for message in messages %}")
    if p.sys_pre is not None:
        sys_block = _j(split[0]) + "{{ message['content'] }}" + _j(split[1]) if split else ""
        out.append("{% if message['role'] == 'system' %}" + sys_block + "{% elif message['role'] == 'user' %}")
        if split:
            first = _j(p.user)
        else:  # the system prompt sits inside the first user prefix; empty when absent
            first = (_j(p.sys_pre) + "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
                     "{% else %}" + _j(default_system) + "{% endif %}" + _j(p.sys_post))
    else:
        # Dropping a system prompt silently would train on rows that lack it.
        out.append("{% if message['role'] == 'system' %}{{ raise_exception('this template has no "
                   "{SYSTEM} slot; add one to the example or remove the system prompt') }}"
                   "{% elif message['role'] == 'user' %}")
        first = _j(p.head)
    out.append("{% if ns.first %}" + first + "{% else %}" + _j(p.user) + "{% endif %}"
               "{% set ns.first = false %}{{ message['content'] }}")
    out.append("{% elif message['role'] == 'assistant' %}" + _j(p.asst) + "{{ message['content'] }}"
               + _j(p.tail) + "{% endif %}{% endfor %}")
    out.append("{% if add_generation_prompt %}" + _j(p.asst) + "{% endif %}")
    return "".join(out)


def _ollama(p: _Parts, default_system: str) -> str:
    split = _system_split(p)
    out = []
    if split:
        default = "{{ else }}" + _g(split[0] + default_system + split[1]) if default_system else ""
        out.append("{{ if .System }}" + _g(split[0]) + "{{ .System }}" + _g(split[1]) + default + "{{ end }}")
    if p.sys_pre is not None and not split:
        default = "{{ else }}" + _g(default_system) if default_system else ""
        first = (_g(p.sys_pre) + "{{ if $.System }}{{ $.System }}" + default + "{{ end }}"
                 + _g(p.sys_post))
    else:
        first = _g(p.user if split else p.head)
    out.append("{{ $first := true }}{{ range $i, $m := .Messages }}"
               "{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    out.append('{{ if eq .Role "user" }}{{ if $first }}' + first + "{{ else }}" + _g(p.user)
               + "{{ end }}{{ $first = false }}{{ .Content }}")
    out.append('{{ else if eq .Role "assistant" }}' + _g(p.asst) + "{{ .Content }}" + _g(p.tail) + "{{ end }}")
    out.append('{{ if and $last (ne .Role "assistant") }}' + _g(p.asst) + "{{ end }}{{ end }}")
    return "".join(out)


def from_example(example: str, name: str = "custom", default_system: str = "") -> ChatTemplate:
    """Derive a ``ChatTemplate`` from an example conversation (see the module docstring).

    ``default_system`` is written where ``{SYSTEM}`` stands when a conversation has no
    system message (it needs ``{SYSTEM}`` in the example).
    """
    p = _parts(example)
    if default_system and p.sys_pre is None:
        raise TunefixError("a default system prompt needs {SYSTEM} in the example", _HINT)
    stop = (p.eot,) if p.eot == EOS else (p.eot, EOS)
    return ChatTemplate(name, _jinja(p, default_system), _ollama(p, default_system), p.eot, stop,
                        default_system or None, False, "derived from an example conversation")
