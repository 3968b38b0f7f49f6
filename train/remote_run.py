"""A run folder at a URL: ``train --out s3://bucket/runs/NAME`` on machines that share no folder.

The trainer works in a local copy of the run folder, in ``$KILN_STAGING`` as the curate stages
stage their shards (curate/shards.py ``staging_dir``), and pushes it to the URL:

- each checkpoint whole (one PUT, or s3fs's multipart upload, which an object store makes visible
  at once or not at all: a listed checkpoint is a complete one), in a background thread while
  training goes on; then the URL's checkpoints beyond ``keep_checkpoints`` are deleted, and the
  local copies older than the uploaded one. A push never waits (the other ranks may be waiting
  for this one in a collective): uploads queue behind the one in flight, and a checkpoint still
  queued when the next one comes is dropped for it, with a note (the store is slower than
  ``checkpoint_every``);
- before it, the other files that changed (config.yaml, metrics.jsonl, samples/, tensorboard/,
  whose events file is started anew at each push so that every finished one is uploaded once;
  not wandb/, which wandb syncs itself), copied aside at the push so the trainer goes on writing;
  at the start too (config.yaml before the first step: a store that refuses writes stops every
  rank there) and at the end.

A resume, on any machine, takes the step the main rank finds at the URL; the main rank clears the
local copy but for that checkpoint and fetches the config, the metrics and the TensorBoard events
(the resumed run appends to them as a local one does); then the first rank of each machine
(LOCAL_RANK 0) fetches the checkpoint unless its copy is already that file (same size and ETag),
and every rank loads it from there. Each of these steps ends with the ranks agreeing that it
worked, so that a rank that failed is not waited for in a collective.

An upload that fails (after the storage module's retries) is a warning and training goes on: the
checkpoint stays in the local copy (up to ``keep_checkpoints`` of them) and the next one is
uploaded. If the last one fails the run ends with an error naming the local copy.

Readers of a run (``train export``, ``--init-from``, ``evaluate run`` and ``compare``) fetch what
they read into a copy of their own (``reader=True``), never the trainer's, whose files it appends
to: :meth:`RemoteRun.fetch`, which keeps there the checkpoint each reader on the machine fetched
last and no other.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import torch
import torch.distributed as dist

from curate import storage
from curate.shards import staging_dir
from train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_path,
    checkpoint_step,
    evaluation_prefix,
    list_checkpoints,
    superseded,
)
from train.config import ConfigError
from train.metrics import METRICS_FILE

NOT_PUSHED = (CHECKPOINT_DIR, "wandb")  # checkpoints go their own way; wandb syncs its folder itself
RESUMED_FILES = ("config.yaml", METRICS_FILE)  # what a resumed run continues, with tensorboard/
TENSORBOARD = "tensorboard"

Note = Callable[[str], None]
T = TypeVar("T")


@dataclass
class _Sent:
    """What an upload job did: the files it sent (the others are sent again by a later push), and
    what went wrong (the first failure: an error; and warnings, such as a checkpoint not pruned)."""

    files: dict[str, tuple[int, int]]
    error: OSError | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Upload:
    future: Future[_Sent]
    checkpoint: Path | None
    snapshot: Path  # the changed files, copied aside at the push
    changed: dict[str, tuple[int, int]]  # their (size, mtime) then


class RemoteRun:
    """The run at ``url`` and its local copy (``local``): the trainer's working copy, or with
    ``reader`` a copy of what readers fetched, apart from it (a reader never replaces a file the
    trainer on the same machine is appending to)."""

    def __init__(self, url: str, *, reader: bool = False):
        self.url, self.reader = storage.resolved(url), reader
        self.local = staging_dir(self.url) / ("read" if reader else "run")
        self._snapshots = staging_dir(self.url) / "pushes"  # beside the copy: never walked while it changes
        self.listed: list[int] = []  # the URL's checkpoints when the run started (rank 0's listing)
        self.notes: list[str] = []  # warnings of the preparation, for the run's log
        self._pushed: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) when last uploaded
        self._pool: ThreadPoolExecutor | None = None
        self._uploads: list[_Upload] = []  # pushed, not yet collected; oldest first
        self._pushes = 0
        self._lost: str | None = None  # the newest checkpoint's failed upload, until a later one succeeds
        self._failed: set[int] = set()  # steps whose upload failed (their local copies are the only ones)

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

    def fetch(self, step: int | None = None) -> Path | None:
        """The local copy of the checkpoint of ``step`` (default: the latest), downloaded unless
        the copy is that file already; None when the URL holds no such checkpoint. A reader's copy
        keeps one checkpoint per reader process on this machine (a checkpoint of a 1B model with its
        optimizer state is tens of GB): this process's previous one is released, and every copy no
        reader holds but this one is dropped (see _use)."""
        steps = self.steps()
        if step is None and steps:
            step = steps[-1]
        if step is None or step not in steps:
            return None
        local, url = checkpoint_path(self.local, step), self.checkpoint_url(step)
        if self.reader:  # before the check: no other reader drops it while this one fetches and loads it
            _use(self.local, local)
        if not self._is_copy_of(local, url):
            storage.fetch_file(url, local)
            self._mark_copy(local, url)
        if self.reader:
            for old, path in list_checkpoints(self.local):
                if old != step:
                    _drop_unused(path)
        return local

    def fetch_on_each_machine(self, step: int | None = None) -> Path | None:
        """:meth:`fetch` for ranks launched together: the step chosen by rank 0, fetched by the
        first rank of each machine, which the others wait for (``--init-from`` a URL)."""
        def chosen() -> int | None:
            steps = self.steps()
            return (step if step in steps else None) if step is not None else (steps[-1] if steps else None)

        found = _from_rank_0(chosen)
        if found is None:
            return None
        _on_first_rank_of_each_machine(lambda: self._fetch_listed(found))
        return checkpoint_path(self.local, found)

    def _fetch_listed(self, step: int) -> Path:
        """:meth:`fetch` of a step rank 0 listed, which another machine may find gone since."""
        path = self.fetch(step)
        if path is None:
            raise storage.RemoteError(f"{self.checkpoint_url(step)}: deleted since this run listed it (another run "
                                      "writing to this URL is pruning its checkpoints?)")
        return path

    def latest_url(self) -> str | None:
        """The URL of the newest checkpoint that is at the URL or being uploaded there."""
        found = {step for step, _ in list_checkpoints(self.local) if step not in self._failed}
        try:
            found.update(self.steps())
        except OSError:  # the store is unreachable: what this run uploaded or is uploading
            pass
        return self.checkpoint_url(max(found)) if found else None

    def copy_version(self, step: int) -> str | None:
        """The size and ETag (or modification time) of the URL's checkpoint of ``step`` that the
        local copy holds, as fetched; None when it holds none."""
        marker = _version_marker(checkpoint_path(self.local, step))
        return marker.read_text() if marker.is_file() else None

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
        def choose() -> tuple[int | None, list[int]]:
            steps = self.steps()
            return self._resume_step(resume, steps), steps

        step, self.listed = _from_rank_0(choose)  # one listing, for every rank
        if not self.reader:  # a reader (train --check) leaves the trainer's copy alone
            _on_first_rank_of_each_machine(lambda: self._clear(keep=step))
            if step is not None:
                _on_main_rank(lambda: self.pull(RESUMED_FILES, folders=(TENSORBOARD,)))
        if step is None:
            return None
        _on_first_rank_of_each_machine(lambda: self._fetch_listed(step))
        return checkpoint_path(self.local, step)

    def start(self, *, note: Note) -> None:
        """Push the run's config, on the main rank (every rank calls this): now, not after hours
        of steps, so that a store that refuses writes stops every rank before the first step."""
        def push_config() -> None:
            self.push(note=note)
            sent = self._uploads.pop().future.result()
            if sent.error is not None:
                raise sent.error
            self._pushed.update(sent.files)
            try:
                listed = "config.yaml" in storage.list_names(self.url, files_only=True)
            except FileNotFoundError:
                listed = False
            if not listed:  # its checkpoints could be neither found by a resume nor pruned
                raise storage.RemoteError(f"{self.url}: the store does not list the run's folder (config.yaml was "
                                          "uploaded but is not listed): a run at a URL needs a store that lists "
                                          "folders (S3, GCS, Azure, an HTTP server with index pages)")

        _on_main_rank(push_config)

    def _resume_step(self, resume: str, steps: list[int]) -> int | None:
        if resume == "never":
            if steps:
                raise ConfigError(f"{self.url} already holds checkpoints (latest step {steps[-1]}): pass "
                                  "--resume auto to continue it, or choose another --out")
            return None
        if resume == "auto":
            return steps[-1] if steps else None
        run, step = split_checkpoint_url(resume) or (None, None)
        if run != self.url or step is None:
            raise ConfigError(f"--resume {resume}: a run at a URL resumes from one of its own checkpoints "
                              f"({storage.join(self.url, CHECKPOINT_DIR)}/step_NNNNNNNN.pt), or auto")
        if step not in steps:
            raise ConfigError(f"--resume {resume}: no such checkpoint (the run holds steps "
                              f"{', '.join(map(str, steps)) or 'none'})")
        return step

    def _clear(self, keep: int | None) -> None:
        """Empty the local copy (what an earlier run here left) but for the checkpoint to resume; a
        checkpoint newer than any at the URL (its upload was killed, or failed) is moved aside."""
        shutil.rmtree(self._snapshots, ignore_errors=True)  # of a run killed during a push
        at_url = self.listed
        for step, path in list_checkpoints(self.local):
            if step != keep and at_url and step > at_url[-1]:  # none at the URL: the run there was deleted
                aside = staging_dir(self.url) / "not-uploaded" / path.name
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, aside)
                self.notes.append(f"{path.name}, written here by an earlier run, never reached {self.url} (its "
                                  f"latest is step {at_url[-1]}): moved to {aside}; "
                                  f"to continue from it, upload it to {self.checkpoint_url(step)} and rerun with "
                                  "--resume auto")
        kept = {checkpoint_path(self.local, keep)} if keep is not None else set()
        kept |= {_version_marker(path) for path in kept}
        for path in self.local.rglob("*") if self.local.is_dir() else ():
            if path.is_file() and path not in kept:
                path.unlink(missing_ok=True)
        self._pushed.clear()

    def pull(self, files: tuple[str, ...] = (), folders: tuple[str, ...] = (), pattern: str = "*",
             only_missing: bool = False) -> Path:
        """Fetch ``files`` (a local one the URL lacks is removed) and the files in ``folders`` (not
        their subfolders) whose names match ``pattern`` (a local one the URL lacks stays: another
        reader on this machine may not have uploaded it yet); ``only_missing``: those the local
        copy lacks (files never rewritten). Returns the local copy."""
        names = list(files)
        for folder in folders:
            try:
                listed = storage.list_names(storage.join(self.url, folder), files_only=True)
            except FileNotFoundError:
                listed = []
            names += [f"{folder}/{n}" for n in listed if fnmatch.fnmatchcase(n, pattern)]
        for name in names:
            if only_missing and (self.local / name).is_file():
                continue
            try:
                storage.fetch_file(storage.join(self.url, name), self.local / name)
            except FileNotFoundError:
                (self.local / name).unlink(missing_ok=True)
                continue
            self._pushed[name] = _stamp(self.local / name)
        return self.local

    def upload(self, folder: str, pattern: str = "[!.]*") -> None:
        """Upload the files of the local copy's ``folder`` (not its subfolders) whose names match
        ``pattern`` and that changed since they were pulled: what a reader added to the run
        (``evaluate run``'s results)."""
        for path in sorted((self.local / folder).glob(pattern)):
            name = f"{folder}/{path.name}"
            if path.is_file() and self._pushed.get(name) != (stamp := _stamp(path)):
                storage.write_file(path, storage.join(self.url, name))
                self._pushed[name] = stamp

    # ---- pushing (the main rank) --------------------------------------------------------------
    def push(self, checkpoint: Path | None = None, *, keep: int = 1, note: Note) -> None:
        """Queue the upload of the files changed since the last push, then of ``checkpoint``
        (then the pruning to ``keep``). Never waits: the uploads finished since are collected
        (a failure becomes a ``note``), and a checkpoint still queued is dropped for this one."""
        self._collect(note, "training goes on, and the next checkpoint is uploaded")
        if checkpoint is not None:
            running = next((u.checkpoint for u in self._uploads if u.checkpoint and u.future.running()), None)
            for upload in self._uploads:
                if upload.checkpoint is not None and upload.future.cancel():
                    note(f"WARNING: checkpoint {upload.checkpoint.name} is not uploaded: {checkpoint.name} replaces "
                         f"it while the store still takes {running.name if running else 'the one before'} "
                         "(uploads are slower than checkpoint_every)")
                    _drop_local(upload.checkpoint)
                    shutil.rmtree(upload.snapshot, ignore_errors=True)
            self._uploads = [u for u in self._uploads if not u.future.cancelled()]
        self._pushes += 1
        snapshot = self._snapshots / f"push-{self._pushes}"
        changed = self._copy_changed(snapshot)  # aside: the trainer appends to them as soon as it goes on
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-run-upload")
        future = self._pool.submit(self._upload_files, snapshot, changed, checkpoint, keep)
        self._uploads.append(_Upload(future, checkpoint, snapshot, changed))

    def close(self, *, note: Note, failing: bool = False) -> None:
        """At the end of the run: push what changed since the last push and wait for every upload.
        Raises when the last checkpoint or those files are not at the URL, unless the run is
        ``failing`` anyway (then they are notes, as is any error here)."""
        pending = [u.checkpoint.name for u in self._uploads if u.checkpoint is not None]
        if pending:
            note(f"waiting for the upload of {', '.join(pending)} to {self.url}")
        try:
            self._collect(note, "", wait=True)  # first: what these failed to send is sent again below
            self.push(note=note)
            error = self._collect(note, "", wait=True)
        except Exception as e:  # noqa: BLE001 - a failing run's own error is the one to show
            if not failing:
                raise
            note(f"WARNING: the run folder was not uploaded in full: {e}")
            return
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
        problems = [p for p in (self._lost, error) if p]
        if problems and not failing:
            raise storage.RemoteError("; ".join(dict.fromkeys(problems)))

    def _collect(self, note: Note, consequence: str, wait: bool = False) -> str | None:
        """Take in the uploads that finished (all of them with ``wait``), oldest first, noting
        their failures; the failure of the last one taken in, if it failed (the files a failed
        upload did not send are sent by the next push after it is taken in)."""
        error = None
        while self._uploads and (wait or self._uploads[0].future.done()):
            sent = self._uploads.pop(0).future.result()
            self._pushed.update(sent.files)
            for warning in sent.warnings:
                note(f"WARNING: {warning}")
            error = str(sent.error) if sent.error is not None else None
            if error is not None:  # the store's errors, after retries: training goes on
                note(f"WARNING: {error}" + (f"; {consequence}" if consequence else ""))
        return error

    def _copy_changed(self, snapshot: Path) -> dict[str, tuple[int, int]]:
        """Copy the files changed since they were last sent (or queued) into ``snapshot``."""
        sent = self._pushed | {name: stamp for upload in self._uploads for name, stamp in upload.changed.items()}
        changed = {}
        for name in _pushed_files(self.local):
            try:
                stamp = _stamp(self.local / name)
                if sent.get(name) != stamp:
                    (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.local / name, snapshot / name)
                    changed[name] = stamp
            except FileNotFoundError:  # gone since it was listed
                continue
        return changed

    def _upload_files(self, snapshot: Path, changed: dict[str, tuple[int, int]], checkpoint: Path | None,
                      keep: int) -> _Sent:
        """The upload job: the changed files first (the metrics may run ahead of the URL's latest
        checkpoint: a resume drops the lines after it), then the checkpoint and the pruning. A
        checkpoint is tried even when a file before it failed, and such files once more after it
        (the metrics behind the URL's latest checkpoint would leave a gap in a resumed run's)."""
        sent = _Sent({})

        def send(names: list[str]) -> OSError | None:
            """Upload ``names``; the first failure (with a store that refuses writes, config.yaml's)."""
            first = None
            for name in names:
                try:
                    storage.write_file(snapshot / name, storage.join(self.url, name))
                    sent.files[name] = changed[name]
                except OSError as e:
                    first = first or e
            return first

        try:
            files_error = send(list(changed))
            checkpoint_error = None
            if checkpoint is not None:
                try:
                    sent.warnings += self._upload_checkpoint(checkpoint, keep)
                except OSError as e:
                    checkpoint_error = e
                if files_error is not None:  # once more: up now, the metrics reach the checkpoint's step
                    files_error = send([name for name in changed if name not in sent.files])
            sent.error = checkpoint_error or files_error  # the checkpoint's matters most
        except Exception as e:  # noqa: BLE001 - anything else in this thread: a failed upload, not a dead run
            sent.error = OSError(f"uploading to {self.url} failed: {e!r}")
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
        return sent

    def _remove_evaluations(self, step: int) -> None:
        """Delete the URL's evaluations of ``step`` (result files and feature folders)."""
        folder = storage.join(self.url, "eval")
        try:
            names = storage.list_names(folder)
        except FileNotFoundError:
            return
        for name in (n for n in names if n.startswith(evaluation_prefix(step))):
            try:
                inner = storage.list_names(storage.join(folder, name), files_only=True)  # a features folder
            except (FileNotFoundError, NotADirectoryError):
                inner = []
            for file in inner:
                storage.remove(storage.join(folder, name, file))
            storage.remove(storage.join(folder, name))

    def _upload_checkpoint(self, checkpoint: Path, keep: int) -> list[str]:
        """Upload ``checkpoint``, then drop the older local copies and the URL's checkpoints it
        supersedes; returns warnings (a store that refuses deletes keeps more than ``keep``)."""
        step = checkpoint_step(checkpoint.name)
        assert step is not None, checkpoint
        url = self.checkpoint_url(step)
        try:
            storage.write_file(checkpoint, url)
        except OSError as e:
            for _, path in [c for c in list_checkpoints(self.local) if c[0] <= step][:-keep]:
                _drop_local(path)  # of the uploads that failed, as many as a local run keeps
            # Set here, in the jobs' order: a later checkpoint's upload clears it.
            self._failed.add(step)
            self._lost = (f"checkpoint step {step} was not uploaded to {url} ({e}); it is kept at {checkpoint}: a rerun "
                          "resumes from the URL's latest and moves that copy aside, so upload it by hand to continue from it")
            raise storage.RemoteError(self._lost) from e
        self._lost = None  # the newest checkpoint is at the URL: one that failed before is superseded
        self._failed.discard(step)
        for old_step, path in list_checkpoints(self.local):
            if old_step < step:
                _drop_local(path)
        warnings = []
        try:
            self._mark_copy(checkpoint, url)
        except OSError as e:  # a resume on this machine fetches it again, no more
            warnings.append(f"{e}: the local copy of {checkpoint.name} is not marked as the URL's")
        try:
            for old in superseded(self.steps(), step, keep):
                storage.remove(self.checkpoint_url(old))
                if old > step:  # abandoned by a resume from an older checkpoint: its evaluations too
                    self._remove_evaluations(old)
        except OSError as e:
            warnings.append(f"{e}: the URL may hold more checkpoints than keep_checkpoints={keep}")
        return warnings


def split_checkpoint_url(url: str) -> tuple[str, int] | None:
    """(the run's URL, the step) of a checkpoint's URL (RUN/checkpoints/step_N.pt); None for any
    other string."""
    if not storage.is_remote(url):
        return None
    folder, _, name = storage.resolved(url).rpartition("/")
    step = checkpoint_step(name)
    if step is None or not folder.endswith(f"/{CHECKPOINT_DIR}"):
        return None
    return storage.parent(folder), step


# ---- ranks agreeing (each helper is called by every rank, or by the only process) -------------------
def _from_rank_0(compute: Callable[[], T]) -> T:
    """Rank 0's ``compute()``, on every rank; its error, raised on every rank."""
    if not dist.is_initialized():
        return compute()
    answer: list[object] = [None, None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            answer[0] = compute()
        except Exception as e:  # noqa: BLE001 - told to every rank, then raised
            answer[1], error = str(e), e
    dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise error if error is not None else ConfigError(f"rank 0: {answer[1]}")
    return answer[0]  # type: ignore[return-value]


def _on_main_rank(work: Callable[[], object]) -> None:
    _agreed(work if not dist.is_initialized() or dist.get_rank() == 0 else None)


def _on_first_rank_of_each_machine(work: Callable[[], object]) -> None:
    _agreed(work if int(os.environ.get("LOCAL_RANK", "0")) == 0 else None)


def _agreed(work: Callable[[], object] | None) -> None:
    """Run ``work`` here (None: nothing to do on this rank), then agree with the other ranks that
    it worked everywhere: a barrier that carries failures, so no rank waits for one that raised."""
    error: Exception | None = None
    try:
        if work is not None:
            work()
    except Exception as e:  # noqa: BLE001 - agreed on with the other ranks, then raised
        if not dist.is_initialized():
            raise
        error = e
    if not dist.is_initialized():
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise storage.RemoteError("another rank failed to read or write the run's URL: see its error")


def _version_marker(local: Path) -> Path:
    """Beside a local copy of a checkpoint: the size and ETag of the URL's file it copies."""
    return local.with_name(f".{local.name}.version")


# The checkpoint each reader copy's process fetched last, held by a shared lock (fcntl.flock, let go
# when the process exits) on a file beside it, so that a reader on the same machine fetching another
# step (`evaluate run URL --step all` by several workers) drops only the copies nobody is loading.
_IN_USE: dict[Path, IO[bytes]] = {}


def _lock_file(checkpoint: Path) -> Path:
    return checkpoint.with_name(f".{checkpoint.name}.lock")


def _same_file(handle: IO[bytes], path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path`` (a reader that dropped the copy
    has not unlinked it meanwhile)."""
    try:
        there = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _use(copy: Path, checkpoint: Path) -> None:
    """Hold ``checkpoint`` of the reader copy ``copy`` for this process, instead of the one it held."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(_lock_file(checkpoint), "ab")  # noqa: SIM115 - held until the next fetch or exit
        fcntl.flock(handle, fcntl.LOCK_SH)
        if _same_file(handle, _lock_file(checkpoint)):
            break
        handle.close()  # locked a file being dropped: take the new one
    previous = _IN_USE.get(copy)
    _IN_USE[copy] = handle
    if previous is not None:
        previous.close()


def _drop_unused(checkpoint: Path) -> None:
    """Delete a reader copy's ``checkpoint`` unless a reader on this machine holds it."""
    lock = _lock_file(checkpoint)
    with open(lock, "ab") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if not _same_file(handle, lock):
            return
        _drop_local(checkpoint)
        lock.unlink()  # last: a reader that opens it anew finds the checkpoint gone and fetches it


def _pushed_files(folder: Path) -> list[str]:
    """The files of a run's local copy that go to its URL, by name: not the checkpoints (uploaded
    their own way), wandb's folder (it syncs itself) or hidden ones (version markers, temporary
    files). Files that another process removes while they are listed are passed over."""
    names = []
    for root, dirs, files in os.walk(folder):
        top = Path(root) == folder
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and d in NOT_PUSHED))
        names += [(Path(root) / f).relative_to(folder).as_posix() for f in sorted(files) if not f.startswith(".")]
    return names


def _drop_local(path: Path) -> None:
    path.unlink(missing_ok=True)
    _version_marker(path).unlink(missing_ok=True)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns
