"""Checks on the chat template and the stop tokens."""

from __future__ import annotations

from tunefix.doctor.probe import Probe
from tunefix.doctor.report import Finding


def missing_chat_template(p: Probe) -> Finding | None:
    if p.s.template:
        return None
    from tunefix.doctor.suggest import suggest_templates

    names = suggest_templates(p)
    return Finding("missing-chat-template", "warning",
                   "no chat template (a base model?): pick one before training on conversations",
                   {"suggested": names},
                   fix=f"pass --template with one of: {', '.join(names) or 'a template file'}")


def template_render_error(p: Probe) -> Finding | None:
    if not p.s.template or p.rendered is not None:
        return None
    err = getattr(p, "render_error", None)
    return Finding("template-error", "error", "the chat template fails to render a plain conversation",
                   {"error": f"{type(err).__name__}: {err}" if err else "unknown"},
                   fix="fix the template's Jinja or pass --template")


def eos_not_end_of_turn(p: Probe) -> Finding | None:
    eot = p.end_of_turn
    if eot is None:
        return None
    stops = set(p.s.stop_ids)
    if p.s.tokenizer is not None and p.s.tokenizer.eos_token_id is not None and not stops:
        stops = {p.s.tokenizer.eos_token_id}
    if eot[0] in stops:
        return None
    tok = p.s.tokenizer
    return Finding("eos-not-end-of-turn", "error",
                   f"the template ends assistant turns with {eot[1]} but generation stops only on "
                   f"{', '.join(tok.convert_ids_to_tokens(sorted(stops))) or 'nothing'}: answers run on",
                   {"end_of_turn": eot[1], "end_of_turn_id": eot[0], "stop_ids": sorted(stops)},
                   fix=f"add {eot[1]} to the stop ids (generation_config eos_token_id)",
                   fixer="fix_end_of_turn")


def no_end_of_turn(p: Probe) -> Finding | None:
    r = p.rendered
    if r is None or p.end_of_turn is not None:
        return None
    return Finding("no-end-of-turn", "warning",
                   "no special token closes an assistant turn in this template: a model trained on it "
                   "has nothing to stop on",
                   {"after_answer": r.text.split("The answer is 42.", 1)[-1][:30]},
                   fix="use a template that ends turns with EOS or an end-of-turn token")


def no_generation_prompt(p: Probe) -> Finding | None:
    from tunefix.doctor.probe import ANSWER, render

    r = p.rendered
    if r is None:
        return None
    conv = r.conversation[:1] if r.conversation[0]["role"] != "system" else r.conversation[:2]
    with_prompt = render(p.s.template, p.s.tokenizer, conv, add_generation_prompt=True)
    without = render(p.s.template, p.s.tokenizer, conv, add_generation_prompt=False)
    if with_prompt != without:
        return None
    # Formats without an assistant header (Mistral: the answer follows [/INST]) need none.
    answered = render(p.s.template, p.s.tokenizer, conv + [{"role": "assistant", "content": ANSWER}],
                      add_generation_prompt=False)
    if answered.startswith(without) and answered[len(without):].lstrip().startswith(ANSWER):
        return None
    return Finding("no-generation-prompt", "warning",
                   "the template ignores add_generation_prompt: inference prompts lack the assistant "
                   "header the model was trained to answer after",
                   {"prompt_end": with_prompt[-30:]}, fix="use a template with a generation prompt")
