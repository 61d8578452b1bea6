"""``tunefix export``: a run (or a model directory) -> merged model, GGUF files, Modelfile,
verified; and ``tunefix verify``: the same checks again on a finished export.

The whole export is built in a hidden temporary directory next to ``--out`` and renamed
to ``--out`` at the end, so an interrupted or failed export leaves nothing under a final
name (and an existing ``--out`` replaced with ``--force`` stays intact until then). The
run directory is only read.

Layout of an export (``NAME``: ``--name`` or the run or model directory's name, through
``tunefix._io.safe_name``, so that no file can land outside ``--out``)::

    export.json            manifest: files, template, stop tokens, verification results
    README.md              what is here; the `ollama create` command
    Modelfile              (--ollama) FROM the first GGUF file asked for
    NAME-f16.gguf ...      one per --gguf type, from one conversion
    merged/                the merged Hugging Face model (kept with --merged, and whenever
                           verification runs: `tunefix verify` needs it as the reference)
    adapter/, NAME-lora-f16.gguf   (--lora-only) the PEFT adapter and its GGUF form

Verification (``--no-verify`` skips it) is recorded in ``export.json``; a failed check
does not unpublish the export (its files are complete and correct GGUF files), but the
command reports the first divergence and exits with status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunefix._io import atomic_dir, check_output_dir, inside, safe_name, write_text
from tunefix.errors import TunefixError
from tunefix.llamacpp import LlamaCrash
from tunefix.progress import Recorder, Reporter, or_silent

DEFAULT_GGUF = ("f16", "q8_0", "q4_k_m")
MANIFEST = "export.json"
MERGED = "merged"
ADAPTER = "adapter"
# Top-1 is judged where PyTorch's best two logits are at least this far apart: closer
# pairs are ties at f16 precision (random tiny models have many). Every position
# counts for the max abs difference.
MIN_MARGIN = 0.01
MAX_ABS_F16 = 0.25
FLOAT_TYPES = ("f32", "bf16", "f16")


@dataclass
class ExportOptions:
    gguf: Sequence[str] | None = None  # None: DEFAULT_GGUF (nothing with lora_only); () for none
    ollama: bool = False
    merged: bool = False
    lora_only: bool = False
    verify: bool = True
    force: bool = False
    dtype: str = "bf16"
    name: str | None = None


@dataclass
class Source:
    path: Path
    kind: str            # "run" or "model"
    base_model: str | None = None
    cfg: Any = None


# -------------------------------------------------------------------------- inputs


def resolve_source(source: str | os.PathLike) -> Source:
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        raise TunefixError(f"{path} is already a GGUF file", "Export a run directory or a Hugging Face model")
    if not path.exists():
        from tunefix.model.files import resolve_model_path

        try:
            path = resolve_model_path(str(source))
        except TunefixError:
            raise TunefixError(f"{source}: no such run directory or model",
                               "Pass the output_dir of a finished `tunefix train`, or a model directory") from None
    if not path.is_dir():
        raise TunefixError(f"{path} is not a directory", "Pass a run directory or a model directory")
    if (path / "summary.json").is_file() or (path / "adapter").is_dir():
        from tunefix.train.run import read_run

        cfg, summary = read_run(path)
        return Source(path.resolve(), "run", summary.get("base_model") or cfg.model, cfg)
    if (path / "config.json").is_file():
        from tunefix.model.files import check_model_family

        check_model_family(path)  # before llama.cpp's converter fails on it, minutes in
        return Source(path.resolve(), "model")
    raise TunefixError(f"{path} is neither a tunefix run (summary.json, adapter/) nor a model (config.json)",
                       "Pass the output_dir of a finished `tunefix train`, or a model directory")


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_out_dir(out: Path, force: bool, source: Path) -> None:
    out = out.expanduser().resolve()
    if _inside(out, source) or _inside(source, out):
        raise TunefixError(f"--out {out} overlaps the source {source}", "Export into a directory of its own")
    check_output_dir(out, "--out", allowed=force, allow_hint="Pass --force to replace it, or choose another --out")


def gguf_types(opts: ExportOptions) -> list[str]:
    from tunefix.export.gguf import _check_types

    if opts.lora_only:
        if opts.gguf:
            raise TunefixError("--lora-only exports the adapter only; it cannot be combined with --gguf")
        return []
    if opts.gguf is None:
        return list(DEFAULT_GGUF)
    if not opts.gguf:
        return []
    return _check_types(opts.gguf)


# ------------------------------------------------------------------------ publishing


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary directory next to ``out``; it replaces ``out`` when the block succeeds.

    A full disk anywhere in the export (in process, in llama.cpp's converter or its
    quantiser) becomes one "no space left on device while writing OUT" error, with the
    partial export removed (``tunefix._io.atomic_dir``).
    """
    with atomic_dir(out.expanduser().resolve(), replace=True) as tmp:
        yield tmp
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            os.chmod(d, 0o755)  # mkdtemp's 0700 would hide the export from an Ollama service


# ---------------------------------------------------------------------- verification


def _check(ok: bool, summary: str, error: str | None = None, judged: bool = True, **data) -> dict:
    return {"ok": bool(ok), "judged": judged, "summary": summary, "error": error, **data}


def _error_of(result) -> str | None:
    try:
        result.raise_if_failed()
    except TunefixError as e:
        return e.message
    return None


def _file_type(name: str) -> str:
    return name.rsplit("-", 1)[-1].removesuffix(".gguf")


def verify_files(hf_dir: Path, root: Path, files: Sequence[dict], *, template_ollama: str | None,
                 system: str | None, progress: Reporter, threads: int | None = None) -> dict:
    """Run every check on the export's files (paths relative to ``root``); a JSON-able record."""
    from tunefix.export import verify

    out: dict[str, Any] = {"files": {}, "template": None, "not_verified": []}
    ggufs = [f for f in files if f["kind"] == "gguf"]
    loras = [f for f in files if f["kind"] == "lora-gguf"]
    tok = verify.load_tokenizer(hf_dir)
    if template_ollama:
        with progress.stage("verify template parity (Go vs Jinja)"):
            tp = verify.template_parity(template_ollama, tok, system=system)
        out["template"] = _check(tp.ok, f"{tp.checked} conversations" + (f", {len(tp.skipped)} skipped" if tp.skipped else ""),
                                 _error_of(tp), checked=tp.checked, skipped=tp.skipped)
    if ggufs:
        with progress.stage("load the PyTorch reference"):
            model = verify.load_reference(hf_dir)
        prompts = verify.prompt_ids(tok)
        stop_file = next((f for f in ggufs if f["type"] in FLOAT_TYPES), ggufs[0])
        for f in ggufs:
            try:
                with progress.stage(f"verify {f['path']}"):
                    checks = _verify_gguf(verify, root / f["path"], hf_dir, model, tok, prompts,
                                          judged=f["type"] in FLOAT_TYPES, stops=f is stop_file, threads=threads)
                out["files"][f["path"]] = {"ok": all(c["ok"] for c in checks.values()), "checks": checks}
            except LlamaCrash as e:  # the file stays published; the record says why it is unverified
                out["not_verified"].append(f["path"])
                out["files"][f["path"]] = {"ok": False, "checks": {"llama.cpp": _check(
                    False, f"not verified: llama.cpp {e.cause}", e.one_line(), returncode=e.returncode)}}
        del model
    for f in loras:
        from tunefix.export.lora_gguf import read_adapter_info

        info = read_adapter_info(root / f["path"])
        ok = info["general.type"] == "adapter" and info["adapter.type"] == "lora" and info["tensors"] > 0
        out["files"][f["path"]] = {"ok": ok, "checks": {"adapter": _check(
            ok, f"{info['tensors']} tensors, alpha {info['adapter.lora.alpha']}",
            None if ok else f"not a GGUF LoRA adapter: {info}", **{"info": {k: str(v) for k, v in info.items()}})}}
    checks = [c for c in [out["template"], *(c for v in out["files"].values() for c in v["checks"].values())] if c]
    out["ok"] = all(c["ok"] for c in checks)
    out["first_error"] = next((c["error"] for c in checks if not c["ok"]), None)
    return out


def _verify_gguf(verify, path: Path, hf_dir: Path, model, tok, prompts, *, judged: bool, stops: bool,
                 threads: int | None) -> dict[str, dict]:
    """Tokens, logits (judged for 16/32-bit files, reported for quantised ones) and, for one
    file, stops; each a ``_check`` record."""
    checks: dict[str, dict] = {}
    # RoPE first: read from the header (and llama3's rope_freqs tensor), nothing run. A scaling
    # lost in conversion changes only long prompts, which the parity prompts are not.
    rp = verify.rope_parity(path, hf_dir)
    checks["rope"] = _check(rp.ok, f"{rp.gguf.get('type')} rope, base {rp.gguf.get('theta')}", _error_of(rp),
                            config=rp.config, gguf=rp.gguf)
    tp = verify.token_parity(path, hf_dir, tok=tok)
    checks["tokens"] = _check(tp.ok, f"{tp.checked} texts" + (", double BOS" if tp.double_bos else ""),
                              _error_of(tp), failures=tp.failures[:5], notes=tp.notes)
    lp = verify.logits_parity(path, hf_dir, model=model, tok=tok, prompts=prompts if judged else prompts[:2],
                              min_margin=MIN_MARGIN, max_abs=MAX_ABS_F16 if judged else None, threads=threads)
    checks["logits"] = _check(lp.ok, f"top-1 {lp.top1_agreement:.1%}, max diff {lp.max_abs_diff:.3f}",
                              _error_of(lp), judged=judged, **{k: v for k, v in asdict(lp).items() if k != "file"})
    if stops:
        sp = verify.stop_parity(path, hf_dir, model=model, tok=tok, threads=threads)
        stopped = sum(r.llama_stopped for r in sp.runs)
        checks["stops"] = _check(sp.ok or not judged, f"llama.cpp stopped {stopped}/{len(sp.runs)}",
                                 _error_of(sp), judged=judged, llama_only_stops=sp.llama_only_stops,
                                 torch_stopped=[r.torch_stopped for r in sp.runs],
                                 llama_stopped=[r.llama_stopped for r in sp.runs])
    return checks


def summarize(file_record: dict | None) -> str:
    """One table cell: the checks of one file."""
    if not file_record:
        return "-"
    parts = []
    for name, c in file_record["checks"].items():
        mark = "ok" if c["ok"] else "FAIL"
        parts.append(f"{name} {mark} ({c['summary']})" if c["judged"] else f"{name}: {c['summary']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    conversions: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        v = self.manifest.get("verification")
        return v is None or v["ok"]


def file_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _num_ctx(src: Source, hf_dir: Path) -> int | None:
    if src.cfg is not None:
        return int(src.cfg.max_seq_length)
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    n = cfg.get("max_position_embeddings")
    return int(n) if isinstance(n, int) else None


@dataclass
class _Plan:
    """What an export will do, decided (and every input checked) before anything is written."""

    src: Source
    out: Path
    opts: ExportOptions
    types: list[str]  # GGUF types, in the order asked for
    full: bool  # the run is a full fine-tune (model/, no adapter)
    name: str  # file names and the README's `ollama create` use safe_name(name)

    @property
    def merges(self) -> bool:
        """A run's weights become a merged Hugging Face model (everything but --lora-only)."""
        return self.src.kind == "run" and not self.opts.lora_only

    @property
    def keep_merged(self) -> bool:
        # `tunefix verify` needs the merged model as its reference, so verification keeps it.
        return self.merges and (self.opts.merged or self.opts.verify)


@dataclass
class _Built:
    """What the build steps made in the staging directory, for the manifest and the README."""

    template: Any = None  # the run's (or the model's) ChatTemplate; None: no chat template
    tok: Any = None
    hf_dir: Path | None = None  # the merged model or the exported model directory; None: LoRA only
    files: list[dict] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # the GGUF steps (convert, patch, quantize)
    spec: Any = None  # the Ollama Modelfile's content (--ollama)
    modelfile_from: str | None = None  # the GGUF file the Modelfile names


class _GgufSteps(Recorder):
    """The GGUF steps, recorded for the manifest. They run inside the export's own GGUF stage,
    so they are not shown as stages of their own; a metadata patch is shown as a note."""

    def __init__(self, shown: Reporter):
        super().__init__()
        self.shown = shown

    def event(self, name: str, detail: str = "") -> None:
        super().event(name, detail)
        if name == "patch":
            self.shown.note(f"GGUF metadata fixed: {detail}")


def export(source: str | os.PathLike, out: str | os.PathLike, opts: ExportOptions | None = None,
           progress: Reporter | None = None) -> ExportResult:
    """Export a run directory (or a Hugging Face model directory) into ``out``. See the module doc.

    Plan (every check on the inputs, nothing written), build (merge, adapter, GGUF files,
    Modelfile) and verify in a staging directory, then write the manifest and README and
    publish the directory under ``out``. ``progress`` sees one stage per step.
    """
    progress = or_silent(progress)
    plan = plan_export(source, out, opts or ExportOptions())
    with staging_dir(plan.out) as tmp:
        built = _load_inputs(plan, tmp, progress)
        if plan.opts.lora_only:
            _write_adapter(plan, tmp, built, progress)
        if plan.types:
            _write_gguf(plan, tmp, built, progress)
        if plan.opts.ollama:
            _write_modelfile(plan, tmp, built)
        if plan.keep_merged:
            built.files.insert(0, {"path": MERGED, "kind": "hf", "type": f"HF merged {plan.opts.dtype}"})
        manifest = _manifest(plan, built)
        manifest["verification"] = _verify_step(plan, tmp, built, manifest, progress)
        _write_records(plan, tmp, built, manifest)
    return ExportResult(plan.out.resolve(), manifest, manifest["conversions"], built.events)


def plan_export(source: str | os.PathLike, out: str | os.PathLike, opts: ExportOptions) -> _Plan:
    """Check the source, the options and ``out`` before anything is loaded or written."""
    from tunefix.train.run import is_full

    out = Path(out).expanduser()
    src = resolve_source(source)
    types = gguf_types(opts)
    check_out_dir(out, opts.force, src.path)
    if opts.lora_only and src.kind != "run":
        raise TunefixError("--lora-only needs a run directory (a model has no adapter)")
    full = src.kind == "run" and is_full(src.path)
    if opts.lora_only and full:
        raise TunefixError(f"{src.path} is a full fine-tune (--finetune full): it has no adapter to export alone",
                           "Export it with --gguf and/or --merged")
    if opts.ollama and not types and not opts.lora_only:
        raise TunefixError("--ollama needs a GGUF file", "Ask for one with --gguf, e.g. --gguf q4_k_m")
    if not types and not opts.merged and not opts.lora_only:
        raise TunefixError("nothing to export", "Ask for --gguf types, --merged or --lora-only")
    return _Plan(src, out, opts, types, full, opts.name or src.path.name)


def _load_inputs(plan: _Plan, tmp: Path, progress: Reporter) -> _Built:
    """The template and tokenizer, and the Hugging Face model the GGUF files come from: a run
    merged into ``tmp/merged`` (or its full model saved there), or the model directory itself."""
    from transformers import AutoTokenizer

    built = _Built()
    src = plan.src
    if src.kind == "model":
        from tunefix.templates import template_for

        built.hf_dir = src.path
        built.tok = AutoTokenizer.from_pretrained(str(src.path))
        built.template = template_for(built.tok) if built.tok.chat_template else None
        return built
    from tunefix.train.run import load_template

    built.template = load_template(src.path)
    built.tok = AutoTokenizer.from_pretrained(str(src.path / "tokenizer"))
    if plan.merges:
        from tunefix.export.merge import merge_run
        from tunefix.train.run import load_run

        with progress.stage("load run (its full model)" if plan.full else
                            "load run (base + adapter, 16-bit base weights)"):
            loaded = load_run(src.path, merge=True)
        with progress.stage(f"{'save' if plan.full else 'merge LoRA'} -> {MERGED}/ ({plan.opts.dtype})"):
            built.hf_dir = merge_run(src.path, tmp / MERGED, dtype=plan.opts.dtype, loaded=loaded)
        del loaded
    return built


def _write_adapter(plan: _Plan, tmp: Path, built: _Built, progress: Reporter) -> None:
    """--lora-only: the PEFT adapter as it is, and its GGUF form for llama.cpp."""
    from tunefix.export import lora_gguf

    adapter = plan.src.path / "adapter"
    with progress.stage(f"copy the PEFT adapter -> {ADAPTER}/"):
        lora_gguf.copy_adapter(adapter, tmp / ADAPTER)
    built.files.append({"path": ADAPTER, "kind": "peft-adapter", "type": "PEFT LoRA"})
    lora_file = inside(tmp, f"{plan.name}-lora-f16.gguf")
    with progress.stage(f"convert the adapter -> {lora_file.name}"):
        lora_gguf.convert_lora(adapter, plan.src.base_model, lora_file, "f16")
    built.files.append({"path": lora_file.name, "kind": "lora-gguf", "type": "LoRA f16"})


def _write_gguf(plan: _Plan, tmp: Path, built: _Built, progress: Reporter) -> None:
    """One conversion, then one quantisation per further type (``tunefix.export.gguf``)."""
    from tunefix.export.gguf import export_gguf

    steps = _GgufSteps(progress)
    with progress.stage(f"GGUF {', '.join(plan.types)} (one conversion)"):
        made = export_gguf(built.hf_dir, tmp, plan.types, name=plan.name, progress=steps)
    built.events = steps.steps
    for t, p in zip(plan.types, made, strict=True):
        os.chmod(p, 0o644)  # readable by an Ollama service running as another user
        built.files.append({"path": p.name, "kind": "gguf", "type": t})


def _write_modelfile(plan: _Plan, tmp: Path, built: _Built) -> None:
    """The Ollama Modelfile: FROM the first GGUF file asked for, or (LoRA only) the base
    model's GGUF the user brings plus the adapter."""
    from tunefix.export import ollama

    if built.template is None:
        raise TunefixError("the model has no chat template: no Modelfile TEMPLATE can be written")
    src = plan.src
    built.spec = ollama.spec_for(built.template, built.tok, system=src.cfg.system if src.cfg else None,
                                 num_ctx=_num_ctx(src, built.hf_dir or src.path))
    if plan.types:
        built.modelfile_from = built.files[-len(plan.types)]["path"]
        ollama.write_modelfile(tmp, built.modelfile_from, built.spec)
    else:
        write_text(tmp / "Modelfile",
                   "# FROM: the base model's GGUF (converted from the base model the run trained on)\n"
                   + ollama.modelfile_text(built.spec, "./base-model.gguf", f"./{built.files[-1]['path']}"))
    built.files.append({"path": "Modelfile", "kind": "modelfile", "type": "Ollama Modelfile"})


def _manifest(plan: _Plan, built: _Built) -> dict[str, Any]:
    """export.json without its verification and file sizes (added once known)."""
    from tunefix.templates import stop_tokens

    src, spec, tok, template = plan.src, built.spec, built.tok, built.template
    bound = template.bind(tok.eos_token or "") if template is not None and tok is not None else None
    return {
        "tunefix_export": 1, "source": str(src.path), "source_kind": src.kind,
        "base_model": src.base_model, "name": plan.name,
        "merged": MERGED if plan.keep_merged else None,
        # The reference of every check: the merged model (or the exported model directory);
        # a LoRA-only export has only the run's tokenizer (for the template check).
        "reference": MERGED if plan.keep_merged else str(built.hf_dir or src.path / "tokenizer"),
        "template": asdict(bound) if bound else None,
        "stop_tokens": stop_tokens(template, tok) if template is not None else [],
        "system": spec.system if spec else None,
        "num_ctx": spec.num_ctx if spec else None,
        "conversions": sum(1 for s, _ in built.events if s == "convert"),
        "events": built.events,
    }


def _verify_step(plan: _Plan, tmp: Path, built: _Built, manifest: dict, progress: Reporter) -> dict | None:
    """The verification record (None with --no-verify), checked on the staged files."""
    if not plan.opts.verify:
        return None
    ref = tmp / MERGED if plan.keep_merged else Path(manifest["reference"])
    if built.hf_dir is None:
        progress.note("LoRA-only export: the adapter file and the template are checked, not its outputs")
    spec = built.spec
    return verify_files(ref, tmp, built.files, template_ollama=spec.template if spec else None,
                        system=spec.system if spec else None, progress=progress)


def _write_records(plan: _Plan, tmp: Path, built: _Built, manifest: dict) -> None:
    """Drop merged/ unless kept, then write README.md and export.json (sizes included)."""
    from tunefix.export import ollama

    if built.hf_dir is not None and not plan.keep_merged and (tmp / MERGED).exists():
        shutil.rmtree(tmp / MERGED)
    files = built.files
    for f in files:
        f["size"] = file_size(tmp / f["path"])
    manifest["files"] = files
    readme = ollama.readme_text(
        safe_name(plan.name), files=[(f["path"], f["type"]) for f in files],
        modelfile="Modelfile" if built.spec else None, gguf_from=built.modelfile_from,
        merged=plan.keep_merged, lora=[f["path"] for f in files if f["kind"] in ("lora-gguf", "peft-adapter")],
        source=str(plan.src.path))
    write_text(tmp / "README.md", readme)
    write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str))
    for p in (tmp / "README.md", tmp / MANIFEST, tmp / "Modelfile"):
        if p.exists():
            os.chmod(p, 0o644)


# ---------------------------------------------------------------------------- verify


def read_manifest(export_dir: str | os.PathLike) -> dict:
    export_dir = Path(export_dir)
    f = export_dir / MANIFEST
    if not f.is_file():
        raise TunefixError(f"{export_dir} is not a tunefix export (no {MANIFEST})",
                           "Pass the --out directory of `tunefix export`")
    return json.loads(f.read_text(encoding="utf-8"))


def verify_export(export_dir: str | os.PathLike, progress: Reporter | None = None) -> dict:
    """Re-run the verification of a finished export (read-only); return the record."""
    from tunefix.export import ollama

    export_dir = Path(export_dir).expanduser().resolve()
    manifest = read_manifest(export_dir)
    progress = or_silent(progress)
    ref = manifest.get("reference")
    hf_dir = (export_dir / ref) if ref and not Path(ref).is_absolute() else Path(ref) if ref else None
    files = manifest.get("files", [])
    if any(f["kind"] == "gguf" for f in files) and (hf_dir is None or not (hf_dir / "config.json").is_file()):
        raise TunefixError(f"{export_dir} has no merged model to verify against ({MERGED}/ was not kept)",
                           "Export again with --merged (or without --no-verify)")
    missing = [f["path"] for f in files if not (export_dir / f["path"]).exists()]
    if missing:
        raise TunefixError(f"{export_dir}: {missing[0]} is missing", "Export again")
    template, system = None, manifest.get("system")
    mf = export_dir / "Modelfile"
    if mf.is_file():
        parsed = ollama.parse_modelfile(mf.read_text(encoding="utf-8"))
        template = parsed.get("TEMPLATE", [None])[0]
        system = parsed.get("SYSTEM", [system])[0]
    return verify_files(hf_dir or export_dir, export_dir, files, template_ollama=template, system=system,
                        progress=progress)
