"""``tunefix train`` and ``tunefix eval``: thin functions over the library."""

from __future__ import annotations

import argparse
import json

from rich.console import Console


def run_train(args: argparse.Namespace) -> int:
    from tunefix.train.config import load_config

    cfg = load_config(args.config, args.overrides)
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
    weights = "model/" if cfg.method == "full" else "adapter/"
    console.print(f"run directory: {result.run_dir} ({weights}, tokenizer/, loss.png, metrics.jsonl)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from tunefix.train.evaluate import evaluate
    from tunefix.train.run import load_run, read_run
    from tunefix.train.trainer import prepare_data

    cfg, _ = read_run(args.run_dir)  # fails early, before any model is loaded
    if args.data:
        cfg.data, cfg.eval_fraction = args.data, 0.0
        for key in ("merge", "output", "system", "format"):
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
    cfg.limit_rows = args.rows or cfg.limit_rows
    cfg.validate()
    model, tok, template, _ = load_run(args.run_dir)
    _, train_rows, eval_rows = prepare_data(cfg, tok)
    rows = eval_rows or train_rows
    result = evaluate(model, tok, template, rows, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"accuracy": result.accuracy, "stop_rate": result.stop_rate, "n": result.n}))
    else:
        Console().print(result.line())
    return 0
