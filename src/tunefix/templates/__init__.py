"""Chat templates: the registry, custom templates from an example, and rendering.

Public entry points:

- ``get_template(name_or_file)``: a registry name, a ``.jinja`` file, or an example file
  with ``{INPUT}``/``{OUTPUT}`` (see ``custom``).
- ``template_for(tokenizer, name_or_file=None)``: the given template, else the tokenizer's
  own chat template, bound to the tokenizer's EOS.
- ``render_for(tokenizer, template, messages, add_generation_prompt=...)``: the text a model
  sees, with the tokenizer's special tokens passed as Hugging Face passes them.
- ``end_of_turn(template, tokenizer)`` and ``stop_tokens(template, tokenizer)``.
"""

from __future__ import annotations

from tunefix.templates.record import EOS, ChatTemplate
from tunefix.templates.registry import REGISTRY
from tunefix.templates.select import (
    end_of_turn,
    from_tokenizer,
    get_template,
    render_for,
    stop_tokens,
    template_for,
)

__all__ = ["EOS", "REGISTRY", "ChatTemplate", "end_of_turn", "from_tokenizer", "get_template",
           "render_for", "stop_tokens", "template_for"]
