"""What the doctor examines: a model's config, tokenizer, template, stop ids and weights.

Weights are read lazily, a block of rows at a time: through safetensors' memory map for
Hugging Face directories, through gguf-py's memory-mapped reader for GGUF files, or from
the parameters of a model already in memory. An 8B checkpoint is audited without
loading it: only embed_tokens, lm_head and the norms are touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunefix.errors import TunefixError
from tunefix.model.files import (
    check_model_code,
    load_pickle_weights,
    read_json,
    read_safetensors_header,
    require_gguf,
    resolve_model_path,
    weights_kind,
)

ROW_BLOCK = 8192  # rows per block: 8192 x 4096 fp32 = 128 MiB at most in flight


class RowMatrix:
    """A (rows x dim) weight read in blocks of rows, each returned as fp32."""

    name: str
    shape: tuple[int, int]

    def rows(self, start: int, stop: int):  # -> torch.Tensor (stop-start, dim) fp32
        raise NotImplementedError

    def blocks(self, size: int = ROW_BLOCK) -> Iterator[tuple[int, Any]]:
        for start in range(0, self.shape[0], size):
            yield start, self.rows(start, min(start + size, self.shape[0]))


_ST_DTYPES = {"BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4)}


class _SafetensorsRows(RowMatrix):
    """Rows read with plain file reads at the tensor's offset in a safetensors file.

    Not through safetensors' memory map: mapped pages count in the process's RSS, so an
    audit of an 8B checkpoint would show its 2 GB of embeddings as resident. The format
    (8-byte header length, JSON header, raw data) is simple enough to read directly.
    """

    def __init__(self, file: Path, key: str, header: dict, data_start: int):
        entry = header[key]
        if entry["dtype"] not in _ST_DTYPES or len(entry["shape"]) != 2:
            raise TunefixError(f"{file.name}: {key} has dtype {entry['dtype']} and shape {entry['shape']}",
                               "tunefix reads bf16, f16 and f32 embeddings")
        self.name, self._file = key, file
        self.shape = (int(entry["shape"][0]), int(entry["shape"][1]))
        self._dtype, self._itemsize = _ST_DTYPES[entry["dtype"]]
        self._begin = data_start + int(entry["data_offsets"][0])
        end = data_start + int(entry["data_offsets"][1])
        if file.stat().st_size < end:
            raise TunefixError(f"{file} is truncated: {key} ends at byte {end}, the file has "
                               f"{file.stat().st_size}", "Download or save the checkpoint again")

    def rows(self, start: int, stop: int):
        import torch

        row_bytes = self.shape[1] * self._itemsize
        n = (stop - start) * row_bytes
        # One raw buffer per matrix, reused by every read (a fresh zero-filled 64 MB
        # bytearray per block cost more than the read itself).
        raw = getattr(self, "_raw", None)
        if raw is None or raw.numel() < n:
            raw = self._raw = torch.empty(n, dtype=torch.uint8)
        view = raw[:n]
        with open(self._file, "rb", buffering=0) as f:
            f.seek(self._begin + start * row_bytes)
            if f.readinto(view.numpy()) != n:
                raise TunefixError(f"{self._file} is truncated", "Download or save the checkpoint again")
        return view.view(getattr(torch, self._dtype)).reshape(stop - start, self.shape[1]).float()


class _GGUFRows(RowMatrix):
    def __init__(self, tensor):
        self.name, self._t = tensor.name, tensor
        dim, rows = (int(x) for x in tensor.shape[:2])  # GGUF lists dims innermost first
        self.shape = (rows, dim)

    def rows(self, start: int, stop: int):
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType, quants

        data = self._t.data[start:stop]  # (rows, dim) or (rows, bytes per row)
        if self._t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(data, dtype=np.float32)
        else:
            arr = quants.dequantize(np.asarray(data), self._t.tensor_type)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(stop - start, -1)


class _ModuleRows(RowMatrix):
    def __init__(self, name: str, weight):
        self.name, self._w = name, weight
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))

    def rows(self, start: int, stop: int):
        return self._w.detach()[start:stop].float()


def _safetensors_loader(file: Path, key: str) -> Callable[[], Any]:
    def load():
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as h:
                return h.get_tensor(key).float()
        except Exception as e:  # safetensors' own error types for a bad file
            raise TunefixError(f"{file}: cannot read {key} ({e})", "The file is truncated or corrupt") from None

    return load


def _gguf_loader(tensor) -> Callable[[], Any]:
    def load():
        import numpy as np
        import torch

        return torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))

    return load


@dataclass
class Subject:
    """Everything the checks read. Built by ``load_subject``; never mutated by checks."""

    name: str
    kind: str  # "hf", "gguf" or "memory"
    config: dict[str, Any]
    tokenizer: Any | None
    template: str | None
    stop_ids: list[int]
    embed: RowMatrix | None
    lm_head: RowMatrix | None  # None when tied to the embeddings
    # (tensor name, loader of the whole 1-D tensor as fp32): norms are small.
    norms: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    tensor_names: list[str] = field(default_factory=list)
    gguf_add_bos: bool | None = None
    data_texts: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")

    def matrices(self) -> list[RowMatrix]:
        return [m for m in (self.embed, self.lm_head) if m is not None]


# ------------------------------------------------------------------------------ loading


def _weight_index(directory: Path) -> dict[str, tuple[Path, dict, int]]:
    """Tensor name -> (safetensors file, its header, its data offset); headers only."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        weights_kind(directory, allow_pickle=False)  # raises with the right message
    out: dict[str, tuple[Path, dict, int]] = {}
    for f in files:
        header, start = read_safetensors_header(f)
        out.update({k: (f, header, start) for k in header})
    return out


def _find(names: dict[str, Path] | list[str], suffixes: tuple[str, ...]) -> str | None:
    for suffix in suffixes:
        for n in names:
            if n.endswith(suffix):
                return n
    return None


def _load_tokenizer(directory: Path, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        if gguf_file:
            return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for a missing/bad tokenizer
        raise TunefixError(f"no usable tokenizer in {directory} ({type(e).__name__}: {str(e)[:120]})",
                           "Put the model's tokenizer files next to its weights") from None


def _stop_ids_from(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def load_hf_dir(directory: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Subject:
    config_file = directory / "config.json"
    if not config_file.exists():
        raise TunefixError(f"{directory} has no config.json, so it is not a Hugging Face model directory",
                           "Pass the directory that holds config.json and the weights")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise TunefixError(f"{config_file} holds a JSON {type(config).__name__}, not an object",
                           "Pass a Hugging Face model directory")
    check_model_code(directory, trust_remote_code)
    if weights_kind(directory, allow_pickle) == "pickle":
        return _load_pickle_dir(directory, config, trust_remote_code)
    index = _weight_index(directory)
    embed_key = _find(index, ("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))
    head_key = _find(index, ("lm_head.weight",))
    if embed_key is None:
        raise TunefixError(f"{directory}: no input embedding tensor among the weights",
                           "Is this a causal language model?")
    try:
        embed = _SafetensorsRows(index[embed_key][0], embed_key, *index[embed_key][1:])
        lm_head = _SafetensorsRows(index[head_key][0], head_key, *index[head_key][1:]) if head_key else None
        norms = [(k, _safetensors_loader(index[k][0], k)) for k in index
                 if "norm" in k and k.endswith(".weight")]
    except TunefixError:
        raise
    except Exception as e:
        raise TunefixError(f"{directory}: cannot read the weights ({e})",
                           "A safetensors file is truncated or corrupt") from None
    tok = _load_tokenizer(directory, trust_remote_code=trust_remote_code)
    gen_file = directory / "generation_config.json"
    gen = read_json(gen_file) if gen_file.exists() else {}
    stops = _stop_ids_from(gen.get("eos_token_id"))
    if not stops:
        stops = _stop_ids_from(config.get("eos_token_id"))
    return Subject(name=str(directory), kind="hf", config=config, tokenizer=tok,
                   template=_template_of(tok), stop_ids=stops, embed=embed, lm_head=lm_head,
                   norms=norms,
                   tensor_names=list(index), path=directory)


def _load_pickle_dir(directory: Path, config: dict[str, Any], trust_remote_code: bool) -> Subject:
    """A subject from pickle weights (opted in): tensors in memory, loaded weights_only."""
    tensors = load_pickle_weights(directory)
    embed_key = _find(list(tensors), ("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))
    if embed_key is None:
        raise TunefixError(f"{directory}: no input embedding tensor among the weights",
                           "Is this a causal language model?")
    head_key = _find(list(tensors), ("lm_head.weight",))
    norms = [(k, (lambda t=t: t.detach().float().reshape(-1))) for k, t in tensors.items()
             if "norm" in k and k.endswith(".weight")]
    tok = _load_tokenizer(directory, trust_remote_code=trust_remote_code)
    gen_file = directory / "generation_config.json"
    gen = read_json(gen_file) if gen_file.exists() else {}
    stops = _stop_ids_from(gen.get("eos_token_id")) or _stop_ids_from(config.get("eos_token_id"))
    head = _ModuleRows(head_key, tensors[head_key]) if head_key else None
    return Subject(name=str(directory), kind="hf", config=config, tokenizer=tok, template=_template_of(tok),
                   stop_ids=stops, embed=_ModuleRows(embed_key, tensors[embed_key]), lm_head=head,
                   norms=norms, tensor_names=list(tensors), path=directory)


def _template_of(tok) -> str | None:
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is trained
        template = template.get("default")
    return template or None


def load_gguf(file: Path) -> Subject:
    from gguf import GGUFReader

    try:
        arch = require_gguf(file)
        reader = GGUFReader(str(file))
    except TunefixError:
        raise
    except Exception as e:
        raise TunefixError(f"{file} is not a readable GGUF file ({type(e).__name__}: {e})",
                           "The file is truncated or corrupt") from None

    def meta(key: str, default: Any = None) -> Any:
        field_ = reader.fields.get(key)
        return field_.contents() if field_ is not None else default

    config: dict[str, Any] = {"model_type": {"phi3": "phi3", "gemma": "gemma"}.get(arch, arch),
                              "gguf_architecture": arch}
    window = meta(f"{arch}.attention.sliding_window")
    if window is not None:
        config["sliding_window"] = window
    tensors = {t.name: t for t in reader.tensors}
    embed = _GGUFRows(tensors["token_embd.weight"]) if "token_embd.weight" in tensors else None
    head = _GGUFRows(tensors["output.weight"]) if "output.weight" in tensors else None
    norms = [(n, _gguf_loader(t)) for n, t in tensors.items() if n.endswith("norm.weight")]
    stops = [meta(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                               "tokenizer.ggml.eom_token_id") if meta(k) is not None]
    tok = _load_tokenizer(file.parent, file.name)
    return Subject(name=str(file), kind="gguf", config=config, tokenizer=tok,
                   template=meta("tokenizer.chat_template"), stop_ids=[int(s) for s in stops],
                   embed=embed, lm_head=head, norms=norms, tensor_names=list(tensors),
                   gguf_add_bos=meta("tokenizer.ggml.add_bos_token"), path=file)


def from_model(model, tokenizer, name: str = "model") -> Subject:
    """A subject for a model already in memory (``load_model`` applies fixes this way)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    head = None if out is None or out.weight is emb else _ModuleRows("lm_head.weight", out.weight)
    gen = getattr(model, "generation_config", None)
    stops = _stop_ids_from(getattr(gen, "eos_token_id", None)) or _stop_ids_from(model.config.eos_token_id)
    norms = [(n, (lambda p=p: p.detach().float().reshape(-1)))
             for n, p in model.named_parameters() if "norm" in n and n.endswith("weight")]
    return Subject(name=name, kind="memory", config=model.config.to_dict(), tokenizer=tokenizer,
                   template=_template_of(tokenizer), stop_ids=stops,
                   embed=_ModuleRows("embed_tokens.weight", emb), lm_head=head, norms=norms,
                   tensor_names=[n for n, _ in model.named_parameters()])


def load_subject(model: str | os.PathLike, template: str | None = None, data: str | None = None, *,
                 trust_remote_code: bool = False, allow_pickle: bool = False) -> Subject:
    path = resolve_model_path(str(model))
    if path.is_dir():
        subject = load_hf_dir(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    elif path.suffix == ".gguf":
        subject = load_gguf(path)
    else:
        raise TunefixError(f"{path} is neither a model directory nor a .gguf file",
                           "Pass a Hugging Face model directory or a .gguf file")
    if template:
        subject.template = read_template_argument(template)
    if data:
        subject.data_texts = read_data_sample(Path(data))
    return subject


def read_template_argument(template: str) -> str:
    """``--template``: a registry name or a file holding a Jinja template."""
    path = Path(template).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TunefixError(f"cannot read template file {path} ({e})",
                               "Save the template as UTF-8 text, or pass a registry name") from None
    try:
        from tunefix.templates import get_template
    except ImportError:
        get_template = None
    if get_template is not None:
        return get_template(template).jinja
    raise TunefixError(f"template {template!r} is not a file", "Pass a file holding a Jinja chat template")


def read_data_sample(path: Path, max_bytes: int = 256 * 1024) -> list[str]:
    """The start of a data file, as text: enough to find tokens the model never learned."""
    if not path.is_file():
        raise TunefixError(f"data file {path} does not exist", "Check the --data path")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(max_bytes)
    except UnicodeDecodeError as e:
        raise TunefixError(f"{path} is not UTF-8 text (byte {e.start})", "Save it as UTF-8") from None
    return [line for line in text.splitlines() if line.strip()]
