"""`train --out URL`: a run folder in an object store (train/remote_run.py), written from a local
copy; killed, resumed on other machines (other local copies), two machines resuming one run
together, uploads that fail, and the readers of such a run (export, --init-from)."""
# ruff: noqa: F811 - the fixtures imported from test_train are the tests' arguments

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from file_server import serve

# The trainer's tests' tiny models, latents and reference runs (fixtures, re-made for this module).
from test_train import (  # noqa: F401
    INTERRUPTED,
    _cli_cmd,
    dataset,
    killed_at_a_checkpoint,
    losses,
    models,
    one_process,
    run_train,
    uninterrupted,
)

from curate import storage
from train.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint
from train.cli import main as train_main
from train.metrics import read_metrics
from train.remote_run import RemoteRun


def _steps_at(store: Path, run: str = "runs/a") -> list[int]:
    return [s for s, _ in list_checkpoints(store / run)]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_run_at_a_url_killed_and_resumed_on_another_machine_continues_exactly(tmp_path: Path, models, dataset,
                                                                               uninterrupted):
    """SIGKILL once the store holds a checkpoint; a rerun refused without --resume; then resumed on
    a machine with an empty local copy (another $KILN_STAGING): the loss sequence and the weights
    are the local uninterrupted run's, and the store holds the run folder as a local run's."""
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        first = {**os.environ, "KILN_STAGING": str(tmp_path / "machine-1")}
        at_kill = killed_at_a_checkpoint(_cli_cmd(dataset["mix"], url, models, **INTERRUPTED),
                                         lambda: _steps_at(store), env=first)

        second = {**os.environ, "KILN_STAGING": str(tmp_path / "machine-2")}
        refused = subprocess.run(_cli_cmd(dataset["mix"], url, models, **INTERRUPTED), cwd=REPO, env=second,
                                 capture_output=True, text=True)
        assert refused.returncode == 2 and f"{url} already holds checkpoints" in refused.stderr
        resumed = subprocess.run([*_cli_cmd(dataset["mix"], url, models, **INTERRUPTED), "--resume", "auto"],
                                 cwd=REPO, env=second, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {url}/checkpoints/step_{at_kill[-1]:08d}.pt" in resumed.stderr
        assert f"run folder {url}" in resumed.stdout
    assert losses(store / "runs/a") == losses(uninterrupted)  # the store's metrics.jsonl, every step
    assert _steps_at(store) == [s for s, _ in list_checkpoints(uninterrupted)] == [25, 50, 60]
    assert _same_weights(latest_checkpoint(store / "runs/a"), latest_checkpoint(uninterrupted))
    config = (store / "runs/a/config.yaml").read_text()  # the same but for --out
    assert config == (uninterrupted / "config.yaml").read_text().replace(f"out: {uninterrupted}\n", f"out: {url}\n")
    # The second machine's local copy holds the newest checkpoint only; the store the kept ones.
    (local,) = (tmp_path / "machine-2").glob("kiln-staging-*/run")
    assert [s for s, _ in list_checkpoints(local)] == [60]


def test_uploads_that_fail_leave_the_checkpoint_local_and_the_last_one_fails_the_run(
        tmp_path: Path, models, dataset, monkeypatch, capsys):
    """An upload refused after the retries is a warning and training goes on (the next checkpoint
    supersedes it); when the last checkpoint's upload fails the run ends with an error naming its
    local copy, which is kept."""
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    write_file, refused = storage.write_file, set()
    store = tmp_path / "store"

    def flaky(local, url):
        name = url.rsplit("/", 1)[-1]
        if name in refused or (name == "metrics.jsonl" and (store / "runs/c/checkpoints").is_dir()):
            raise storage.RemoteError(f"{url}: uploading it failed 5 times; last: 503 Slow Down")
        return write_file(local, url)

    monkeypatch.setattr(storage, "write_file", flaky)
    store.mkdir()
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        refused.add("step_00000004.pt")
        assert run_train(dataset["long"], url, models, steps=6, checkpoint_every=2) == 0
        err = capsys.readouterr().err
        assert "WARNING: checkpoint step 4 was not uploaded" in err
        assert _steps_at(store) == [2, 6]
        assert [s for s, _ in list_checkpoints(RemoteRun(url).local)] == [6]
        assert len(read_metrics(store / "runs/a")) == 6

        url = f"{server.url}/runs/b"
        refused.add("step_00000006.pt")
        assert run_train(dataset["long"], url, models, steps=6, checkpoint_every=2) == 2
        err = capsys.readouterr().err
        kept = checkpoint_path(RemoteRun(url).local, 6)
        assert f"train: error: checkpoint step 6 was not uploaded to {url}/checkpoints/step_00000006.pt" in err
        assert f"it is kept at {kept}" in err and kept.is_file()
        assert _steps_at(store, "runs/b") == [2]
        assert len(read_metrics(store / "runs/b")) == 6  # the metrics went up all the same

        # The metrics refused once a checkpoint is up: each checkpoint after them goes up all the
        # same, and the run fails.
        url = f"{server.url}/runs/c"
        refused.clear()
        assert run_train(dataset["long"], url, models, steps=6, checkpoint_every=2) == 2
        assert "runs/c/metrics.jsonl: uploading it failed" in capsys.readouterr().err
        assert _steps_at(store, "runs/c") == [2, 4, 6]


def test_a_store_slower_than_checkpoint_every_gets_the_newest_checkpoint_and_no_step_waits(
        tmp_path: Path, models, dataset, monkeypatch, capsys):
    """A checkpoint every step, each upload ending only once the run has saved a checkpoint three
    steps later (a store slower than the steps, whatever the machine's speed): the steps do not
    wait for the uploads (had they, the run would make no checkpoint while one uploads, and every
    checkpoint would be up), a checkpoint still queued is dropped for the next one with a warning,
    and the last one is up when the run ends."""
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    write_file = storage.write_file
    steps = 6

    def slow(local, to):
        if match := re.search(r"/checkpoints/step_(\d+)\.pt$", to):
            later = min(int(match[1]) + 3, steps)
            deadline = time.monotonic() + 30  # a step that waits on this upload fails the test below, not hangs
            while not any(s >= later for s, _ in list_checkpoints(RemoteRun(url).local)) and time.monotonic() < deadline:
                time.sleep(0.02)
        return write_file(local, to)

    monkeypatch.setattr(storage, "write_file", slow)
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        assert run_train(dataset["long"], url, models, steps=steps, checkpoint_every=1, keep_checkpoints=6) == 0
    err = capsys.readouterr().err
    uploaded = _steps_at(store)
    assert uploaded[0] == 1 and uploaded[-1] == 6 and len(uploaded) < 6, uploaded
    # Which checkpoint replaces a queued one depends on how fast the steps run beside the uploads.
    assert re.search(r"is not uploaded: step_0000000\d\.pt replaces it", err) and "slower than checkpoint_every" in err
    assert [s for s, _ in list_checkpoints(RemoteRun(url).local)] == [6]


def test_a_store_that_refuses_writes_stops_the_run_before_its_first_step(tmp_path: Path, models, dataset,
                                                                         monkeypatch, capsys):
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        server.read_only = True
        assert run_train(dataset["long"], f"{server.url}/runs/a", models, steps=6) == 2
    err = capsys.readouterr().err
    assert "/runs/a/config.yaml: uploading it was refused" in err and "step 1/6" not in err


def test_a_store_that_refuses_deletes_or_lists_nothing(tmp_path: Path, models, dataset, monkeypatch, capsys):
    """A bucket that takes writes but refuses deletes: the run goes on with a warning at each
    checkpoint, the local copy still keeps only the newest checkpoint, and every file goes up once.
    A store whose folders list nothing is refused before step 1 (a resume could not find the
    checkpoints, nor could they be pruned)."""
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        server.keeps_files = True
        url = f"{server.url}/runs/a"
        assert run_train(dataset["long"], url, models, steps=8, checkpoint_every=2, keep_checkpoints=1,
                         sample_every=2) == 0
        assert "deleting it was refused" in capsys.readouterr().err and _steps_at(store) == [2, 4, 6, 8]
        assert [s for s, _ in list_checkpoints(RemoteRun(url).local)] == [8]
        samples = sorted((store / "runs/a/samples").iterdir())
        assert len(samples) == 4 and all(server.received[f"/runs/a/samples/{p.name}"] == p.stat().st_size
                                         for p in samples)
        assert not (RemoteRun(url).local.parent / "pushes").exists() or not any(
            (RemoteRun(url).local.parent / "pushes").iterdir())  # the snapshots of the pushes are gone

        server.lists_folders = False
        assert run_train(dataset["long"], f"{server.url}/runs/b", models, steps=2) == 2
    err = capsys.readouterr().err
    assert "the store does not list the run's folder" in err and "step 1/2" not in err


def test_a_file_refused_before_a_checkpoint_is_sent_again_after_it(tmp_path: Path, models, dataset, monkeypatch,
                                                                   capsys):
    """metrics.jsonl refused in the first checkpoint's push: sent again after the checkpoint, so the URL
    never holds a checkpoint without the metrics up to it (a resume elsewhere would have a gap), and
    no warning is given for what went up in the end."""
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    write_file, calls = storage.write_file, []

    def flaky_metrics(local, url):
        calls.append(url.rsplit("/", 1)[-1])
        if url.endswith("metrics.jsonl") and calls.count("metrics.jsonl") == 2:  # the first after the start
            raise storage.RemoteError(f"{url}: uploading it was refused")
        return write_file(local, url)

    monkeypatch.setattr(storage, "write_file", flaky_metrics)
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        assert run_train(dataset["long"], url, models, steps=4, checkpoint_every=2) == 0
    assert "WARNING" not in capsys.readouterr().err  # sent again in the same upload: nothing was lost
    between = calls[calls.index("step_00000002.pt"):calls.index("step_00000004.pt")]
    assert between[1] == "metrics.jsonl" and between.count("metrics.jsonl") == 2  # sent again, then step 4's push
    assert [m["step"] for m in read_metrics(store / "runs/a")] == [1, 2, 3, 4]


def test_readers_fetch_a_url_runs_checkpoints(tmp_path: Path, models, dataset, monkeypatch, capsys):
    """`train export`, --init-from and --resume of a run at a URL use its checkpoints as a run
    folder's: fetched once into the readers' local copy (apart from the trainer's), S3 included."""
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    local = tmp_path / "local"
    assert run_train(dataset["long"], local, models, steps=4, checkpoint_every=2, keep_checkpoints=2) == 0
    store = tmp_path / "store"
    (store / "runs").mkdir(parents=True)
    shutil.copytree(local, store / "runs/a")
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        # Exported from the URL as from the folder.
        assert train_main(["export", url, "--to", str(tmp_path / "from-url")]) == 0
        assert train_main(["export", str(local), "--to", str(tmp_path / "from-folder")]) == 0
        a = (tmp_path / "from-url/transformer/diffusion_pytorch_model.safetensors").read_bytes()
        assert a == (tmp_path / "from-folder/transformer/diffusion_pytorch_model.safetensors").read_bytes()
        # A new run started from the URL run's latest checkpoint, or from one it names.
        for source, step in ((url, 4), (f"{url}/checkpoints/step_00000002.pt", 2)):
            new = tmp_path / f"init-{step}"
            assert run_train(dataset["long"], new, models, "--init-from", source, steps=1) == 0
            record = load_checkpoint(latest_checkpoint(new))["init"]
            assert record["source"] == source and record["step"] == step
        assert run_train(dataset["long"], new, models, "--init-from", f"{url}/checkpoints/step_00000001.pt",
                         steps=1) == 2  # not one of the run's
        # What a NaN stop names to resume from: the URL's latest, with nothing in the local copy.
        assert RemoteRun(url).latest_url() == f"{url}/checkpoints/step_00000004.pt"
        # The readers' copy keeps the checkpoint each reader on the machine fetched last: here the
        # one of step 2, until another reader's fetch of step 4 finds nobody holding it.
        reader = RemoteRun(url, reader=True)
        assert [s for s, _ in list_checkpoints(reader.local)] == [2] and reader.local != RemoteRun(url).local
        with open(reader.local / "checkpoints/.step_00000002.pt.lock", "ab") as other_reader:
            fcntl.flock(other_reader, fcntl.LOCK_SH)
            assert reader.fetch(4) == checkpoint_path(reader.local, 4)
            assert [s for s, _ in list_checkpoints(reader.local)] == [2, 4]
        stamp = checkpoint_path(reader.local, 4).stat().st_mtime_ns
        assert reader.fetch(4) == checkpoint_path(reader.local, 4)
        assert checkpoint_path(reader.local, 4).stat().st_mtime_ns == stamp  # same size and Last-Modified: kept
        assert sorted(p.name for p in (reader.local / "checkpoints").iterdir()) == [
            ".step_00000004.pt.lock", ".step_00000004.pt.version", "step_00000004.pt"]
        assert _same_weights(checkpoint_path(reader.local, 4), checkpoint_path(local, 4))
        # --resume names one of the run's own checkpoints by URL, nothing else; going back to an
        # older one, the later ones are deleted once the resumed run has written its first.
        assert run_train(dataset["long"], url, models, "--resume", str(local / "checkpoints/step_00000002.pt"),
                         steps=4, checkpoint_every=2, keep_checkpoints=2) == 2
        capsys.readouterr()
        for name in ("step00000002-a.json", "step00000004-a.json", "step00000004-a/00000.fid.npy"):
            (store / "runs/a/eval" / name).parent.mkdir(parents=True, exist_ok=True)
            (store / "runs/a/eval" / name).write_text("{}")
        assert run_train(dataset["long"], url, models, "--resume", f"{url}/checkpoints/step_00000002.pt",
                         steps=4, checkpoint_every=3, keep_checkpoints=2) == 0
        assert "the checkpoints of steps 4 come after the one resumed" in capsys.readouterr().err
        assert losses(store / "runs/a") == losses(local)  # steps 3 and 4 again, the same
        assert _steps_at(store) == [3, 4]
        # The abandoned step 4's evaluations went with its checkpoint (files; the server keeps empty
        # folders), step 2's stay.
        assert sorted(p.relative_to(store / "runs/a/eval").as_posix()
                      for p in (store / "runs/a/eval").rglob("*") if p.is_file()) == ["step00000002-a.json"]


def test_a_run_in_s3_resumes_and_keeps_its_newest_checkpoints(tmp_path: Path, models, dataset, monkeypatch,
                                                              s3_bucket, capsys):
    """Through s3fs against a real S3 API (moto): started, continued with more steps from another
    machine; the bucket keeps keep_checkpoints, and a reader's copy is fetched only once (its ETag)."""
    url = f"{s3_bucket}/runs/a"
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-1"))
    settings = {"checkpoint_every": 2, "keep_checkpoints": 2}
    assert run_train(dataset["long"], url, models, steps=4, **settings) == 0
    # --check fetches what a resume would load, into the readers' copy: the trainer's stays as it is.
    trainer_copy = sorted(p.name for p in RemoteRun(url).local.rglob("*"))
    assert train_main(["--shards", str(dataset["long"]), "--out", url, "--preset", "tiny", "--resume", "auto",
                       "--check", "steps=6"]) == 0
    assert f"would resume from {url}/checkpoints/step_00000004.pt at step 4" in capsys.readouterr().out
    assert sorted(p.name for p in RemoteRun(url).local.rglob("*")) == trainer_copy
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-2"))
    assert train_main(["--shards", str(dataset["long"]), "--out", url, "--preset", "tiny", "--resume", "auto",
                       "steps=6"]) == 0
    assert RemoteRun(url).steps() == [4, 6]
    storage.fetch_file(storage.join(url, "metrics.jsonl"), tmp_path / "fetched" / "metrics.jsonl")
    assert [m["step"] for m in read_metrics(tmp_path / "fetched")] == [1, 2, 3, 4, 5, 6]
    reader = RemoteRun(url, reader=True)
    first = reader.fetch()
    stamp = first.stat().st_mtime_ns
    assert reader.fetch() == first and first.stat().st_mtime_ns == stamp  # the same ETag: not fetched again


def test_two_machines_resume_a_url_run_together_as_one_process(tmp_path: Path, models, dataset, one_process):
    """A run at a URL started by one process, continued by two machines with nothing shared but the
    store (torchrun --nnodes 2, each node with its own $KILN_STAGING): each fetches the checkpoint
    itself, and steps 4-6 equal the one-process run's."""
    one, settings = one_process
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KILN_STAGING": str(tmp_path / "node-0")}
        subprocess.run(_cli_cmd(dataset["long"], url, models, **{**settings, "steps": 3}), check=True, cwd=REPO,
                       env=env, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
             *_cli_cmd(dataset["long"], url, models, **settings)[1:], "--resume", "auto"],
            cwd=REPO, env={**env, "KILN_STAGING": str(tmp_path / f"node-{rank}")}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    # The second machine fetched step 3 for itself (the first one's copy is dropped once step 6 is up).
    assert [p.name for p in (tmp_path / "node-1").rglob("step_*.pt")] == ["step_00000003.pt"]
    b = load_checkpoint(store / "runs/a/checkpoints/step_00000006.pt")
    assert b["world_size"] == 2
    a = load_checkpoint(checkpoint_path(one, 6))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6)
    for (s1, l1), (s2, l2) in zip(losses(one), losses(store / "runs/a"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


def test_a_checkpoint_that_never_reached_the_url_is_moved_aside_not_lost(tmp_path: Path, models, dataset,
                                                                         monkeypatch, capsys):
    """A rerun on the machine of a run killed while it uploaded its newest checkpoint resumes from the
    URL's latest and keeps the newer local one apart, saying where and how to continue from it."""
    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    store = tmp_path / "store"
    store.mkdir()
    with serve(store) as server:
        url = f"{server.url}/runs/a"
        assert run_train(dataset["long"], url, models, steps=4, checkpoint_every=2) == 0
        local = RemoteRun(url).local
        shutil.copy(checkpoint_path(local, 4), checkpoint_path(local, 6))  # as if its upload had been killed
        capsys.readouterr()
        assert train_main(["--out", url, "--resume", "auto", "steps=8"]) == 0
    err = capsys.readouterr().err
    aside = local.parent / "not-uploaded" / "step_00000006.pt"
    assert f"step_00000006.pt, written here by an earlier run, never reached {url} (its latest is step 4): " \
           f"moved to {aside}" in err and aside.is_file()
    assert "resumed from" in err and _steps_at(store)[-1] == 8


def test_a_file_url_is_the_local_folder(tmp_path: Path, models, dataset, monkeypatch):
    """`--out file:///abs/run` and `train export file:///abs/run` are the folder /abs/run (not a
    folder named "file:" in the working directory)."""
    monkeypatch.chdir(tmp_path)
    assert run_train(dataset["long"], f"file://{tmp_path}/run", models, steps=1) == 0
    assert (tmp_path / "run/checkpoints/step_00000001.pt").is_file() and not (tmp_path / "file:").exists()
    assert train_main(["export", f"file://{tmp_path}/run", "--to", str(tmp_path / "export")]) == 0
