"""LoRA training speed and memory: plain transformers + PEFT vs tunefix, same rows, same seed.

Each side runs in its own child process (so each peak memory is its own) and trains the
same model on the same batches with the same LoRA (r=16 by default, alpha=2r, dropout 0,
all linear layers) and the same AdamW. The two sides and the models are defined in
``bench/_common.py`` (shared with ``bench/context.py``):

- baseline: what a careful user writes with transformers + PEFT: gradient checkpointing on
  (non-reentrant, model.train()), dynamic padding, ``model(**batch).loss``.
- tunefix: ``tune_cpu_allocator()`` on a CPU, ``apply_checkpointing(model, "offload")``
  (on a CPU the same as "on") and ``tunefix.model.loss.model_loss`` (chunked lm_head +
  cross-entropy on the scored tokens only).

On a CPU both run in bf16 autocast where the CPU has bf16 instructions (avx512_bf16 /
amx_bf16), else fp32 (design.md: a CPU without them emulates bf16 slowly), or as
``--precision`` says; weights in fp32. On CUDA (``--device cuda``) the weights are bf16 and
the step runs under bf16 autocast (as transformers' Trainer with ``bf16=True``); peak
memory is ``torch.cuda.max_memory_allocated``. Prints tokens/s (non-padding tokens per
optimizer step, median of the steps after warm-up), peak memory, the loss of every step
and the ratios; exits 1 when the loss curves differ beyond ``--tol``.

    .venv/bin/python bench/train.py --model smollm2 --seq 512 --steps 6
    .venv/bin/python bench/train.py --model tiny128k --seq 2048 --steps 6
    python3 bench/train.py --model llama3-8b --device cuda --seq 2048 --batch 2 --grad-accum 4 --lora-r 32
    .venv/bin/python bench/train.py --model llama3-8b --dry-run   # shapes only, on the meta device
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (
    LLAMA3_8B,
    LLAMA3_8B_PARAMS,
    SIDES,
    add_model_args,
    check_model_args,
    child_env,
    cpu_has_bf16,
    default_precision,
    llama3_8b_config,
    model_argv,
    peak_memory_mb,
    prepare_side,
    random_model,
    require_cuda,
    start_child,
    train_step,
)


def child(args) -> dict:
    import torch

    count = (args.warmup + args.steps) * args.grad_accum
    model, step_loss, optimizer, data, notes = start_child(args, args.side, count=count,
                                                           batch=args.batch)
    after_load = peak_memory_mb(args.device)
    losses, times, tokens = [], [], []
    for step in range(args.warmup + args.steps):
        micro = data[step * args.grad_accum:(step + 1) * args.grad_accum]
        if args.lockstep:  # wait for the parent's turn signal (see run_sides)
            sys.stdin.readline()
        loss, seconds = train_step(model, step_loss, optimizer, micro, device=args.device,
                                   precision=args.precision)
        losses.append(loss)
        times.append(seconds)
        tokens.append(sum(int(b["attention_mask"].sum()) for b in micro))
        print(f"  {args.side} step {len(losses)}: loss {loss:.5f}  {seconds:.2f} s",
              file=sys.stderr, flush=True)
        if args.lockstep:
            print("done", flush=True)
    measured = range(args.warmup, len(times))
    return {
        "side": args.side, "losses": losses, "step_s": times, "tokens": tokens,
        "tokens_per_s": statistics.median(tokens[i] / times[i] for i in measured),
        "peak_mb": peak_memory_mb(args.device), "after_load_mb": after_load, "notes": notes,
        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,  # pages faulted in
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def dry_run(args) -> int:
    """Llama-3-8B's shapes on the meta device (no memory, no GPU): the GPU run's model code.

    Checks the full model's parameter count, then builds ``--layers`` (default 2) layers at
    8B widths, adds the LoRA and runs both sides' forward on meta tensors to check shapes.
    """
    import torch

    from tunefix.model.loss import final_hidden

    full = random_model(llama3_8b_config(), "meta", torch.bfloat16)
    count = sum(p.numel() for p in full.parameters())
    assert count == LLAMA3_8B_PARAMS, f"8B config has {count:,} parameters, not {LLAMA3_8B_PARAMS:,}"
    del full
    config = llama3_8b_config(args.layers or 2, args.hidden)
    model = random_model(config, "meta", torch.bfloat16)
    model, _, _ = prepare_side("baseline", model, lora_r=args.lora_r, device="meta")
    c, r = config, args.lora_r
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    per_layer = r * ((c.hidden_size + c.hidden_size) * 2 + (c.hidden_size + kv) * 2  # q, o; k, v
                     + (c.hidden_size + c.intermediate_size) * 3)  # gate, up, down
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == per_layer * c.num_hidden_layers, (trained, per_layer * c.num_hidden_layers)
    ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="meta")
    # A ready 4-D causal mask: transformers' own mask building asks data-dependent
    # questions (is every row unpadded?) that meta tensors cannot answer.
    causal = torch.ones(args.seq, args.seq, dtype=torch.bool, device="meta").tril()
    inputs = {"input_ids": ids, "attention_mask": causal.expand(args.batch, 1, -1, -1)}
    logits = model(**inputs, use_cache=False).logits
    assert logits.shape == (args.batch, args.seq, c.vocab_size), logits.shape
    hidden = final_hidden(model, **inputs)
    assert hidden.shape == (args.batch, args.seq, c.hidden_size), hidden.shape
    print(f"dry run OK: Llama-3-8B config, {count:,} parameters; {c.num_hidden_layers} layers "
          f"at hidden {c.hidden_size} (MLP {c.intermediate_size}, {c.num_attention_heads} heads, "
          f"{c.num_key_value_heads} kv) on meta: LoRA r={r} trains {trained:,} "
          f"({per_layer:,} a layer; {per_layer * LLAMA3_8B['num_hidden_layers']:,} for all 32); "
          f"logits {tuple(logits.shape)}, hidden {tuple(hidden.shape)}")
    return 0


def run_sides(args, precision: str) -> tuple[dict, dict]:
    """Run both children; with ``--lockstep`` they take turns, one step each.

    Both children live at once (each peak memory is still its own process's), but only one
    computes at a time, alternating which goes first each step. On a machine shared with
    other work, the load then falls on both sides alike instead of on whichever happened
    to run during a busy minute.
    """
    with tempfile.TemporaryDirectory() as tmp:
        procs, outs = {}, {}
        for side in SIDES:
            env = child_env(args, side)
            outs[side] = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, __file__, *model_argv(args, precision), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--grad-accum", str(args.grad_accum),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--side", side,
                   "--out", str(outs[side])] + (["--lockstep"] if args.lockstep else [])
            if not args.lockstep:
                subprocess.run(cmd, check=True, env=env)
                continue
            procs[side] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
        for step in range(args.warmup + args.steps if args.lockstep else 0):
            order = SIDES if step % 2 == 0 else SIDES[::-1]
            for side in order:
                procs[side].stdin.write("go\n")
                procs[side].stdin.flush()
                if procs[side].stdout.readline().strip() != "done":
                    raise SystemExit(f"{side} child stopped at step {step + 1}")
        for side, proc in procs.items():
            proc.stdin.close()
            if proc.wait() != 0:
                raise SystemExit(f"{side} child failed")
        return tuple(json.loads(outs[side].read_text()) for side in SIDES)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tol", type=float, default=None,
                   help="max relative loss difference per step (default 2e-3 fp32, 2e-2 bf16)")
    p.add_argument("--lockstep", action="store_true",
                   help="both children alive, taking turns one step each (fairer on a busy machine)")
    p.add_argument("--dry-run", action="store_true",
                   help="llama3-8b only: build it on the meta device and check shapes, no training")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.dry_run and args.model != "llama3-8b":
        p.error("--dry-run builds llama3-8b only")
    check_model_args(p, args, dry_run=args.dry_run)
    if args.dry_run:
        return dry_run(args)
    if args.side:  # the child
        Path(args.out).write_text(json.dumps(child(args)))
        return 0
    if args.device == "cuda":
        require_cuda()  # here too, so the error comes before any child starts

    precision = default_precision(args.device) if args.precision == "auto" else args.precision
    tol = args.tol if args.tol is not None else (2e-2 if precision == "bf16" else 2e-3)
    memory_name = "peak VRAM MB" if args.device == "cuda" else "peak RSS MB"
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cpus, "
          f"bf16 instructions: {cpu_has_bf16()}; device {args.device}; precision {precision}; "
          f"model {args.model}{' (' + args.quant + ')' if args.quant != 'none' else ''}, "
          f"LoRA r={args.lora_r}, batch {args.batch} x seq {args.seq} (dynamic padding) x "
          f"{args.grad_accum} accumulated, {args.warmup} warm-up + {args.steps} measured steps; "
          f"lockstep {args.lockstep}; load average {os.getloadavg()[0]:.1f}", flush=True)
    base, ours = run_sides(args, precision)

    print(f"\n{'step':>4} {'baseline loss':>14} {'tunefix loss':>14} {'rel diff':>9}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(base["losses"], ours["losses"], strict=True)):
        rel = abs(a - b) / max(abs(a), 1e-12)
        worst = max(worst, rel)
        print(f"{i + 1:>4} {a:>14.6f} {b:>14.6f} {rel:>9.2e}")
    print(f"\n{'':>10} {'tokens/s':>10} {memory_name:>13} {'after load':>11} {'page faults':>12}")
    for r in (base, ours):
        print(f"{r['side']:>10} {r['tokens_per_s']:>10.1f} {r['peak_mb']:>13.0f} "
              f"{r['after_load_mb']:>11.0f} {r['minor_faults']:>12,}  {r['notes'] or ''}")
    speed = ours["tokens_per_s"] / base["tokens_per_s"]
    memory = ours["peak_mb"] / base["peak_mb"]
    print(f"\nratios tunefix/baseline: tokens/s {speed:.2f}x, {memory_name[:-3]} {memory:.2f}x; "
          f"worst loss difference {worst:.2e} (tolerance {tol:.0e}); torch threads {base['threads']}")
    if worst > tol:
        print("FAIL: the loss curves disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
