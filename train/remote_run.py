"""A run folder at a URL: ``train --out s3://bucket/runs/NAME`` on machines that share no folder.

The trainer works in a local copy of the run folder, in ``$KILN_STAGING`` as the curate stages
stage their shards (curate/shards.py ``staging_dir``), and pushes it to the URL:

- each checkpoint whole (one PUT, or s3fs's multipart upload, which a store makes visible at once
  or not at all: a listed checkpoint is a complete one), in a background thread while training
  goes on; then the URL's checkpoints beyond ``keep_checkpoints`` are deleted, and the local
  copies older than the uploaded one;
- the other files that changed (config.yaml, metrics.jsonl, samples/, tensorboard/; not wandb/,
  which wandb syncs itself), with each checkpoint, and at the start (config.yaml before the
  first step, which also finds a store that refuses writes) and at the end.

A resume, on any machine, lists the URL's checkpoints on the main rank, which every rank follows;
the main rank clears the local copy but for that checkpoint and fetches the config, the metrics
and the TensorBoard events (the resumed run appends to them as a local one does); then the first
rank of each machine (LOCAL_RANK 0) fetches the checkpoint unless its copy is already that file
(same size and ETag), and every rank loads it from there.

An upload that fails (after the storage module's retries) is a warning and training goes on: the
checkpoint stays in the local copy and the next one is uploaded. If the last one fails the run
ends with an error naming the local copy.

Readers of a run (``train export``, ``train generate``, ``--init-from``, ``evaluate run``) fetch
the checkpoint they need into the same local copy (:meth:`RemoteRun.fetch`).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from curate import storage
from curate.shards import staging_dir
from train.checkpoint import CHECKPOINT_DIR, checkpoint_path, checkpoint_step, list_checkpoints
from train.config import ConfigError
from train.metrics import METRICS_FILE

NOT_PUSHED = (CHECKPOINT_DIR, "wandb")  # checkpoints go their own way; wandb syncs its folder itself
RESUMED_FILES = ("config.yaml", METRICS_FILE)  # what a resumed run continues, with tensorboard/
TENSORBOARD = "tensorboard"

Note = Callable[[str], None]


class RemoteRun:
    """The run at ``url`` and its local copy (``local``): the trainer's working copy, or with
    ``reader`` a copy of what readers fetched, apart from it (a reader never replaces a file the
    trainer on the same machine is appending to)."""

    def __init__(self, url: str, *, reader: bool = False):
        self.url, self.reader = storage.resolved(url), reader
        self.local = staging_dir(self.url) / ("read" if reader else "run")
        self._pushed: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) when last uploaded
        self._pool: ThreadPoolExecutor | None = None
        self._upload: Future[dict[str, tuple[int, int]]] | None = None
        self._lost: str | None = None  # the newest checkpoint's failed upload, until a later one succeeds

    # ---- checkpoints at the URL ---------------------------------------------------------------
    def checkpoint_url(self, step: int) -> str:
        return storage.join(self.url, CHECKPOINT_DIR, checkpoint_path("", step).name)

    def steps(self) -> list[int]:
        """The steps of the checkpoints at the URL, oldest first."""
        try:
            names = storage.list_names(storage.join(self.url, CHECKPOINT_DIR))
        except FileNotFoundError:
            return []
        return sorted(step for name in names if (step := checkpoint_step(name)) is not None)

    def latest_url(self) -> str | None:
        steps = self.steps()
        return self.checkpoint_url(steps[-1]) if steps else None

    def fetch(self, step: int | None = None) -> Path | None:
        """The local copy of the checkpoint of ``step`` (default: the latest), downloaded unless
        the copy is that file already; None when the URL holds no such checkpoint."""
        steps = self.steps()
        if step is None and steps:
            step = steps[-1]
        if step is None or step not in steps:
            return None
        local, url = checkpoint_path(self.local, step), self.checkpoint_url(step)
        if not self._is_copy_of(local, url):
            storage.fetch_file(url, local)
            self._mark_copy(local, url)
        return local

    def _is_copy_of(self, local: Path, url: str) -> bool:
        marker = _version_marker(local)
        if not (local.is_file() and marker.is_file()):
            return False
        size, tag = storage.version(url)
        return bool(tag) and marker.read_text() == f"{size} {tag}" and local.stat().st_size == size

    def _mark_copy(self, local: Path, url: str) -> None:
        size, tag = storage.version(url)
        storage.write_text(_version_marker(local), f"{size} {tag}")

    # ---- starting or resuming (every rank) ----------------------------------------------------
    def prepare(self, resume: str) -> Path | None:
        """The local checkpoint this run resumes from (None: a new run), the same on every rank:
        ``resume`` is "never", "auto" (the URL's latest) or one of the run's checkpoints by URL."""
        distributed = dist.is_initialized()
        main = not distributed or dist.get_rank() == 0
        answer: list[object] = [None]
        error: Exception | None = None
        if main:
            try:
                answer[0] = self._resume_step(resume)
            except (ConfigError, OSError) as e:
                if not distributed:
                    raise
                answer[0], error = str(e), e
        if distributed:
            dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], str):  # rank 0 refused: every rank stops with its reason
            raise error if error is not None else ConfigError(f"rank 0: {answer[0]}")
        step = answer[0]
        assert step is None or isinstance(step, int)
        if main and not self.reader:  # a reader (train --check) leaves the trainer's copy alone
            self._clear(keep=step)
            if step is not None:
                self.pull(RESUMED_FILES, folders=(TENSORBOARD,))
        if distributed:
            dist.barrier()
        if step is None:
            return None
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one download per machine
            self.fetch(step)
        if distributed:
            dist.barrier()
        return checkpoint_path(self.local, step)

    def _resume_step(self, resume: str) -> int | None:
        steps = self.steps()
        if resume == "never":
            if steps:
                raise ConfigError(f"{self.url} already holds checkpoints (latest step {steps[-1]}): pass "
                                  "--resume auto to continue it, or choose another --out")
            return None
        if resume == "auto":
            return steps[-1] if steps else None
        step = checkpoint_step(os.path.basename(resume.rstrip("/"))) if storage.is_remote(resume) else None
        if step is None or storage.resolved(resume) != self.checkpoint_url(step):
            raise ConfigError(f"--resume {resume}: a run at a URL resumes from one of its own checkpoints "
                              f"({storage.join(self.url, CHECKPOINT_DIR)}/step_NNNNNNNN.pt), or auto")
        if step not in steps:
            raise ConfigError(f"--resume {resume}: no such checkpoint (the run holds steps "
                              f"{', '.join(map(str, steps)) or 'none'})")
        return step

    def _clear(self, keep: int | None) -> None:
        """Empty the local copy (what an earlier run here left) but for the checkpoint to resume."""
        kept = {checkpoint_path(self.local, keep)} if keep is not None else set()
        kept |= {_version_marker(path) for path in kept}
        for path in self.local.rglob("*") if self.local.is_dir() else ():
            if path.is_file() and path not in kept:
                path.unlink(missing_ok=True)
        self._pushed.clear()

    def pull(self, files: tuple[str, ...] = (), folders: tuple[str, ...] = (), pattern: str = "*") -> Path:
        """Fetch ``files``, and the files in ``folders`` (not their subfolders) whose names match
        ``pattern``, that the URL holds; returns the local copy."""
        names = list(files)
        for folder in folders:
            try:
                names += [f"{folder}/{name}" for name in storage.list_names(storage.join(self.url, folder))
                          if fnmatch.fnmatchcase(name, pattern)]
            except FileNotFoundError:
                continue
        for name in names:
            try:
                storage.fetch_file(storage.join(self.url, name), self.local / name)
            except (FileNotFoundError, IsADirectoryError):  # absent, or a subfolder's name
                continue
            self._pushed[name] = _stamp(self.local / name)
        return self.local

    def upload(self, folder: str) -> None:
        """Upload the files of the local copy's ``folder`` (not its subfolders) that changed since
        they were pulled: what a reader added to the run (``evaluate run``'s results)."""
        for path in sorted((self.local / folder).glob("[!.]*")):
            name = f"{folder}/{path.name}"
            if path.is_file() and self._pushed.get(name) != (stamp := _stamp(path)):
                storage.write_file(path, storage.join(self.url, name))
                self._pushed[name] = stamp

    # ---- pushing (the main rank) --------------------------------------------------------------
    def push(self, checkpoint: Path | None = None, *, keep: int = 1, note: Note, wait: bool = False) -> None:
        """Upload the files changed since the last push and then ``checkpoint``, in the background;
        the upload before it is waited for first (its failure becomes a ``note``). ``wait``: this
        upload too, raising its failure."""
        self._settle(note, "training goes on, and the next checkpoint is uploaded")
        for _, old in list_checkpoints(self.local)[:-keep]:  # uploads that failed: as many as a local run keeps
            _drop_local(old)
        changed = self._changed_files()  # read now: the trainer appends to them as soon as it goes on
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-run-upload")
        self._upload = self._pool.submit(self._upload_files, changed, checkpoint, keep)
        if wait:
            upload, self._upload = self._upload, None
            self._pushed.update(upload.result())

    def close(self, *, note: Note, failing: bool = False) -> None:
        """At the end of the run: wait for the upload in flight, then push what changed since.
        Raises when the last checkpoint or those files are not at the URL, unless the run is
        ``failing`` anyway (then they were notes)."""
        try:
            self.push(note=note)
            error = self._settle(note, "")
        finally:
            if self._pool is not None:
                self._pool.shutdown()
        problems = [p for p in (self._lost, error) if p]
        if problems and not failing:
            raise storage.RemoteError("; ".join(dict.fromkeys(problems)))

    def _settle(self, note: Note, consequence: str) -> str | None:
        """Wait for the upload in flight; its failure, noted (None when it succeeded)."""
        if self._upload is None:
            return None
        upload, self._upload = self._upload, None
        try:
            self._pushed.update(upload.result())
        except Exception as e:  # noqa: BLE001 - the store's errors, after retries: training goes on
            if isinstance(e, CheckpointNotUploaded):
                self._lost = str(e)
            note(f"WARNING: {e}" + (f"; {consequence}" if consequence else ""))
            return str(e)
        return None

    def _changed_files(self) -> dict[str, tuple[bytes, tuple[int, int]]]:
        changed = {}
        for path in sorted(self.local.rglob("*")) if self.local.is_dir() else ():
            name = path.relative_to(self.local).as_posix()
            if (not path.is_file() or name.split("/")[0] in NOT_PUSHED
                    or any(part.startswith(".") for part in name.split("/"))):
                continue
            stamp = _stamp(path)
            if self._pushed.get(name) != stamp:
                changed[name] = (path.read_bytes(), stamp)
        return changed

    def _upload_files(self, changed: dict[str, tuple[bytes, tuple[int, int]]], checkpoint: Path | None,
                      keep: int) -> dict[str, tuple[int, int]]:
        """The upload job: the small files first (the metrics may run ahead of the URL's latest
        checkpoint: a resume drops the lines after it), then the checkpoint and the pruning."""
        for name, (data, _) in changed.items():
            storage.write_bytes(storage.join(self.url, name), data)
        if checkpoint is not None:
            step = checkpoint_step(checkpoint.name)
            assert step is not None, checkpoint
            url = self.checkpoint_url(step)
            try:
                storage.write_file(checkpoint, url)
            except OSError as e:
                raise CheckpointNotUploaded(
                    f"checkpoint step {step} was not uploaded to {url} ({e}); it is kept at {checkpoint}: "
                    "a rerun resumes from the URL's latest and clears that copy, so upload it by hand to "
                    "keep it") from e
            self._lost = None  # the newest checkpoint is at the URL: one that failed before is superseded
            self._mark_copy(checkpoint, url)
            for old in self.steps()[:-keep]:
                storage.remove(self.checkpoint_url(old))
            for old_step, path in list_checkpoints(self.local):
                if old_step < step:
                    _drop_local(path)
        return {name: stamp for name, (_, stamp) in changed.items()}


class CheckpointNotUploaded(storage.RemoteError):
    """A checkpoint that stayed in the local copy only."""


def _version_marker(local: Path) -> Path:
    """Beside a local copy of a checkpoint: the size and ETag of the URL's file it copies."""
    return local.with_name(f".{local.name}.version")


def _drop_local(path: Path) -> None:
    path.unlink(missing_ok=True)
    _version_marker(path).unlink(missing_ok=True)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns

