"""Shared measurements the checks make: rendering a conversation, counting BOS tokens,
finding the end-of-turn token, and finding untrained embedding rows.

Each is computed once per subject (``Probe`` caches them) because several checks use them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from tunefix.doctor.subject import RowMatrix, Subject

ANSWER = "The answer is 42."
CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is six times seven?"},
     {"role": "assistant", "content": ANSWER},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
    # Without a system turn, for templates that refuse one (Gemma, Mistral v1).
    [{"role": "user", "content": "What is six times seven?"},
     {"role": "assistant", "content": ANSWER},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
]
# BOS tokens of families whose models were trained with a BOS at the start of every
# sequence; a missing one silently degrades them.
KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<bos>")
# Relative threshold for untrained rows: a trained row's norm is within an order of
# magnitude of the median (SmolLM2-135M: min/median = 0.57); the never-trained rows of
# Llama 3 base are ~0. 1% of the median separates them with room on both sides, and does
# not depend on the dtype or scale of a checkpoint the way an absolute epsilon would.
UNTRAINED_REL = 0.01


def render(template: str, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render as training and serving do: the token policy's strict sandbox, never
    transformers' ``apply_chat_template`` (the template is untrusted code)."""
    from tunefix.templates.policy import render as render_policy

    return render_policy(tokenizer, template, messages, add_generation_prompt=add_generation_prompt)


@dataclass
class Rendered:
    conversation: list[dict]
    text: str              # the whole conversation
    prompt: str            # the first user turn with the generation prompt


@dataclass
class Untrained:
    ids: list[int]
    matrix: str
    kind: str              # "zero" or "identical"
    median_norm: float


class Probe:
    """``model``: the model in memory when one is loaded (checks that run it, such as the fp16
    probe forward, need it); ``run_dtype``: the compute dtype of the run it is loaded for
    (``torch.float16`` makes fp16 overflow an error); ``lora_targets``: the LoRA targets the
    run asks for (None: tunefix's default, every linear projection)."""

    def __init__(self, subject: Subject, model: Any = None, run_dtype: Any = None,
                 lora_targets: list[str] | str | None = None):
        self.s = subject
        self.model = model
        self.run_dtype = run_dtype
        self.lora_targets = lora_targets

    # ---------------------------------------------------------------- template side
    @functools.cached_property
    def rendered(self) -> Rendered | None:
        s = self.s
        if not s.template or s.tokenizer is None:
            return None
        last_error: Exception | None = None
        for conv in CONVERSATIONS:
            try:
                text = render(s.template, s.tokenizer, conv, add_generation_prompt=False)
                prompt = render(s.template, s.tokenizer, conv[:-3] if conv[0]["role"] == "system"
                                else conv[:1], add_generation_prompt=True)
                return Rendered(conv, text, prompt)
            except Exception as e:  # a template may raise_exception() on a role it refuses
                last_error = e
        self.render_error = last_error
        return None

    @functools.cached_property
    def bos(self) -> tuple[str | None, int | None]:
        tok = self.s.tokenizer
        if tok is None or tok.bos_token is None:
            return None, None
        return tok.bos_token, tok.bos_token_id

    @functools.cached_property
    def tokenizer_adds_bos(self) -> bool:
        """Measured by tokenising, never read from ``add_bos_token`` (unreliable, design.md)."""
        from tunefix.templates.policy import adds_bos

        return self.s.tokenizer is not None and adds_bos(self.s.tokenizer)

    def count_leading_bos(self, ids: list[int]) -> int:
        _, bos_id = self.bos
        n = 0
        while n < len(ids) and ids[n] == bos_id:
            n += 1
        return n

    @functools.cached_property
    def end_of_turn(self) -> tuple[int, str] | None:
        """The token that closes an assistant turn in the template (the token policy's rule)."""
        from tunefix.templates.policy import end_of_turn_text, token_id

        tok = self.s.tokenizer
        if self.rendered is None:
            return None
        text = end_of_turn_text(tok, self.s.template)
        i = token_id(tok, text)
        return (i, text) if i is not None else None

    @functools.cached_property
    def template_ids(self) -> set[int]:
        r, tok = self.rendered, self.s.tokenizer
        if r is None:
            return set()
        return set(tok(r.text + r.prompt, add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def data_ids(self) -> set[int]:
        tok = self.s.tokenizer
        if tok is None or not self.s.data_texts:
            return set()
        ids: set[int] = set()
        for text in self.s.data_texts:
            ids.update(tok(text, add_special_tokens=False)["input_ids"])
        return ids

    # ---------------------------------------------------------------- weight side
    @functools.cached_property
    def untrained(self) -> list[Untrained]:
        found = []
        for m in self.s.matrices():
            found += untrained_rows(m)
        return found

    @functools.cached_property
    def untrained_ids(self) -> set[int]:
        return {i for u in self.untrained for i in u.ids}


@dataclass
class MatrixStats:
    """Everything the checks need from one matrix, read in a single pass."""

    norms: Any          # (rows,) fp32
    proj: Any           # (rows,) int64: bits of each row's projection on two random vectors
    row_sum: Any        # (dim,) fp64, over the finite rows
    nonfinite_rows: int


def matrix_stats(m: RowMatrix) -> MatrixStats:
    """One pass over ``m``: norms, projections, the row sum and the NaN/Inf row count.

    Everything stays in fp32 inside a block (fp64 conversion of a 2 GB matrix cost more
    than the rest together); only the per-block sums are accumulated in fp64. A row holding
    NaN or Inf has a non-finite norm, so no separate isfinite pass is needed.
    """
    import torch

    cached = getattr(m, "_tunefix_stats", None)
    if cached is not None:
        return cached
    gen = torch.Generator().manual_seed(0)
    # Two fp32 projections per row, their bit patterns read as one int64 key: with 128k
    # rows a single fp32 projection collides by chance hundreds of times (birthday bound
    # over 2^24 mantissas), the pair practically never; fp64 costs a 2x conversion pass.
    r = torch.randn(m.shape[1], 2, generator=gen)  # (dim, 2) fp32
    norms, proj = [], []
    row_sum = torch.zeros(m.shape[1], dtype=torch.float64)
    nonfinite = 0
    for _, block in m.blocks():  # block: (rows, dim) fp32
        n = block.norm(dim=1)  # (rows,)
        norms.append(n)
        proj.append((block @ r).contiguous().view(torch.int64).flatten())  # (rows,) int64 keys
        bad = ~torch.isfinite(n)
        if bad.any():
            nonfinite += int(bad.sum())
            block = block[~bad]
        row_sum += block.sum(dim=0).double()
    stats = MatrixStats(torch.cat(norms), torch.cat(proj), row_sum, nonfinite)
    m._tunefix_stats = stats  # type: ignore[attr-defined]
    return stats


def row_norms(m: RowMatrix):
    return matrix_stats(m).norms


def untrained_rows(m: RowMatrix) -> list[Untrained]:
    """Rows never trained: near-zero relative to the median norm, or identical to each other.

    Identical rows (Llama 3.1's lm_head) are found without hashing every row: each row is
    projected on a fixed random vector in float64; only rows sharing a projection value
    are compared exactly. Rows that hold the mean of the trained rows (the doctor's own
    fix) are not reported again.
    """
    import torch

    norms = row_norms(m)
    median = float(norms.median())
    zero = torch.nonzero(norms <= UNTRAINED_REL * median).flatten().tolist()
    identical = _identical_rows(m, set(zero))
    candidates = set(zero) | set(identical)
    if not candidates:
        return []
    mean = _mean_excluding(m, candidates)
    # bf16 storage rounds the mean by up to 2^-8 per element: 1% of its norm covers it,
    # and a zero row is 100% of the mean's norm away, so the two never mix up.
    tol = 0.01 * float(mean.norm()) + 1e-12
    fixed = {i for i in candidates if float((m.rows(i, i + 1)[0] - mean).norm()) <= tol}
    out = []
    zero = [i for i in zero if i not in fixed]
    identical = [i for i in identical if i not in fixed]
    if zero:
        out.append(Untrained(zero, m.name, "zero", median))
    if identical:
        out.append(Untrained(identical, m.name, "identical", median))
    return out


def _identical_rows(m: RowMatrix, skip: set[int]) -> list[int]:
    import torch

    # Identical rows give identical projections; equal projections are only candidates,
    # confirmed by comparing the rows themselves.
    keys = matrix_stats(m).proj
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    same_as_next = sorted_keys[1:] == sorted_keys[:-1]  # (rows-1,)
    identical: list[int] = []
    for pos in torch.nonzero(same_as_next).flatten().tolist():
        a, b = int(order[pos]), int(order[pos + 1])
        if a in skip or b in skip:
            continue
        if torch.equal(m.rows(a, a + 1), m.rows(b, b + 1)):
            identical += [a, b]
    return sorted(set(identical))


def _mean_excluding(m: RowMatrix, skip: set[int]):
    """Mean of the rows not in ``skip``: the one-pass row sum minus the skipped rows."""
    import torch

    stats = matrix_stats(m)
    total = stats.row_sum.clone()
    for i in skip:
        row = m.rows(i, i + 1)[0].double()
        if torch.isfinite(row).all():
            total -= row
    return (total / max(m.shape[0] - len(skip), 1)).float()


def token_names(tokenizer, ids: list[int] | set[int], limit: int = 12) -> list[str]:
    if tokenizer is None:
        return []
    ids = sorted(ids)[:limit]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def special_names_among(tokenizer, ids: set[int], limit: int = 12) -> list[str]:
    """The named special tokens among ``ids`` (the ones users recognise)."""
    if tokenizer is None:
        return []
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    names = [special[i] for i in sorted(ids) if i in special]
    # Named ones first (<|eot_id|>) before the long tail of reserved tokens.
    names.sort(key=lambda n: ("reserved" in n, n))
    return names[:limit]
