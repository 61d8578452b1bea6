"""Hugging Face directory -> GGUF: convert once with llama.cpp's converter, quantise many.

The converter (``convert_hf_to_gguf.py``) and the quantiser (``llama_model_quantize``)
come from one pinned llama.cpp (see ``tunefix.assets.llama_cpp_source``), so the files
we write are the files that version of llama.cpp reads. Converting is the slow,
memory-hungry step (it reads every tensor through torch), so an export runs it exactly
once, to a 16/32-bit base, and derives every other type from that base with the
quantiser, which works tensor by tensor in C++.

After the conversion the base file's tokenizer metadata is checked against the Hugging
Face tokenizer and patched where the converter got it wrong (``gguf_meta``); quantised
files copy their metadata from the base, so the fix is made once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tunefix._io import atomic_path, inside, out_of_space, safe_name
from tunefix.errors import TunefixError
from tunefix.progress import Reporter, or_silent

log = logging.getLogger(__name__)

# Types the converter writes itself. q8_0 is among them, but a q8_0 base would make
# every further quantisation a requantisation, so it is a base only when nothing
# better is asked for.
CONVERT_TYPES = ("f32", "bf16", "f16", "q8_0")
# Types the quantiser writes, by the name of llama.cpp's ``LLAMA_FTYPE_*`` constant
# (resolved only when quantising, so that this module imports without llama_cpp).
QUANT_TYPES = {
    "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
    "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_l": "MOSTLY_Q3_K_L", "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K",
}
# Unquantised types, best first: the base of an export is the first one asked for.
_FLOAT_TYPES = ("f32", "bf16", "f16")
_DTYPE_TO_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 bytes + an f16 scale
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

def _check_types(types: Sequence[str]) -> list[str]:
    wanted = [t.lower() for t in types]
    unknown = [t for t in wanted if t not in QUANT_TYPES]
    if unknown:
        raise TunefixError(f"unknown GGUF type {', '.join(map(repr, unknown))}",
                           f"Choose from {', '.join(QUANT_TYPES)}")
    if not wanted:
        raise TunefixError("no GGUF type requested", "Ask for at least one, e.g. f16,q8_0,q4_k_m")
    return list(dict.fromkeys(wanted))


def _read_config(hf_dir: Path) -> dict:
    cfg = hf_dir / "config.json"
    if not cfg.is_file():
        raise TunefixError(f"{hf_dir} is not a Hugging Face model directory (no config.json)",
                           "Point the export at a merged model directory")
    return json.loads(cfg.read_text(encoding="utf-8"))


def _tensor_names(hf_dir: Path) -> list[str]:
    """The tensor names of a safetensors checkpoint, from its headers (no data read)."""
    from tunefix.model.files import read_safetensors_header

    return [n for f in sorted(hf_dir.glob("*.safetensors")) for n in read_safetensors_header(f)[0]]


def base_type(hf_dir: Path, types: Sequence[str]) -> str:
    """The one type the converter writes for an export of ``types``.

    The best unquantised type asked for; when only quantised types are asked for, the
    checkpoint's own 16/32-bit dtype (lossless, kept only while quantising).
    """
    for t in _FLOAT_TYPES:
        if t in types:
            return t
    return _DTYPE_TO_TYPE.get(_checkpoint_dtype(_read_config(hf_dir)), "f16")


def _checkpoint_dtype(cfg: dict) -> str:
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")


# ------------------------------------------------------------------------ conversion


def _stale_quantization(cfg: dict) -> bool:
    # A model loaded from a GGUF file and saved again keeps ``quantization_config =
    # {"quant_method": "gguf"}`` in config.json although its safetensors are plain
    # 16/32-bit (measured on tunefix's SmolLM2 asset). The converter then refuses with
    # "Quant method is not yet supported: 'gguf'". The record describes where the
    # weights came from, not how they are stored, so the converter may ignore it.
    q = cfg.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "gguf"


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _unlisted_added_tokens(hf_dir: Path) -> dict[str, dict]:
    """Added tokens that llama.cpp's SentencePiece converter would not see, by id.

    That converter builds the vocabulary from ``tokenizer.model`` and adds the tokens
    listed in ``tokenizer_config.json``'s ``added_tokens_decoder``, which transformers 4
    wrote and transformers 5 no longer does (it keeps them in tokenizer.json only).
    A token added after the SentencePiece model was made (tunefix's pad token on Llama 2
    and Mistral vocabularies, measured) then becomes an unused ``[PAD32000]`` in the GGUF,
    and llama.cpp tokenises its text as plain characters.
    """
    sp_file, tok_file = hf_dir / "tokenizer.model", hf_dir / "tokenizer.json"
    if not (sp_file.is_file() and tok_file.is_file()):
        return {}
    from sentencepiece import SentencePieceProcessor

    listed = _json_or_empty(hf_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
    sp = SentencePieceProcessor(model_file=str(sp_file))
    size = sp.get_piece_size()
    missing = {}
    for t in json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", []):
        i = t["id"]
        if str(i) in listed or (i < size and sp.id_to_piece(i) == t["content"]):
            continue  # the converter already has this one, from one source or the other
        missing[str(i)] = {k: v for k, v in t.items() if k != "id"}
    return missing


@contextmanager
def _converter_input(hf_dir: Path) -> Iterator[Path]:
    """``hf_dir`` itself, or a staged copy (links plus cleaned configs) the converter accepts.

    The user's directory is never modified: fixes go into a temporary directory of
    symbolic links where only config.json (a stale quantisation record) and
    tokenizer_config.json (added tokens, see ``_unlisted_added_tokens``) are rewritten.
    """
    rewritten: dict[str, dict] = {}
    cfg = _read_config(hf_dir)
    if _stale_quantization(cfg):
        cfg.pop("quantization_config")
        rewritten["config.json"] = cfg
    added = _unlisted_added_tokens(hf_dir)
    if added:
        tok_cfg = _json_or_empty(hf_dir / "tokenizer_config.json")
        tok_cfg["added_tokens_decoder"] = {**(tok_cfg.get("added_tokens_decoder") or {}), **added}
        rewritten["tokenizer_config.json"] = tok_cfg
    if not rewritten:
        yield hf_dir
        return
    with tempfile.TemporaryDirectory(prefix="tunefix-convert-") as tmp:
        staged = Path(tmp) / hf_dir.name
        staged.mkdir()
        for p in hf_dir.iterdir():
            if p.name not in rewritten:
                (staged / p.name).symlink_to(p.resolve())
        for name, data in rewritten.items():
            (staged / name).write_text(json.dumps(data, indent=1), encoding="utf-8")
        yield staged


def _check_disk_space(hf_dir: Path, out_dir: Path, outtype: str, factor: float = 1.1) -> None:
    # The converted file is about as large as the checkpoint times the ratio of bytes per
    # weight (an f32 file from a bf16 checkpoint: twice; an f16 one from f32 weights:
    # half): fail before writing rather than leave the disk full.
    stored = _DTYPE_TO_TYPE.get(_checkpoint_dtype(_read_config(hf_dir)), "bf16")
    need = factor * _BYTES_PER_WEIGHT[outtype] / _BYTES_PER_WEIGHT[stored] * sum(
        p.stat().st_size for p in hf_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    free = shutil.disk_usage(out_dir).free
    if need > free:
        # The export writes into a hidden staging directory: name the directory the user chose.
        shown = out_dir
        while shown.name.startswith(".") and shown.name.endswith(".partial"):
            shown = shown.parent
        raise TunefixError(f"not enough disk space in {shown}: about {need / 2**30:.1f} GiB "
                           f"needed, {free / 2**30:.1f} GiB free", "Free some space or choose another --out")


def _converter_command(src: Path, model_dir: Path, out: Path, outtype: str, name: str) -> list[str]:
    return [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir),
            "--outtype", outtype, "--outfile", str(out), "--model-name", name]


def _converter_env(src: Path) -> dict[str, str]:
    # The converter must use the gguf-py of its own commit, not the pip ``gguf``: it
    # inserts its gguf-py into sys.path itself unless NO_LOCAL_GGUF is set, and our
    # PYTHONPATH entry makes the same choice for anything it imports before that.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src / "gguf-py"), env.get("PYTHONPATH")]))
    # Conversion runs on the CPU, even on a machine with a GPU.
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "no output"


def convert(hf_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str = "f16",
            progress: Reporter | None = None, *, name: str | None = None) -> Path:
    """Convert a Hugging Face model directory to one GGUF file with llama.cpp's converter.

    Runs ``convert_hf_to_gguf.py`` of the pinned llama.cpp in a subprocess (on the CPU)
    and writes ``out_file`` atomically. Logs one line "converting HF -> GGUF (outtype)"
    and runs as the stage ``("convert", outtype)`` of ``progress``: one of each per conversion.
    """
    from tunefix import assets

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if outtype not in CONVERT_TYPES:
        raise TunefixError(f"the converter cannot write {outtype!r}",
                           f"Convert to one of {', '.join(CONVERT_TYPES)} and quantise from it")
    from tunefix.export.gguf_arch import check_config, converter_flags

    config = _read_config(hf_dir)
    check_config(config)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _check_disk_space(hf_dir, out_file.parent, outtype)
    src = assets.llama_cpp_source()
    log.info("converting HF -> GGUF (%s)", outtype)
    with or_silent(progress).stage("convert", outtype), _converter_input(hf_dir) as model_dir, \
            atomic_path(out_file) as tmp:
        flags = converter_flags(config, _tensor_names(model_dir))
        run_converter(_converter_command(src, model_dir, tmp, outtype, name or hf_dir.name) + flags, src,
                      f"llama.cpp's converter failed on {hf_dir}",
                      "Check that the directory holds a merged model of a supported family", writes=tmp)
    return out_file


def _raise_if_disk_full(writes: Path, what: str) -> None:
    # Inside ``atomic_path(...)``, which turns this OSError into the one-line disk error
    # and removes the partial file.
    if out_of_space(writes.parent):
        raise OSError(errno.ENOSPC, f"{what}: {os.strerror(errno.ENOSPC)}", str(writes))


def run_converter(cmd: list[str], src: Path, failure: str, hint: str, *, writes: Path) -> None:
    """Run one of llama.cpp's converter scripts with its own gguf-py; failure -> one line.

    ``writes``: the file it writes. A child that filled the disk fails with numpy's "N
    requested and M written" (no errno): measured on a full tmpfs. So a failure is judged
    a full disk (an OSError, see ``_raise_if_disk_full``) when ``writes``' disk is full.
    """
    done = subprocess.run(cmd, env=_converter_env(src), capture_output=True, text=True)
    if done.returncode != 0:
        _raise_if_disk_full(writes, failure)
        raise TunefixError(f"{failure}: {_last_lines(done.stderr)}", hint)
    log.debug("converter output:\n%s", done.stderr)


# ---------------------------------------------------------------------- quantisation


def quantize(src_gguf: str | os.PathLike, out_file: str | os.PathLike, qtype: str,
             *, threads: int | None = None) -> Path:
    """Write ``out_file`` as ``qtype`` from a 16/32-bit GGUF with llama.cpp's quantiser."""
    from tunefix.llamacpp import quantize as llama_quantize

    (qtype,) = _check_types([qtype])
    src_gguf, out_file = Path(src_gguf), Path(out_file)
    if not src_gguf.is_file():
        raise TunefixError(f"no GGUF file at {src_gguf}")
    log.info("quantizing GGUF -> %s", qtype)
    with atomic_path(out_file) as tmp:
        rc, lines = llama_quantize(src_gguf, tmp, QUANT_TYPES[qtype], threads or os.cpu_count() or 1)
        log.debug("llama.cpp's quantiser:\n%s", "".join(lines))  # a line per tensor: --debug only
        if rc != 0:
            # llama.cpp says only "iostream error" (in its log) when the disk is full.
            _raise_if_disk_full(tmp, f"llama.cpp could not quantise {src_gguf.name} to {qtype}")
            raise TunefixError(f"llama.cpp could not quantise {src_gguf.name} to {qtype} (code {rc})",
                               "Quantise from an f16, bf16 or f32 file")
    return out_file


# ---------------------------------------------------------------------------- export


def gguf_name(stem: str, qtype: str) -> str:
    return f"{stem}-{qtype}.gguf"


def export_gguf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike,
                types: Sequence[str] = ("f16", "q8_0", "q4_k_m"), *, name: str | None = None,
                progress: Reporter | None = None, fix_metadata: bool = True) -> list[Path]:
    """Export ``hf_dir`` as one GGUF file per type in ``types``; return them in that order.

    One conversion to the best unquantised base type, its tokenizer metadata checked
    and patched, then one quantisation per further type. The base is written under a
    hidden temporary name and renamed only once patched (removed when not asked for).
    ``progress`` sees the stages ``("convert", base)`` and ``("quantize", type)``, and the
    event ``("patch", keys)`` when the metadata was fixed.
    """
    from tunefix.export import gguf_meta

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    progress = or_silent(progress)
    wanted = _check_types(types)
    _read_config(hf_dir)  # a missing model is an error before anything is written
    stem = name or hf_dir.name  # general.name as given; file names pass through safe_name
    base = base_type(hf_dir, wanted)
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = {t: inside(out_dir, gguf_name(stem, t)) for t in wanted}
    with _base_file(out_dir, safe_name(stem), base) as base_file:
        convert(hf_dir, base_file, base, progress, name=stem)
        patches = gguf_meta.fix_metadata(base_file, hf_dir) if fix_metadata else {}
        if patches:
            progress.event("patch", ", ".join(sorted(patches)))
        if base in finals:
            # Only now, converted and patched, does the base get its final name.
            os.replace(base_file, finals[base])
            base_file = finals[base]
        for t in wanted:
            if t != base:
                with progress.stage("quantize", t):
                    quantize(base_file, finals[t], t)
    return [finals[t] for t in wanted]


@contextmanager
def _base_file(out_dir: Path, stem: str, base: str) -> Iterator[Path]:
    """A hidden temporary name for the converted base, removed unless renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{gguf_name(stem, base)}.", suffix=".partial", dir=out_dir)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
