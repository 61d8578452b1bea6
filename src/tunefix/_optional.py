"""All checks for optional dependencies live here (one place, no ``except: pass``)."""

from __future__ import annotations

import importlib.util
import shutil


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def has_cuda() -> bool:
    """True when torch sees a CUDA device. Imports torch, so call it only when needed."""
    import torch

    return torch.cuda.is_available()


def has_bitsandbytes() -> bool:
    return has_module("bitsandbytes")


def has_tensorboard() -> bool:
    return has_module("tensorboard")


def has_wandb() -> bool:
    return has_module("wandb")


def go_binary() -> str | None:
    """The Go toolchain used to run Ollama's template engine in tests and verification."""
    found = shutil.which("go")
    if found:
        return found
    # Debian's golang-go puts the toolchain under /usr/lib/go-1.19 with a /usr/bin/go link.
    for candidate in ("/usr/lib/go/bin/go", "/usr/lib/go-1.19/bin/go", "/usr/local/go/bin/go"):
        if shutil.which(candidate):
            return candidate
    return None
