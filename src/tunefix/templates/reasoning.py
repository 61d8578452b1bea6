"""Reasoning (thinking) chat templates: Qwen3, Qwen3.5, SmolLM3 and Gemma 4 (text only), each
in the family's default mode and in the other one, with Ollama twins.

Decisions, and why:

- **Reasoning in messages.** tunefix's field is ``reasoning`` (a str) on an assistant message.
  Real templates read it under other names: Qwen3 and Qwen3.5 ``message.reasoning_content``,
  Gemma 4 ``reasoning`` or ``reasoning_content`` (and only on turns with tool calls: text-only
  Gemma 4 renders no reasoning at all), gpt-oss ``thinking``; llama.cpp's SmolLM3 template
  renders none. ``render.template_message`` (the one Jinja renderer, so both a model-carried
  real template and a registry entry) passes ``reasoning`` under those names too; the Go
  renderer passes it as Ollama's ``thinking`` (``.Thinking``).
- **The think switch is part of the record.** ``enable_thinking`` changes what the model sees
  (Qwen3 off: the generation prompt ends in an empty ``<think>\\n\\n</think>\\n\\n``), so each
  entry carries it in ``ChatTemplate.variables``; ``policy.render`` passes it, ``template.json``
  stores it, and the Jinja starts with it as a default (``record.jinja_defaults``), so that a
  model directory or a GGUF that carries only the Jinja renders the trained variant too.
  Names: ``qwen-3``, ``qwen-3.5`` and ``smollm-3`` think (their families' default);
  ``*-no-think`` do not; ``gemma-4`` does not think (Gemma 4's default), ``gemma-4-think`` does.
  A model trained without reasoning is served with thinking off: use the ``-no-think``
  entries (or ``gemma-4``) for rows without reasoning (``variant``).
- **Ollama's think switch.** Templates see ``.Think`` and ``.IsThinkSet`` (the request's
  ``think``; a Modelfile cannot set it). Ollama's server (routes.go, checked on the 2026-08
  snapshot) turns an unset ``think`` into ``true`` for a template it deems thinking-capable
  (one that prints ``{{ .Thinking }}`` between tags inside the range over ``.Messages``), so a
  template cannot tell "unset" from "true". Hence: a thinking entry's twin thinks unless
  ``think`` is set false (``false`` renders what the Jinja renders with ``enable_thinking=False``);
  a non-thinking entry's twin never thinks, whatever ``think`` says (the model was trained
  without reasoning). By that rule (Ollama's ``thinking.InferTags``, run on the twins) the
  Qwen3/3.5 twins are thinking-capable; the SmolLM3 and Gemma 4 twins print no reasoning and
  are not, so Ollama leaves ``think`` unset for them (their default mode) and refuses
  ``think=true``. Not handled: that snapshot may also prefer a GGUF's Jinja over the Go
  TEMPLATE when the Jinja looks more capable (``<think>`` and ``</think>`` in SmolLM3's).
  Ollama's own library ``qwen3`` template differs from Hugging Face's
  (it appends `` /think`` or `` /no_think`` to the last user turn when think is set, and no
  newlines around the reasoning): the twins follow the Jinja, i.e. the training text.

What holds (tested in ``tests/test_reasoning_templates.py`` against llama.cpp's copies of the
real templates, and Jinja == Go with Go's ``text/template``):

- Each entry renders exactly as the real template with the same ``enable_thinking`` on
  conversations whose system message (if any) comes first, whose roles are user/assistant
  (no tools, no two assistant turns in a row), whose contents and reasoning have no leading or
  trailing whitespace (tunefix strips them) and hold no ``</think>`` or channel markers, and,
  for SmolLM3, whose system message holds no ``/think`` or ``/no_think``.
- Jinja == Go (``think`` unset) for those conversations; for thinking entries also
  Jinja(``enable_thinking=False``) == Go(``think=false``).
- Every assistant turn ends with ``eot``.
- Not prefix-stable: history turns render differently from the last one. Qwen3 writes the
  think block only on an assistant turn after the last user turn (empty when there is no
  reasoning), Qwen3.5 on every such turn; both drop the reasoning of earlier turns; SmolLM3
  and text-only Gemma 4 drop all reasoning. The inference prompt is a prefix of the training
  row (same tokens) when the row's last answer is rendered as inference continues it: Qwen3
  and SmolLM3 in either mode for rows without reasoning; Qwen3/3.5 thinking entries for rows
  whose last answer carries reasoning; the ``-no-think`` entries for rows whose last answer
  carries none. It never holds for ``gemma-4`` (its generation prompt opens an empty thought
  channel that its rendering of a finished answer lacks), nor for a ``qwen-3.5`` row without
  reasoning (the prompt ends ``<think>\\n``, the row goes on ``<think>\\n\\n</think>``, and
  ``\\n\\n`` is one token, not ``\\n`` and another). Training does not depend on it: where
  it fails, ``data.tokenize`` trains each turn in a sequence of its own, the inference prompt
  first and tokenised alone (``data.history``).
"""

from __future__ import annotations

from tunefix.templates.record import ChatTemplate, jinja_defaults

# Go: Ollama's "is this the last message" idiom; the index of the last user message; the
# think mode (a thinking entry honours think=false, a non-thinking one ignores think).
_GO_LOOP = '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
_GO_LAST_USER = ('{{ $lastUser := -1 }}{{ range $i, $m := .Messages }}'
                 '{{ if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}{{ end }}')
_GO_GEN = '{{ if and $last (ne .Role "assistant") }}'


def _go_think(thinks: bool) -> str:
    if thinks:
        return "{{ $think := true }}{{ if .IsThinkSet }}{{ $think = .Think }}{{ end }}"
    return "{{ $think := false }}"


# Jinja: the index of the last user message (-1: none), as Qwen's templates compute it.
_J_LAST_USER = ("{%- set ns = namespace(last_user=-1) %}{%- for message in messages %}"
                "{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}")
_J_SYSTEM_TURN = ("{%- if messages and messages[0]['role'] == 'system' %}"
                  "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}")
_J_USER_TURN = "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
_J_REASONING = "(message['reasoning_content'] or '')"
_GO_SYSTEM_TURN = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
_GO_USER_TURN = '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
_QWEN_STOP = ("<|im_end|>", "<|endoftext|>")


# Each family's default mode (its real template's, with enable_thinking unset): the entry
# named after the family; the other mode is suffixed.
_THINKS_BY_DEFAULT = {"qwen-3": True, "qwen-3.5": True, "smollm-3": True, "gemma-4": False}


def _name(family: str, thinks: bool) -> str:
    if thinks == _THINKS_BY_DEFAULT[family]:
        return family
    return family + ("-think" if thinks else "-no-think")


def _qwen3(thinks: bool) -> ChatTemplate:
    # The think block only on an assistant turn after the last user turn, and there only on
    # the last message or when it has reasoning (Qwen3's rule for multi-step tool turns).
    jinja = (jinja_defaults({"enable_thinking": thinks}) + _J_SYSTEM_TURN + _J_LAST_USER
             + "{%- for message in messages %}"
             "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
             "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
             "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
             "{%- set reasoning = " + _J_REASONING + " %}"
             "{%- if ns.last_user >= 0 and loop.index0 > ns.last_user and (loop.last or reasoning) %}"
             "{{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{%- endif %}"
             "{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
             "{%- if not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
    ollama = (_GO_SYSTEM_TURN + _GO_LAST_USER + _go_think(thinks) + _GO_LOOP + _GO_USER_TURN
              + '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
              "{{ if and (ge $lastUser 0) (gt $i $lastUser) (or $last .Thinking) }}"
              "<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}"
              + _GO_GEN + "<|im_start|>assistant\n{{ if not $think }}<think>\n\n</think>\n\n{{ end }}{{ end }}{{ end }}")
    mode = "thinking" if thinks else "thinking off (enable_thinking=False)"
    return ChatTemplate(_name("qwen-3", thinks), jinja, ollama, "<|im_end|>", _QWEN_STOP, None, False,
                        f"Qwen3 (ChatML, <think>), {mode}", {"enable_thinking": thinks})


def _qwen35(thinks: bool) -> ChatTemplate:
    # Every assistant turn after the last user turn gets a think block; the generation prompt
    # opens one (thinking) or writes an empty one (off). Like the real template, a
    # conversation without a user turn or with a later system message is refused.
    jinja = (jinja_defaults({"enable_thinking": thinks}) + _J_SYSTEM_TURN + _J_LAST_USER
             + "{%- if ns.last_user < 0 %}{{- raise_exception('No user query found in messages.') }}{%- endif %}"
             "{%- for message in messages %}"
             "{%- if message['role'] == 'system' and not loop.first %}"
             "{{- raise_exception('System message must be at the beginning.') }}"
             "{%- elif message['role'] == 'user' %}" + _J_USER_TURN
             + "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
             "{%- if loop.index0 > ns.last_user %}{{- '<think>\\n' + " + _J_REASONING + " + '\\n</think>\\n\\n' }}"
             "{%- endif %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
             "{%- if enable_thinking %}{{- '<think>\\n' }}{%- else %}{{- '<think>\\n\\n</think>\\n\\n' }}"
             "{%- endif %}{%- endif %}")
    ollama = (_GO_SYSTEM_TURN + _GO_LAST_USER + _go_think(thinks) + _GO_LOOP + _GO_USER_TURN
              + '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
              "{{ if gt $i $lastUser }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}"
              + _GO_GEN + "<|im_start|>assistant\n{{ if $think }}<think>\n{{ else }}<think>\n\n</think>\n\n{{ end }}"
              "{{ end }}{{ end }}")
    mode = "thinking" if thinks else "thinking off (enable_thinking=False)"
    return ChatTemplate(_name("qwen-3.5", thinks), jinja, ollama, "<|im_end|>", _QWEN_STOP, None, False,
                        f"Qwen3.5 text (ChatML, <think>), {mode}", {"enable_thinking": thinks})


_SMOLLM3_THINK_SYSTEM = ('You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an '
                         'assistant involves thoroughly exploring questions through a systematic thinking process '
                         'before providing the final precise and accurate solutions. This requires engaging in a '
                         'comprehensive cycle of analysis, summarizing, exploration, reassessment, reflection, '
                         'backtracking, and iteration to develop well-considered thinking process. Please structure '
                         'your response into two main sections: Thought and Solution using the specified format: '
                         '<think> Thought section </think> Solution section. In the Thought section, detail your '
                         'reasoning process in steps. Each step should include detailed considerations such as '
                         'analysing questions, summarizing relevant findings, brainstorming new ideas, verifying the '
                         'accuracy of the current steps, refining any errors, and revisiting previous steps. In the '
                         'Solution section, based on various attempts, explorations, and reflections from the Thought '
                         'section, systematically present the final solution that you deem correct. The Solution '
                         'section should be logical, accurate, and concise and detail necessary steps needed to reach '
                         'the conclusion.')
_SMOLLM3_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
_SMOLLM3_HEADER = "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\nReasoning Mode: "


def _smollm3(thinks: bool) -> ChatTemplate:
    # A metadata system turn always; its default instructions depend on the mode. No
    # reasoning is rendered in either mode (llama.cpp's SmolLM3 template reads none); with
    # thinking off every assistant turn opens with an empty think block.
    esc = _SMOLLM3_HEADER.replace("\n", "\\n")
    jinja = (jinja_defaults({"enable_thinking": thinks})
             + "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' %}"
             "{{- '" + esc + "' + ('/think' if enable_thinking else '/no_think') + '\\n\\n## Custom Instructions\\n\\n' }}"
             "{%- if system %}{{- system }}{%- elif enable_thinking %}{{- '" + _SMOLLM3_THINK_SYSTEM + "' }}"
             "{%- else %}{{- '" + _SMOLLM3_SYSTEM + "' }}{%- endif %}{{- '\\n\\n<|im_end|>\\n' }}"
             "{%- for message in messages %}{%- if message['role'] == 'user' %}" + _J_USER_TURN
             + "{%- elif message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
             "{%- if not enable_thinking %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}"
             "{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
             "{%- if not enable_thinking %}{{- '<think>\\n\\n</think>\\n' }}{%- endif %}{%- endif %}")
    ollama = (_go_think(thinks) + _SMOLLM3_HEADER + "{{ if $think }}/think{{ else }}/no_think{{ end }}"
              "\n\n## Custom Instructions\n\n{{ if .System }}{{ .System }}{{ else if $think }}"
              + _SMOLLM3_THINK_SYSTEM + "{{ else }}" + _SMOLLM3_SYSTEM + "{{ end }}\n\n<|im_end|>\n"
              + _GO_LOOP + _GO_USER_TURN + '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n'
              "{{ if not $think }}<think>\n\n</think>\n{{ end }}{{ .Content }}<|im_end|>\n{{ end }}"
              + _GO_GEN + "<|im_start|>assistant\n{{ if not $think }}<think>\n\n</think>\n{{ end }}{{ end }}{{ end }}")
    mode = "thinking" if thinks else "thinking off (/no_think)"
    return ChatTemplate(_name("smollm-3", thinks), jinja, ollama, "<|im_end|>", ("<|im_end|>", "<|im_start|>"),
                        None, False, f"SmolLM3 (ChatML, metadata system turn), {mode}", {"enable_thinking": thinks})


def _gemma4(thinks: bool) -> ChatTemplate:
    # Text only: a system turn when thinking (it opens with <|think|>) or given a system
    # message; reasoning is never rendered (Gemma 4 writes a thought channel only on tool
    # calls); with thinking off the generation prompt opens an empty thought channel.
    jinja = (jinja_defaults({"enable_thinking": thinks}) + "{{- bos_token }}"
             "{%- set has_system = messages and messages[0]['role'] == 'system' %}"
             "{%- if enable_thinking or has_system %}{{- '<|turn>system\\n' }}"
             "{%- if enable_thinking %}{{- '<|think|>\\n' }}{%- endif %}"
             "{%- if has_system %}{{- messages[0]['content'] }}{%- endif %}{{- '<turn|>\\n' }}{%- endif %}"
             "{%- for message in (messages[1:] if has_system else messages) %}"
             "{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' "
             "+ message['content'] + '<turn|>\\n' }}{%- endfor %}"
             "{%- if add_generation_prompt %}{{- '<|turn>model\\n' }}"
             "{%- if not enable_thinking %}{{- '<|channel>thought\\n<channel|>' }}{%- endif %}{%- endif %}")
    ollama = (_go_think(thinks) + "{{ if or $think .System }}<|turn>system\n{{ if $think }}<|think|>\n{{ end }}"
              "{{ .System }}<turn|>\n{{ end }}" + _GO_LOOP
              + '{{ if eq .Role "user" }}<|turn>user\n{{ .Content }}<turn|>\n'
              '{{ else if eq .Role "assistant" }}<|turn>model\n{{ .Content }}<turn|>\n{{ end }}'
              + _GO_GEN + "<|turn>model\n{{ if not $think }}<|channel>thought\n<channel|>{{ end }}{{ end }}{{ end }}")
    mode = "thinking (<|think|>)" if thinks else "thinking off (empty thought channel)"
    return ChatTemplate(_name("gemma-4", thinks), jinja, ollama, "<turn|>", ("<turn|>", "<|turn>"), None, True,
                        f"Gemma 4 instruct, text only, {mode}", {"enable_thinking": thinks})


def is_thinking(template: ChatTemplate) -> bool:
    """The record renders in thinking mode (its rows are meant to carry reasoning)."""
    return bool(template.variables.get("enable_thinking"))


def templates() -> list[ChatTemplate]:
    """The reasoning entries of the registry, each family's default mode first."""
    builders = {"qwen-3": _qwen3, "qwen-3.5": _qwen35, "smollm-3": _smollm3, "gemma-4": _gemma4}
    return [builders[f](thinks) for f, default in _THINKS_BY_DEFAULT.items() for thinks in (default, not default)]


def variant(template: ChatTemplate, thinks: bool) -> str:
    """The registry name of ``template``'s family in the given mode (rows with reasoning are
    trained and served thinking; rows without, not thinking)."""
    family = template.name.removesuffix("-no-think").removesuffix("-think")
    return _name(family, thinks)
