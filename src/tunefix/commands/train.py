"""``tunefix train`` and ``tunefix eval``: thin functions over the library."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from tunefix.commands.build import HelpFrom, add_arguments, document_arguments, option, positional


@dataclass
class TrainOptions:
    """The run's own keys are ``RunConfig``'s fields (``tunefix.train.config``): ``--help``
    lists them, and ``load_config`` reads them from the YAML file and the overrides."""

    config: str | None = positional(metavar="[CONFIG.yaml] [key=value | --key value ...]", default=None)
    """YAML run config (optional when every key is given), then overrides"""
    overrides: list[str] = option(cli=False, default_factory=list)
    """key=value and --key value overrides, in the order given (the last one wins)"""


def train_arguments(argv: Sequence[str]) -> TrainOptions:
    """The config file and the overrides, from the arguments after ``train``.

    Read here, not by argparse: argparse cannot take "--data x" as a positional list, and
    key=value and --key value overrides keep their order. Only a first argument naming a
    YAML file is the config.
    """
    rest = list(argv)
    config = rest.pop(0) if rest and rest[0].endswith((".yaml", ".yml")) else None
    return TrainOptions(config=config, overrides=rest)


def add_train_help(parser: argparse.ArgumentParser) -> None:
    """``-h/--help`` for ``parser`` (which parses only the config file) listing every
    ``RunConfig`` key with its docstring. The keys are not parser options: argparse would
    reorder them, abbreviate them and word their errors its own way."""
    from tunefix.train.config import RunConfig

    shown = argparse.ArgumentParser(prog=parser.prog, description=parser.description, add_help=False,
                                    usage="%(prog)s [-h] [CONFIG.yaml] [key=value | --key value ...]")
    shown.add_argument("-h", "--help", action="help", help="show this help message and exit")
    add_arguments(shown, TrainOptions)
    document_arguments(shown.add_argument_group("run config keys (YAML key: value, key=value or --key value)"),
                       RunConfig)
    parser.add_argument("-h", "--help", action=HelpFrom, help_parser=shown)


@dataclass
class EvalOptions:
    run_dir: str = positional()
    """a finished run directory"""
    data: str | None = None
    """data file (default: the run's held-out split)"""
    merge: str | None = None
    """merge template for a table (default: the run's)"""
    output: str | None = None
    """answer column or template (default: the run's)"""
    system: str | None = None
    """system prompt (default: the run's)"""
    format: str | None = None
    """data format (default: the run's / detected)"""
    rows: int | None = None
    """use only the first N rows"""
    max_new_tokens: int = 16
    """the longest answer generated, in tokens"""
    json: bool = False
    """print accuracy, stop rate and row count as JSON"""


def run_train(opts: TrainOptions) -> int:
    from rich.console import Console

    from tunefix.train.config import load_config

    cfg = load_config(opts.config, opts.overrides)
    if cfg.cpu_allocator in ("auto", "lean"):
        from tunefix.model.allocator import request_huge_pages

        request_huge_pages()  # torch reads its switch once: before it is imported (here)
    console = Console()
    from tunefix.train.trainer import is_main_process, train

    result = train(cfg, console=console)
    if not is_main_process():
        return 0  # under torchrun, rank 0 reports for all
    last = result.losses[-1][1] if result.losses else float("nan")
    console.print(f"trained {result.steps} steps on {result.train_rows} rows; last loss {last:.4f}")
    if result.eval_losses:
        console.print(f"eval loss {result.eval_losses[-1][1]:.4f} on {result.eval_rows} held-out rows")
    weights = "model/" if cfg.finetune == "full" else "adapter/"
    console.print(f"run directory: {result.run_dir} ({weights}, tokenizer/, loss.png, metrics.jsonl)")
    return 0


def run_eval(opts: EvalOptions) -> int:
    import json

    from rich.console import Console

    from tunefix.train.evaluate import evaluate
    from tunefix.train.methods import method_of
    from tunefix.train.run import load_run, read_run
    from tunefix.train.trainer import prepare_data

    cfg, _ = read_run(opts.run_dir)  # fails early, before any model is loaded
    if opts.data:
        cfg.data, cfg.eval_fraction = opts.data, 0.0
        for key in ("merge", "output", "system", "format"):
            if getattr(opts, key) is not None:
                setattr(cfg, key, getattr(opts, key))
    cfg.limit_rows = opts.rows or cfg.limit_rows
    cfg.validate()
    model, tok, template, _ = load_run(opts.run_dir)
    if method_of(cfg).data == "pairs":
        return _eval_pairs(cfg, model, tok, template, opts)
    _, train_rows, eval_rows = prepare_data(cfg, tok)
    rows = eval_rows or train_rows
    result = evaluate(model, tok, template, rows, max_new_tokens=opts.max_new_tokens)
    if opts.json:
        print(json.dumps({"accuracy": result.accuracy, "stop_rate": result.stop_rate, "n": result.n}))
    else:
        Console().print(result.line())
    return 0


def _eval_pairs(cfg, model, tok, template, opts: EvalOptions) -> int:
    """A DPO/ORPO run on its held-out pairs: preference accuracy with and without the adapter,
    and the generated answers' exact match with the chosen answers."""
    import json

    from rich.console import Console

    from tunefix.train.evaluate import evaluate, preference_accuracy
    from tunefix.train.preference import load_preference_rows, preference_rows

    _, train_rows, eval_rows, held = preference_rows(cfg, tok, load_preference_rows(cfg))
    rows, pairs = (eval_rows, held) if eval_rows else (train_rows, load_preference_rows(cfg).rows)
    trained = preference_accuracy(model, rows)
    with model.disable_adapter():  # the reference: the same base, no adapter
        base = preference_accuracy(model, rows)
    answers = evaluate(model, tok, template, [r["prompt"] + [r["chosen"]] for r in pairs],
                       max_new_tokens=opts.max_new_tokens)
    if opts.json:
        print(json.dumps({"preference_accuracy": trained.accuracy, "margin": trained.margin,
                          "base_preference_accuracy": base.accuracy, "accuracy": answers.accuracy,
                          "stop_rate": answers.stop_rate, "n": trained.n}))
        return 0
    console = Console()
    console.print(f"{trained.line()} (without the adapter: {base.accuracy:.1%})")
    console.print(f"answers equal to the chosen ones: {answers.line()}")
    return 0
