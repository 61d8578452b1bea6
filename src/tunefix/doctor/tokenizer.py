"""Checks on the tokenizer and its special tokens: BOS, pad, vocabulary size."""

from __future__ import annotations

from tunefix.doctor.probe import KNOWN_BOS, Probe
from tunefix.doctor.report import Finding


def double_bos(p: Probe) -> Finding | None:
    """The template writes BOS and the tokenizer adds one too."""
    r, (bos_text, _) = p.rendered, p.bos
    if r is None or bos_text is None or not r.text.startswith(bos_text):
        return None
    tok = p.s.tokenizer
    via_tokenizer = p.count_leading_bos(tok(r.prompt)["input_ids"])
    gguf_two = bool(p.s.gguf_add_bos)
    if via_tokenizer < 2 and not gguf_two:
        return None
    if gguf_two:
        severity, where = "error", ("llama.cpp and Ollama: the GGUF sets add_bos_token = true and its "
                                    "template writes BOS, so every prompt starts with two")
    else:
        # tunefix's own paths tokenise rendered text without special tokens (design.md), so
        # this bites only a user who calls the tokenizer on rendered text.
        severity, where = "warning", ("`tokenizer(rendered_chat)` gives two BOS tokens: the template writes "
                                      "BOS and the tokenizer adds another")
    return Finding("double-bos", severity, where,
                   {"bos": bos_text, "leading_bos_via_tokenizer": via_tokenizer,
                    "gguf_add_bos_token": p.s.gguf_add_bos},
                   fix="keep the template's BOS and stop the tokenizer adding one (add_bos_token = false)",
                   fixer="fix_double_bos")


def bos_missing(p: Probe) -> Finding | None:
    """A family trained with BOS gets none when a chat is rendered and tokenised."""
    r, (bos_text, _) = p.rendered, p.bos
    if r is None or bos_text is None:
        return None
    needs_bos = bos_text in KNOWN_BOS or p.tokenizer_adds_bos or bool(p.s.gguf_add_bos)
    if not needs_bos or r.text.startswith(bos_text):
        return None
    return Finding("bos-missing", "warning",
                   f"the chat template does not write {bos_text}, so `apply_chat_template(tokenize=True)` "
                   "and any path that adds no special tokens starts without the BOS this model was trained with",
                   {"bos": bos_text, "tokenizer_adds_bos": p.tokenizer_adds_bos,
                    "template_starts": r.text[:40]},
                   fix="write BOS in the template and stop the tokenizer adding one: one BOS on every path",
                   fixer="fix_bos_missing")


def pad_token(p: Probe) -> Finding | None:
    """Pad missing, or equal to EOS / the end-of-turn token (then EOS is masked from the loss)."""
    tok = p.s.tokenizer
    if tok is None:
        return None
    if tok.pad_token_id is None:
        return Finding("pad-missing", "warning",
                       "the tokenizer has no pad token: batching needs one, and the usual shortcut "
                       "(pad = eos) masks the end of every answer out of the loss",
                       {"eos": tok.eos_token},
                       fix="use an unused existing token as pad (or add one)", fixer="fix_pad")
    eot = p.end_of_turn
    pad = tok.pad_token_id
    if eot is not None and pad == eot[0]:
        severity, what = "error", "the end-of-turn token"
    elif pad == tok.eos_token_id:
        # With a template whose turns end with another token, EOS is trained only by raw
        # text (continued pretraining): a smaller risk than a masked end of turn.
        severity = "warning" if eot is not None else "error"
        what = "EOS"
    else:
        return None
    return Finding("pad-is-eos", severity,
                   f"pad token {tok.pad_token} is also {what}: the collator masks pad positions out of "
                   "the loss, so the model never learns to stop",
                   {"pad": tok.pad_token, "pad_id": pad, "eos": tok.eos_token,
                    "end_of_turn": eot[1] if eot else None},
                   fix="use an existing token unused by the template and data as pad (or add one)",
                   fixer="fix_pad")


def vocab_size_mismatch(p: Probe) -> Finding | None:
    tok, emb = p.s.tokenizer, p.s.embed
    if tok is None or emb is None:
        return None
    rows = emb.shape[0]
    max_id = max(tok.get_vocab().values())
    if len(tok) <= rows and max_id < rows:
        return None
    return Finding("vocab-size-mismatch", "error",
                   f"the tokenizer has {len(tok)} tokens (largest id {max_id}) but the embeddings hold "
                   f"{rows} rows: those ids index past the matrix",
                   {"tokenizer_tokens": len(tok), "max_id": max_id, "embedding_rows": rows},
                   fix="resize the embeddings (new rows = mean of the trained rows)", fixer="fix_vocab_size")
