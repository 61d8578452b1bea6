"""argparse parsers generated from options dataclasses.

A command's options are one ``@dataclass``: each field's annotation gives the flag's type
(``Literal[...]`` its choices, ``bool`` a switch, ``X | None`` an optional value), its default
the flag's default, and the string literal under the field (an attribute docstring, as
litgpt and torchtune write their configs) its ``--help`` line. ``max_new_tokens`` becomes
``--max-new-tokens``; a field made with ``positional()`` is a positional argument.

Written here (a page of code) rather than taken from tyro, simple-parsing or jsonargparse:
each of those brings its own error and help rendering (tyro draws rich panels, jsonargparse
reads config files and environment variables its own way), while tunefix needs argparse's
subcommands with its one-line errors, and ``tunefix train``'s YAML plus ``key=value``
overrides, which ``train.config.load_config`` owns with its own messages.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal


@dataclasses.dataclass
class NoOptions:
    """The options of a command that has none (``tunefix assets path``)."""


def positional(*, metavar: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field read as a positional argument (optional when it has a default)."""
    return dataclasses.field(metadata={"positional": True, "metavar": metavar}, **kwargs)


def option(*, metavar: str | None = None, cli: bool = True, **kwargs: Any) -> Any:
    """A dataclass field with a metavar for its flag, or (``cli=False``) one no flag sets."""
    return dataclasses.field(metadata={"metavar": metavar, "cli": cli}, **kwargs)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right under it), on one line.

    Read from the class source once: Python keeps no such docstring at run time.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are command-line arguments, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unwrap(hint: Any) -> Any:
    """The type without its ``| None`` (an option left out is None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{hint}: an option is one type, or that type | None")
        return rest[0]
    return hint


def _help(cls: type, f: dataclasses.Field, default: Any) -> str:
    """The field's docstring, plus its default unless that is empty or the text names one."""
    text = field_docs(cls).get(f.name, "")
    empty = default is None or default is False or default is dataclasses.MISSING or default in ("", [], ())
    if not empty and "default" not in text:
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One argument per field of ``cls``, typed, with its docstring as help."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        kind = _unwrap(hints[f.name])
        default = _default(f)
        kwargs: dict[str, Any] = {"help": _help(cls, f, default)}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif kind is bool:
            assert default is False, f"{cls.__name__}.{f.name}: a switch is off by default"
            parser.add_argument(flag_name(f.name), action="store_true", help=kwargs["help"])
            continue
        elif kind in (int, float):
            kwargs["type"] = kind
        if f.metadata.get("positional"):
            if default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=default)
            parser.add_argument(f.name, **kwargs)
        elif default is dataclasses.MISSING:
            parser.add_argument(flag_name(f.name), required=True, **kwargs)
        else:
            parser.add_argument(flag_name(f.name), default=default, **kwargs)


_METAVARS = {str: "TEXT", int: "INT", float: "FLOAT", list: "A,B,...", dict: "MAPPING"}


def document_arguments(group: argparse._ArgumentGroup, cls: type) -> None:
    """``cls``'s fields as flags for a parser that only shows help (``tunefix train``'s run
    keys, which ``load_config`` parses): ``--lora-r INT`` with the docstring."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        kind = _unwrap(hints[f.name])
        kwargs: dict[str, Any] = {"help": _help(cls, f, _default(f))}
        if typing.get_origin(kind) is Literal:
            kwargs["choices"] = typing.get_args(kind)
        elif kind is bool:  # a bare --resume means true
            kwargs.update(nargs="?", metavar="BOOL")
        else:
            kwargs["metavar"] = _METAVARS.get(typing.get_origin(kind) or kind, "VALUE")
        group.add_argument(flag_name(f.name), **kwargs)


class HelpFrom(argparse.Action):
    """``-h/--help`` that prints another parser's help (one built to document, not to parse)."""

    def __init__(self, option_strings, dest, *, help_parser: argparse.ArgumentParser, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show this help message and exit")
        self.help_parser = help_parser

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        self.help_parser.print_help()
        parser.exit()


def options_from(cls: type, namespace: argparse.Namespace) -> Any:
    """The options dataclass from a parsed namespace (the one place a Namespace is read)."""
    values = vars(namespace)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
