"""Builders behind ``tunefix.assets``: GGUF files in, Hugging Face directories out.

Kept apart from ``assets`` so that looking up a cached path never imports torch or
transformers; these functions run once per cache.
"""

from __future__ import annotations

import json
from pathlib import Path

# How each family's real tokenizer handles BOS/EOS, where the vocab-only GGUF (or
# transformers' reading of it) differs from the real checkpoint. Measured: the Llama 3
# vocab GGUF carries no add_bos_token key, so transformers builds a tokenizer that adds
# no BOS, while Meta's tokenizer adds <|begin_of_text|>.
_FAMILY_BOS = {
    "llama-bpe": True,   # Llama 3 / 3.1 / 3.2: adds <|begin_of_text|>
    "llama-spm": True,   # Llama 2 / Mistral: adds <s>
    "phi-3": True,       # Phi-3: the GGUF says add_bos_token = true
    "qwen2": False,      # Qwen2: no BOS at all
    "gpt-2": False,
    "gemma-4": True,
}
# SentencePiece families: real checkpoints ship tokenizer.model, which llama.cpp's
# converter reads; the vocab GGUF carries its pieces, scores and types.
_SENTENCEPIECE = {"llama-spm", "phi-3"}


def read_gguf_vocab(gguf_path: Path) -> dict:
    """Tokens, scores, types and special ids of a GGUF file, as plain Python values."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    out: dict = {}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.model"):
        field = reader.fields.get(key)
        if field is not None:
            out[key.rsplit(".", 1)[1]] = field.contents()
    return out


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


def gemma4_tokenizer(gguf_path: Path):
    """Gemma 4's tokenizer from its vocab GGUF, built with the tokenizers library.

    transformers 5.24 cannot read this GGUF (its config has per-layer num_key_value_heads),
    so the fast tokenizer is assembled from the GGUF's own pieces: SentencePiece-style BPE
    over the merges with byte fallback, spaces as "▁", no space prefix, control tokens
    (type 3) special and user-defined ones (type 4) plain added tokens, BOS added.
    Measured: identical ids to llama.cpp on leading/double spaces, digits, emoji, CJK,
    Cyrillic and special-token text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = read_gguf_vocab(gguf_path)
    import gguf

    merges_field = gguf.GGUFReader(str(gguf_path)).fields["tokenizer.ggml.merges"]
    merges = [tuple(m.split(" ", 1)) for m in merges_field.contents()]
    tokens, types = vocab["tokens"], vocab["token_type"]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                     unk_token="<unk>", fuse_unk=True)
    tk = Tokenizer(bpe)
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == 3])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == 4])
    bos = tokens[int(vocab["bos_token_id"])]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, int(vocab["bos_token_id"]))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=tokens[int(vocab["eos_token_id"])],
                                   unk_token="<unk>", pad_token=tokens[int(vocab.get("padding_token_id", 0))],
                                   mask_token="<mask>")


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
    if not want_bos and name == "qwen2":
        # Qwen2's real tokenizer has no BOS token at all (bos_token: null).
        tok.bos_token = None
    if name in _SENTENCEPIECE:
        _sentencepiece_whitespace(tok)
    tok.save_pretrained(str(out))
    vocab = read_gguf_vocab(gguf_path)
    _drop_added_tokens_beyond(out, len(vocab["tokens"]))
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
