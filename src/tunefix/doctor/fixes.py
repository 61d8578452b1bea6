"""The fixes, applied to a model and tokenizer in memory. Each returns one line saying
what it changed; ``load_model`` prints those lines and ``--fix`` saves the result."""

from __future__ import annotations

import re
from typing import Any

from tunefix.doctor.probe import Probe, untrained_rows
from tunefix.doctor.report import Finding, Report
from tunefix.doctor.subject import _ModuleRows, from_model
from tunefix.families import STOP_TEXTS  # a runtime may end text on these: never a pad

PAD_LIKE = re.compile(r"pad", re.I)
RESERVED_LIKE = re.compile(r"reserved|placeholder|unused", re.I)


def trained_mean(weight, untrained: list[int]):
    """Mean of the trained rows only, in fp32: dividing the sum by all rows (the classic
    mistake) shrinks the mean by the untrained fraction."""
    import torch

    mask = torch.ones(weight.shape[0], dtype=torch.bool)
    mask[untrained] = False
    return weight.detach().float()[mask].mean(dim=0)  # (dim,)


def _matrices(model) -> list[Any]:
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    mats = [("embed_tokens", emb)]
    if out is not None and out.weight is not emb:
        mats.append(("lm_head", out.weight))
    return mats


def fix_untrained_tokens(model, tokenizer, finding: Finding, probe: Probe) -> str:
    import torch

    changed = []
    with torch.no_grad():
        for name, w in _matrices(model):
            ids = sorted({i for u in untrained_rows(_ModuleRows(name, w)) for i in u.ids})
            if not ids:
                continue
            w[ids] = trained_mean(w, ids).to(w.dtype)
            changed.append(f"{len(ids)} rows of {name}")
    return "untrained rows set to the mean of the trained rows: " + ", ".join(changed)


def choose_pad(tokenizer, used: set[int], stop_ids: list[int]) -> int | None:
    """An existing token unused by template and data, pad-like first, then reserved ones."""
    avoid = set(used) | set(stop_ids)
    avoid |= {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) if i is not None}
    candidates = [(i, t.content) for i, t in sorted(tokenizer.added_tokens_decoder.items())
                  if i not in avoid and t.content not in STOP_TEXTS and i < len(tokenizer)]
    for tier in (lambda c: PAD_LIKE.search(c), lambda c: RESERVED_LIKE.search(c), lambda c: True):
        for i, content in candidates:
            if tier(content):
                return i
    # Last before adding a token: <unk>, when neither the template nor the data produce it
    # (byte-fallback vocabularies such as Llama 2's and Mistral's never do) and it is no
    # BOS/EOS/stop. Padding is masked from attention and loss, so any such id serves, and the
    # vocabulary keeps its size: a LoRA adapter then needs no resized embeddings and still
    # fits the user's original base model (in llama.cpp and Ollama too).
    unk = tokenizer.unk_token_id
    others = {tokenizer.bos_token_id, tokenizer.eos_token_id} | set(stop_ids) | set(used)
    if unk is not None and unk not in others and unk < len(tokenizer):
        return unk
    return None


def fix_pad(model, tokenizer, finding: Finding, probe: Probe) -> str:
    import torch

    eot = probe.end_of_turn
    used = probe.template_ids | probe.data_ids | ({eot[0]} if eot else set())
    stops = list(probe.s.stop_ids)
    pad_id = choose_pad(tokenizer, used, stops)
    added = ""
    if pad_id is None:
        text = "<|tunefix_pad|>"
        vocab = tokenizer.get_vocab()
        n = 0
        while text in vocab:  # a text that cannot already be a token
            n += 1
            text = f"<|tunefix_pad_{n}|>"
        tokenizer.add_special_tokens({"pad_token": text})
        pad_id = tokenizer.convert_tokens_to_ids(text)
        old = model.get_input_embeddings().weight.shape[0]
        if pad_id >= old:
            means = [trained_mean(w, []) for _, w in _matrices(model)]
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for (_, w), mean in zip(_matrices(model), means, strict=True):
                    w[old:] = mean.to(w.dtype)
        added = " (added; embeddings resized, new row = trained mean)"
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id
    return f"pad token is now {tokenizer.pad_token} (id {pad_id}){added}"


def fix_double_bos(model, tokenizer, finding: Finding, probe: Probe) -> str:
    tokenizer.add_bos_token = False
    return "tokenizer no longer adds BOS; the chat template writes the one BOS"


def fix_bos_missing(model, tokenizer, finding: Finding, probe: Probe) -> str:
    tokenizer.chat_template = "{{ bos_token }}" + probe.s.template
    tokenizer.add_bos_token = False
    return f"chat template now starts with {tokenizer.bos_token}; tokenizer adds none (one BOS)"


def fix_end_of_turn(model, tokenizer, finding: Finding, probe: Probe) -> str:
    eot_id = finding.evidence["end_of_turn_id"]
    stops = sorted(set(probe.s.stop_ids) | {eot_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    model.generation_config.eos_token_id = stops
    return f"stop ids are now {stops} (added {finding.evidence['end_of_turn']})"


def fix_stop_inside_answer(model, tokenizer, finding: Finding, probe: Probe) -> str:
    inside = set(finding.evidence["stop_ids_inside"])
    stops = [i for i in probe.s.stop_ids if i not in inside]
    model.generation_config.eos_token_id = stops
    return f"stop ids are now {stops} (removed {', '.join(finding.evidence['tokens'])}, written inside answers)"


def fix_gemma_gelu(model, tokenizer, finding: Finding, probe: Probe) -> str:
    from transformers.activations import ACT2FN

    model.config.hidden_act = "gelu_pytorch_tanh"
    if hasattr(model.config, "hidden_activation"):
        model.config.hidden_activation = "gelu_pytorch_tanh"
    # Modules built from the old config hold the exact GELU already: swap the instances.
    for module in model.modules():
        if hasattr(module, "act_fn"):
            module.act_fn = ACT2FN["gelu_pytorch_tanh"]
    return "activation set to gelu_pytorch_tanh"


def fix_sliding_window(model, tokenizer, finding: Finding, probe: Probe) -> str:
    model.config.sliding_window = 2048
    return "sliding_window set to 2048"


def fix_vocab_size(model, tokenizer, finding: Finding, probe: Probe) -> str:
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    means = [trained_mean(w, []) for _, w in _matrices(model)]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for (_, w), mean in zip(_matrices(model), means, strict=True):
            w[old:] = mean.to(w.dtype)
    return f"embeddings resized from {old} to {len(tokenizer)} rows"


def fix_fp16_overflow(model, tokenizer, finding: Finding, probe: Probe) -> str:
    from tunefix.doctor.precision import fix_fp16_overflow as keep_fp32

    return keep_fp32(model, finding.evidence["layers"])


FIXERS = {f.__name__: f for f in (fix_untrained_tokens, fix_pad, fix_double_bos, fix_bos_missing,
                                  fix_end_of_turn, fix_stop_inside_answer, fix_gemma_gelu, fix_sliding_window,
                                  fix_vocab_size, fix_fp16_overflow)}
# Order matters: weights first (the pad choice must not pick a row fixed afterwards is
# fine either way), tokenizer policy next, stop ids last.
ORDER = ["fix_vocab_size", "fix_untrained_tokens", "fix_gemma_gelu", "fix_sliding_window",
         "fix_fp16_overflow", "fix_bos_missing", "fix_double_bos", "fix_pad", "fix_stop_inside_answer", "fix_end_of_turn"]


def apply_fixes(model, tokenizer, report: Report, template: str | None = None,
                data_texts: list[str] | None = None) -> list[str]:
    """Apply every fixable finding of ``report`` to ``model``/``tokenizer`` in memory."""
    if template and template != getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    probe = Probe(from_model(model, tokenizer))
    probe.s.data_texts = list(data_texts or [])
    lines = []
    done: set[str] = set()
    for name in ORDER:
        for f in report.findings:
            if f.fixer == name and not f.fixed and name not in done:
                lines.append(FIXERS[name](model, tokenizer, f, probe))
                done.add(name)
        for f in report.findings:
            if f.fixer == name:
                f.fixed = True
    return lines
