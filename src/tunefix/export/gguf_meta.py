"""A GGUF file's tokenizer metadata: read it, derive what it must be, patch the difference.

What the metadata must say is measured on the Hugging Face tokenizer (by tokenising,
never by reading attributes, see design.md), because the converter guesses some of it
per architecture. Measured with the pinned converter:

- Gemma (1): ``tokenizer.ggml.eot_token_id`` is hard-coded to 107 (``<end_of_turn>`` in
  Gemma's own vocabulary). With any other vocabulary, 107 is an ordinary token (byte
  ``<0x68>``, "h", in the Llama 2 one) and llama.cpp stops generating on it.
- Gemma 1/2/3: ``tokenizer.ggml.add_space_prefix`` is forced to false (right for Gemma's
  own SentencePiece model, wrong for one that adds the dummy prefix).
- Phi-3: llama.cpp's whitespace handling after special tokens depends on general.name
  (see ``gguf_arch.phi3_name``), so the name may be adjusted too.
- No family gets an explicit end-of-turn id for chatml/Phi-3 templates; llama.cpp then
  guesses it from token texts. We write the id the template actually ends turns with
  (``policy.end_of_turn_id``), so the file's EOS and end-of-turn ids are the stop ids of
  training, evaluation and chat (``policy.stop_ids``).

Patching copies the file with gguf-py's ``copy_with_new_metadata`` (the function behind
its ``gguf_new_metadata`` script) into a temporary file that replaces the original.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tunefix._io import atomic_path
from tunefix.templates import policy

log = logging.getLogger(__name__)

_TOK = "tokenizer.ggml."
CHAT_TEMPLATE = "tokenizer.chat_template"


@dataclass(frozen=True)
class GgufMeta:
    """The tokenizer metadata of one GGUF file (None where the key is absent)."""

    arch: str
    name: str | None
    file_type: int | None
    tokenizer_model: str | None
    n_vocab: int
    chat_template: str | None
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None


def _value(md: dict[str, str], key: str, kind: type):
    raw = md.get(key)
    if raw is None:
        return None
    if kind is bool:
        return raw == "true"
    return kind(raw)


def read_metadata(gguf_file: str | os.PathLike) -> GgufMeta:
    """Read the metadata as llama.cpp itself reads it (a vocab-only load in a child, about a second).

    gguf-py's ``GGUFReader`` parses every token of the vocabulary into Python objects:
    measured 16 s for Qwen2's 151k tokens, against 0.7 s for this.
    """
    from tunefix.llamacpp import LlamaProcess

    with LlamaProcess(gguf_file, vocab_only=True) as llm:
        md, n_vocab = llm.metadata, llm.info["n_vocab"]
    tok = _TOK
    return GgufMeta(
        arch=md["general.architecture"], name=md.get("general.name"),
        file_type=_value(md, "general.file_type", int), tokenizer_model=md.get(tok + "model"),
        n_vocab=n_vocab, chat_template=md.get(CHAT_TEMPLATE),
        add_bos=_value(md, tok + "add_bos_token", bool), add_eos=_value(md, tok + "add_eos_token", bool),
        add_space_prefix=_value(md, tok + "add_space_prefix", bool),
        bos_id=_value(md, tok + "bos_token_id", int), eos_id=_value(md, tok + "eos_token_id", int),
        eot_id=_value(md, tok + "eot_token_id", int), pad_id=_value(md, tok + "padding_token_id", int),
    )


# ------------------------------------------------------------------ what it must say


def load_tokenizer(hf_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


adds_bos = policy.adds_bos  # the one token policy (measured by tokenising)


def adds_eos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id


def adds_space_prefix(tok) -> bool:
    """SentencePiece's dummy prefix: does "a" become "▁a"?"""
    pieces = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"])
    return bool(pieces) and pieces[0].startswith("▁")


def template_of(tok):
    """The chat template a model directory carries, as tunefix trains and serves it (None: none,
    or one that ends turns with no token)."""
    from tunefix.errors import TunefixError
    from tunefix.templates import template_for

    if not isinstance(tok.chat_template, str) or not tok.chat_template:
        return None
    try:
        return template_for(tok)
    except TunefixError:
        return None


def expected_metadata(hf_dir: str | os.PathLike, tok=None, template=None) -> dict[str, object]:
    """The tokenizer keys the GGUF of ``hf_dir`` must carry, measured on its tokenizer.

    ``template``: the run's ``ChatTemplate`` (default: the one the directory's tokenizer
    carries). ``tokenizer.ggml.eot_token_id`` maps to None when the template ends turns with
    EOS (or there is none): then the GGUF must not name one either.
    """
    tok = tok or load_tokenizer(hf_dir)
    template = template or template_of(tok)
    want: dict[str, object] = {
        _TOK + "add_bos_token": adds_bos(tok),
        _TOK + "add_eos_token": adds_eos(tok),
        _TOK + "eot_token_id": policy.end_of_turn_id(tok, template),
    }
    for key, value in ((_TOK + "bos_token_id", tok.bos_token_id), (_TOK + "eos_token_id", tok.eos_token_id),
                       (_TOK + "padding_token_id", tok.pad_token_id)):
        if value is not None:
            want[key] = value
    if isinstance(tok.chat_template, str):
        want[CHAT_TEMPLATE] = tok.chat_template
    return want


def stop_set(meta: GgufMeta) -> set[int]:
    """The stop ids a GGUF's metadata names: EOS and the end-of-turn token."""
    return {i for i in (meta.eos_id, meta.eot_id) if i is not None}


def _spm_expectation(meta: GgufMeta, tok) -> dict[str, object]:
    # Only llama.cpp's SentencePiece tokenizer ("llama") reads add_space_prefix; its
    # default, when the key is absent, is true.
    if meta.tokenizer_model != "llama":
        return {}
    return {_TOK + "add_space_prefix": adds_space_prefix(tok)}


def _current(meta: GgufMeta) -> dict[str, object]:
    return {
        _TOK + "add_bos_token": meta.add_bos, _TOK + "add_eos_token": meta.add_eos,
        _TOK + "eot_token_id": meta.eot_id, _TOK + "bos_token_id": meta.bos_id,
        _TOK + "eos_token_id": meta.eos_id, _TOK + "padding_token_id": meta.pad_id,
        _TOK + "add_space_prefix": True if meta.add_space_prefix is None else meta.add_space_prefix,
        CHAT_TEMPLATE: meta.chat_template,
    }


def metadata_mismatches(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike,
                        tok=None, template=None) -> dict[str, tuple[object, object]]:
    """``{key: (in the file, expected)}`` for every tokenizer key that is wrong."""
    from tunefix.export.gguf_arch import phi3_name

    tok = tok or load_tokenizer(hf_dir)
    meta = read_metadata(gguf_file)
    want = expected_metadata(hf_dir, tok, template) | _spm_expectation(meta, tok)
    have = _current(meta)
    renamed = phi3_name(meta.arch, meta.name or "", tok)
    if renamed:
        want["general.name"], have["general.name"] = renamed, meta.name
    # A missing add_eos_token means false to llama.cpp, like ours.
    if have[_TOK + "add_eos_token"] is None:
        have[_TOK + "add_eos_token"] = False
    return {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}


# ------------------------------------------------------------------------ patching


def _details(key: str, value: object):
    from gguf import GGUFValueType
    from gguf.scripts.gguf_new_metadata import MetadataDetails

    if isinstance(value, bool):
        return MetadataDetails(GGUFValueType.BOOL, value)
    if isinstance(value, int):
        return MetadataDetails(GGUFValueType.UINT32, value)
    return MetadataDetails(GGUFValueType.STRING, value)


def patch_metadata(gguf_file: str | os.PathLike, changes: dict[str, object]) -> None:
    """Rewrite ``gguf_file`` with ``changes`` (a None value removes the key), atomically."""
    from gguf import GGUFReader, GGUFWriter, Keys
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    gguf_file = Path(gguf_file)
    reader = GGUFReader(str(gguf_file), "r")
    new = {k: _details(k, v) for k, v in changes.items() if v is not None}
    remove = [k for k, v in changes.items() if v is None]
    arch = reader.get_field(Keys.General.ARCHITECTURE).contents()
    with atomic_path(gguf_file) as tmp:
        writer = GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        alignment = reader.get_field(Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        # gguf-py draws a progress bar on stderr, unconditionally, for a copy that takes a
        # second: kept out of tunefix's output for the call only.
        with contextlib.redirect_stderr(io.StringIO()):
            copy_with_new_metadata(reader, writer, new, remove)
    del reader  # its memory map of the replaced file


def _shown(value: object) -> str:
    return f"{len(value)} chars" if isinstance(value, str) and len(value) > 40 else repr(value)


def fix_metadata(gguf_file: str | os.PathLike, hf_dir: str | os.PathLike, template=None) -> dict[str, tuple]:
    """Patch every wrong tokenizer key of ``gguf_file``; return what changed (old, new)."""
    wrong = metadata_mismatches(gguf_file, hf_dir, template=template)
    if wrong:
        for key, (old, new) in sorted(wrong.items()):
            log.info("GGUF metadata %s: %s -> %s", key, _shown(old), _shown(new))
        patch_metadata(gguf_file, {k: new for k, (_old, new) in wrong.items()})
    return wrong
