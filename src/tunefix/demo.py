"""`tunefix demo`: the main job on the built-in default.

Today: fetch the real assets, run the doctor on SmolLM2-135M-Instruct and show what it
finds. Training, evaluation and export join as their issues land.
"""

from __future__ import annotations

import argparse

from rich.console import Console


def run_demo(args: argparse.Namespace) -> int:
    from tunefix import assets

    console = Console()
    console.rule("tunefix demo")
    console.print(f"fetching the real assets (once; cached in {assets.cache_root()})")
    assets.fetch_all(progress=lambda label: console.print(f"  {label}", highlight=False))
    model = args.model or str(assets.smollm2())
    try:
        from tunefix.doctor.cli import doctor_and_print
    except ImportError:
        console.print("the doctor is not built yet")
        return 0
    console.rule(f"doctor: {model}")
    doctor_and_print(model, console=console)
    return 0
