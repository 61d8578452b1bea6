"""Issue 17, typed commands: each command's options are one dataclass, its parser is generated
from it, ``--help`` shows every field's docstring, and no library function takes a Namespace."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

import tunefix
from tunefix import cli
from tunefix.cli import COMMANDS, main
from tunefix.commands.build import (
    add_arguments,
    cli_fields,
    field_docs,
    flag_name,
    options_from,
    positional,
)
from tunefix.commands.train import TrainOptions, train_arguments
from tunefix.train.config import CHOICES, RunConfig

PACKAGE = Path(tunefix.__file__).parent
ALPACA = Path(__file__).resolve().parents[1] / "examples" / "alpaca_sample.json"


def flat(text: str) -> str:
    return " ".join(text.split())


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return flat(capsys.readouterr().out)


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    # argparse wraps help at the terminal width and breaks words at hyphens; one long line
    # per option keeps each docstring whole.
    monkeypatch.setenv("COLUMNS", "2000")


def documented(cls: type) -> list[tuple[str, str]]:
    """(field, docstring) for every command-line field; a field without one fails here."""
    docs = field_docs(cls)
    missing = [f.name for f in cli_fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    return [(f.name, docs[f.name]) for f in cli_fields(cls)]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_help_shows_every_option_with_its_docstring(command, capsys):
    out = help_of(command.name.split(), capsys)
    fields = documented(command.options)
    if command.options is TrainOptions:  # the run's own keys are RunConfig's fields
        fields += [(flag_name(name), doc) for name, doc in documented(RunConfig)]
    for name, doc in fields:
        assert flat(doc) in out, f"{command.name} --help lacks {name}'s docstring {doc!r}"
    for f in cli_fields(command.options):
        if not f.metadata.get("positional"):
            assert flag_name(f.name) in out


def test_train_help_lists_lora_alpha(capsys):
    out = help_of(["train"], capsys)
    doc = flat(field_docs(RunConfig)["lora_alpha"])
    assert f"--lora-alpha INT {doc}" in out, out
    assert "--finetune {lora,full}" in out and "--method {sft,cpt,dpo,orpo,kto,grpo}" in out  # a Literal field shows its choices


@pytest.mark.parametrize("command", COMMANDS, ids=[c.name for c in COMMANDS])
def test_handlers_take_their_options_dataclass(command):
    hints = typing.get_type_hints(command.handler)
    params = [p for p in hints if p != "return"]
    assert len(params) == 1 and hints[params[0]] is command.options
    assert dataclasses.is_dataclass(command.options)


def _required_argv(cls: type) -> list[str]:
    """The least argv that satisfies ``cls``'s required arguments."""
    argv = []
    for f in cli_fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            argv += ["x"] if f.metadata.get("positional") else [flag_name(f.name), "x"]
    return argv


LITERALS = [(c, f.name, typing.get_args(typing.get_type_hints(c.options)[f.name]))
            for c in COMMANDS for f in cli_fields(c.options)
            if typing.get_origin(typing.get_type_hints(c.options)[f.name]) is Literal]


def test_some_command_has_choices():
    assert LITERALS  # else the next test would check nothing


@pytest.mark.parametrize("command,name,choices", LITERALS, ids=[f"{c.name}-{n}" for c, n, _ in LITERALS])
def test_a_bad_choice_is_one_line_and_exit_2(command, name, choices, capsys):
    bad = "not-" + choices[0]
    with pytest.raises(SystemExit) as done:
        main([*command.name.split(), *_required_argv(command.options), flag_name(name), bad])
    assert done.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "invalid choice" in err[0] and bad in err[0] and all(c in err[0] for c in choices)
    assert f"See `tunefix {command.name} --help`." in err[0]


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_a_bad_run_config_choice_is_one_line_and_exit_2(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(ALPACA), flag_name(name), "nope"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    allowed = CHOICES[name]
    assert err[0].startswith(f"tunefix: error: {flag_name(name)} must be {', '.join(allowed[:-1])} or "
                             f"{allowed[-1]}, got 'nope'"), err[0]
    assert not list(tmp_path.iterdir())


def test_run_config_choices_come_from_the_annotations():
    hints = typing.get_type_hints(RunConfig)
    assert CHOICES["finetune"] == typing.get_args(hints["finetune"]) == ("lora", "full")
    assert set(CHOICES) == {n for n, h in hints.items() if typing.get_origin(h) is Literal}


# ------------------------------------------------------------------ the builder itself


@dataclass
class _Example:
    path: str = positional()
    """where it is"""
    max_new_tokens: int = 16
    """how many,
    at most"""
    kind: Literal["a", "b"] = "a"
    """which one"""
    rate: float | None = None
    """how fast"""
    dry_run: bool = False
    """only pretend"""


def _example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_arguments(parser, _Example)
    return parser


def test_builder_reads_docstrings_types_and_defaults():
    assert field_docs(_Example) == {"path": "where it is", "max_new_tokens": "how many, at most",
                                    "kind": "which one", "rate": "how fast", "dry_run": "only pretend"}
    ns = _example_parser().parse_args(["p", "--max-new-tokens", "3", "--kind", "b", "--rate", "0.5", "--dry-run"])
    assert options_from(_Example, ns) == _Example("p", 3, "b", 0.5, True)
    assert options_from(_Example, _example_parser().parse_args(["q"])) == _Example("q")
    with pytest.raises(SystemExit):
        _example_parser().parse_args(["q", "--max-new-tokens", "many"])  # typed from the annotation
    with pytest.raises(SystemExit):
        _example_parser().parse_args(["q", "--kind", "c"])
    with pytest.raises(SystemExit):
        _example_parser().parse_args([])  # the positional without a default is required


def test_run_config_docstrings_come_out_like_the_commands():
    docs = field_docs(RunConfig)
    assert docs["lora_alpha"] == "default 2 * lora_r"
    assert docs["report_to"].startswith("where metrics go besides metrics.jsonl: auto (TensorBoard")
    assert "\n" not in docs["report_to"]  # a docstring over several lines becomes one line
    assert "extra" not in {f.name for f in cli_fields(RunConfig)}


def test_train_arguments_keep_their_order():
    opts = train_arguments(["run.yaml", "lora_r=8", "--lora-r", "16", "--resume"])
    assert opts == TrainOptions(config="run.yaml", overrides=["lora_r=8", "--lora-r", "16", "--resume"])
    assert train_arguments(["--data", "x.csv"]) == TrainOptions(config=None, overrides=["--data", "x.csv"])


# ------------------------------------------------------------------ no Namespace in the library


BUILDER = {PACKAGE / "commands" / "build.py", PACKAGE / "cli.py"}


def namespace_annotations(path: Path) -> list[str]:
    """Functions in ``path`` whose parameter or return annotations mention a Namespace."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            args += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            notes = [a.annotation for a in args if a.annotation is not None] + [node.returns]
            if any(n is not None and "Namespace" in ast.unparse(n) for n in notes):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    return found


def test_no_library_function_takes_a_namespace():
    # The walker finds what it looks for: the builder's own reader of a Namespace.
    assert namespace_annotations(PACKAGE / "commands" / "build.py")
    offenders = [hit for f in sorted(PACKAGE.rglob("*.py")) if f not in BUILDER for hit in namespace_annotations(f)]
    assert not offenders, offenders


def test_cli_builds_every_command_from_the_table():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    top = {c.name.split()[0] for c in COMMANDS}
    assert set(sub.choices) == top
