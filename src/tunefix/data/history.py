"""Reasoning in history: does a template render earlier turns as it did when each was the latest?

At inference each assistant turn is generated after the template's rendering of the
conversation so far. Reasoning templates render the latest turn and earlier ones differently:
the real Qwen3, Qwen3.5 and QwQ templates drop the reasoning of turns before the last user
message, and Qwen3 writes an empty ``<think>\\n\\n</think>`` block only on the last turn. So a
multi-turn row rendered in one piece trains every earlier answer in a context the model never
sees at inference (measured on the probe below: Qwen3 renders turn 1 as
``<|im_start|>assistant\\n<think>\\nR1\\n</think>\\n\\nA1`` alone and as
``<|im_start|>assistant\\nA1`` with a turn after it).

A template is *prefix-stable* when, for every assistant turn k, rendering ``messages[:k + 1]``
is a prefix of rendering the whole conversation; then one sequence per row trains every turn
as at inference. Otherwise tokenisation trains each turn in a sequence of its own
(``data.tokenize``) and the doctor says so (``reasoning-in-history``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunefix.errors import TunefixError
from tunefix.templates.policy import render

# The probes: reasoning as a message field (templates reading ``reasoning_content`` or
# ``thinking``) and inline in the content (templates that split ``</think>`` off the content:
# QwQ, the DeepSeek-R1 distills), each also with a system prompt (Mistral's v3 templates move it
# into the last user turn, so the first turn reads otherwise once a second follows). A template
# is prefix-stable only when every probe it renders is; a probe it refuses (Gemma refuses a
# system role) says nothing.
_TURNS = (("What is six times seven?", "Six sevens: 42.", "The answer is 42."),
          ("And six times eight?", "One more six: 48.", "It is 48."))
_FIELD = [m for q, r, a in _TURNS for m in ({"role": "user", "content": q},
                                            {"role": "assistant", "content": a, "reasoning": r})]
_INLINE = [m for q, r, a in _TURNS for m in ({"role": "user", "content": q},
                                             {"role": "assistant", "content": f"<think>\n{r}\n</think>\n\n{a}"})]
_SYSTEM = [{"role": "system", "content": "Answer briefly."}]
PROBES = [_FIELD, _INLINE, _SYSTEM + _FIELD, _SYSTEM + _INLINE]


def changed_turns(tokenizer: Any, template: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Indices of the assistant turns that the whole rendering of ``messages`` shows otherwise
    than inference does: otherwise than the rendering that ends with them (where each was the
    latest), or after another text than the inference prompt (Gemma 4's prompt opens an empty
    thought channel that its rendering of an answered turn leaves out)."""
    whole = render(tokenizer, template, messages)
    changed = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        upto = render(tokenizer, template, messages[:i + 1])
        prompt = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        if not upto.startswith(prompt) or not whole.startswith(upto):
            changed.append(i)
    return changed


def _changed(tokenizer: Any, template: Any, probe: list[dict[str, str]]) -> bool:
    try:
        return bool(changed_turns(tokenizer, template, probe))
    except TunefixError:  # the template refuses this probe (a role, reasoning): no evidence
        return False


def prefix_stable(tokenizer: Any, template: Any) -> bool:
    """True when the template renders every probe's earlier turns as it rendered them last."""
    return not any(_changed(tokenizer, template, probe) for probe in PROBES)


def history_example(tokenizer: Any, template: Any) -> tuple[str, str, str] | None:
    """Where a probe shows inference and the one-piece rendering disagree, on its first assistant
    turn up to the answer: ("history", the turn as rendered when latest, as rendered with a turn
    after it), or ("prompt", the inference prompt's end with the answer, the rendered turn).
    None for a template that renders every turn as inference does."""
    answer = _TURNS[0][2]
    for probe in PROBES:
        if _changed(tokenizer, template, probe):
            first = next(i for i, m in enumerate(probe) if m["role"] == "assistant")
            before = render(tokenizer, template, probe[:first])  # the turns before it, as a common start
            alone, whole = render(tokenizer, template, probe[:first + 1]), render(tokenizer, template, probe)
            n = len(before) if alone.startswith(before) and whole.startswith(before) else 0
            latest, later = alone[n:alone.find(answer) + len(answer)], whole[n:whole.find(answer) + len(answer)]
            if latest != later:
                return "history", latest, later
            prompt = render(tokenizer, template, probe[:first], add_generation_prompt=True)
            return "prompt", prompt[n:] + "…" + answer, latest
    return None
