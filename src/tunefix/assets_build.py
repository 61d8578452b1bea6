"""Builders behind ``tunefix.assets``: GGUF files in, Hugging Face directories out.

Kept apart from ``assets`` so that looking up a cached path never imports torch or
transformers; these functions run once per cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunefix.model.files import gemma4_tokenizer, read_gguf_vocab

# How each family's real tokenizer handles BOS/EOS, where the vocab-only GGUF (or
# transformers' reading of it) differs from the real checkpoint. Measured: the Llama 3
# vocab GGUF carries no add_bos_token key, so transformers builds a tokenizer that adds
# no BOS, while Meta's tokenizer adds <|begin_of_text|>.
_FAMILY_BOS = {
    "llama-bpe": True,   # Llama 3 / 3.1 / 3.2: adds <|begin_of_text|>
    "llama-spm": True,   # Llama 2 / Mistral: adds <s>
    "phi-3": True,       # Phi-3: the GGUF says add_bos_token = true
    "qwen2": False,      # Qwen2: no BOS at all
    "qwen35": False,     # Qwen3.5: no BOS at all, as Qwen2
    "gpt-2": False,
    "gemma-4": True,
}
# The tokenizer class each family's checkpoint names, where the GGUF reader's differs.
# transformers 5's tokenizer classes rebuild the normalizer and pre-tokenizer from their own
# code on load (tokenizer.json's are ignored): a Qwen3.5 tokenizer saved as Qwen2Tokenizer
# reloads with Qwen2's split, which cuts combining marks off their letters (measured: 3 of
# llama.cpp's 51 reference strings for this vocab then differ).
_TOKENIZER_CLASS = {"qwen35": "Qwen3_5Tokenizer"}
# SentencePiece families: real checkpoints ship tokenizer.model, which llama.cpp's
# converter reads; the vocab GGUF carries its pieces, scores and types.
_SENTENCEPIECE = {"llama-spm", "phi-3"}


def build_sentencepiece_model(vocab: dict, out_file: Path) -> None:
    """Write a SentencePiece ``tokenizer.model`` (BPE, byte fallback) from GGUF vocab data.

    llama.cpp's token types use SentencePiece's enumeration (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte), so each piece keeps its type.
    Written by hand because no library turns a GGUF vocab back into this file.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    types = vocab["token_type"]
    # Only the SentencePiece base vocabulary goes into tokenizer.model; tokens added
    # after it (Phi-3's <|user|>, <|end|>, ... and llama.cpp's [PAD...] fillers, typed
    # UNKNOWN) live in tokenizer.json's added tokens, as in the real checkpoint.
    n_base = next((i for i in range(3, len(types)) if types[i] not in (1, 6)), len(types))
    for text, score, ttype in zip(vocab["tokens"][:n_base], vocab["scores"][:n_base], types[:n_base],
                                  strict=True):
        piece = m.pieces.add()
        piece.piece = text
        piece.score = float(score)
        piece.type = int(ttype)
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n_base
    spec.byte_fallback = True
    spec.unk_id = int(vocab.get("unknown_token_id", 0))
    spec.bos_id = int(vocab.get("bos_token_id", 1))
    spec.eos_id = int(vocab.get("eos_token_id", 2))
    spec.pad_id = -1
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    out_file.write_bytes(m.SerializeToString())


def _drop_added_tokens_beyond(out: Path, n_vocab: int) -> None:
    """Remove tokens transformers invented past the GGUF's vocabulary.

    Measured: reading the Llama 3 vocab GGUF, transformers appends ``<|endoftext|>`` as
    id 128256, a token the real Llama 3 tokenizer does not have (it would make the
    tokenizer one longer than the embedding matrix).
    """
    tj = out / "tokenizer.json"
    data = json.loads(tj.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n_vocab]
    tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tc = out / "tokenizer_config.json"
    cfg = json.loads(tc.read_text(encoding="utf-8"))
    decoder = cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < n_vocab}
    tc.write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _sentencepiece_whitespace(tok) -> None:
    """Give a fast tokenizer SentencePiece's own whitespace handling (add_dummy_prefix).

    SentencePiece, and llama.cpp's SPM tokenizer with ``add_space_prefix`` (its default),
    put one "▁" in front of every piece of text it encodes, even one that already starts
    with a space, and llama.cpp does so again after each special token: " a" is "▁", "▁a"
    and "<s>a" is "<s>", "▁a". transformers' GGUF reader writes a Metaspace pre-tokenizer
    with prepend_scheme "first" (its legacy=False behaviour) instead: no prefix after
    special tokens, and none before text that starts with a space. Measured on the
    llama-spm vocab: 17 of 31 tricky strings differed from llama.cpp. The normalizer of
    transformers' legacy Llama converter (Prepend, then spaces to "▁"; no pre-tokenizer),
    which real Llama 2 and Mistral v0.1 tokenizer.json files carry, matches both.
    """
    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None


def build_tokenizer(name: str, gguf_path: Path, out: Path) -> None:
    """A Hugging Face tokenizer directory from a vocab GGUF, with the family's real BOS policy."""
    from transformers import AutoTokenizer

    if name == "gemma-4":
        tok = gemma4_tokenizer(gguf_path)
    else:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    want_bos = _FAMILY_BOS.get(name)
    if want_bos is not None and tok.bos_token is not None:
        tok.add_bos_token = want_bos
    if not want_bos and name in ("qwen2", "qwen35"):
        # Qwen's real tokenizers have no BOS token at all (bos_token: null).
        tok.bos_token = None
    if name in _SENTENCEPIECE:
        _sentencepiece_whitespace(tok)
    tok.save_pretrained(str(out))
    vocab = read_gguf_vocab(gguf_path)
    _drop_added_tokens_beyond(out, len(vocab["tokens"]))
    if name in _TOKENIZER_CLASS:
        tc = out / "tokenizer_config.json"
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        tc.write_text(json.dumps({**cfg, "tokenizer_class": _TOKENIZER_CLASS[name]}, ensure_ascii=False, indent=2),
                      encoding="utf-8")
    if name in _SENTENCEPIECE:
        build_sentencepiece_model(vocab, out / "tokenizer.model")
    (out / "tunefix-asset.json").write_text(json.dumps(
        {"source": gguf_path.name, "family_tokenizer": name, "add_bos_token": want_bos}, indent=1))


def build_smollm2(gguf_path: Path, out: Path) -> None:
    """Dequantise SmolLM2's GGUF into a bf16 safetensors directory with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from tunefix.model.files import dequantized_gguf_model

    model = dequantized_gguf_model(gguf_path, torch.float32)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gen = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model.generation_config = gen
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


# o200k_base's pre-tokenizer split (the published definition of the encoding; openai-harmony
# embeds the same). With the vocabulary file it fixes every id: tested against openai-harmony.
_O200K_SPLIT = "|".join((
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
))
# o200k_harmony's special tokens after the 199,998 ranks of o200k_base; every other id up to
# 201,087 is <|reserved_N|> (201,088 = gpt-oss's vocab_size).
_HARMONY_SPECIALS = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>",
                     200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>",
                     200008: "<|message|>", 200012: "<|call|>", 200018: "<|endofprompt|>"}
HARMONY_VOCAB_SIZE = 201088


def build_harmony_tokenizer(vocab_file: Path, out: Path) -> None:
    """gpt-oss's tokenizer from ``o200k_base.tiktoken``: byte-level BPE (transformers' tiktoken
    converter), the harmony special tokens, no BOS added, ``<|return|>`` as EOS and
    ``<|endoftext|>`` as pad, as openai/gpt-oss-20b's tokenizer_config.json sets them."""
    import base64

    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalFile(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # the file, not tiktoken's fetch
            lines = Path(tiktoken_url).read_text(encoding="ascii").split()
            return {base64.b64decode(tok): int(rank) for tok, rank in zip(lines[::2], lines[1::2], strict=True)}

    tk = _LocalFile(vocab_file=str(vocab_file), pattern=_O200K_SPLIT).converted()
    first = min(_HARMONY_SPECIALS)
    if tk.get_vocab_size() != first:
        raise ValueError(f"o200k_base has {tk.get_vocab_size()} ranks, expected {first}")
    tk.add_special_tokens([AddedToken(_HARMONY_SPECIALS.get(i, f"<|reserved_{i}|>"), special=True, normalized=False)
                           for i in range(first, HARMONY_VOCAB_SIZE)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|return|>",
                                  pad_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    (out / "tunefix-asset.json").write_text(json.dumps(
        {"source": vocab_file.name, "family_tokenizer": "o200k-harmony", "add_bos_token": False}, indent=1))


def build_tekken_tokenizer(vocab_file: Path, out: Path) -> None:
    """Mistral's Tekken tokenizer from its ``tekken.json``, as transformers converts it, adding
    ``<s>`` as mistral-common's ``encode(text, bos=True)`` does (measured: the converted
    tokenizer adds nothing; mistral-common and Mistral's Hugging Face checkpoints add BOS).

    Files in the old Tekken format (this one) list no special tokens: their table is
    mistral-common's default one, which transformers' converter takes from mistral-common.
    """
    from tunefix._optional import has_module
    from tunefix.errors import TunefixError

    if not has_module("mistral_common"):
        raise TunefixError("building the Tekken tokenizer needs mistral-common (its special-token table)",
                           "pip install mistral-common==1.13.1")
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    # "" stops the converter generating a template with mistral-common; None then saves none
    # (a chat template is the run's choice: the registry's ministral-3, templates/mistral.py)
    tok = convert_tekken_tokenizer(str(vocab_file), chat_template="")
    tok.chat_template = None
    tok.add_bos_token = True
    tok.save_pretrained(str(out))
    (out / "tunefix-asset.json").write_text(json.dumps(
        {"source": vocab_file.name, "family_tokenizer": "tekken", "add_bos_token": True}, indent=1))
