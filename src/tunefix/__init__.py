"""tunefix: fine-tune open LLMs with their silent bugs found and fixed.

The public API, for scripts and notebooks::

    import tunefix

    report = tunefix.examine("path/to/model")           # the doctor's findings
    model, tok = tunefix.load_model("path/to/model")    # loaded with the doctor's fixes
    result = tunefix.train(tunefix.RunConfig(model=..., data=..., output_dir=...))
    scores = tunefix.evaluate(model, tok, template, conversations)
    tunefix.export("runs/run", "exports/run", tunefix.ExportOptions(gguf=["q8_0"], ollama=True))

Importing this package is cheap on purpose: no torch, no transformers, nothing downloaded.
Each name above is imported on first use (PEP 562 ``__getattr__``), and ``train()`` leaves no
process state behind (design.md, "A library safe in a notebook").
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from tunefix.errors import TunefixError

__version__ = "0.1.0"

# public name -> (module, attribute): imported on first use
_LAZY = {
    "examine": ("tunefix.doctor", "examine"),
    "load_model": ("tunefix.model.load", "load_model"),
    "RunConfig": ("tunefix.train.config", "RunConfig"),
    "load_config": ("tunefix.train.config", "load_config"),
    "train": ("tunefix.train.trainer", "train"),
    "load_run": ("tunefix.train.run", "load_run"),
    "evaluate": ("tunefix.train.evaluate", "evaluate"),
    "ExportOptions": ("tunefix.export.pipeline", "ExportOptions"),
    "export": ("tunefix.export.pipeline", "export"),
    "template_for": ("tunefix.templates", "template_for"),
}

__all__ = ["TunefixError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tunefix' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """``tunefix.train`` and ``tunefix.export`` name the public functions, and also subpackages.

    Importing a subpackage makes the import system bind it as an attribute of its parent
    (``setattr(tunefix, "train", <module>)``), which would replace the function after the first
    ``from tunefix.train.config import ...``. That one binding is skipped for the public names:
    the subpackages stay importable (``sys.modules``, ``from tunefix.train import ...``), and
    ``tunefix.train`` stays the function. The only change to this package's own module object.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
