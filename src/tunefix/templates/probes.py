"""A fixed set of conversations used wherever two renderings must be compared."""

from __future__ import annotations

_SYS = {"role": "system", "content": "You are terse.\nAnswer in one line."}
_U1 = {"role": "user", "content": "Hi there! What is {{ 2 + 2 }}?"}
_A1 = {"role": "assistant", "content": "It is 4 — café."}
_U2 = {"role": "user", "content": "And\n\ntwice that?"}
_A2 = {"role": "assistant", "content": "8."}

# Each conversation ends with a user turn (rendered with the generation prompt) or with an
# assistant turn (rendered complete, as for training).
PROBES: list[list[dict[str, str]]] = [
    [_U1],
    [_U1, _A1],
    [_SYS, _U1],
    [_SYS, _U1, _A1],
    [_U1, _A1, _U2],
    [_U1, _A1, _U2, _A2],
    [_SYS, _U1, _A1, _U2, _A2],
    [_SYS, _U1, _A1, _U2],
]


def wants_generation_prompt(messages: list[dict[str, str]]) -> bool:
    return bool(messages) and messages[-1]["role"] != "assistant"
