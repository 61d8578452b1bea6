"""Answers to held-out prompts: exact-match accuracy and whether the model stops by itself."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

from tunefix.templates import policy


@dataclass
class EvalResult:
    accuracy: float
    stop_rate: float
    n: int
    answers: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"accuracy {self.accuracy:.1%} on {self.n} held-out rows; stopped by itself "
                f"{self.stop_rate:.1%}")


def normalize(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(f"[{re.escape(string.punctuation)}]", " ", text)
    return " ".join(text.split())


# The one token policy (tunefix.templates.policy); kept under these names for callers.
prompt_ids = policy.prompt_ids
stop_ids = policy.stop_ids


def generate_answers(model, tokenizer, template, conversations, *, max_new_tokens: int = 16,
                     batch_size: int = 16) -> tuple[list[str], list[bool]]:
    """Greedy answers to each conversation's last user turn (left-padded batches)."""
    import torch

    stops = stop_ids(tokenizer, template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    answers, stopped = [], []
    model.eval()
    for start in range(0, len(conversations), batch_size):
        batch = [prompt_ids(tokenizer, template, c) for c in conversations[start:start + batch_size]]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=pad)
        for row in out[:, width:].tolist():
            ended = next((i for i, t in enumerate(row) if t in stops), None)
            stopped.append(ended is not None)
            answers.append(tokenizer.decode(row[:ended] if ended is not None else row, skip_special_tokens=True))
    return answers, stopped


def evaluate(model, tokenizer, template, conversations, *, max_new_tokens: int = 16,
             batch_size: int = 16) -> EvalResult:
    """Exact match of the generated answer against each conversation's last assistant turn."""
    prompts = [c[:-1] for c in conversations if c and c[-1]["role"] == "assistant"]
    expected = [c[-1]["content"] for c in conversations if c and c[-1]["role"] == "assistant"]
    answers, stopped = generate_answers(model, tokenizer, template, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size)
    correct = sum(normalize(a) == normalize(e) for a, e in zip(answers, expected, strict=True))
    n = len(expected)
    return EvalResult(correct / n if n else 0.0, sum(stopped) / n if n else 0.0, n, answers, expected)
