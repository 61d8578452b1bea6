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


@dataclass
class PreferenceResult:
    accuracy: float
    """how often the model gives the chosen answer a higher log-probability than the rejected one"""
    margin: float
    """the mean of log p(chosen) - log p(rejected), summed over each answer's tokens"""
    n: int

    def line(self) -> str:
        return (f"preference accuracy {self.accuracy:.1%} on {self.n} held-out pairs (chosen preferred over "
                f"rejected); mean log-probability margin {self.margin:+.3f}")


def answer_logps(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt), summed over the answer's tokens: the quantity DPO's loss compares."""
    import torch

    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    return float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt_ids):, None]).sum())


def preference_accuracy(model, rows: list[dict]) -> PreferenceResult:
    """Preference accuracy over tokenised pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``):
    ties count as wrong (an untrained model that cannot tell them apart scores 0, not 50%)."""
    model.eval()
    margins = [answer_logps(model, r["prompt_ids"], r["chosen_ids"])
               - answer_logps(model, r["prompt_ids"], r["rejected_ids"]) for r in rows]
    n = len(margins)
    return PreferenceResult(sum(m > 0 for m in margins) / n if n else 0.0, sum(margins) / n if n else 0.0, n)
