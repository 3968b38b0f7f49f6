"""The shared runner and the shard contract, independent of any stage."""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import polars as pl
import pytest

from curate.runner import (
    CurateError,
    ShardTask,
    Stage,
    WorkerShare,
    default_device,
    resolve_device,
    resolve_share,
    run_stage,
)
from curate.shards import (
    ShardError,
    ShardWriter,
    _tarinfo,
    committed_shards,
    iter_tar_samples,
    open_shard,
    read_index,
    reject_samples,
    sample_key,
)


class Squares(Stage):
    """A toy stage: input shard i holds numbers; each sample stores its square; odd ones rejected."""

    name = "squares"
    index_schema = {"value": pl.Int64}

    def __init__(self, inputs: list[list[int]], fail_on: int | None = None):
        self.inputs, self.fail_on = inputs, fail_on

    def config(self):
        return {"power": 2}

    def plan(self):
        return [ShardTask(i, json.dumps(xs), len(xs), xs) for i, xs in enumerate(self.inputs)]

    def process(self, task, writer, progress):
        for x in task.payload:
            if x == self.fail_on:
                raise RuntimeError("boom")
            key = sample_key(str(x).encode())
            if x % 2:
                writer.reject(key, "odd", row={"value": x}, detail=f"{x} is odd")
            else:
                writer.add(key, {"txt": str(x * x).encode()}, row={"value": x}, flags=["big"] if x > 5 else [])
            progress(1)


ENV_KEYS = ["RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_ARRAY_TASK_ID",
            "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6"}, (5, 6)),  # srun -n 6
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}, (5, 6)),  # an srun without step variables
        # a batch script with --ntasks 6 that runs the stage itself: one process, so all the work
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "6"}, (0, 1)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1"}, (6, 10)),
        ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_COUNT": "6", "SLURM_ARRAY_TASK_MIN": "0",
          "SLURM_ARRAY_TASK_STEP": "4"}, (2, 6)),  # --array=0-20:4
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1",
          "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, (6, 10)),  # array tasks' batch scripts
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "3",
          "SLURM_STEP_NUM_TASKS": "3"}, (7, 12)),
        # torchrun inside a Slurm allocation: torchrun's global rank wins
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 2)),
    ],
)
def test_worker_share_from_environment(monkeypatch, env, expected):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    share = resolve_share()
    assert (share.rank, share.world_size) == expected
    assert resolve_share(1, 4) == WorkerShare(1, 4)  # flags win


@pytest.mark.parametrize(("env", "expected"), [({}, "cuda:0"), ({"LOCAL_RANK": "3"}, "cuda:3"),
                                                ({"SLURM_LOCALID": "2"}, "cuda:2"),
                                                ({"LOCAL_RANK": "5", "SLURM_LOCALID": "0"}, "cuda:1")])
def test_default_device_is_this_workers_gpu(monkeypatch, env, expected):
    import torch

    for k in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device() == expected  # torchrun's LOCAL_RANK first, modulo the GPUs visible
    # A bare "cuda" is this worker's GPU too (torch would take cuda:0, and set_device refuses it).
    assert resolve_device(None) == resolve_device("cuda") == torch.device(expected)
    assert resolve_device("cuda:2") == torch.device("cuda:2") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu" and resolve_device(None) == torch.device("cpu")


@pytest.mark.parametrize(("env", "parallel", "expected"), [
    ({"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, "2,3"),
    ({"SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_LOCALID": "3"}, 1, "3"),
    ({}, 1, "0,1,2,3"),  # one worker on the machine: vLLM chooses
    ({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "2"}, 2, None),  # 4 workers x 2 GPUs > 4 GPUs
])
def test_vllm_workers_get_their_own_gpus(monkeypatch, env, parallel, expected):
    from curate.captioners.base import CaptionerError
    from curate.captioners.vllm_backend import _pin_local_gpus

    for k in ("LOCAL_WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_TASKS_PER_NODE", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {**env, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}.items():
        monkeypatch.setenv(k, v)
    if expected is None:
        with pytest.raises(CaptionerError, match="worker 2 of 4 needs 2 GPU"):
            _pin_local_gpus(parallel)
    else:
        _pin_local_gpus(parallel)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_bad_worker_share_is_a_clear_error(monkeypatch):
    with pytest.raises(CurateError, match="outside"):
        resolve_share(4, 4)
    with pytest.raises(CurateError, match="go together"):
        resolve_share(1, None)
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "6", "SLURM_ARRAY_TASK_MIN": "0",
                       "SLURM_ARRAY_TASK_STEP": "4"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CurateError, match="not the first task's number plus a multiple of its step 4"):
        resolve_share()


def test_stage_counts_and_stage_file(tmp_path: Path):
    result = run_stage(Squares([[1, 2, 3], [4, 6, 8], [9]]), tmp_path, progress=False)
    assert result.complete and result.processed == [0, 1, 2]
    totals = result.summary["totals"]
    assert totals == {"seen": 7, "ok": 4, "rejected": 3, "reasons": {"odd": 3}, "flags": {"big": 2}}
    assert json.loads((tmp_path / "_stage.json").read_text())["totals"] == totals
    for shard in committed_shards(tmp_path):
        c = shard.meta.counts
        assert c["ok"] + c["rejected"] == c["seen"] == read_index(shard.index_path).height
    assert [k for k, _ in iter_tar_samples(tmp_path / "000001.tar")] == [sample_key(b"4"), sample_key(b"6"),
                                                                         sample_key(b"8")]


def test_failure_mid_shard_leaves_no_visible_shard_and_rerun_completes(tmp_path: Path):
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Squares([[2], [4, 6, 8]], fail_on=6), tmp_path, progress=False)
    assert [s.shard_id for s in committed_shards(tmp_path)] == [0]
    assert not list(tmp_path.glob(".*tmp-*")), "temporaries are removed on failure"
    assert not (tmp_path / "_stage.json").exists()
    result = run_stage(Squares([[2], [4, 6, 8]]), tmp_path, progress=False)
    assert result.skipped == [0] and result.processed == [1] and result.complete


class Cubed(Squares):
    """Squares with another setting: a rerun of the same stage whose shards all change."""

    def config(self):
        return {"power": 3}


def test_a_rerun_with_another_setting_withdraws_the_stage_file_until_it_completes(tmp_path: Path):
    """A finished stage rerun with another setting and killed midway holds shards of both runs:
    it must not read as complete."""
    run_stage(Squares([[2], [4, 6, 8]]), tmp_path, progress=False)
    assert (tmp_path / "_stage.json").exists()
    with pytest.raises(RuntimeError, match="boom"):
        run_stage(Cubed([[2], [4, 6, 8]], fail_on=6), tmp_path, progress=False)
    assert [s.meta.config_hash for s in committed_shards(tmp_path)][0] != open_shard(tmp_path, 1).meta.config_hash
    assert not (tmp_path / "_stage.json").exists()
    result = run_stage(Cubed([[2], [4, 6, 8]]), tmp_path, progress=False)
    assert result.skipped == [0] and result.processed == [1] and result.complete
    assert json.loads((tmp_path / "_stage.json").read_text())["config"]["power"] == 3
    assert run_stage(Cubed([[2], [4, 6, 8]]), tmp_path, progress=False).complete  # nothing to do: complete


class DeferredSquares(Squares):
    """Squares whose samples are written by deferred work, as encode-latents writes its own."""

    def __init__(self, inputs: list[list[int]], fail_on: int | None = None, fail_writing: int | None = None):
        super().__init__(inputs, fail_on)
        self.fail_writing, self.events = fail_writing, []

    def process(self, task, writer, progress):
        self.events.append(("process", task.shard_id, threading.current_thread().name))
        if task.shard_id == self.fail_on:
            raise RuntimeError("boom in process")

        def write():
            self.events.append(("write", task.shard_id, threading.current_thread().name))
            if task.shard_id == self.fail_writing:
                raise RuntimeError("boom in writing")
            for x in task.payload:
                writer.add(sample_key(str(x).encode()), {"txt": str(x * x).encode()}, row={"value": x})

        writer.defer(write)
        progress(len(task.payload))


def test_deferred_writing_gives_the_same_shards(tmp_path: Path):
    inputs = [[2, 4], [6], [8, 10, 12]]
    stage = DeferredSquares(inputs)
    result = run_stage(stage, tmp_path / "deferred", progress=False)
    assert result.complete and result.processed == [0, 1, 2]
    # Each shard is written after its processing, by the runner's commit thread.
    main = threading.current_thread().name
    assert [e for e in stage.events if e[0] == "process"] == [("process", i, main) for i in range(3)]
    writes = [e for e in stage.events if e[0] == "write"]
    assert [i for _, i, _ in writes] == [0, 1, 2] and all(t.startswith("squares-commit") for _, _, t in writes)
    assert stage.events.index(writes[0]) > stage.events.index(("process", 0, main))
    for shard in committed_shards(tmp_path / "deferred"):
        assert shard.meta.counts["ok"] == len(inputs[shard.shard_id]) and shard.meta.seconds >= 0
        assert [k for k, _ in iter_tar_samples(shard.tar_path)] == [sample_key(str(x).encode())
                                                                   for x in inputs[shard.shard_id]]


@pytest.mark.parametrize(("fail_on", "fail_writing", "message"),
                         [(None, 1, "boom in writing"), (2, None, "boom in process")])
def test_a_failure_while_a_shard_commits_in_the_background_loses_nothing(tmp_path: Path, fail_on, fail_writing,
                                                                         message):
    inputs = [[2], [4], [6], [8]]
    with pytest.raises(RuntimeError, match=message):
        run_stage(DeferredSquares(inputs, fail_on=fail_on, fail_writing=fail_writing), tmp_path, progress=False)
    committed = [s.shard_id for s in committed_shards(tmp_path)]
    # Shards before the failing one are committed (the one in the background too); none after.
    assert committed == ([0] if fail_writing == 1 else [0, 1])
    assert not list(tmp_path.glob(".*tmp-*")), "temporaries are removed on failure"
    result = run_stage(DeferredSquares(inputs), tmp_path, progress=False)
    assert result.skipped == committed and result.complete


class Cubes(Squares):
    """Another stage, reading a folder of its input (its provenance names it)."""

    name = "cubes"

    def __init__(self, inputs: list[list[int]], images: Path | None = None, fail_on: int | None = None):
        super().__init__(inputs, fail_on)
        self.images = images

    def provenance(self):
        return {"images": str(self.images)} if self.images else {}


def test_a_stage_refuses_the_folder_of_another_stage_or_its_own_input(tmp_path: Path):
    run_stage(Squares([[2], [4]]), tmp_path / "done", progress=False)  # complete: its _stage.json
    with pytest.raises(RuntimeError, match="boom"):  # begun: one shard committed
        run_stage(Squares([[2], [4, 6]], fail_on=6), tmp_path / "begun", progress=False)
    run_stage(Squares([[2], [4]]), tmp_path / "second", share=WorkerShare(1, 2), progress=False)  # shard 1 only
    for folder, message in (("done", "done/000000.parquet is a shard of `curate squares`"),
                            ("begun", "begun/000000.parquet is a shard of `curate squares`"),
                            ("second", "second/000001.parquet is a shard of `curate squares`")):
        with pytest.raises(CurateError, match=f"{message}: give `curate cubes` a folder of its own"):
            run_stage(Cubes([[2], [4]]), tmp_path / folder, progress=False)
    with pytest.raises(CurateError, match="is also the images the cubes stage reads"):
        run_stage(Cubes([[2]], images=tmp_path / "in"), tmp_path / "in", progress=False)
    assert [s.meta.stage for s in committed_shards(tmp_path / "done")] == ["squares", "squares"]
    assert run_stage(Cubes([[2], [4]], images=tmp_path / "done"), tmp_path / "cubes", progress=False).complete


def test_tar_without_index_is_not_a_shard_and_a_mismatched_tar_is_redone(tmp_path: Path):
    run_stage(Squares([[2], [4]]), tmp_path, progress=False)
    (tmp_path / "000001.parquet").unlink()  # as if killed between the two renames
    assert open_shard(tmp_path, 1) is None
    (tmp_path / "000000.tar").write_bytes(b"truncated")  # as if the tar were replaced under the index
    assert not open_shard(tmp_path, 0).intact()
    result = run_stage(Squares([[2], [4]]), tmp_path, progress=False)
    assert result.processed == [0, 1]
    assert all(s.intact() for s in committed_shards(tmp_path))


class CubedValues(Squares):
    """Another setting whose samples differ from Squares' but whose tars are the same size."""

    def config(self):
        return {"power": 3}

    def process(self, task, writer, progress):
        for x in task.payload:
            writer.add(sample_key(str(x).encode()), {"txt": str(x**3).encode()}, row={"value": x})


def test_a_redo_killed_between_its_renames_leaves_no_old_index_over_the_new_tar(tmp_path: Path, monkeypatch):
    """A shard redone with another setting and killed after its tar's rename: the old index must not
    describe the new tar (same size here), or a rerun with the old setting skips a shard of the other."""
    import curate.shards

    run_stage(Squares([[2]]), tmp_path, progress=False)
    replace = curate.shards._fsync_replace

    def killed_before_the_index(tmp: Path, final: Path) -> None:
        if final.suffix == ".parquet":
            raise KeyboardInterrupt("killed between the renames")
        replace(tmp, final)

    monkeypatch.setattr(curate.shards, "_fsync_replace", killed_before_the_index)
    with pytest.raises(KeyboardInterrupt):
        run_stage(CubedValues([[2]]), tmp_path, progress=False)
    monkeypatch.setattr(curate.shards, "_fsync_replace", replace)
    assert open_shard(tmp_path, 0) is None  # the tar without its index: no shard
    result = run_stage(Squares([[2]]), tmp_path, progress=False)
    assert result.processed == [0]
    assert [m for _, m in iter_tar_samples(tmp_path / "000000.tar")] == [{"txt": b"4"}]


class Counting(Squares):
    """Squares whose final pass records the shards it finds, as encode-latents' manifests list them."""

    def finalize(self, out_dir, tasks):
        return {"shards": [s.shard_id for s in committed_shards(out_dir)]}


def test_shards_no_longer_planned_are_gone_before_the_final_pass(tmp_path: Path):
    run_stage(Counting([[2], [4], [6]]), tmp_path, progress=False)
    result = run_stage(Counting([[2], [4]]), tmp_path, progress=False)
    assert result.summary["summary"] == {"shards": [0, 1]}
    assert [s.shard_id for s in committed_shards(tmp_path)] == [0, 1] and result.summary["totals"]["seen"] == 2


def test_a_full_disk_mid_shard_is_a_clear_error_that_leaves_no_partial_shard(tmp_path: Path, monkeypatch):
    import errno

    import curate.shards

    write = curate.shards._HashingFile.write

    def full_at_the_third_shard(self, data):
        if ".000002.tar" in self.raw.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, data)

    monkeypatch.setattr(curate.shards._HashingFile, "write", full_at_the_third_shard)
    with pytest.raises(CurateError, match=f"squares: No space left on device writing to {tmp_path}; the shards "
                                          "committed so far are kept"):
        run_stage(Squares([[2], [4], [6, 8]]), tmp_path, progress=False)
    assert [s.shard_id for s in committed_shards(tmp_path)] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.parquet", "000000.tar", "000001.parquet",
                                                          "000001.tar"]
    monkeypatch.setattr(curate.shards._HashingFile, "write", write)
    result = run_stage(Squares([[2], [4], [6, 8]]), tmp_path, progress=False)
    assert result.skipped == [0, 1] and result.processed == [2] and result.complete


def test_an_index_cut_off_is_redone_by_its_stage_and_named_to_its_readers(tmp_path: Path):
    run_stage(Squares([[2], [4]]), tmp_path, progress=False)
    index = tmp_path / "000001.parquet"
    index.write_bytes(index.read_bytes()[:100])  # a copy of the folder cut off
    with pytest.raises(ShardError, match="000001.parquet: not a readable shard index, cut off or damaged"):
        committed_shards(tmp_path)
    result = run_stage(Squares([[2], [4]]), tmp_path, progress=False)
    assert result.skipped == [0] and result.processed == [1] and result.complete
    assert open_shard(tmp_path, 1).meta.counts["ok"] == 1


def test_a_tar_without_its_index_outside_a_smaller_plan_is_removed(tmp_path: Path):
    """A kill between a shard's renames leaves its tar alone; once the input shrinks, no run redoes that
    shard, and a reader globbing *.tar would read it."""
    run_stage(Squares([[2], [4], [6]]), tmp_path, progress=False)
    (tmp_path / "000002.parquet").unlink()  # as if killed between the two renames
    (tmp_path / "000003.tar").write_bytes(b"\0" * 1024)  # as if killed before shard 3's index, long ago
    result = run_stage(Squares([[2], [4]]), tmp_path, progress=False)
    assert result.complete
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith((".", "_"))) == [
        "000000.parquet", "000000.tar", "000001.parquet", "000001.tar"]


def test_leftover_temporaries_are_cleaned_before_a_shard_is_redone(tmp_path: Path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".000000.tar.tmp-99999"
    stale.write_bytes(b"half a tar")
    run_stage(Squares([[2]]), tmp_path, progress=False)
    assert not stale.exists()


def test_a_shard_another_process_here_is_writing_is_refused_not_deleted_under_it(tmp_path: Path):
    """The same stage started twice into one folder (or two workers of one rank): the second to
    reach a shard finds the first one's temporary, and stops with the reason instead of deleting
    the file the first is writing; once that process is gone, its temporary is removed."""
    import socket
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".000001.tar.tmp-{socket.gethostname()}-{writer.pid}"
        busy.write_bytes(b"half a tar")
        with pytest.raises(CurateError, match=f"shard 1 of .* is being written by process {writer.pid} on this machine"):
            run_stage(Squares([[2], [4]]), tmp_path, progress=False)
        assert busy.exists()
    finally:
        writer.kill()
        writer.wait()
    assert run_stage(Squares([[2], [4]]), tmp_path, progress=False).complete and not busy.exists()


def test_temporaries_of_killed_writers_on_this_machine_go_even_where_no_shard_is_redone(tmp_path: Path):
    """A final pass's rewrite killed, or a shard another worker redid: the run skips the shard, and
    its temporaries would stay for good. A run removes those of this host's writers that are gone
    and untouched for an hour; a running writer's, another host's, and fresh ones stay."""
    import socket
    import subprocess
    import sys
    import time

    run_stage(Squares([[2], [4]]), tmp_path, progress=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host, hour_ago = socket.gethostname(), time.time() - 3700
    names = {"orphan": f".000001.tar.tmp-{host}-{gone}", "orphan index": f".000000.parquet.tmp-{host}-{gone}",
             "running": f".000001.tar.tmp-{host}-{os.getpid()}", "another host": f".000001.tar.tmp-elsewhere-{gone}",
             "fresh": f".000000.tar.tmp-{host}-{gone}", "not a shard's": f".notes.txt.tmp-{host}-{gone}"}
    for label, name in names.items():
        (tmp_path / name).write_bytes(b"part of a shard")
        if label != "fresh":
            os.utime(tmp_path / name, (hour_ago, hour_ago))
    assert run_stage(Squares([[2], [4]]), tmp_path, progress=False).skipped == [0, 1]
    assert {label for label, name in names.items() if not (tmp_path / name).exists()} == {"orphan", "orphan index"}


def test_reject_samples_rewrites_tar_and_index(tmp_path: Path):
    writer = ShardWriter(tmp_path, 0, {"value": pl.Int64})
    for x in (2, 4, 6):
        writer.add(sample_key(bytes([x])), {"txt": b"x"}, row={"value": x})
    shard = writer.commit(stage="t", fingerprint="f", config_hash="c")
    new = reject_samples(shard, {sample_key(bytes([4])): "same as elsewhere"}, "duplicate",
                         depends_on={"7": "fp7"})
    assert [k for k, _ in iter_tar_samples(new.tar_path)] == [sample_key(bytes([2])), sample_key(bytes([6]))]
    rows = read_index(new.index_path).to_dicts()
    assert [r["status"] for r in rows] == ["ok", "rejected", "ok"]
    assert rows[1]["reason"] == "duplicate" and rows[1]["detail"] == "same as elsewhere"
    assert new.meta.counts["reasons"] == {"duplicate": 1}
    assert new.meta.depends_on == {"7": "fp7"} and new.intact()


def test_tars_are_byte_for_byte_what_tarfile_writes(tmp_path: Path):
    members = [("a.txt", b""), ("b" * 40 + ".latent.safetensors", bytes(range(256)) * 300),
               ("c.json", b"{}" * 256), ("d" * 96 + ".txt", b"x"), ("é-ü.txt", b"\xff" * 511),
               ("p/" * 30 + "long" * 20 + ".txt", b"split into prefix and name")]  # over 100 bytes
    for count in (0, 1, len(members)):
        writer = ShardWriter(tmp_path / f"ours-{count}", 0, {})
        with tarfile.open(tmp_path / f"tarfile-{count}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members[:count]:
                key, ext = name.rsplit(".", 1)
                writer.write_members(key, {ext: data})
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        shard = writer.commit(stage="t", fingerprint="f", config_hash="h")
        assert shard.tar_path.read_bytes() == (tmp_path / f"tarfile-{count}.tar").read_bytes()


def test_identical_samples_give_byte_identical_tars(tmp_path: Path):
    for name in ("a", "b"):
        w = ShardWriter(tmp_path / name, 0, {})
        w.add("k1", {"txt": b"hello", "json": b"{}"})
        w.commit(stage="t", fingerprint="f", config_hash="c")
    assert (tmp_path / "a" / "000000.tar").read_bytes() == (tmp_path / "b" / "000000.tar").read_bytes()


@pytest.mark.parametrize(("env", "visible", "expected"), [
    ({}, 16, 16),
    ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),  # torchrun's 4 ranks see the whole node: a quarter each
    ({"SLURM_STEP_TASKS_PER_NODE": "8"}, 16, 2),  # srun's tasks without CPU binding
    ({"SLURM_STEP_TASKS_PER_NODE": "8"}, 2, 2),  # srun bound each task to its 2 cores already
])
def test_default_workers_split_a_node_between_its_workers(monkeypatch, env, visible, expected):
    import curate.procs
    from curate.cli import _default_workers

    for k in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(curate.procs, "available_cores", lambda: visible)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _default_workers() == expected


def test_a_device_that_is_not_there_is_a_clear_error(monkeypatch):
    import torch

    with pytest.raises(CurateError, match="--device bogus: not a device"):
        resolve_device("bogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CurateError, match="--device cuda: CUDA is not available here"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(CurateError, match="--device cuda:2: this machine has 2 GPU"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")
