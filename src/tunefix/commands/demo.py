"""``tunefix demo``: the main job on the built-in default (``tunefix.demo`` runs it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoOptions:
    model: str | None = None
    """model to use instead of the built-in SmolLM2-135M-Instruct"""
    data: str | None = None
    """your data file instead of the built-in Titanic CSV"""
    merge: str | None = None
    """merge template over your table's columns"""
    answer: str | None = None
    """the answer column or template (e.g. {alive})"""
    output: str = "runs/demo"
    """run directory (never overwritten: runs/demo-2... when taken)"""
    steps: int = 120
    """optimizer steps"""
    rows: int | None = None
    """use only the first N rows (quick runs)"""
    no_export: bool = False
    """stop after training and evaluation"""


def run_demo(opts: DemoOptions) -> int:
    from tunefix.model.allocator import request_huge_pages

    request_huge_pages()  # before torch is imported: the demo trains with cpu_allocator auto
    from tunefix.demo import run_demo as demo

    return demo(model=opts.model, data=opts.data, merge=opts.merge, answer=opts.answer, output=opts.output,
                steps=opts.steps, rows=opts.rows, export=not opts.no_export)

