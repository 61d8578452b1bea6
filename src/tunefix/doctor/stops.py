"""Channels and stops: generation must end exactly where the template ends a final answer.

Reasoning formats put more than one message into one generated turn: gpt-oss writes its
analysis, ``<|end|>``, then ``<|start|>assistant<|channel|>final<|message|>`` and the answer up
to ``<|return|>``; Gemma 4 writes a thought channel before the answer. A stop id that occurs
inside that trained text (gpt-oss's ``<|end|>`` in ``generation_config.eos_token_id``, as
exports that treat every end-of-message token as a stop write it) ends generation after the
reasoning: the final answer is never produced, and nothing fails. The trained part of a probe
conversation is tokenised as training does (``data.tokenize``) and searched for stop ids
before its last token; the stop that ends it must be one of them (``eos-not-end-of-turn``).
"""

from __future__ import annotations

from tunefix.doctor.probe import ANSWER, Probe
from tunefix.doctor.report import Finding
from tunefix.errors import TunefixError

_PROBES = [
    [{"role": "user", "content": "What is six times seven?"},
     {"role": "assistant", "content": ANSWER, "reasoning": "Six sevens make 42."}],
    [{"role": "user", "content": "What is six times seven?"}, {"role": "assistant", "content": ANSWER}],
]


def _inside(p: Probe) -> tuple[list[int], str] | None:
    """Stop ids found inside the trained text of a probe turn (before its last token), with
    that text; None when no probe shows one."""
    from tunefix.data.tokenize import tokenize_conversation
    from tunefix.templates.policy import IGNORE
    from tunefix.templates.record import ChatTemplate

    tok, eot = p.s.tokenizer, p.end_of_turn
    stops = set(p.s.stop_ids)
    template = ChatTemplate("model's own", p.s.template, None, eot[1], (eot[1],))
    for conv in _PROBES:
        try:
            # One single-turn probe: tokenize_rows would also warn, into the user's training
            # output, that the template drops the probe's reasoning.
            rows = [tokenize_conversation(tok, template, conv)]
        except TunefixError:  # a template that refuses the probe says nothing here
            continue
        for row in rows:
            scored = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE]
            found = sorted({i for i in scored[:-1] if i in stops})
            if found:
                return found, tok.decode(scored)
    return None


def stop_inside_answer(p: Probe) -> Finding | None:
    if p.rendered is None or p.end_of_turn is None or not p.s.stop_ids:
        return None
    hit = _inside(p)
    if hit is None:
        return None
    ids, text = hit
    names = p.s.tokenizer.convert_ids_to_tokens(ids)
    return Finding("stop-inside-answer", "error",
                   f"generation stops on {', '.join(names)}, which the template writes inside an "
                   "assistant turn before its end (between reasoning and the final answer): the "
                   "model stops after its reasoning and the answer is never produced",
                   {"stop_ids_inside": ids, "tokens": names, "trained_turn": text[:200]},
                   fix=f"remove {', '.join(names)} from the stop ids (generation_config eos_token_id)",
                   fixer="fix_stop_inside_answer")
