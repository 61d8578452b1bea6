"""Model files, read without running them: paths, config.json, the weights' kind, the
remote-code and pickle policy, safetensors and GGUF headers, and a GGUF as a transformers model.

The model layer's ground floor: the doctor (which examines these files) and ``load_model``
(which loads them with the doctor's fixes) both build on it; it imports neither.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError
from tunefix.families import GGUF_ARCHES, SUPPORTED, family_of

# ---------------------------------------------------------------------- families



def unsupported_family(family: str, architectures: list | None = None) -> TunefixError:
    """The one-line refusal of a model family tunefix cannot train or export."""
    arch = f" ({', '.join(map(str, architectures))})" if architectures else ""
    return TunefixError(f"model family {family!r}{arch} is not supported by tunefix",
                        f"Pass a model of a supported family: {', '.join(SUPPORTED)} "
                        "(e.g. Llama 2/3, SmolLM2, Mistral, Qwen2.x, Phi-3, Gemma 1/2/3)")


def check_model_family(path: Path) -> None:
    """Refuse a Hugging Face model directory of an unsupported family from its config.json
    alone, before any weight is read or any file written: otherwise transformers fails on its
    own registry (for a type it does not know) or llama.cpp's converter fails minutes into an
    export. A directory whose config.json names no model (a tunefix run's) passes, as does an
    unreadable one (the loader reports it with its own message).
    """
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    family = config.get("model_type")
    architectures = config.get("architectures")
    architectures = architectures if isinstance(architectures, list) else None
    if not family and not architectures:
        return
    if family not in SUPPORTED:
        raise unsupported_family(str(family or "unknown"), architectures)



# ------------------------------------------------------------------------ paths


def resolve_model_path(model: str) -> Path:
    """A directory, a .gguf file, or a hub id found in the local Hugging Face cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.count("/") == 1 and not model.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(model, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            raise TunefixError(f"{model} is not a path and not in the local Hugging Face cache "
                               f"({type(e).__name__})",
                               "tunefix works offline: download it once where you have access "
                               "(huggingface-cli download), or pass a local directory") from None
    raise TunefixError(f"{model}: no such file or directory", "Pass a model directory or a .gguf file")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TunefixError(f"{path} is not readable JSON ({e.__class__.__name__}: {e})",
                           "Fix the file, or download or save the model again") from None


# ------------------------------------------------------------------ untrusted model files

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def weights_kind(directory: Path, allow_pickle: bool) -> str:
    """"safetensors", or "pickle" when only pickle weights exist and the user opted in.

    Pickle files (``pytorch_model.bin``, ``*.pt``) can run arbitrary code when unpickled;
    they are refused unless ``--allow-pickle`` is given, and then read with torch's
    ``weights_only=True`` loader, which accepts tensors and plain containers only.
    """
    if any(directory.glob("*.safetensors")):
        return "safetensors"
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
                     and p.name != "training_args.bin")
    if not pickles:
        raise TunefixError(f"{directory} holds no weights (no *.safetensors, no pickle files)",
                           "Pass the directory that holds the model's *.safetensors files")
    if not allow_pickle:
        raise TunefixError(f"{directory} has pickle weights only ({', '.join(pickles[:3])}), which can run "
                           "code when loaded",
                           "Convert them to safetensors, or pass --allow-pickle if you trust the files "
                           "(they are then loaded with weights_only=True)")
    return "pickle"


def check_model_code(directory: Path, trust_remote_code: bool) -> None:
    """Refuse a model whose config or tokenizer needs Python code shipped with it.

    ``auto_map`` names classes in ``.py`` files of the model repository; transformers runs
    them with ``trust_remote_code=True``. A config whose ``model_type`` transformers knows
    loads with the built-in class instead (many repos keep a stale ``auto_map``), so only
    unknown types count.
    """
    if trust_remote_code:
        return
    needs: list[str] = []
    config_file = directory / "config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    if isinstance(config, dict) and config.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            needs.append(f"config.json auto_map {_classes(config['auto_map'])}")
    tok_file = directory / "tokenizer_config.json"
    tok_config = read_json(tok_file) if tok_file.is_file() else {}
    if isinstance(tok_config, dict) and tok_config.get("auto_map"):
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        name = tok_config.get("tokenizer_class")
        try:
            known = bool(name) and tokenizer_class_from_name(str(name)) is not None
        except Exception:  # an odd name is as unknown as a missing one
            known = False
        if not known:
            needs.append(f"tokenizer_config.json auto_map {_classes(tok_config['auto_map'])}")
    if needs:
        raise TunefixError(f"{directory} needs its own Python code to load ({'; '.join(needs)}); "
                           "tunefix runs no code from model files by default",
                           "Pass --trust-remote-code if you trust the code in that directory")


def _classes(auto_map: Any) -> str:
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    flat = [v for x in values for v in (x if isinstance(x, list) else [x]) if v]
    return ", ".join(str(v) for v in flat[:3])


def load_pickle_weights(directory: Path) -> dict[str, Any]:
    """Every tensor of a directory's pickle weights, read with ``weights_only=True``."""
    import torch

    tensors: dict[str, Any] = {}
    for f in sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin"):
        try:
            loaded = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError for anything beyond tensors, or a broken file
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise TunefixError(f"{f}: refused or unreadable pickle ({first[:160]})",
                               "The file holds more than tensors or is corrupt; convert the model to "
                               "safetensors with code you trust") from None
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise TunefixError(f"{f} holds a {type(loaded).__name__}, not a state dict of tensors")
        tensors.update({k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)})
    return tensors



# --------------------------------------------------------------------- headers


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise TunefixError(f"{file} is not a readable safetensors file ({e})",
                           "The file is truncated or corrupt: download or save it again") from None
    if not isinstance(header, dict):
        raise TunefixError(f"{file} is not a readable safetensors file (its header is not a JSON object)",
                           "The file is truncated or corrupt: download or save it again")
    header.pop("__metadata__", None)
    return header, 8 + n




_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


_GGUF_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _gguf_value(f, vtype: int, keep: bool) -> Any:
    """The value at the file position (scalars and strings when ``keep``; else skipped by
    seeking, arrays always)."""
    import struct

    if vtype in _GGUF_SCALARS:
        raw = _read(f, _GGUF_SCALARS[vtype])
        return struct.unpack(_GGUF_FORMATS[vtype], raw)[0] if keep else None
    if vtype == _GGUF_STRING:
        n = struct.unpack("<Q", _read(f, 8))[0]
        if keep:
            return _read(f, min(n, 1 << 20)).decode("utf-8", "replace")
        f.seek(n, 1)
        return None
    if vtype == _GGUF_ARRAY:
        etype, count = struct.unpack("<IQ", _read(f, 12))
        if etype in _GGUF_SCALARS:
            f.seek(_GGUF_SCALARS[etype] * count, 1)
        else:
            for _ in range(count):
                _gguf_value(f, etype, False)
        return None
    raise ValueError(vtype)


def gguf_header_values(file: Path, wanted: set[str], max_keys: int = 512) -> dict[str, Any]:
    """The scalar and string values of ``wanted`` keys, read from the GGUF header alone (no
    tensor data; arrays such as the vocabulary are skipped by seeking).

    gguf-py's reader parses every key first (16 s on a 151k vocab). Stops when every wanted
    key is found; an unreadable header gives what was read before it.
    """
    import struct

    found: dict[str, Any] = {}
    try:
        with open(file, "rb") as f:
            if _read(f, 4) != b"GGUF":
                return found
            _version, _tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
            for _ in range(min(n_kv, max_keys)):
                key_len = struct.unpack("<Q", _read(f, 8))[0]
                if key_len > 65536:
                    return found
                key = _read(f, key_len).decode("utf-8", "replace")
                got = _gguf_value(f, struct.unpack("<I", _read(f, 4))[0], key in wanted)
                if key in wanted and got is not None:
                    found[key] = got
                    if len(found) == len(wanted):
                        break
    except (OSError, EOFError, ValueError, struct.error):
        pass
    return found


def gguf_tensors(file: Path) -> dict[str, tuple[int, int]]:
    """Tensor name -> (ggml type, absolute data offset), read from the header by seeking past
    the key/value section (gguf-py's reader: 15 s on the tiny Llama's 128k vocabulary; this
    0.2 s). Empty for a file that is not a GGUF."""
    import struct

    out: dict[str, tuple[int, int]] = {}
    alignment = 32  # general.alignment's default; the pinned converter writes no other
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":
            return out
        _version, n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
        for _ in range(n_kv):
            f.seek(struct.unpack("<Q", _read(f, 8))[0], 1)
            _gguf_value(f, struct.unpack("<I", _read(f, 4))[0], False)
        infos = []
        for _ in range(n_tensors):
            name = _read(f, struct.unpack("<Q", _read(f, 8))[0]).decode("utf-8", "replace")
            n_dims = struct.unpack("<I", _read(f, 4))[0]
            f.seek(8 * n_dims, 1)
            ggml_type, offset = struct.unpack("<IQ", _read(f, 12))
            infos.append((name, ggml_type, offset))
        start = -(-f.tell() // alignment) * alignment
    return {name: (ggml_type, start + offset) for name, ggml_type, offset in infos}


def gguf_architecture(file: Path, max_keys: int = 64) -> str | None:
    """``general.architecture`` from the GGUF header (by convention its first key); None when
    it cannot be found."""
    arch = gguf_header_values(file, {"general.architecture"}, max_keys).get("general.architecture")
    return arch if isinstance(arch, str) else None


def check_gguf_architecture(file: Path) -> str:
    """The GGUF's architecture when tunefix supports it; a TunefixError otherwise."""
    arch = gguf_architecture(file)
    if arch is None:
        raise TunefixError(f"{file} is not a readable GGUF file (no general.architecture in its header)",
                           "The file is truncated or corrupt: download or convert it again")
    if arch not in GGUF_ARCHES:
        raise TunefixError(f"{file}: GGUF architecture {arch!r} is not supported",
                           f"Supported: {', '.join(GGUF_ARCHES)}; for another family pass its Hugging Face "
                           "directory")
    return arch


def check_gguf_magic(file: Path) -> None:
    """A one-line TunefixError unless ``file`` starts as a GGUF file does."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TunefixError(f"{file} is not a GGUF file (it starts with {magic!r})",
                           "Pass a .gguf file written by llama.cpp, or a model directory")


def require_gguf(file: Path) -> str:
    """A GGUF file of a supported architecture (its magic, then its header): the
    architecture, or a one-line TunefixError."""
    check_gguf_magic(file)
    return check_gguf_architecture(file)


# ------------------------------------------------------------------ GGUF as a model


def read_gguf_model(path: Path, dtype):
    """Model and tokenizer from a GGUF file (dequantised), with one-line errors."""
    try:
        return _read_gguf(path, dtype)
    except TunefixError:
        raise
    except Exception as e:  # transformers/gguf-py raise many types for a bad or foreign file
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise TunefixError(f"cannot load {path} as a model ({type(e).__name__}: {first[:160]})",
                           f"Pass a GGUF of a supported family ({', '.join(SUPPORTED)}) written by "
                           "llama.cpp, or a Hugging Face directory") from None


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
    named = {bos, tokens[int(vocab["eos_token_id"])], "<unk>", "<mask>", tokens[int(vocab.get("padding_token_id", 0))]}
    # The other control tokens (<|turn>, <turn|>, <|think|>, ...) are listed as special too: the
    # converter types a token CONTROL only when the tokenizer lists it among its special ids, and
    # llama.cpp then parses it in text (measured: without this an export typed <|turn> NORMAL and
    # llama.cpp read it as "<", "|", "turn", ">").
    extra = [tokens[i] for i, t in enumerate(types) if t == 3 and tokens[i] not in named]
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=tokens[int(vocab["eos_token_id"])],
                                   unk_token="<unk>", pad_token=tokens[int(vocab.get("padding_token_id", 0))],
                                   mask_token="<mask>", additional_special_tokens=extra)


# GGUF architectures transformers 5.24 maps but reads wrongly: refused with the reason rather
# than loaded as another model (measured on the tiny gpt-oss: rope_type and the YaRN betas came
# back as raw arrays, the factor as 27 and the original context as 44 instead of 32 and 4096).
GGUF_MISREAD = {"gpt-oss": "transformers 5.24 misreads its YaRN RoPE keys"}


def _read_gguf(path: Path, dtype):
    from transformers import AutoTokenizer

    require_gguf(path)  # transformers would load a Mamba GGUF as a Mamba model
    arch = gguf_architecture(path)
    if arch in GGUF_MISREAD:
        raise TunefixError(f"cannot read {path.name} as a trainable model: {GGUF_MISREAD[arch]}",
                           "Pass the model's Hugging Face directory (the GGUF itself runs in llama.cpp)")
    if arch == "gemma4":  # transformers' tokenizer reading fails on its config
        return dequantized_gguf_model(path, dtype), gemma4_tokenizer(path)
    return dequantized_gguf_model(path, dtype), AutoTokenizer.from_pretrained(str(path.parent),
                                                                             gguf_file=path.name)


# GGUF keys transformers 5.24's GGUF loader does not map into the config although the tensor
# shapes depend on them: without them it builds the default-shaped model and refuses the file
# (measured: Qwen3's head_dim 64 read as hidden/heads, the experts' width as the dense one).
# config field -> GGUF key under the architecture's prefix
_GGUF_CONFIG_GAPS = {"head_dim": "attention.key_length", "moe_intermediate_size": "expert_feed_forward_length"}


def gguf_config(path: Path):
    """The transformers config of a GGUF, with the shape keys its loader leaves out."""
    from transformers import AutoConfig

    arch = gguf_architecture(path)
    if arch == "gemma4":
        return _gemma4_config(path)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    keys = {f"{arch}.{k}": name for name, k in _GGUF_CONFIG_GAPS.items() if hasattr(config, name)}
    for key, value in gguf_header_values(path, set(keys)).items():
        setattr(config, keys[key], int(value))
    family = family_of(config.model_type)
    if hasattr(config, "query_pre_attn_scalar") and family is not None \
            and config.num_hidden_layers != family.layers_27b:
        # Gemma 2/3: the GGUF has no such key; llama.cpp scales attention by head_dim ** -0.5
        # (the 27B models aside), so the model read back must too (export/gguf_arch.py).
        config.query_pre_attn_scalar = config.head_dim
    return config


def dequantized_gguf_model(path: Path, dtype):
    """A GGUF checkpoint as an ordinary (savable, trainable) transformers model.

    transformers dequantises GGUF weights but marks the model "quantized with gguf" and
    refuses ``save_pretrained`` on it, so the model is rebuilt from its config without the
    quantization config and given the state dict.
    """
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                  config=gguf_config(path))
    config = loaded.config
    if hasattr(config, "quantization_config"):  # dequantised: plain tensors now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head is absent from the state dict of a tied model; nothing else may be.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF rebuild of {path.name}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if config.model_type == "gemma4_text":
        _gemma4_layer_scalars(path, model)
    return model


def _gemma4_config(path: Path):
    """A Gemma 4 GGUF's config, rebuilt from its header.

    transformers 5.24 reads the per-layer KV head counts into ``num_key_value_heads`` (a list
    its config then refuses) and leaves out the sliding layers' head_dim, the layer pattern,
    the logit softcap, keys-as-values and each layer type's RoPE (measured on the tiny model:
    it does not load at all). The full layers' RoPE fraction is the share of ``rope_freqs``
    that the converter left at 1 (the rest it sets to 1e30: not rotated).
    """
    import gguf
    from transformers import Gemma4TextConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    reader = gguf.GGUFReader(str(path))
    h = {k.split(".", 1)[1]: f.contents() for k, f in reader.fields.items() if k.startswith("gemma4.")}
    tensors = {t.name: t for t in reader.tensors}
    swa = h["attention.sliding_window_pattern"]
    kv = h["attention.head_count_kv"]
    kv = kv if isinstance(kv, list) else [kv] * len(swa)
    full = [i for i, s in enumerate(swa) if not s]
    freqs = tensors["rope_freqs.weight"].data
    cfg = load_gguf_checkpoint(str(path))["config"]  # the keys transformers does read
    cfg.pop("model_type", None)
    cfg.update(
        num_key_value_heads=kv[swa.index(True)] if True in swa else kv[0],
        num_global_key_value_heads=kv[full[0]] if full else None,
        head_dim=h["attention.key_length_swa"], global_head_dim=h["attention.key_length"],
        layer_types=["sliding_attention" if s else "full_attention" for s in swa],
        final_logit_softcapping=h.get("final_logit_softcapping"),
        hidden_size_per_layer_input=h.get("embedding_length_per_layer_input", 0),
        num_kv_shared_layers=h.get("attention.shared_kv_layers", 0),
        attention_k_eq_v=bool(full) and not any(f"blk.{i}.attn_v.weight" in tensors for i in full),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": h["rope.freq_base_swa"]},
            "full_attention": {"rope_type": "proportional", "rope_theta": h["rope.freq_base"],
                               "partial_rotary_factor": float((freqs == 1.0).sum()) * 2 / h["attention.key_length"]}})
    return Gemma4TextConfig(**cfg)


def _gemma4_layer_scalars(path: Path, model) -> None:
    """Each layer's output scale, which transformers 5.24's GGUF loader leaves at 1 (the GGUF
    names it ``blk.N.layer_output_scale.weight``, the model ``layers.N.layer_scalar``): real
    Gemma 4 checkpoints train it, so a read-back model without it computes other logits."""
    import gguf

    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.endswith(".layer_output_scale.weight"):
            layer = model.model.layers[int(t.name.split(".")[1])]
            layer.layer_scalar.fill_(float(gguf.dequantize(t.data, t.tensor_type).reshape(-1)[0]))  # shape [1]


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars from transformers while the block
    runs (the user's terminal shows tunefix's lines and real warnings; a load of SmolLM2 takes
    under a second), and the switch put back as it was afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
