"""Trainer callbacks: the steps and a live loss line for a ``tunefix.progress.Reporter``,
the metrics log, and a stop on a NaN/Inf loss."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from tunefix.progress import Reporter


class LossLog(TrainerCallback):
    """Appends every logged metric to metrics.jsonl; keeps (step, loss) pairs for the plot."""

    def __init__(self, path: Path | None):
        self.path = path
        self.train: list[tuple[int, float]] = []
        self.eval: list[tuple[int, float]] = []
        self.trainer = None
        self._last = (time.perf_counter(), 0)

    def tokens_per_second(self) -> float | None:
        seen = getattr(self.trainer, "tokens_seen", None)  # TRL's trainers do not count them
        if seen is None:
            return None
        now = time.perf_counter()
        t0, s0 = self._last
        self._last = (now, seen)
        return (seen - s0) / (now - t0) if now > t0 and seen > s0 else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The same dict reaches the callbacks after this one: the progress bar shows tok/s.
        logs = logs if logs is not None else {}
        step = state.global_step
        if "loss" in logs:
            self.train.append((step, float(logs["loss"])))
            tps = self.tokens_per_second()
            if tps:
                logs["tokens_per_second"] = round(tps, 1)
        if "eval_loss" in logs:
            self.eval.append((step, float(logs["eval_loss"])))
        self.last_logs = logs
        if self.path is not None:  # None on ranks > 0 of a distributed run
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def record_eval(self, step: int, loss: float | None) -> None:
        if loss is not None and (not self.eval or self.eval[-1][0] != step):
            self.eval.append((step, float(loss)))


class NonFiniteStop(TrainerCallback):
    """Stops at the first NaN/Inf loss; the trainer then asks the doctor why."""

    bad_step: int | None = None
    bad_value: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.bad_step is None:
            self.bad_step, self.bad_value = state.global_step, float(loss)
            control.should_training_stop = True


def status_line(logs: dict) -> str:
    """The live line of a training log: loss, learning rate, gradient norm, tokens per second."""
    parts = [f"loss {logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if logs.get("grad_norm") is not None:
        parts.append(f"grad {logs['grad_norm']:.2f}")
    if logs.get("tokens_per_second"):
        parts.append(f"{logs['tokens_per_second']:.0f} tok/s")
    return " | ".join(parts)


class ReportProgress(TrainerCallback):
    """The run's steps as counted progress (``advance(step, max_steps, status_line)``); the
    reporter draws it (a bar in the terminal), this callback knows nothing of rendering."""

    def __init__(self, progress: Reporter):
        self.progress = progress
        self.detail = ""  # the last status line, kept between logs

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.advance(state.global_step, state.max_steps, self.detail)  # a resumed run starts part-way

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.advance(state.global_step, state.max_steps, self.detail)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.detail = status_line(logs)
        self.progress.advance(state.global_step, state.max_steps, self.detail)
