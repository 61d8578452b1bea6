"""LoRA training speed and memory: plain transformers + PEFT vs tunefix, same rows, same seed.

Each side runs in its own child process (so each peak RSS is its own) and trains the same
model on the same batches with the same LoRA (r=16, alpha=32, dropout 0, all linear
layers) and the same AdamW:

- baseline: what a careful user writes with transformers + PEFT: gradient checkpointing on
  (non-reentrant, model.train()), dynamic padding, ``model(**batch).loss``.
- tunefix: ``tunefix.model.checkpointing.apply_checkpointing(model, "offload")`` (on a CPU
  the same as "on") and ``tunefix.model.loss.model_loss`` (chunked lm_head + cross-entropy
  on the scored tokens only).

Both run in bf16 autocast where the CPU has bf16 instructions (avx512_bf16 / amx_bf16),
else fp32 (design.md: a CPU without them emulates bf16 slowly), or as ``--precision`` says.
Prints tokens/s (non-padding tokens, median of the steps after warm-up), peak RSS, the loss
of every step and the ratios; exits 1 when the loss curves differ beyond ``--tol``.

    .venv/bin/python bench/train.py --model smollm2 --seq 512 --steps 6
    .venv/bin/python bench/train.py --model tiny128k --seq 2048 --steps 6
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH = 2
SEED = 0
LR = 2e-4
TITANIC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "titanic.csv"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from tunefix import assets

        return assets.smollm2()
    if name == "tiny128k":
        from tunefix.tiny import tiny_model

        return tiny_model("llama")  # hidden 256, 2 layers, real Llama 3 vocabulary (128,256)
    raise SystemExit(f"unknown model {name!r}")


def corpus() -> list[str]:
    """One sentence per Titanic passenger (real, varied text; the project's demo data)."""
    with TITANIC.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [", ".join(f"{k} {v}" for k, v in row.items() if v) + "." for row in rows]


def batches(tokenizer, seq: int, count: int) -> list[dict]:
    """``count`` batches of BATCH rows, lengths uniform in [seq/2, seq], padded to the longest.

    The first quarter of each row is a "prompt" (label -100), as in supervised fine-tuning
    with response-only labels; padding is labelled -100 too.
    """
    import torch

    g = torch.Generator().manual_seed(SEED)
    texts = corpus()
    order = torch.randperm(len(texts), generator=g).tolist()
    stream = tokenizer("\n".join(texts[i] for i in order), add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out, offset = [], 0
    for _ in range(count):
        lengths = torch.randint(seq // 2, seq + 1, (BATCH,), generator=g).tolist()
        width = max(lengths)  # dynamic padding: to the longest row of this batch
        ids = torch.full((BATCH, width), pad, dtype=torch.long)
        mask = torch.zeros(BATCH, width, dtype=torch.long)
        labels = torch.full((BATCH, width), -100, dtype=torch.long)
        for r, n in enumerate(lengths):
            if offset + n > len(stream):
                offset = 0
            row = torch.tensor(stream[offset:offset + n])
            offset += n
            ids[r, :n], mask[r, :n] = row, 1
            labels[r, n // 4:n] = row[n // 4:]
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def child(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    data = batches(tokenizer, args.seq, args.warmup + args.steps)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.side == "baseline":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # from_pretrained returns eval mode, where checkpointing does nothing

        def step_loss(batch):
            return model(**batch, use_cache=False).loss
    else:
        from tunefix.model.checkpointing import apply_checkpointing
        from tunefix.model.loss import model_loss

        apply_checkpointing(model, "offload")

        def step_loss(batch):
            return model_loss(model, batch)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    bf16 = args.precision == "bf16"
    rss_loaded = peak_rss_mb()
    losses, times, tokens = [], [], []
    for batch in data:
        if args.lockstep:  # wait for the parent's turn signal (see run_sides)
            sys.stdin.readline()
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = step_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        tokens.append(int(batch["attention_mask"].sum()))
        print(f"  {args.side} step {len(losses)}: loss {losses[-1]:.5f}  {times[-1]:.2f} s",
              file=sys.stderr, flush=True)
        if args.lockstep:
            print("done", flush=True)
    measured = range(args.warmup, len(times))
    return {
        "side": args.side, "losses": losses, "step_s": times, "tokens": tokens,
        "tokens_per_s": statistics.median(tokens[i] / times[i] for i in measured),
        "peak_rss_mb": peak_rss_mb(), "peak_rss_after_load_mb": rss_loaded,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def run_sides(args, precision: str) -> tuple[dict, dict]:
    """Run both children; with ``--lockstep`` they take turns, one step each.

    Both children live at once (each peak RSS is still its own process's), but only one
    computes at a time, alternating which goes first each step. On a machine shared with
    other work, the load then falls on both sides alike instead of on whichever happened
    to run during a busy minute.
    """
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        procs, outs = {}, {}
        for side in ("baseline", "tunefix"):
            outs[side] = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, "--model", args.model, "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--precision", precision, "--threads", str(args.threads), "--side", side,
                   "--out", str(outs[side])] + (["--lockstep"] if args.lockstep else [])
            if not args.lockstep:
                subprocess.run(cmd, check=True, env=env)
                continue
            procs[side] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
        for step in range(args.warmup + args.steps if args.lockstep else 0):
            order = ("baseline", "tunefix") if step % 2 == 0 else ("tunefix", "baseline")
            for side in order:
                procs[side].stdin.write("go\n")
                procs[side].stdin.flush()
                if procs[side].stdout.readline().strip() != "done":
                    raise SystemExit(f"{side} child stopped at step {step + 1}")
        for side, proc in procs.items():
            proc.stdin.close()
            if proc.wait() != 0:
                raise SystemExit(f"{side} child failed")
        return tuple(json.loads(outs[side].read_text()) for side in ("baseline", "tunefix"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "tiny128k"], default="smollm2")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tol", type=float, default=None,
                   help="max relative loss difference per step (default 2e-3 fp32, 2e-2 bf16)")
    p.add_argument("--lockstep", action="store_true",
                   help="both children alive, taking turns one step each (fairer on a busy machine)")
    p.add_argument("--side", choices=["baseline", "tunefix"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.side:  # the child
        Path(args.out).write_text(json.dumps(child(args)))
        return 0

    precision = args.precision
    if precision == "auto":
        precision = "bf16" if cpu_has_bf16() else "fp32"
    tol = args.tol if args.tol is not None else (2e-2 if precision == "bf16" else 2e-3)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, "
          f"bf16 instructions: {cpu_has_bf16()}; precision {precision}; model {args.model}, "
          f"batch {BATCH} x seq {args.seq} (dynamic padding), {args.warmup} warm-up + "
          f"{args.steps} measured steps; lockstep {args.lockstep}; load average "
          f"{os.getloadavg()[0]:.1f}")
    base, ours = run_sides(args, precision)

    print(f"\n{'step':>4} {'baseline loss':>14} {'tunefix loss':>14} {'rel diff':>9}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(base["losses"], ours["losses"], strict=True)):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"{i + 1:>4} {a:>14.6f} {b:>14.6f} {rel:>9.2e}")
    print(f"\n{'':>10} {'tokens/s':>10} {'peak RSS MB':>12} {'RSS after load':>15}")
    for r in (base, ours):
        print(f"{r['side']:>10} {r['tokens_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_after_load_mb']:>15.0f}")
    speed = ours["tokens_per_s"] / base["tokens_per_s"]
    memory = ours["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"\nratios tunefix/baseline: tokens/s {speed:.2f}x, peak RSS {memory:.2f}x; "
          f"worst loss difference {worst:.2e} (tolerance {tol:.0e}); torch threads {base['threads']}")
    if worst > tol:
        print("FAIL: the loss curves disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
