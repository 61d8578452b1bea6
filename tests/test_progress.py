"""Issue 17: one progress protocol (``tunefix.progress``) for the asset fetch, the GGUF steps,
the export and training; the terminal's rendering of it (``tunefix.console``); and the two
orchestrators, ``export()`` and ``train()``, kept in steps a reader can follow."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
from rich.console import Console

import tunefix
from tunefix import assets, tiny
from tunefix.console import RichReporter
from tunefix.progress import Recorder, Reporter, Silent

PACKAGE = Path(tunefix.__file__).parent
# The orchestrators' modules and the modules split from them: no function over MAX_LINES.
SHORT_MODULES = ("export/pipeline.py", "train/trainer.py", "train/rows.py", "train/arguments.py",
                 "train/hf_trainer.py")
MAX_LINES = 50
# Library modules that report progress: they must not draw it (a web UI renders it too).
REPORTING = ("progress.py", "assets.py", "tiny.py", "export/gguf.py", "train/trainer.py", "train/callbacks.py",
             "train/rows.py", "train/arguments.py", "train/hf_trainer.py")


def long_functions(source: str, limit: int = MAX_LINES) -> dict[str, int]:
    """Every function (methods and nested ones included) longer than ``limit`` lines: name -> lines."""
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > limit}


def imported_modules(source: str) -> set[str]:
    """Top-level package names of every import, module level and inside functions."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_length_rule_catches_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    assert long_functions(f"def f():\n{body}\n") == {"f": MAX_LINES + 1}
    assert long_functions(f"def f():\n{body}\n", limit=MAX_LINES + 1) == {}


@pytest.mark.parametrize("module", SHORT_MODULES)
def test_orchestrator_functions_fit_on_a_screen(module):
    source = (PACKAGE / module).read_text(encoding="utf-8")
    assert long_functions(source) == {}, f"{module}: split these into steps"


def test_export_and_train_are_short_steps():
    for module, name in (("export/pipeline.py", "export"), ("train/trainer.py", "train")):
        tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
        [fn] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
        assert fn.end_lineno - fn.lineno + 1 <= MAX_LINES


@pytest.mark.parametrize("module", REPORTING)
def test_library_reporters_do_not_import_a_renderer(module):
    source = (PACKAGE / module).read_text(encoding="utf-8")
    assert "rich" not in imported_modules(source)


def test_the_trainer_takes_its_options_in_init():
    from transformers import Trainer

    from tunefix.train.hf_trainer import TunefixTrainer

    assert TunefixTrainer.__mro__[1] is Trainer
    tree = ast.parse((PACKAGE / "train/trainer.py").read_text(encoding="utf-8"))
    set_later = [t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "trainer"]
    assert set_later == [], "pass the option to TunefixTrainer(...) instead"


# ------------------------------------------------------------------------- the protocol


def test_every_reporter_is_a_reporter():
    for reporter in (Silent(), Recorder(), RichReporter(Console(file=io.StringIO()))):
        assert isinstance(reporter, Reporter)


def rendered(run) -> list[str]:
    out = io.StringIO()
    run(RichReporter(Console(file=out, force_terminal=False, width=100)))
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_rich_reporter_lines():
    def run(r):
        with r.stage("merge LoRA -> merged/", "(bf16)"):
            r.note("GGUF metadata fixed: [a]")  # markup-like text is printed as it is
        with r.stage("train"):
            for step in (1, 2):
                r.advance(step, 2, f"loss {step / 10:.4f}")
        with pytest.raises(KeyboardInterrupt), r.stage("verify x.gguf"):
            raise KeyboardInterrupt
        r.note("tunefix fixed: pad token")

    lines = rendered(run)
    assert lines[0] == "  GGUF metadata fixed: [a]"
    assert lines[1].startswith("✓ merge LoRA -> merged/ (bf16) (") and lines[1].endswith("s)")
    # A stage with counted progress leaves its bar's last state as its line.
    assert lines[2].startswith("train ") and "2/2" in lines[2] and lines[2].endswith("loss 0.2000")
    assert lines[3:] == ["✗ verify x.gguf", "tunefix fixed: pad token"]


def test_silent_reporter_logs_notes_at_info_and_stages_at_debug(caplog):
    caplog.set_level("DEBUG", logger="tunefix.progress")
    reporter = Silent()
    with reporter.stage("convert", "f16"):
        reporter.advance(1, 2, "ignored")
    reporter.note("a note")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("DEBUG", "convert f16 ..."),
                                                                      ("INFO", "a note")]


# --------------------------------------------------------------------- who reports it


def test_asset_fetch_reports_each_asset_as_a_stage():
    reporter = Recorder()
    paths = {**assets.fetch_all(progress=reporter), **tiny.fetch_tiny(progress=reporter)}
    assert reporter.steps == [(label, "") for label in paths]
    assert "SmolLM2-135M-Instruct (Hugging Face)" in paths and "tiny llama model" in paths


@pytest.mark.slow
def test_export_reports_its_stages_and_records_the_gguf_steps(tmp_path):
    from tunefix.export.pipeline import ExportOptions, export

    reporter = Recorder()
    model = tiny.tiny_model("mistral")  # a 32k vocabulary: the cheapest real tokenizer
    result = export(model, tmp_path / "out", ExportOptions(gguf=["f16", "q8_0"], name="tiny"), reporter)
    assert result.ok, result.manifest["verification"]["first_error"]
    assert reporter.steps == [("GGUF f16, q8_0 (one conversion)", ""), ("load the PyTorch reference", ""),
                              ("verify tiny-f16.gguf", ""), ("verify tiny-q8_0.gguf", "")]
    # The GGUF steps run inside the export's GGUF stage: recorded in the manifest, not shown.
    steps = [tuple(e) for e in result.manifest["events"]]
    assert [e for e in steps if e[0] != "patch"] == [("convert", "f16"), ("quantize", "q8_0")]
    patches = [detail for name, detail in steps if name == "patch"]
    assert reporter.notes == [f"GGUF metadata fixed: {d}" for d in patches]
    assert result.conversions == 1
