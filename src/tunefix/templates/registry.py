"""The built-in chat templates, each written twice: Jinja (Hugging Face) and Go (Ollama).

The two forms are hand-written to the contract stated on ``ChatTemplate`` and checked
byte-for-byte against each other by the tests (Go's own ``text/template`` runs the Ollama
side). Conventions shared by all of them, and why:

- Message contents are written verbatim (no ``| trim``): Ollama cannot trim, so trimming
  in Jinja alone would make training text and inference prompt differ. tunefix strips
  contents once, when data is standardised.
- A system message is honoured only as the first message, because Ollama hoists every
  system message into ``.System`` at the top.
- The assistant's header sits in the generation prompt; where a family puts a space before
  the answer (mistral, vicuna) that space belongs to the answer, so that a prompt never ends
  in a space that the model would have seen merged into its first token during training.
- Llama 3.1's system header carries a fixed "Today Date: 26 Jul 2024" (its official default):
  a date that changed with the day would make training rows and Ollama prompts drift apart.
"""

from __future__ import annotations

from tunefix.templates.harmony import gpt_oss
from tunefix.templates.mistral import mistral_templates
from tunefix.templates.reasoning import templates as reasoning_templates
from tunefix.templates.record import EOS, ChatTemplate

# Go helpers repeated in every messages-style template: Ollama's idiom for "is this the last
# message" (text/template has no arithmetic) and the generation prompt after a non-assistant
# last message.
_GO_LOOP = '{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'


def _go_gen(header: str) -> str:
    return '{{ if and $last (ne .Role "assistant") }}' + header + '{{ end }}'


_LLAMA3_TURN = ("'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
                "+ message['content'] + '<|eot_id|>'")
_LLAMA3_GEN = "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
_LLAMA3_GO_TURN = ('{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                   '{{ .Content }}<|eot_id|>{{ end }}')
_LLAMA3_GO_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_LLAMA31_DATE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

# "Split off a leading system message" in Jinja, used by templates without a system turn.
_JINJA_SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
)


def _chatml(name: str, default_system: str | None, stop: tuple[str, ...], description: str) -> ChatTemplate:
    jinja_default = go_default = ""
    if default_system:
        jinja_default = ("{% if not messages or messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                         + default_system + "<|im_end|>\\n' }}{% endif %}")
        go_default = "{{ else }}<|im_start|>system\n" + default_system + "<|im_end|>\n"
    jinja = (jinja_default + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' "
             "+ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    ollama = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n" + go_default + "{{ end }}"
              + _GO_LOOP + '{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
              + _go_gen("<|im_start|>assistant\n") + "{{ end }}")
    return ChatTemplate(name, jinja, ollama, "<|im_end|>", stop, default_system, False, description)


def _gemma(name: str, description: str) -> ChatTemplate:
    # Gemma has no system turn: the system prompt opens the first user turn, as Gemma 3's
    # official template does.
    jinja = ("{{ bos_token }}" + _JINJA_SPLIT_SYSTEM + "{% for message in loop_messages %}"
             "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
             "{{ '<start_of_turn>' + role + '\\n' }}{% if loop.first and system %}{{ system + '\\n\\n' }}{% endif %}"
             "{{ message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
    ollama = (_GO_LOOP + '{{ if eq .Role "user" }}<start_of_turn>user\n'
              "{{ if and $.System (le $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
              '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}'
              + _go_gen("<start_of_turn>model\n") + "{{ end }}")
    return ChatTemplate(name, jinja, ollama, "<end_of_turn>", ("<end_of_turn>", "<eos>"), None, True, description)


def _build() -> dict[str, ChatTemplate]:
    t: list[ChatTemplate] = []
    t.append(ChatTemplate(
        "llama-3",
        "{{ bos_token }}{% for message in messages %}{{ " + _LLAMA3_TURN + " }}{% endfor %}" + _LLAMA3_GEN,
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        + _GO_LOOP + _LLAMA3_GO_TURN + _go_gen(_LLAMA3_GO_HEADER) + "{{ end }}",
        "<|eot_id|>", ("<|eot_id|>", "<|end_of_text|>"), None, True, "Llama 3.0 instruct"))
    t.append(ChatTemplate(
        "llama-3.1",
        "{{ bos_token }}" + _JINJA_SPLIT_SYSTEM
        + "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n" + _LLAMA31_DATE.replace("\n", "\\n")
        + "' + system + '<|eot_id|>' }}{% for message in loop_messages %}{{ " + _LLAMA3_TURN + " }}{% endfor %}"
        + _LLAMA3_GEN,
        "<|start_header_id|>system<|end_header_id|>\n\n" + _LLAMA31_DATE + "{{ .System }}<|eot_id|>"
        + _GO_LOOP + _LLAMA3_GO_TURN + _go_gen(_LLAMA3_GO_HEADER) + "{{ end }}",
        "<|eot_id|>", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"), None, True,
        "Llama 3.1/3.2/3.3 instruct, fixed date header"))
    t.append(_chatml("chatml", None, ("<|im_end|>", "<|im_start|>"), "ChatML (SmolLM2, Hermes, ...)"))
    t.append(_chatml("qwen-2.5", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                     ("<|im_end|>", "<|endoftext|>"), "Qwen 2 / 2.5 instruct (ChatML with a default system)"))
    t.append(ChatTemplate(
        "mistral",
        "{{ bos_token }}" + _JINJA_SPLIT_SYSTEM + "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' }}{% if loop.first and system %}{{ system + '\\n\\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + message['content'] + '</s>' }}{% endif %}{% endfor %}",
        _GO_LOOP + '{{ if eq .Role "user" }}[INST] {{ if and $.System (le $i 1) }}{{ $.System }}\n\n{{ end }}'
        '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}',
        "</s>", ("</s>", "[INST]"), None, True, "Mistral / Mixtral instruct (system in the first turn)"))
    t.append(_gemma("gemma", "Gemma 1 and 2 instruct (system prompt opens the first user turn)"))
    t.append(_gemma("gemma-3", "Gemma 3 instruct, text only"))
    t.append(ChatTemplate(
        "phi-3",
        "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] "
        "+ '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}" + _GO_LOOP
        + '{{ if ne .Role "system" }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}'
        + _go_gen("<|assistant|>\n") + "{{ end }}",
        "<|end|>", ("<|end|>", "<|endoftext|>"), None, True, "Phi-3 / Phi-3.5 instruct"))
    alpaca_system = ("Below is an instruction that describes a task. "
                     "Write a response that appropriately completes the request.")
    t.append(ChatTemplate(
        "alpaca",
        _JINJA_SPLIT_SYSTEM + "{{ (system or '" + alpaca_system + "') + '\\n\\n' }}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}",
        "{{ if .System }}{{ .System }}{{ else }}" + alpaca_system + "{{ end }}\n\n" + _GO_LOOP
        + '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}' + EOS + "\n\n{{ end }}"
        + _go_gen("### Response:\n") + "{{ end }}",
        EOS, (EOS, "### Instruction:"), alpaca_system, False, "Stanford Alpaca (multi-turn by repetition)"))
    vicuna_system = ("A chat between a curious user and an artificial intelligence assistant. "
                     "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    t.append(ChatTemplate(
        "vicuna",
        _JINJA_SPLIT_SYSTEM + "{{ (system or \"" + vicuna_system + "\") + ' ' }}"
        "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ 'USER: ' + message['content'] + ' ' }}{% elif message['role'] == 'assistant' %}"
        "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
        "{{ if .System }}{{ .System }}{{ else }}" + vicuna_system + "{{ end }} " + _GO_LOOP
        + '{{ if eq .Role "user" }}USER: {{ .Content }} {{ else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}'
        + EOS + "{{ end }}" + _go_gen("ASSISTANT:") + "{{ end }}",
        EOS, (EOS, "USER:"), vicuna_system, False, "Vicuna v1.1"))
    t.append(ChatTemplate(
        "zephyr",
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "{{ if .System }}<|system|>\n{{ .System }}" + EOS + "\n{{ end }}" + _GO_LOOP
        + '{{ if ne .Role "system" }}<|{{ .Role }}|>\n{{ .Content }}' + EOS + "\n{{ end }}"
        + _go_gen("<|assistant|>\n") + "{{ end }}",
        EOS, (EOS, "<|user|>"), None, False, "Zephyr (HuggingFaceH4)"))
    t += mistral_templates()  # v3, v3 Tekken, v7, Tekken v7 (``mistral`` above is v1)
    t.append(gpt_oss())  # harmony (templates/harmony.py)
    t += reasoning_templates()  # Qwen3, Qwen3.5, SmolLM3, Gemma 4, thinking on and off (templates/reasoning.py)
    return {x.name: x for x in t}


REGISTRY: dict[str, ChatTemplate] = _build()
