"""Atomic checkpoints in ``RUN/checkpoints/step_NNNNNNNN.pt``; the last K are kept.

A checkpoint holds everything a resumed run needs to continue the same loss sequence: the
model and optimizer states, the LR schedule, the step (which is also the data position: the
loader derives every batch from the step), the resolved config, the manifest's checksum and the
data-order fingerprint. Random draws are derived from (seed, step, slot), so there is no RNG
stream to save. Loading uses ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from curate import storage

CHECKPOINT_DIR = "checkpoints"
# The layout of a checkpoint's dict; bumped when a key's meaning changes, so that a resume from
# another layout is refused with a reason instead of failing half-way (checkpoints written
# before the number was recorded have none).
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run."""


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def checkpoint_step(name: str) -> int | None:
    """The step a checkpoint's file name holds; None for any other name (a temporary file)."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints, oldest first (temporary files of a killed save are not listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir() if (step := checkpoint_step(path.name)) is not None]
    return sorted(found)


def checkpoint_steps(run: str | os.PathLike) -> list[int]:
    """The steps of a run folder's checkpoints, or of a run's at a URL, oldest first."""
    if storage.is_remote(run):
        from train.remote_run import RemoteRun

        return RemoteRun(os.fspath(run), reader=True).steps()
    return [step for step, _ in list_checkpoints(storage.local_path(run))]


def superseded(steps: list[int], step: int, keep: int) -> list[int]:
    """Of a run's checkpoint ``steps`` (oldest first), those that go once ``step`` is written: the
    later ones (a resume from an older checkpoint abandoned them) and all but the newest ``keep``."""
    return [s for s in steps if s > step] + [s for s in steps if s <= step][:-keep]


def evaluation_prefix(step: int) -> str:
    """How the names of a step's evaluations begin, in RUN/eval (eval/evaluation.py)."""
    return f"step{step:08d}-"


def drop_evaluations(run_dir: str | os.PathLike, step: int) -> None:
    """Delete the evaluations (results, features) of an abandoned checkpoint of ``step``: a resume
    from an older one writes another checkpoint of that step, which must not inherit them."""
    import shutil

    for path in (Path(run_dir) / "eval").glob(f"{evaluation_prefix(step)}*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def find_checkpoint(run: str | os.PathLike, step: int | None = None) -> Path | None:
    """The checkpoint of ``step`` (default: the latest) of a run folder, or of a run at a URL
    (``train --out s3://...``; fetched into its local copy, train/remote_run.py); None when there
    is none."""
    if storage.is_remote(run):
        from train.remote_run import RemoteRun

        return RemoteRun(os.fspath(run), reader=True).fetch(step)
    run = storage.local_path(run)
    path = latest_checkpoint(run) if step is None else checkpoint_path(run, step)
    return path if path is not None and path.is_file() else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Write under a temporary name, fsync, rename; then drop the checkpoints it supersedes (see
    :func:`superseded`; ``keep`` None: the caller prunes, as a run at a URL drops its local copies
    once they are uploaded, its local copy holding no later ones)."""
    final = checkpoint_path(run_dir, step)
    with storage.replacing(final, fsync=True) as tmp:
        torch.save(state, tmp)
    for old in superseded([s for s, _ in list_checkpoints(run_dir)], step, keep) if keep is not None else ():
        checkpoint_path(run_dir, old).unlink(missing_ok=True)
        if old > step:
            drop_evaluations(run_dir, old)
    for stale in final.parent.glob(".step_*.pt.tmp-*"):  # left by a save that was killed
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's dict. ``mmap``: tensors are read from the file when first used, so a
    reader that needs the config and the model does not read the optimizer's moments."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot load checkpoint {path}: not a checkpoint torch reads, or cut off "
                              f"({type(e).__name__}: {e})") from None


def check_format(state: dict[str, Any], path: str | os.PathLike, window_keys: set[str]) -> None:
    """Refuse a checkpoint of another layout; ``window_keys``: what the metrics window restores."""
    found = state.get("format")
    usable = found == CHECKPOINT_FORMAT or (found is None and set(state.get("window", {})) <= window_keys)
    if not usable:
        raise CheckpointError(
            f"cannot resume {path}: it was written by another version of kiln (checkpoint format "
            f"{found if found is not None else 'unrecorded'}, this one reads {CHECKPOINT_FORMAT}); "
            "start a new run with another --out, or delete this run's folder")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None
