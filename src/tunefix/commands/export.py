"""``tunefix export`` and ``tunefix verify``: the export's table of files and checks, and
exit status 1 with one line when a check failed."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from tunefix.commands.build import option, positional


@dataclass
class ExportCommandOptions:
    source: str = positional(metavar="RUN_DIR|MODEL")
    """a finished run directory or a model directory"""
    out: str = option()
    """export directory (created; must be empty unless --force)"""
    gguf: str | None = option(metavar="TYPES", default=None)
    """comma-separated GGUF types, e.g. f16,q8_0,q4_k_m (default: f16,q8_0,q4_k_m; 'none' for no GGUF)"""
    ollama: bool = False
    """write a Modelfile (and its `ollama create` command)"""
    merged: bool = False
    """keep the merged Hugging Face model (merged/)"""
    lora_only: bool = False
    """export the adapter only: PEFT and GGUF LoRA"""
    no_verify: bool = False
    """skip the parity checks"""
    force: bool = False
    """replace a non-empty --out"""
    dtype: Literal["bf16", "f16"] = "bf16"
    """merged weights"""
    name: str | None = None
    """file name stem (default: the run or model directory's name)"""


@dataclass
class VerifyOptions:
    export_dir: str = positional()
    """the --out directory of `tunefix export`"""
    json: bool = False
    """also print the results as JSON"""


def gguf_list(value: str | None) -> list[str] | None:
    """``--gguf``'s comma-separated types; None: the default set; "none" or "": no GGUF."""
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return []
    return [t.strip() for t in value.split(",") if t.strip()]


def run_export(opts: ExportCommandOptions) -> int:
    from rich.console import Console

    from tunefix.console import RichReporter, result_table
    from tunefix.export.pipeline import MANIFEST, ExportOptions, export

    options = ExportOptions(gguf=gguf_list(opts.gguf), ollama=opts.ollama, merged=opts.merged,
                            lora_only=opts.lora_only, verify=not opts.no_verify, force=opts.force,
                            dtype=opts.dtype, name=opts.name)
    result = export(opts.source, opts.out, options, RichReporter(Console(stderr=True)))
    Console().print(result_table(result.out, result.manifest["files"], result.manifest.get("verification")))
    print(f"conversions HF -> GGUF: {result.conversions}; manifest: {result.out / MANIFEST}")
    return verdict(result.manifest.get("verification"))


def run_verify(opts: VerifyOptions) -> int:
    import json
    from pathlib import Path

    from rich.console import Console

    from tunefix.console import RichReporter, result_table
    from tunefix.export.pipeline import read_manifest, verify_export

    export_dir = Path(opts.export_dir).expanduser().resolve()
    v = verify_export(export_dir, RichReporter(Console(stderr=True)))
    manifest = read_manifest(export_dir)
    Console().print(result_table(export_dir, manifest["files"], v))
    if opts.json:
        print(json.dumps(v, indent=1, default=str))
    return verdict(v)


def verdict(v: dict | None) -> int:
    """Exit status 1 and one line when a check failed or a file could not be verified."""
    if v is None or v["ok"]:
        return 0
    what = "not verified" if v.get("not_verified") else "verification failed"
    print(f"tunefix: error: {what}: {v['first_error']}", file=sys.stderr)
    return 1
