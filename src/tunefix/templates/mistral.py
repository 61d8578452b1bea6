"""Mistral's chat formats, one per tokenizer version (the registry's ``mistral-*`` entries).

Mistral publishes its format as code, not as a template: ``mistral-common``'s
``encode_chat_completion`` builds the token ids message by message, and the format changed
with each tokenizer version. The entries here are written to give exactly those ids when
the text is tokenised by the Hugging Face tokenizer of the same files (tested in
``tests/test_mistral_templates.py`` against mistral-common 1.13.1 and its shipped files):

- ``mistral`` (in ``registry.py``, kept under that name): v1, Mistral 7B v0.1/v0.2 and
  Mixtral 8x7B. ``[INST]`` is plain text; ``<s>[INST] Hi [/INST] Hello!</s>``; the system
  prompt opens the first user turn.
- ``mistral-v3``: SentencePiece v2/v3 (Mistral 7B v0.3, Mixtral 8x22B, Codestral 22B).
  ``[INST]``/``[/INST]`` are control tokens: ``<s>[INST] Hi[/INST] Hello!</s>``. The space
  after ``[INST]`` and before the answer is SentencePiece's word-start mark ("▁Hi",
  "▁Hello"), which mistral-common writes because it encodes each message on its own; the
  Hugging Face tokenizer of these files (Metaspace, prepend_scheme "first") turns " Hi"
  into the same "▁Hi".
- ``mistral-v3-tekken``: Tekken v3 (Mistral Nemo, Pixtral 12B): a byte-level BPE that adds
  no word-start mark, so no spaces: ``<s>[INST]Hi[/INST]Hello!</s>``.
- ``mistral-v7``: SentencePiece v7 (Mistral Large 2411, Pixtral Large): the system prompt
  is its own block, ``<s>[SYSTEM_PROMPT] Be brief.[/SYSTEM_PROMPT][INST] Hi[/INST] ...``.
- ``ministral-3``: Tekken v7 and later (Ministral 3, Mistral Small 3.x, Magistral,
  Devstral): ``<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]Hello!</s>``.
  v11/v13/v15 change only tool calls, tool results and model settings, none of which a
  plain conversation has.

Versions 2 and 3 put the system prompt into the LAST user message (mistral-common's
``is_last``), not the first. Ollama can do that too: text/template has no arithmetic, but
a nested ``range`` over ``slice $.Messages $i`` can clear a ``$lastUser`` flag when a later
user message exists (variable assignment, Go 1.11+), so the Go twins are exact. The system
prompt therefore moves with the conversation: a row [system, user, assistant, user,
assistant] trains it in the second user turn, and the inference prompt for the third turn
has it in the third. Measured on the real templates: Nemo's (and Mistral 7B v0.3's) Jinja
writes it only when the last user message is the very last message (``loop.last``), so a
training row that ends with an answer loses its system prompt there; mistral-common keeps
it, and so do these entries.

Published templates for v7 Tekken models add a default system prompt to conversations
without one (Ministral 3 Reasoning: fixed thinking instructions; Mistral Small 3.2: a text
with today's date). These entries write none: a row is trained with the system prompt it
has, and a date would make training rows and Ollama prompts drift apart.

Conventions are the registry's (contents verbatim, a system message only first, BOS
written by the Jinja as Mistral's templates do). There is no assistant header: the
generation prompt is the closing ``[/INST]``.
"""

from __future__ import annotations

from tunefix.templates.record import ChatTemplate

# The control tokens each entry writes as single tokens (v1 writes [INST] as text). Doctor's
# template suggestion requires them to be in the vocabulary and trained.
CONTROL_TOKENS: dict[str, tuple[str, ...]] = {
    "mistral": (),
    "mistral-v3": ("[INST]", "[/INST]"),
    "mistral-v3-tekken": ("[INST]", "[/INST]"),
    "mistral-v7": ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"),
    "ministral-3": ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"),
}

_EOT, _STOP = "</s>", ("</s>", "[INST]")

# A leading system message split off in Jinja (empty when none, as Go's .System is).
_SPLIT_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
)


def _turns_jinja(space: str, system_in_last_user: bool) -> str:
    last_user = ""
    system = ""
    if system_in_last_user:
        last_user = ("{% set ns = namespace(last_user=-1) %}{% for message in loop_messages %}"
                     "{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}")
        system = "{% if loop.index0 == ns.last_user and system %}{{ system + '\\n\\n' }}{% endif %}"
    return (last_user + "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
            "{{ '[INST]" + space + "' }}" + system + "{{ message['content'] + '[/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ '" + space + "' + message['content'] + '</s>' }}"
            "{% endif %}{% endfor %}")


def _turns_go(space: str, system_in_last_user: bool) -> str:
    last_user = system = ""
    if system_in_last_user:
        # $lastUser: no user message after this one ($j is 0 for the message itself).
        last_user = ('{{ $lastUser := true }}{{ range $j, $n := slice $.Messages $i }}'
                     '{{ if and $j (eq $n.Role "user") }}{{ $lastUser = false }}{{ end }}{{ end }}')
        system = "{{ if and $.System $lastUser }}{{ $.System }}\n\n{{ end }}"
    return ('{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}' + last_user + "[INST]" + space + system
            + '{{ .Content }}[/INST]{{ else if eq .Role "assistant" }}' + space + "{{ .Content }}</s>"
            "{{ end }}{{ end }}")


def _v3(name: str, space: str, description: str) -> ChatTemplate:
    jinja = "{{ bos_token }}" + _SPLIT_SYSTEM + _turns_jinja(space, True)
    return ChatTemplate(name, jinja, _turns_go(space, True), _EOT, _STOP, None, True, description)


def _v7(name: str, space: str, description: str) -> ChatTemplate:
    jinja = ("{{ bos_token }}" + _SPLIT_SYSTEM
             + "{% if system %}{{ '[SYSTEM_PROMPT]" + space + "' + system + '[/SYSTEM_PROMPT]' }}{% endif %}"
             + _turns_jinja(space, False))
    ollama = ("{{ if .System }}[SYSTEM_PROMPT]" + space + "{{ .System }}[/SYSTEM_PROMPT]{{ end }}"
              + _turns_go(space, False))
    return ChatTemplate(name, jinja, ollama, _EOT, _STOP, None, True, description)


def mistral_templates() -> list[ChatTemplate]:
    """The versioned Mistral entries (v1 is the registry's ``mistral``)."""
    return [
        _v3("mistral-v3", " ", "Mistral SentencePiece v3 (7B v0.3, Mixtral 8x22B): system in the last user turn"),
        _v3("mistral-v3-tekken", "", "Mistral Tekken v3 (Nemo, Pixtral 12B): system in the last user turn"),
        _v7("mistral-v7", " ", "Mistral SentencePiece v7 (Large 2411): [SYSTEM_PROMPT] block"),
        _v7("ministral-3", "", "Mistral Tekken v7+ (Ministral 3, Small 3.x, Magistral, Devstral): [SYSTEM_PROMPT]"),
    ]
