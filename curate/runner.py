"""The one stage runner: ingest, recaption and encode-latents are all this loop.

    plan every output shard (deterministic, the same on every worker)
    take this worker's share (--rank/--world-size, torchrun, Slurm)
    skip shards already committed with the same input fingerprint and config
    process the rest shard by shard, committing each atomically (in the background,
        while the next shard is processed)
    when every shard is committed: the stage's final pass, then _stage.json

Scaling out is "launch more workers" (torchrun, Slurm arrays); workers never talk to each
other, and need no shared folder: a stage's output may be a URL (an object store), written
shard by shard, each worker staging its shards locally and uploading them.
Whichever worker finds every shard committed runs the final pass; it is deterministic and
idempotent, so two workers doing it at once write the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import posixpath
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from curate.shards import (
    TAR_RE,
    Shard,
    ShardWriter,
    UnreadableIndex,
    add_counts,
    committed_shards,
    delete_shard,
    open_shard,
    remove_orphaned_temporaries,
    remove_temporaries,
    stable_hash,
)

log = logging.getLogger("curate")

STAGE_FILE = "_stage.json"
UPLOADS = 4  # shards uploaded at once by a worker writing to a URL


class CurateError(Exception):
    """A user-facing error: bad arguments or input. The CLI prints it and exits with 2."""


@dataclass(frozen=True)
class ShardTask:
    """One output shard to produce: its id, the fingerprint of its input, and what to read."""

    shard_id: int
    fingerprint: str
    num_inputs: int  # input samples expected, for the progress bar
    payload: Any = None


def stage_record(stage_dir: Path | str) -> dict[str, Any] | None:
    """A complete stage's _stage.json (its folder here or at a URL), or None when it has none: the
    one way every reader asks whether a stage is there and finished."""
    from curate import storage

    try:
        return json.loads(storage.read_bytes(storage.join(stage_dir, STAGE_FILE)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as e:
        raise CurateError(f"{storage.join(stage_dir, STAGE_FILE)}: not readable JSON: {e}") from None


def stage_of_kind(stage_dir: Path | str, kind: str, what: str) -> dict[str, Any] | None:
    """``stage_dir``'s _stage.json (None while it is not complete), refusing a folder that holds
    another stage than ``kind`` (complete, or begun: its first shard's), which ``what`` names."""
    record = stage_record(stage_dir)
    found = record.get("stage") if record is not None else _first_shard_stage(stage_dir)
    if found is not None and found != kind:
        raise CurateError(f"{stage_dir} holds shards of `curate {found}`, not {what} (`curate {kind}` makes those)")
    return record


def _first_shard_stage(stage_dir: Path | str) -> str | None:
    """The stage of a folder's first committed shard (one opened, not all of them)."""
    from curate.shards import listed_shard_ids

    for shard_id in listed_shard_ids(stage_dir):
        if (shard := open_shard(stage_dir, shard_id)) is not None:
            return shard.meta.stage
    return None


def image_shards(images_dir: Path | str) -> list[Shard]:
    """The shards of a complete image stage (a folder, or a URL: curate/storage.py)."""
    from curate.shards import check_intact, committed_shards

    if stage_of_kind(images_dir, "ingest", "images") is None:
        raise CurateError(f"{images_dir}: not a complete image stage (no {STAGE_FILE}); run `curate ingest` to "
                          "completion first")
    shards = committed_shards(images_dir)
    if not shards:
        raise CurateError(f"{images_dir}: no image shards")
    check_intact(shards, images_dir)
    return shards


def image_stage_tasks(images_dir: Path | str, captions_dir: Path | str | None = None) -> list[ShardTask]:
    """The plan of a stage that reads the image stage (and its caption stage): one task per image
    shard, with the same id, fingerprinted by the image shard and its captions, its payload
    (image index, image tar, caption index or None). Either stage may be a URL."""
    from curate import storage
    from curate.shards import stable_hash

    shards = image_shards(images_dir)

    def captions_sha256(shard: Shard) -> tuple[str, str] | None:
        if captions_dir is None:
            return None
        captions = storage.join(captions_dir, posixpath.basename(shard.index_path))
        try:
            return captions, storage.sha256(captions)
        except FileNotFoundError:
            raise CurateError(f"{captions}: no captions for image shard {shard.shard_id}; were they made from "
                              "another image stage?") from None

    remote = captions_dir is not None and storage.is_remote(captions_dir)
    tasks = []
    for shard, captions in zip(shards, storage.parallel_map(captions_sha256, shards, remote), strict=True):
        fingerprint = stable_hash([shard.meta.fingerprint, shard.meta.tar_sha256, captions[1] if captions else None])
        tasks.append(ShardTask(shard.shard_id, fingerprint, shard.meta.counts["ok"],
                               (str(shard.index_path), str(shard.tar_path), captions[0] if captions else None)))
    return tasks


@dataclass
class ImageCaptions:
    """One image shard's samples and their captions, as every stage reading captions sees them."""

    keys: list[str]  # the image shard's accepted keys, in tar order
    originals: dict[str, str | None]  # each key's original caption, from the image stage
    accepted: dict[str, dict[str, str]]  # each key's accepted captions by variant: what training reads
    filtered: set[str]  # keys that `curate recaption --where ...` left out on purpose (FILTERED_OUT)


def read_image_captions(task: ShardTask, variants: list[str]) -> ImageCaptions:
    """The captions of an :func:`image_stage_tasks` task. A variant counts where its caption is
    non-empty, whatever the row's status: recaption keeps the good variants of a rejected row (its
    short caption failed, its long one did not), and training uses them."""
    from curate.images import FILTERED_OUT
    from curate.shards import OK, read_index

    images = read_index(task.payload[0], columns=["key", "status", "caption"])
    images = images.filter(images["status"] == OK)
    keys = images["key"].to_list()
    captions = ImageCaptions(keys, dict(zip(keys, images["caption"].to_list(), strict=True)),
                             {k: {} for k in keys}, set())
    if task.payload[2] is not None:
        table = read_index(task.payload[2])
        for row in table.select(["key", *variants]).iter_rows(named=True):
            if row["key"] in captions.accepted:
                captions.accepted[row["key"]] = {v: row[v] for v in variants if row[v]}
        captions.filtered = set(table.filter(table["reason"] == FILTERED_OUT)["key"].to_list())
    return captions


class Stage:
    """What a stage provides to the runner. Subclasses stay short: plan, process, finalize."""

    name: str = "stage"
    version: int = 1  # bump when the stage's output changes for the same input and config
    index_schema: dict = {}
    with_tar: bool = True
    unit: str = "img"
    packages: tuple[str, ...] = ("kiln",)  # versions recorded in _stage.json

    def config(self) -> dict[str, Any]:
        """Settings that change the output; their hash decides whether committed shards are reused."""
        return {}

    def provenance(self) -> dict[str, Any]:
        """Context recorded in _stage.json that does not change the output (paths, hosts)."""
        return {}

    def plan(self) -> list[ShardTask]:
        raise NotImplementedError

    def prepare(self, todo: list[ShardTask]) -> None:
        """Called once with this worker's pending shards before processing (e.g. downloads)."""

    def process(self, task: ShardTask, writer: ShardWriter, progress: Callable[[int], None]) -> None:
        """Produce one shard into ``writer``. The runner commits it in a background thread while
        the next shard is processed; work that can wait for then (writing what was produced)
        goes to ``writer.defer``, so that an accelerator does not wait for it."""
        raise NotImplementedError

    def finalize(self, out_dir: Path | str, tasks: list[ShardTask]) -> dict[str, Any]:
        """Final pass once every shard is committed; returns a summary for _stage.json.
        ``out_dir`` is a URL (a string) when the stage writes to one: what it rewrites there goes
        through :class:`ShardWriter` (staged, then uploaded) as the shards did."""
        return {}

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass(frozen=True)
class WorkerShare:
    rank: int
    world_size: int

    def take(self, tasks: list[ShardTask]) -> list[ShardTask]:
        # Strided: with shards of equal size, every worker gets the same amount of work.
        return tasks[self.rank :: self.world_size]


def resolve_share(rank: int | None = None, world_size: int | None = None) -> WorkerShare:
    """Explicit flags win; then torchrun (RANK/WORLD_SIZE); then Slurm tasks and arrays.

    Inside a Slurm array each array task may itself run several tasks (srun -n K): the
    worker index is then array_index * K + SLURM_PROCID over COUNT * K workers. Slurm's tasks
    are srun's (:func:`slurm_tasks`): a batch script that runs a stage itself is one worker,
    whatever ``--ntasks`` it allocated.
    """
    env = os.environ
    if rank is None and world_size is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            ntasks = slurm_tasks(env)
            # --array=0-20:4 numbers its tasks 0, 4, ... 20: the index counts steps from the first.
            step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
            offset = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            if step < 1 or offset % step:
                raise CurateError(f"Slurm array task {env['SLURM_ARRAY_TASK_ID']} is not the first task's number plus "
                                  f"a multiple of its step {step}: give --rank and --world-size")
            index = offset // step
            rank = index * ntasks + (int(env.get("SLURM_PROCID", 0)) if ntasks > 1 else 0)
            world_size = int(env["SLURM_ARRAY_TASK_COUNT"]) * ntasks
        elif "SLURM_PROCID" in env and slurm_tasks(env) > 1:
            rank, world_size = int(env["SLURM_PROCID"]), slurm_tasks(env)
        else:
            rank, world_size = 0, 1
    elif rank is None or world_size is None:
        raise CurateError("--rank and --world-size go together")
    if world_size < 1 or not 0 <= rank < world_size:
        raise CurateError(f"worker rank {rank} is outside 0..{world_size - 1}")
    return WorkerShare(rank, world_size)


def slurm_tasks(env: Mapping[str, str] | None = None) -> int:
    """The tasks this process is one of: srun's step (``SLURM_STEP_NUM_TASKS``). A batch script is
    one process although Slurm sets ``SLURM_NTASKS`` (the allocation) and ``SLURM_PROCID=0`` in it;
    a task past the first without step variables (an srun that sets none) counts ``SLURM_NTASKS``."""
    env = os.environ if env is None else env
    step = slurm_int(env.get("SLURM_STEP_NUM_TASKS"))
    if step is not None:
        return step
    if (slurm_int(env.get("SLURM_PROCID")) or 0) > 0:
        return slurm_int(env.get("SLURM_NTASKS")) or 1
    return 1


def slurm_int(value: str | None) -> int | None:
    """A count from a Slurm variable, which may read ``4(x2)`` or ``4,2``: its first number."""
    digits = (value or "").split("(")[0].split(",")[0].strip()
    return int(digits) if digits.isdigit() else None


def local_rank() -> int:
    """This worker's index on its machine: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(name, "")
        if value:
            return int(value)
    return 0


def local_world_size() -> int:
    """Workers on this machine: torchrun's LOCAL_WORLD_SIZE, else Slurm's SLURM_STEP_TASKS_PER_NODE
    (srun's tasks on this node; a batch script is one worker), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        count = slurm_int(os.environ.get(name))
        if count is not None:
            return count
    return 1


def _local_gpu() -> Any:
    # The local rank modulo the visible GPUs, so that a launcher that already narrowed
    # CUDA_VISIBLE_DEVICES to one GPU per worker (Slurm's --gpus-per-task=1) still works.
    import torch

    count = torch.cuda.device_count()
    return torch.device("cuda", local_rank() % count if count else 0)


def default_device() -> str:
    """``cuda:LOCAL_RANK`` when CUDA is available (one worker per GPU under torchrun or srun),
    else ``cpu``; the local rank is taken modulo the GPUs visible."""
    import torch

    return str(_local_gpu()) if torch.cuda.is_available() else "cpu"


def resolve_device(device: Any = None, option: str = "--device ") -> Any:
    """The ``torch.device`` to run on: ``default_device()`` when none is given, and this
    worker's GPU for a bare ``cuda`` (torch would read it as the current device, cuda:0 in
    every worker, and ``torch.cuda.set_device`` refuses a device without an index). ``option``:
    how errors name the setting (``--device `` or train's ``device=``)."""
    import torch

    if device is None:
        return torch.device(default_device())
    try:
        asked = torch.device(device)
    except RuntimeError:
        raise CurateError(f"{option}{device}: not a device (cpu, cuda, cuda:N, ...)") from None
    if asked.type == "cuda" and not torch.cuda.is_available():
        build = f"a CPU-only build of torch {torch.__version__}" if torch.version.cuda is None else "no GPU visible"
        raise CurateError(f"{option}{device}: CUDA is not available here ({build})")
    if asked.type == "cuda" and asked.index is not None and asked.index >= torch.cuda.device_count():
        raise CurateError(f"{option}{device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return _local_gpu() if asked.type == "cuda" and asked.index is None else asked


def package_versions(names: Iterable[str]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class StageResult:
    processed: list[int] = field(default_factory=list)  # shard ids this worker wrote
    skipped: list[int] = field(default_factory=list)  # shard ids already committed
    complete: bool = False  # every shard of the stage is committed and the final pass ran
    summary: dict[str, Any] = field(default_factory=dict)  # _stage.json, when complete


def _is_done(shard: Shard | None, task: ShardTask, config_hash: str, fingerprints: dict[str, str],
             stage_name: str | None = None) -> bool:
    if shard is not None and stage_name is not None and shard.meta.stage != stage_name:
        raise CurateError(f"{shard.index_path} is a shard of `curate {shard.meta.stage}`: give `curate {stage_name}` "
                          "a folder of its own (it would replace that stage's shards)")
    return (
        shard is not None
        and shard.meta.fingerprint == task.fingerprint
        and shard.meta.config_hash == config_hash
        and all(fingerprints.get(sid) == fp for sid, fp in shard.meta.depends_on.items())
        and shard.intact()
    )


def _done(out_dir: Path | str, tasks: list[ShardTask], config_hash: str,
          fingerprints: dict[str, str], stage_name: str | None = None) -> Iterator[bool]:
    """Whether each task's shard is committed and current, lazily and in order: at a URL, many
    asked at once (a shard costs two or three requests) and the folder's listing asked afresh
    (other workers' shards)."""
    from curate import storage

    remote = storage.is_remote(out_dir)
    if remote:
        storage.forget_listings(str(out_dir))
    return storage.parallel_map(
        lambda t: _is_done(_own_shard(out_dir, t.shard_id), t, config_hash, fingerprints, stage_name), tasks, remote)


def _own_shard(out_dir: Path | str, shard_id: int) -> Shard | None:
    """A stage's own committed shard, as :func:`open_shard`; None (to be redone) for one whose index is
    not readable (cut off by a copy), which would otherwise stop every rerun."""
    try:
        return open_shard(out_dir, shard_id)
    except UnreadableIndex as e:
        log.warning("%s; the shard is made again", e)
        return None


def _all_done(out_dir: Path | str, tasks: list[ShardTask], config_hash: str, fingerprints: dict[str, str]) -> bool:
    """Whether every shard is in; the first one missing ends the asking."""
    checks = _done(out_dir, tasks, config_hash, fingerprints)
    try:
        return all(checks)
    finally:
        checks.close()


def stage_config(stage: Stage) -> dict[str, Any]:
    """What a stage's shards are made with: a committed shard made with another one is redone."""
    return {"stage": stage.name, "stage_version": stage.version, **stage.config()}


INPUTS = ("source", "images", "captions", "latents")  # the provenance entries that name a stage's inputs


def _check_own_folder(stage: Stage, out_dir: Path | str) -> None:
    """A stage's --out is not one of the folders it reads (nor another stage's: each shard of this
    worker's share found there is checked before any work, _is_done; no request is added here)."""
    from curate import storage

    where = storage.resolved(out_dir)
    inputs = stage.provenance()
    for name in INPUTS:
        if isinstance(inputs.get(name), str) and storage.resolved(inputs[name]) == where:
            raise CurateError(f"--out {out_dir} is also the {name} the {stage.name} stage reads: give it a folder of "
                              "its own")


def run_stage(
    stage: Stage,
    out_dir: str | os.PathLike,
    *,
    share: WorkerShare | None = None,
    progress: bool = True,
) -> StageResult:
    """Run this worker's share of a stage; finish the stage if every shard is then committed.
    ``out_dir`` is a local folder or a URL (``s3://bucket/DATA/latents``: curate/storage.py)."""
    from curate import storage

    out_dir = storage.as_location(out_dir)
    share = share or WorkerShare(0, 1)
    tasks = stage.plan()
    ids = [t.shard_id for t in tasks]
    if ids != sorted(set(ids)):
        raise RuntimeError(f"{stage.name}: plan must list unique shard ids in order")
    _check_own_folder(stage, out_dir)
    config = stage_config(stage)
    config_hash = stable_hash(config)
    fingerprints = {str(t.shard_id): t.fingerprint for t in tasks}
    if isinstance(out_dir, Path):
        out_dir.mkdir(parents=True, exist_ok=True)
    if orphans := remove_orphaned_temporaries(out_dir):
        log.info("%s: removed %d temporaries that killed writers on this machine left in %s", stage.name,
                 len(orphans), orphans[0].parent)

    result = StageResult()
    mine = share.take(tasks)
    todo = []
    remote = storage.is_remote(out_dir)
    # Every shard of this worker's share is asked for before any work: one of another stage is refused.
    for task, done in zip(mine, _done(out_dir, mine, config_hash, fingerprints, stage.name), strict=True):
        if done:
            result.skipped.append(task.shard_id)
            if remote:  # staged copies that a kill left after the upload, if any
                remove_temporaries(out_dir, task.shard_id)
        else:
            todo.append(task)
    log.info(
        "%s: %d shards in all; worker %d/%d has %d, %d already committed, %d to do",
        stage.name, len(tasks), share.rank, share.world_size, len(mine), len(result.skipped), len(todo),
    )

    with _disk_full_named(stage, out_dir), stage:
        if todo and remote:
            _check_writable(out_dir)
        if todo:
            _withdraw_completion(out_dir)
            stage.prepare(todo)
        bar = tqdm(
            total=sum(t.num_inputs for t in todo),
            unit=stage.unit,
            desc=f"{stage.name} [{share.rank}/{share.world_size}]",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
            file=sys.stderr,
        )
        # One shard is finished and committed in the background while the next is processed; an
        # error in either stops the run (the executor's exit waits for the one in the background).
        # At a URL the commit stages the shard and hands its upload to a pool of its own, UPLOADS
        # at once: uploads wait on the store's latency, request by request, and need not wait for
        # each other or hold up the next shard's commit.
        # The uploader is shut down last: the committer's shard in flight hands it its upload.
        with (bar, ThreadPoolExecutor(UPLOADS if remote else 1, thread_name_prefix=f"{stage.name}-upload") as uploader,
              ThreadPoolExecutor(1, thread_name_prefix=f"{stage.name}-commit") as committer):
            committing: Future[Future[int]] | None = None
            uploading: deque[Future[int]] = deque()
            for task in todo:
                if writing := remove_temporaries(out_dir, task.shard_id):
                    # Two writers of one shard could also mix their tar and index.
                    raise CurateError(f"{stage.name}: shard {task.shard_id} of {out_dir} is being written by process "
                                      f"{writing[0]} on this machine: is this stage running twice into one folder, "
                                      "or do two workers have the same rank? (--rank/--world-size, RANK/WORLD_SIZE "
                                      "or Slurm's task variables)")
                writer = ShardWriter(out_dir, task.shard_id, stage.index_schema, with_tar=stage.with_tar)
                try:
                    started = time.perf_counter()
                    stage.process(task, writer, bar.update)
                    seconds = time.perf_counter() - started
                    if committing is not None:
                        uploading.append(committing.result())
                    # Uploads that ended are taken as they end (a failed one stops the run now).
                    while uploading and (len(uploading) > UPLOADS or uploading[0].done()):
                        result.processed.append(uploading.popleft().result())
                except BaseException:
                    writer.abort()
                    raise
                committing = committer.submit(_commit, stage, task, writer, config_hash, seconds,
                                              uploader if remote else None)
            if committing is not None:
                uploading.append(committing.result())
            while uploading:
                result.processed.append(uploading.popleft().result())

        # Finish the stage if every worker's shards are in (this one may be the last to end).
        if _all_done(out_dir, tasks, config_hash, fingerprints):
            _remove_unplanned(stage, out_dir, tasks)
            extra = stage.finalize(out_dir, tasks)
            result.summary = _finish(stage, out_dir, tasks, config, config_hash, extra)
            result.complete = True
        else:
            log.info("%s: other workers' shards are still missing; the last worker to end finishes the stage",
                     stage.name)
    return result


@contextlib.contextmanager
def _disk_full_named(stage: Stage, out_dir: Path | str) -> Iterator[None]:
    """A full disk (or quota) while a stage runs is the user's to fix: a clear error that names the
    folder written to (an OSError's message names none), not a traceback. The shard being made stays
    uncommitted, its temporaries removed, and the committed ones are kept for the rerun."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from curate import storage
        from curate.shards import work_dir

        where = e.filename or work_dir(out_dir)
        hint = (f" (the local staging folder of {out_dir}: point $KILN_STAGING at a larger disk)"
                if storage.is_remote(out_dir) else "")
        raise CurateError(f"{stage.name}: {e.strerror} writing to {where}{hint}; the shards committed so far "
                          "are kept: free some space and rerun to go on") from e


def _remove_unplanned(stage: Stage, out_dir: Path | str, tasks: list[ShardTask]) -> None:
    """Remove the committed shards that the plan no longer has (left from an earlier run over a larger
    input: a clean run would not have them), before the final pass, which reads the folder's shards
    (its manifests, its summary, its cross-shard deduplication) and must see the plan's alone."""
    from curate import storage

    planned = {t.shard_id for t in tasks}
    for shard in committed_shards(out_dir):
        if shard.shard_id not in planned:
            log.info("%s: removing shard %d, which is no longer in the plan", stage.name, shard.shard_id)
            delete_shard(shard)
    # A tar whose index never came (its writer killed between the renames), outside the plan too: no
    # run would redo it, and a reader that globs *.tar (datasets' webdataset loader) would read it.
    for name in storage.list_names(out_dir):
        if (m := TAR_RE.match(name)) and int(m.group(1)) not in planned:
            log.info("%s: removing %s, a tar without its index outside the plan", stage.name, name)
            storage.remove(storage.join(out_dir, name))


def _withdraw_completion(out_dir: Path | str) -> None:
    """Remove the _stage.json of an earlier run before this one replaces or adds any shard: left
    there, a rerun with another setting that is killed midway would leave a folder of both runs'
    shards that still reads as complete (to `curate stats`, and to the stages that read it). The
    run that commits the last shard writes it again."""
    from curate import storage

    storage.remove(storage.join(out_dir, STAGE_FILE))


def _check_writable(out_dir: str) -> None:
    """Write and delete a small object at a URL before any work: a store this worker may not write
    to (read-only credentials, a server that refuses uploads) is named now, not after its first
    shards were made."""
    import socket

    from curate import storage

    probe = storage.join(out_dir, f".kiln-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"kiln")
        storage.remove(probe)
    except OSError as e:
        raise CurateError(f"{out_dir}: cannot write there: {e}") from None


def _commit(stage: Stage, task: ShardTask, writer: ShardWriter, config_hash: str, seconds: float,
            uploader: ThreadPoolExecutor | None) -> Future[int]:
    """Commit a shard; at a URL, stage it and return its upload's future (its id when it is up)."""
    try:
        # The shard's own time (its processing, plus its deferred work that commit adds), not the
        # time it waited behind the next shard's processing.
        writer.commit(stage=stage.name, fingerprint=task.fingerprint, config_hash=config_hash,
                      seconds=seconds, upload=uploader is None)
    except BaseException:
        writer.abort()
        raise
    if uploader is None:
        done: Future[int] = Future()
        done.set_result(task.shard_id)
        return done

    def upload() -> int:
        writer.upload()
        return task.shard_id

    return uploader.submit(upload)


def _finish(
    stage: Stage,
    out_dir: Path | str,
    tasks: list[ShardTask],
    config: dict[str, Any],
    config_hash: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from curate import storage

    planned = {t.shard_id for t in tasks}
    totals: dict[str, Any] = {}
    seconds = 0.0
    for shard in committed_shards(out_dir):
        if shard.shard_id not in planned:  # another worker's final pass is removing it too
            continue
        totals = add_counts(totals, shard.meta.counts)
        seconds += shard.meta.seconds
    summary = {
        "stage": stage.name,
        "format_version": 1,
        "complete": True,
        "shards": len(tasks),
        "totals": totals,
        "throughput": {
            # Per worker, from the time spent inside each shard: comparable across runs
            # whatever the number of workers.
            f"{stage.unit}_per_second_per_worker": round(totals["seen"] / seconds, 2) if seconds else None,
            "worker_seconds": round(seconds, 2),
        },
        "summary": extra,
        "config": config,
        "config_hash": config_hash,
        "provenance": stage.provenance(),
        "versions": package_versions(stage.packages),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_text(storage.join(out_dir, STAGE_FILE), json.dumps(summary, indent=2, sort_keys=False) + "\n")
    log.info("%s: complete, %d ok and %d rejected of %d seen", stage.name,
             totals["ok"], totals["rejected"], totals["seen"])
    return summary

