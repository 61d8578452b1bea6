"""Which chat templates suit a model without one: never an instruct template whose
special tokens are missing or untrained in this model."""

from __future__ import annotations

from tunefix.doctor.probe import Probe

# The registry templates a model without one may be offered: (name, the special tokens it
# writes). The thinking entries are left out: a base model has no reasoning to be trained on.
SUGGESTIONS = [
    ("llama-3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    ("chatml", ["<|im_start|>", "<|im_end|>"]),
    ("qwen-2.5", ["<|im_start|>", "<|im_end|>"]),
    ("phi-3", ["<|user|>", "<|assistant|>", "<|end|>"]),
    ("gemma", ["<start_of_turn>", "<end_of_turn>"]),
    ("gemma-4", ["<|turn>", "<turn|>"]),
    ("gpt-oss", ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"]),
    ("mistral", []),  # v1 ([INST] is text); suggest_templates picks the version
    ("alpaca", []),
    ("vicuna", []),
    ("zephyr", []),
]


def suggest_templates(p: Probe) -> list[str]:
    tok = p.s.tokenizer
    if tok is None:
        return []
    vocab = tok.get_vocab()
    untrained = p.untrained_ids
    out = []
    for name, specials in SUGGESTIONS:
        if name == "mistral":  # one Mistral entry: the version this vocabulary was made for
            from tunefix.templates.mistral import CONTROL_TOKENS
            from tunefix.templates.select import mistral_template

            name = mistral_template(tok)
            specials = list(CONTROL_TOKENS[name])
        ids = [vocab.get(t) for t in specials]
        if all(i is not None and i not in untrained for i in ids):
            out.append(name)
    return out
