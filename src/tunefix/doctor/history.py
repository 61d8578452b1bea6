"""Reasoning in history: a template that renders earlier turns otherwise than at inference.

Measured by ``data.history`` on probe conversations with reasoning (as a field and inline in
``<think>`` tags): the real Qwen3, Qwen3.5 and QwQ templates drop the reasoning of earlier
turns (Qwen3 also writes an empty think block on the last turn only), so one rendering of a
multi-turn row is not what the model sees before each earlier answer at inference. Mistral's
v3 templates, which move the system prompt into the last user turn, are caught the same way.
"""

from __future__ import annotations

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding
from tunefix.errors import TunefixError


def reasoning_in_history(p: Probe) -> Finding | None:
    from tunefix.data.history import history_example

    if p.rendered is None:  # no template, or one that fails (template-error says so)
        return None
    try:
        example = history_example(p.s.tokenizer, p.s.template)
    except TunefixError:  # a template that refuses reasoning or four turns: nothing to compare
        return None
    if example is None:
        return None
    kind, first, second = example
    if kind == "prompt":
        return Finding("reasoning-in-history", "warning",
                       "the chat template's inference prompt is not the start of its rendering of the "
                       "answered turn (e.g. the prompt opens an empty thought channel the rendered answer "
                       "lacks): a row rendered in one piece trains answers after a text the model never "
                       "sees at inference",
                       {"inference": first, "rendered": second},
                       fix="tunefix trains each assistant turn as a sequence of its own: the inference "
                           "prompt, then the answer (train_turns auto, the default)")
    return Finding("reasoning-in-history", "warning",
                   "the chat template renders an assistant turn otherwise once a later turn follows "
                   "(it drops or rewrites the reasoning, writes a think block on the last turn only, or "
                   "moves the system prompt): "
                   "a multi-turn row rendered in one piece would train earlier answers in a context the "
                   "model never sees at inference",
                   {"turn_when_latest": first, "same_turn_in_history": second},
                   fix="tunefix trains each assistant turn as a sequence of its own, its history rendered "
                       "as at inference (train_turns auto, the default); train_turns last trains only each "
                       "row's last turn")
