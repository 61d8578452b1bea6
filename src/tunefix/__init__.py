"""tunefix: fine-tune open LLMs with their silent bugs found and fixed.

Importing this package is cheap on purpose: no torch, no transformers, nothing
downloaded. The heavy modules are imported by the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "TunefixError"]

from tunefix.errors import TunefixError  # noqa: E402  (light: stdlib only)
