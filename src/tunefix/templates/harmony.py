"""gpt-oss's harmony format (text only), in Jinja and Ollama Go, to the ``ChatTemplate`` contract.

Harmony puts every message in ``<|start|>{role}...<|message|>{text}<|end|>`` and splits an
assistant's turn into channels: ``analysis`` (the reasoning; tunefix's message field
``reasoning``, Hugging Face's ``thinking``, Ollama's ``.Thinking``) and ``final`` (the answer).
What the official template (``openai-gpt-oss-120b.jinja``) does, and so this one:

- A fixed system message (identity, knowledge cutoff, date, reasoning effort, channels); the
  user's system prompt becomes the developer message ("# Instructions").
- The last assistant turn of a training row keeps its reasoning and ends with ``<|return|>``,
  the token that ends generation; earlier turns lose their reasoning and end with ``<|end|>``,
  which the model also writes after its reasoning, so ``<|end|>`` is never a stop.
  ``<|call|>`` ends a tool call (tools are out of scope here) and is a stop.
- The generation prompt is ``<|start|>assistant``: the model picks its channel itself.

Pinned where the official template varies, so that training rows and Ollama prompts agree:
the date (the official template writes today's, ``strftime_now``; gpt-oss's release date
here, as llama-3.1 pins its own), the reasoning effort ("medium", its default) and the
model identity (its default). Measured against the official template and openai-harmony's
token ids in tests/test_gpt_oss.py.
"""

from __future__ import annotations

from tunefix.templates.record import ChatTemplate

DATE = "2025-08-05"
REASONING_EFFORT = "medium"
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
SYSTEM = (f"<|start|>system<|message|>{IDENTITY}\nKnowledge cutoff: 2024-06\nCurrent date: {DATE}\n\n"
          f"Reasoning: {REASONING_EFFORT}\n\n# Valid channels: analysis, commentary, final. "
          "Channel must be included for every message.<|end|>")
_DEVELOPER = ("<|start|>developer<|message|># Instructions\n\n", "\n\n<|end|>")
_ANALYSIS = "<|start|>assistant<|channel|>analysis<|message|>"
_FINAL = "<|start|>assistant<|channel|>final<|message|>"
GENERATION_PROMPT = "<|start|>assistant"
STOPS = ("<|return|>", "<|call|>")


def _q(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


_JINJA = (
    "{{ " + _q(SYSTEM) + " }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ " + _q(_DEVELOPER[0]) + " + messages[0]['content'] + " + _q(_DEVELOPER[1]) + " }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ '<|start|>user<|message|>' + message['content'] + '<|end|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    # Only a training row's last turn keeps its reasoning and ends generation (<|return|>).
    "{% if loop.last and not add_generation_prompt %}"
    "{% if message.reasoning %}{{ " + _q(_ANALYSIS) + " + message.reasoning + '<|end|>' }}{% endif %}"
    "{{ " + _q(_FINAL) + " + message['content'] + '<|return|>' }}"
    "{% else %}{{ " + _q(_FINAL) + " + message['content'] + '<|end|>' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ " + _q(GENERATION_PROMPT) + " }}{% endif %}"
)

# Ollama: the contract's add_generation_prompt is "the last message is not the assistant's",
# so the last message being the assistant's is the training case.
_GO = (
    SYSTEM + "{{ if .System }}" + _DEVELOPER[0] + "{{ .System }}" + _DEVELOPER[1] + "{{ end }}"
    "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if eq .Role "user" }}<|start|>user<|message|>{{ .Content }}<|end|>'
    '{{ else if eq .Role "assistant" }}'
    "{{ if $last }}{{ if .Thinking }}" + _ANALYSIS + "{{ .Thinking }}<|end|>{{ end }}"
    + _FINAL + "{{ .Content }}<|return|>"
    "{{ else }}" + _FINAL + "{{ .Content }}<|end|>{{ end }}{{ end }}"
    '{{ if and $last (ne .Role "assistant") }}' + GENERATION_PROMPT + "{{ end }}{{ end }}"
)


def gpt_oss() -> ChatTemplate:
    return ChatTemplate("gpt-oss", _JINJA, _GO, "<|return|>", STOPS, None, False,
                        "gpt-oss (harmony), text only: analysis and final channels, fixed date")
