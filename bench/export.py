"""Export time and peak RSS: one conversion + quantisations vs one conversion per type.

tunefix: convert SmolLM2-135M-Instruct once to f16 with llama.cpp's converter, then
quantise q8_0, q4_k_m and q5_k_m from it. Baseline (what a careful user does with
llama.cpp's own tools): for each of the three types, convert to f16 and quantise.

Each scenario runs in a fresh child process; its peak RSS is the largest resident set
of it or any process it waited for (the converter), from ``os.wait4``.

    .venv/bin/python bench/export.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUANTS = ("q8_0", "q4_k_m", "q5_k_m")


def run_scenario(name: str, out: Path) -> None:
    from tunefix import assets
    from tunefix.export import gguf

    hf = assets.smollm2()
    if name == "tunefix":
        gguf.export_gguf(hf, out, ["f16", *QUANTS])
        return
    for q in QUANTS:  # baseline: one conversion per quantised type
        base = out / f"base-for-{q}.gguf"
        gguf.convert(hf, base, "f16")
        gguf.quantize(base, out / f"{q}.gguf", q)


def measure(name: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one scenario in a child process."""
    with tempfile.TemporaryDirectory(prefix="tunefix-bench-") as tmp:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, __file__, "--scenario", name, "--out", tmp])
        _pid, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"scenario {name} failed with status {status}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("tunefix", "baseline"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.scenario:
        run_scenario(args.scenario, args.out)
        return
    from tunefix import assets

    assets.smollm2()  # build the asset outside the timings
    load = os.getloadavg()[0]
    rows = [(name, *measure(name)) for name in ("tunefix", "baseline")]
    base_s = rows[1][1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load:.1f} at start, Python {platform.python_version()}")
    print("| scenario | conversions | seconds | vs baseline | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds, rss in rows:
        convs = 1 if name == "tunefix" else len(QUANTS)
        print(f"| {name} | {convs} | {seconds:.1f} | {seconds / base_s:.2f}x | {rss:.0f} |")


if __name__ == "__main__":
    main()
