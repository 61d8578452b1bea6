"""The longest sequence that trains within a memory budget: plain transformers + PEFT vs tunefix.

A probe is one training step (forward, backward, AdamW step) of batch 1 x ``seq`` tokens,
every token scored (continued pretraining: the most the lm_head can cost), with the LoRA
and the two sides of ``bench/train.py`` (defined in ``bench/_common.py``). Each probe runs
in its own child process and fails when

- CPU: the child's peak RSS passes ``--budget-gb`` (default 6). The parent reads the
  child's RSS every 20 ms and kills it as soon as it is over, so a failing probe stops
  early; a passing one is then checked on ``ru_maxrss`` (its true peak, from ``wait4``).
- CUDA: the step raises CUDA's out-of-memory error. The budget is the card, or
  ``--budget-gb`` (through ``torch.cuda.set_per_process_memory_fraction``); the peak
  reported is ``torch.cuda.max_memory_allocated``.
- it fails in any other way (the reason is printed). One that runs past
  ``--probe-timeout`` (or the time left) is undecided and ends that side's search.

The search, for each side: double from ``--start`` until a probe fails (or ``--max-seq``
passes: the result is then a lower bound, marked with ">="), then bisect between the last
pass and the first failure until the gap is at most max(``--granularity``, 1/8 of the
passing length). ``--time-budget`` bounds each side's search, the probe then running
included (it is killed, undecided): the search stops with the bracket it has.

    .venv/bin/python bench/context.py --model tiny128k --budget-gb 6
    .venv/bin/python bench/context.py --model smollm2 --budget-gb 4 --max-seq 16384
    python3 bench/context.py --model llama3-8b --device cuda --lora-r 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common


def probe(args) -> dict:
    """In the child: one training step at ``args.seq``; whether it fit and its peak."""
    import torch

    if args.device == "cuda" and args.budget_gb:
        common.require_cuda()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gb * 2**30 / total))
    model, step_loss, optimizer, batch, _ = common.start_child(args, args.probe, count=1, batch=1,
                                                               full=True)
    try:
        loss, seconds = common.train_step(model, step_loss, optimizer, batch, device=args.device,
                                          precision=args.precision)
    except torch.cuda.OutOfMemoryError:
        why = "CUDA out of memory"
    except RuntimeError as e:  # the CPU allocator's "can't allocate memory"
        if "allocate" not in str(e):
            raise
        why = f"out of memory ({e})"[:200]
    else:
        return {"ok": True, "loss": loss, "seconds": seconds,
                "peak_mb": common.peak_memory_mb(args.device)}
    return {"ok": False, "why": why, "peak_mb": common.peak_memory_mb(args.device)}


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass  # the child has just exited: wait4 has its final figure
    return 0.0


def run_probe(args, precision: str, side: str, seq: int, budget_mb: float | None,
              timeout: float) -> dict:
    """One probe in a child process, watched: killed when over budget or over ``timeout`` s.

    A probe killed for time is undecided (``timed_out``), not a failure to fit.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, __file__, *common.model_argv(args, precision), "--seq", str(seq),
               "--probe", side, "--out", str(out)]
        if args.budget_gb:
            cmd += ["--budget-gb", str(args.budget_gb)]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=common.child_env(args, side), stderr=subprocess.PIPE, text=True)
        killed = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if killed is None and args.device == "cpu" and budget_mb and rss_mb(proc.pid) > budget_mb:
                killed = f"RSS over the budget ({rss_mb(proc.pid):.0f} MB), killed"
                proc.kill()
            if killed is None and time.monotonic() - start > timeout:
                killed = f"out of time ({timeout:.0f} s), killed"
                proc.kill()
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        stderr = proc.stderr.read()
        proc.stderr.close()
        wall = time.monotonic() - start
        if killed:
            return {"ok": False, "why": killed, "peak_mb": usage.ru_maxrss / 1024, "wall_s": wall,
                    "timed_out": killed.startswith("out of time")}
        if proc.returncode != 0 or not out.exists():
            tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
            return {"ok": False, "why": f"child failed (exit {proc.returncode}): {tail}",
                    "peak_mb": usage.ru_maxrss / 1024, "wall_s": wall}
        result = json.loads(out.read_text())
    if args.device == "cpu":
        result["peak_mb"] = usage.ru_maxrss / 1024  # the whole child process, from wait4
        if result["ok"] and budget_mb and result["peak_mb"] > budget_mb:
            result.update(ok=False, why="peak RSS over the budget")
    result["wall_s"] = wall
    return result


def search(args, precision: str, side: str, budget_mb: float | None) -> dict:
    """Doubling, then bisection; the longest passing length and the shortest failing one."""
    passed, failed, probes = 0, None, []
    started = time.monotonic()

    def remaining() -> float:
        if not args.time_budget:
            return args.probe_timeout
        return min(args.probe_timeout, args.time_budget - (time.monotonic() - started))

    def attempt(seq: int) -> bool | None:
        """True: fits; False: does not; None: undecided (out of time)."""
        r = run_probe(args, precision, side, seq, budget_mb, remaining())
        probes.append({"seq": seq, **r})
        mark = "fits" if r["ok"] else ("undecided" if r.get("timed_out") else "fails") + f": {r.get('why')}"
        print(f"  {side:>8} seq {seq:>7,}: {mark}; peak {r['peak_mb']:,.0f} MB, "
              f"{r['wall_s']:.0f} s", flush=True)
        return None if r.get("timed_out") else r["ok"]

    def out_of_time() -> bool:
        return remaining() <= 0 or any(p.get("timed_out") for p in probes)

    seq = args.start
    while seq <= args.max_seq and not out_of_time():
        fits = attempt(seq)
        if fits is None:
            break
        if not fits:
            failed = seq
            break
        passed, seq = seq, seq * 2
    while failed is not None and failed - passed > max(args.granularity, passed // 8) \
            and not out_of_time():
        mid = (passed + failed) // 2 // args.granularity * args.granularity
        if mid <= passed:
            break
        fits = attempt(mid)
        if fits is None:
            break
        if fits:
            passed = mid
        else:
            failed = mid
    capped = failed is None and not out_of_time() and passed * 2 > args.max_seq
    peak = next((p["peak_mb"] for p in probes if p["seq"] == passed and p["ok"]), None)
    return {"side": side, "max_seq": passed, "first_fail": failed, "capped": capped,
            "stopped_early": out_of_time(), "peak_mb_at_max": peak, "probes": probes,
            "search_s": time.monotonic() - started}


def describe(r: dict) -> str:
    bound = ">= " if r["capped"] or (r["first_fail"] is None) else ""
    return f"{bound}{r['max_seq']:,}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_model_args(p)
    p.add_argument("--budget-gb", type=float, default=None,
                   help="CPU: peak RSS budget (default 6); CUDA: default the whole card")
    p.add_argument("--start", type=int, default=1024, help="first length probed")
    p.add_argument("--max-seq", type=int, default=65536, help="no probe beyond this length")
    p.add_argument("--granularity", type=int, default=256, help="lengths are multiples of this")
    p.add_argument("--probe-timeout", type=float, default=1800,
                   help="seconds per probe; one that runs longer is undecided and ends the search")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds per side's search (0: none), the probe running then included; "
                        "stops it early with its bracket")
    p.add_argument("--sides", default=",".join(common.SIDES), help="comma-separated: baseline,tunefix")
    p.add_argument("--probe", choices=common.SIDES, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    common.check_model_args(p, args)

    if args.probe:  # the child
        Path(args.out).write_text(json.dumps(probe(args)))
        return 0
    if args.device == "cuda":
        common.require_cuda()
    elif args.budget_gb is None:
        args.budget_gb = 6.0
    budget_mb = args.budget_gb * 1024 if args.budget_gb else None
    precision = common.default_precision(args.device) if args.precision == "auto" else args.precision
    sides = [s for s in args.sides.split(",") if s]
    budget = f"{args.budget_gb:g} GB" if args.budget_gb else "the whole card"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, bf16 instructions: "
          f"{common.cpu_has_bf16()}; device {args.device}; precision {precision}; model {args.model}"
          f"{' (' + args.quant + ')' if args.quant != 'none' else ''}, LoRA r={args.lora_r}, "
          f"batch 1, every token scored; budget {budget} "
          f"({'peak RSS of the probe process' if args.device == 'cpu' else 'CUDA memory'}); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = {side: search(args, precision, side, budget_mb) for side in sides}

    print(f"\n{'side':>8} {'max context':>13} {'first failing':>14} {'peak at max':>12} "
          f"{'probes':>7} {'search':>8}")
    for r in results.values():
        fail = f"{r['first_fail']:,}" if r["first_fail"] else "-"
        peak = f"{r['peak_mb_at_max']:,.0f} MB" if r["peak_mb_at_max"] else "-"
        note = "  (--max-seq reached)" if r["capped"] else ""
        note += "  (--time-budget reached)" if r["stopped_early"] else ""
        print(f"{r['side']:>8} {describe(r):>13} {fail:>14} {peak:>12} {len(r['probes']):>7} "
              f"{r['search_s']:>7.0f}s{note}")
    if set(common.SIDES) <= results.keys() and results["baseline"]["max_seq"]:
        base, ours = results["baseline"], results["tunefix"]
        bound = ">= " if describe(ours).startswith(">=") else ""
        print(f"\nratio tunefix/baseline: {bound}{ours['max_seq'] / base['max_seq']:.1f}x the context "
              f"(load average now {os.getloadavg()[0]:.1f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"budget_gb": args.budget_gb, "precision": precision,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
