"""The run directory: refuse to overwrite a run, resume from the newest complete checkpoint,
and leave nothing half-made behind after running out of memory, a full disk or a kill.

One module for the rules that ``train`` (and its out-of-memory and full-disk handlers)
apply to ``output_dir``; ``train.trainer`` and ``train.memory`` both call it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

from tunefix._io import check_output_dir
from tunefix.errors import TunefixError
from tunefix.train.config import RunConfig

log = logging.getLogger(__name__)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to overwrite a run, to resume a non-run, or to write where nothing can be."""
    o = RunConfig.option
    check_output_dir(run_dir, o("output_dir"), allowed=resume,
                     allow_hint=f"Pass {o('resume')} to continue it, or choose another {o('output_dir')}")
    if resume and not (run_dir / "config.json").is_file():
        raise TunefixError(f"{run_dir} is not a tunefix run to resume (no config.json)",
                           f"Pass the {o('output_dir')} of an interrupted `tunefix train`")


# What a checkpoint written by transformers' Trainer holds once complete. Trainer writes
# them in place, not atomically (weights, optimizer, scheduler, RNG, then trainer_state.json
# last), so a process killed mid-save leaves a directory that looks like a checkpoint but is
# not one. Resume uses the newest complete one and deletes the incomplete ones (ours, and
# useless), instead of transformers' "highest number wins".
_CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


def checkpoint_complete(path: Path) -> bool:
    if not all((path / name).is_file() for name in _CHECKPOINT_FILES):
        return False
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        return False
    if not any(path.glob("rng_state*.pth")):
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return f"checkpoint-{state.get('global_step')}" == path.name


def last_complete_checkpoint(checkpoints: Path, *, clean: bool = False) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``checkpoints``; ``clean`` removes broken ones."""
    found = []
    for p in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else ():
        suffix = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and suffix.isdigit():
            found.append((int(suffix), p))
    best = None
    for _, p in sorted(found, reverse=True):
        if checkpoint_complete(p):
            best = best or p
        elif clean and best is None:  # newer than every complete one: a save cut short
            log.warning("removing %s: an incomplete checkpoint (the run was killed while saving)", p)
            shutil.rmtree(p)
    return best


@contextlib.contextmanager
def disk_full_as_error(run_dir: Path, owner: bool = True):
    """A full disk (or quota, or read-only file system) while Trainer writes a checkpoint or
    we append metrics: one line, and the checkpoint it was writing removed, so the run
    directory holds complete checkpoints only and ``--resume`` continues from the last one."""
    from tunefix._io import _DISK_ERRORS, _disk_error

    try:
        yield
    except Exception as e:
        disk = _disk_error(e, run_dir)
        if disk is None:
            raise
        kept = last_complete_checkpoint(run_dir / "checkpoints", clean=True) if owner else None
        then = (f"then {RunConfig.option('resume')} continues from {kept.name}" if kept
                else "then train again")
        raise TunefixError(f"{_DISK_ERRORS[disk]} while writing the run in {run_dir}",
                           f"Free some space (the unfinished checkpoint was removed), {then}") from None


def first_missing(path: Path) -> Path | None:
    """The outermost directory that creating ``path`` (with parents) would create; None if it exists."""
    missing = None
    for p in (path, *path.absolute().parents):
        if p.exists():
            break
        missing = p
    return missing


def clean_up_fresh_run(run_dir: Path, created: Path | None, resume: bool) -> str:
    """Remove what a fresh run wrote before its first complete checkpoint; keep a run that has one."""
    checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
    if checkpoint is not None:
        return f"; {RunConfig.option('resume')} then continues from {checkpoint.name} in {run_dir}"
    if resume:
        return ""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif run_dir.is_dir():  # it existed, empty (a non-empty one is refused): empty it again
        for p in run_dir.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return ""


def prepare_resume(run_dir: Path, *, owner: bool) -> Path | None:
    """The checkpoint a resumed run continues from (None: from step 0). The owner (rank 0)
    first removes unfinished writes of a killed run and incomplete checkpoints."""
    if owner:
        from tunefix._io import remove_stale

        remove_stale(run_dir)  # said in the log, with the size freed
    checkpoint = last_complete_checkpoint(run_dir / "checkpoints", clean=owner)
    if checkpoint is None:
        log.warning("%s has no complete checkpoint yet: training starts from step 0", run_dir)
    return checkpoint
