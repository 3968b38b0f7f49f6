"""Shards at URLs (curate.storage): a manifest, its latent, text and image shards served over HTTP
by a real server on 127.0.0.1 read exactly as the same files on disk; what a remote store does
wrong (503s, ignored ranges, missing or truncated files) is retried or named."""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from file_server import serve
from latent_data import add_image_stage, add_text_shards, make_latent_dataset

from curate import storage
from curate.manifest import ManifestError, load_manifest
from train.data import DataError, DataSettings, LatentLoader, _TarSamples, check_data, first_samples


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_WAIT", 0.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Latents (two shapes, rejected rows between), their text shards and image stage, served."""
    root = tmp_path_factory.mktemp("remote")
    dataset = make_latent_dataset(root, shards=3, per_shard=6, channels=4, sizes=[(4, 4), (2, 6)],
                                  rejected_every=4)
    add_text_shards(dataset, root / "encoder", dim=8, max_tokens=16)
    add_image_stage(dataset)
    with serve(root) as server:
        yield root, server


def test_range_reader_reads_what_the_file_holds_and_a_forward_walk_fetches_each_chunk_once(tmp_path):
    data = random.Random(0).randbytes(250_000)
    (tmp_path / "blob").write_bytes(data)
    with serve(tmp_path) as server:
        url = f"{server.url}/blob"
        assert storage.size(url) == len(data) and storage.read_bytes(url) == data
        assert storage.sha256(url) == storage.sha256(tmp_path / "blob")
        reader = storage.RangeReader(url, chunk=10_000)
        rng = random.Random(1)
        for _ in range(200):
            offset, size = rng.randrange(len(data) + 10), rng.randrange(30_000)
            assert reader.pread(size, offset) == data[offset: offset + size]
        reader.close()
        server.requests = server.bytes_sent = 0
        reader = storage.RangeReader(url, chunk=10_000)
        offset = 0
        while block := reader.pread(512, offset):  # a tar's headers, one at a time
            assert block == data[offset: offset + 512]
            offset += len(block)
        reader.close()
        # One request for the size, one per chunk: reading ahead never fetches a chunk twice.
        assert server.requests == 1 + 25 and server.bytes_sent == len(data)


def test_a_tar_walked_by_the_loaders_reader_is_fetched_once(served, monkeypatch):
    # The reader parses a sample's next header before reading its data: reads go back one chunk.
    root, server = served
    monkeypatch.setattr(storage, "CHUNK", 4096)
    tar = sorted((root / "latents").glob("*.tar"))[0]
    server.bytes_sent = 0
    samples = _TarSamples(f"{server.url}/latents/{tar.name}", "test")
    walked = [(key, samples.read(members)) for key, members in samples]
    # The walk ends at the end-of-archive marker; the read-ahead of the tar's zero padding after it
    # may still be in flight, and closing would cancel it: let it land, so the count is exact.
    for chunk in list(samples._file._chunks.values()):
        chunk.result()
    samples.close()
    local = _TarSamples(str(tar), "test")
    assert walked == [(key, local.read(members)) for key, members in local]
    local.close()
    assert server.bytes_sent == tar.stat().st_size > 4 * 4096


@pytest.mark.parametrize(("workers", "chunk"), [(2, 3), (3, 1)])
def test_the_image_stream_comes_in_shard_order_and_fetches_each_chunk_in_one_request(served, workers, chunk):
    """recaption and score read the image stage through ImageStream: the images come in the
    shards' order, a skipped key undecoded, whatever the workers and chunk; at a URL a worker
    fetches each of its chunks of consecutive samples in one request, and no skipped sample."""
    from PIL import Image

    from curate.images import ImageStream
    from curate.shards import iter_tar_samples, read_index

    root, server = served
    tars = sorted((root / "images").glob("*.tar"))
    expected = [[(key, Image.open(io.BytesIO(members["jpg"])).convert("RGB").tobytes(), None)
                 for key, members in iter_tar_samples(tar)] for tar in tars]
    skip = {expected[0][1][0], expected[1][2][0]}  # mid-chunk for chunk 3: its chunk is fetched in two
    expected = [[(key, *((None, None) if key in skip else rest)) for key, *rest in shard] for shard in expected]

    def streamed(paths: list[str]) -> list[list[tuple]]:
        stream = ImageStream(list(enumerate(paths)), lambda img: img.tobytes(), workers, skip=skip, chunk=chunk)
        taken = [list(stream.take(shard_id, len(shard))) for shard_id, shard in enumerate(expected)]
        stream.close()
        return taken

    assert streamed([str(t) for t in tars]) == expected
    server.sent.clear()
    server.answers.clear()
    assert streamed([f"{server.url}/images/{t.name}" for t in tars]) == expected
    position, spans = 0, 0
    for tar, shard in zip(tars, expected, strict=True):
        index = read_index(tar.with_suffix(".parquet")).filter(pl.col("status") == "ok")
        assert server.sent[f"/images/{tar.name}"] == index.filter(~pl.col("key").is_in(skip))["tar_length"].sum()
        runs, last = 0, None  # runs of consecutive fetched samples of one chunk
        for key, *_ in shard:
            runs += key not in skip and position // chunk != last
            last = None if key in skip else position // chunk
            position += 1
        assert server.answers[f"/images/{tar.name}"] == runs
        spans += runs
    assert spans < position - len(skip) or chunk == 1


def test_a_large_index_at_a_url_is_read_by_its_footer_and_the_columns_asked_for(tmp_path):
    """A score stage's index holds image embeddings, megabytes a shard: at a URL its metadata, its
    column names and its score columns are read from its footer, its first bytes and those
    columns' bytes, not the whole file, and equal the local file's; all of it reads whole."""
    import numpy as np
    from polars.testing import assert_frame_equal

    from curate.shards import ShardWriter, index_columns, open_shard, read_index

    rows = 4000
    embeddings = np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32)
    writer = ShardWriter(tmp_path / "scores", 0, {"clip_long": pl.Float32, "image_embedding": pl.Array(pl.Float32, 256)},
                         with_tar=False)
    for i in range(rows):
        writer.add(f"{i:06d}", {}, {"clip_long": i / rows, "image_embedding": embeddings[i].tolist()})
    shard = writer.commit(stage="score", fingerprint="f", config_hash="c")
    index, name = shard.index_path, "/scores/000000.parquet"
    assert index.stat().st_size > 3 * storage.WHOLE
    with serve(tmp_path) as server:
        remote = open_shard(f"{server.url}/scores", 0)
        assert remote.meta == shard.meta and remote.tar_path is None
        assert server.sent[name] == storage.TAIL  # the size was asked with a HEAD: no body
        server.sent.clear()
        assert index_columns(remote.index_path) == index_columns(index)
        assert server.sent[name] == storage.WHOLE + storage.TAIL  # the first bytes, then the footer
        for columns in (["key", "status", "clip_long"], ["clip_long"]):
            server.sent.clear()
            assert_frame_equal(read_index(remote.index_path, columns), read_index(index, columns))
            assert server.sent[name] < storage.WHOLE + storage.TAIL + rows * 16 < index.stat().st_size / 2
        server.sent.clear()
        assert_frame_equal(read_index(remote.index_path), read_index(index))
        assert server.sent[name] == index.stat().st_size
        assert_frame_equal(read_index(remote.index_path, ["image_embedding", "key"]),
                           read_index(index, ["image_embedding", "key"]))


def test_a_large_index_in_an_s3_bucket_reads_as_the_file(tmp_path, s3_bucket):
    """The same ranged reads through s3fs against a real S3 API (moto's server on 127.0.0.1)."""
    from fsspec.core import url_to_fs
    from polars.testing import assert_frame_equal

    from curate.shards import ShardWriter, index_columns, open_shard, read_index

    writer = ShardWriter(tmp_path, 0, {"clip_long": pl.Float32, "image_embedding": pl.Array(pl.Float32, 64)},
                         with_tar=False)
    embeddings = torch.randn(6000, 64, generator=torch.Generator().manual_seed(0))
    for i, embedding in enumerate(embeddings.tolist()):
        writer.add(f"{i:06d}", {}, {"clip_long": i / 6000, "image_embedding": embedding})
    shard = writer.commit(stage="score", fingerprint="f", config_hash="c")
    assert shard.index_path.stat().st_size > storage.WHOLE + storage.TAIL
    fs, _ = url_to_fs(s3_bucket)
    fs.put_file(str(shard.index_path), f"{s3_bucket}/scores/000000.parquet")
    remote = open_shard(f"{s3_bucket}/scores", 0)
    assert remote.meta == shard.meta and index_columns(remote.index_path) == index_columns(shard.index_path)
    for columns in (["clip_long", "key"], ["image_embedding"], None):
        assert_frame_equal(read_index(remote.index_path, columns), read_index(shard.index_path, columns))


def test_a_file_missing_from_an_s3_bucket_is_missing_to_ranged_reads_not_a_failure_retried(s3_bucket):
    """s3fs gives a ranged read of a missing key boto's NoSuchKey as its FileNotFoundError's cause: not a
    failed request to retry (15 s of waits) and report as the store's failure, but a file not there,
    which readers answer (a score shard without its index, a stage not yet complete)."""
    from curate.shards import read_index

    missing = f"{s3_bucket}/never-written/000000.parquet"
    for read in (lambda: storage.read_range(missing, 0, 4), lambda: read_index(missing, ["key"]),
                 lambda: storage.parquet_source(missing)):
        with pytest.raises(FileNotFoundError):
            read()


def test_failed_requests_are_retried_and_a_server_that_ignores_ranges_is_named(tmp_path):
    (tmp_path / "blob").write_bytes(bytes(range(256)) * 100)
    with serve(tmp_path) as server:
        url = f"{server.url}/blob"
        server.fail_next = storage.RETRIES  # the last try succeeds
        assert len(storage.read_bytes(url)) == 25_600
        server.fail_next = storage.RETRIES + 1
        with pytest.raises(storage.RemoteError, match="failed 5 times.*503"):
            storage.read_bytes(url)
        server.fail_next = server.requests = 0
        with pytest.raises(FileNotFoundError):
            storage.RangeReader(f"{server.url}/gone")
        assert server.requests <= 2  # a missing file is not retried (fsspec asks with HEAD, then GET)
        server.ignore_ranges = True
        with pytest.raises(storage.RemoteError, match="ignores range requests"):
            storage.RangeReader(url, chunk=1000).pread(10, 5000)


def _assert_same(a, b):
    assert [x.step for x in a] == [y.step for y in b]
    for x, y in zip([m for s in a for m in s.micro], [m for s in b for m in s.micro], strict=True):
        assert x.keys == y.keys and x.captions == y.captions
        for name in ("latents", "context", "context_mask", "images"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("workers", [0, 2])
def test_a_manifest_at_a_url_trains_on_exactly_the_batches_of_its_files(served, workers):
    root, server = served
    local, url = root / "manifests" / "mix-text.json", f"{server.url}/manifests/mix-text.json"
    manifest = load_manifest(url, check_files=True, check_checksums=True)
    assert manifest == load_manifest(local)
    st = DataSettings(seed=1, global_batch=4, micro_batch=2, workers=workers, shuffle_buffer=5)
    summary = check_data(manifest, url, verify="checksums", settings=st, images=f"{server.url}/images")
    assert summary == check_data(manifest, local, verify="checksums", settings=st, images=root / "images")

    def steps(path, images, start):
        with LatentLoader(manifest, path, st, start_step=start, images=images) as loader:
            return [b for b, _ in zip(loader, range(4), strict=False)]

    for start in (0, 5):  # from the start, and resumed (the readers seek to the current block)
        _assert_same(steps(url, f"{server.url}/images", start), steps(local, root / "images", start))
    held_out = first_samples(manifest, url, 7, seed=0)
    for a, b in zip(held_out, first_samples(manifest, local, 7, seed=0), strict=True):
        assert a.key == b.key and a.caption == b.caption and torch.equal(a.latent, b.latent)


def test_an_evaluation_set_at_a_url_is_its_files_and_reads_only_the_chosen_samples(served):
    """evaluate on a run that trained from URLs: the samples, captions and real images are the
    files' (eval/evalset.py), and of the tars only the chosen samples' bytes are fetched (each at
    the offset its index records), not the megabytes of chunks around them."""
    from eval.evalset import choose_samples, real_batches

    root, server = served
    local, url = root / "manifests" / "mix.json", f"{server.url}/manifests/mix.json"
    chosen = choose_samples(load_manifest(url), url, 5, seed=3)
    assert chosen == choose_samples(load_manifest(local), local, 5, seed=3)
    server.bytes_sent = 0
    remote = list(real_batches(chosen, f"{server.url}/images", 16, batch_size=2))
    indexes = sum(p.stat().st_size for p in (root / "images").glob("*.parquet"))
    spans = pl.concat([pl.read_parquet(p) for p in (root / "images").glob("*.parquet")])
    wanted = spans.filter(pl.col("key").is_in([s.key for s in chosen]))["tar_length"].sum()
    assert server.bytes_sent == indexes + wanted  # the image indexes whole, then each chosen sample once
    files = list(real_batches(chosen, root / "images", 16, batch_size=2))
    for (a, x), (b, y) in zip(remote, files, strict=True):
        assert a == b and torch.equal(x, y)


def test_curate_manifest_on_manifests_at_urls_writes_a_manifest_of_their_shards(served, tmp_path, capsys):
    """`curate manifest URL --where ... --out FILE`, a held-out split and a merge of URL manifests:
    the latent indexes read over HTTP, the same samples chosen as from the files, the shards named
    by their URLs (a local manifest cannot reach them by a relative path); and it trains. Written at
    a URL, the new manifest names them relative to itself."""
    from curate.cli import main as curate_main

    root, server = served
    base = f"{server.url}/manifests"
    runs = {"where": ["--where", "bucket_w > 4", "--name", "wide"], "held": ["--hold-out-samples", "3", "--name", "v"],
            "merge": ["a=MANIFEST:2", f"b={base}/short.json", "--name", "both"]}
    for name, args in runs.items():
        made = {}
        for side, manifest in (("files", str(root / "manifests" / "long.json")), ("http", f"{base}/long.json")):
            at = [a.replace("MANIFEST", manifest) for a in args]
            if name != "merge":
                at = [manifest, *at]
            out = tmp_path / side / f"{name}.json"
            assert curate_main(["manifest", *at, "--out", str(out), "--captions", "long=1"]) == 0, (name, side)
            made[side] = load_manifest(out)
        files, http = made["files"], made["http"]
        assert [e.path.rsplit("/", 1)[-1] for e in http.shards] == [e.path.rsplit("/", 1)[-1] for e in files.shards]
        assert all(e.path.startswith(f"{server.url}/latents/") for e in http.shards)
        assert [(e.samples, e.subset) for e in http.shards] == [(e.samples, e.subset) for e in files.shards]
        assert http.samples == files.samples
    st = DataSettings(seed=1, global_batch=2, micro_batch=2, workers=0, shuffle_buffer=4)
    with LatentLoader(http, tmp_path / "http" / "merge.json", st) as loader:
        assert sum(1 for _ in zip(loader, range(3), strict=False)) == 3
    # Without --out, beside the source at its URL; or --out a URL: the shards named relative to it
    # there (one host), as encode-latents names them from a --manifest-dir URL.
    try:
        assert curate_main(["manifest", f"{base}/long.json", "--captions", "long=1", "--name", "x"]) == 0
        assert curate_main(["manifest", f"{base}/long.json", "--hold-out", "1", "--name", "h",
                            "--out", f"{server.url}/split/h.json"]) == 0
        beside, held, rest = (load_manifest(f"{server.url}/{name}") for name in
                              ("manifests/x.json", "split/h-heldout.json", "split/h.json"))
        for manifest in (beside, held, rest):
            assert all(e.path.startswith("../latents/") for e in manifest.shards)
        assert beside.samples == load_manifest(root / "manifests" / "long.json").samples == held.samples + rest.samples
        assert check_data(rest, f"{server.url}/split/h.json").samples == rest.samples
        # A manifest of local shards cannot name them from a URL.
        assert curate_main(["manifest", str(root / "manifests" / "long.json"), "--captions", "long=1", "--name", "y",
                            "--out", f"{server.url}/split/y.json"]) == 2
        assert "write the manifest to a local file, or its shards to a URL" in capsys.readouterr().err
        assert not (root / "split" / "y.json").exists()
    finally:
        (root / "manifests" / "x.json").unlink(missing_ok=True)
        shutil.rmtree(root / "split", ignore_errors=True)


def test_score_folders_and_tables_at_urls_choose_the_samples_their_files_do(served, tmp_path):
    """`curate manifest --scores URL --keep URL --exclude URL`: a `curate score` folder (its indexes
    read many at a time) and key tables over HTTP choose the same samples as the files, and the
    manifest records their URLs with the files' hashes."""
    from curate.cli import main as curate_main
    from curate.shards import ShardWriter, committed_shards, read_index, stable_hash

    root, server = served
    keys = [k for shard in committed_shards(root / "latents")
            for k in read_index(shard.index_path).filter(pl.col("status") == "ok")["key"]]
    tables = root / "tables"
    scores = tables / "clip"
    for shard in range(3):  # as curate score writes them: an index per image shard, no tar
        writer = ShardWriter(scores, shard, {"clip_long": pl.Float32}, with_tar=False)
        for i in range(shard, len(keys), 3):
            writer.add(keys[i], {}, row={"clip_long": i / 100})
        writer.commit(stage="score", fingerprint=stable_hash([shard]), config_hash="test")
    (tables / "keep.txt").write_text("\n".join(keys[:-2]) + "\n")
    pl.DataFrame({"key": keys[:2]}).write_csv(tables / "drop.csv")
    rules = ["--where", "clip_long >= 0.03", "--keep", "TABLES/keep.txt", "--exclude", "TABLES/drop.csv"]
    made = {}
    server.latency, server.peak = 0.05, 0
    try:
        for side, at in (("files", str(tables)), ("http", f"{server.url}/tables")):
            args = [a.replace("TABLES", at) for a in rules]
            out = tmp_path / f"{side}.json"
            assert curate_main(["manifest", str(root / "manifests" / "long.json"), "--scores", f"{at}/clip", *args,
                                "--name", side, "--out", str(out)]) == 0, side
            made[side] = load_manifest(out)
    finally:
        server.latency = 0.0
    assert server.peak > 1  # the score indexes asked for side by side
    files, http = made["files"], made["http"]
    assert [(e.path, e.subset) for e in http.shards] == [(e.path, e.subset) for e in files.shards]
    assert http.samples == files.samples == len(keys) - 5  # the first 3 scored low, the last 2 not kept
    recorded = {side: m.provenance["subsets"][-1] for side, m in made.items()}
    assert recorded["http"]["scores"][0] == {**recorded["files"]["scores"][0], "path": f"{server.url}/tables/clip"}
    assert recorded["http"]["keep"] == {**recorded["files"]["keep"], "path": f"{server.url}/tables/keep.txt"}
    missing = ["--where", "clip_long > 0", "--scores", f"{server.url}/tables/none.parquet", "--out", str(tmp_path / "x")]
    assert curate_main(["manifest", str(root / "manifests" / "long.json"), *missing, "--name", "x"]) == 2


def test_curate_stats_of_stages_and_a_manifest_at_urls_are_their_files(served, tmp_path):
    """`curate stats URL`: a complete stage (with a dedup table beside its shards), an incomplete
    one and a manifest read over HTTP give the files' statistics."""
    import contextlib
    import json

    from curate.cli import main as curate_main

    root, server = served
    scored = root / "scored"
    scored.mkdir(exist_ok=True)
    shutil.copy(root / "latents" / "_stage.json", scored / "_stage.json")
    pl.DataFrame({"key": ["a", "b", "c"], "duplicate_of": ["x", "x", "y"]}).write_parquet(
        scored / "duplicates-0.95.parquet")

    def stats(path: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert curate_main(["stats", path, "--json"]) == 0, path
        return json.loads(out.getvalue())

    for name in ("latents", "images", "scored", "manifests/long.json"):
        files, http = stats(str(root / name)), stats(f"{server.url}/{name}")
        if name.endswith(".json"):
            assert http.pop("manifest") == f"{server.url}/{name}" and files.pop("manifest") == str(root / name)
        assert http == files, name
    assert stats(f"{server.url}/scored")["duplicates"] == {"duplicates-0.95.parquet": 3}
    assert stats(f"{server.url}/manifests/long.json")["buckets"] is not None  # its latent indexes were read
    assert curate_main(["stats", f"{server.url}/nothing"]) == 2
    # A manifest whose image stage is at a URL (`curate encode-latents http://.../images`): the
    # samples with an original caption are counted from that stage's indexes, fetched.
    from curate.manifest import write_manifest

    manifest = load_manifest(root / "manifests" / "long.json")
    images_at_url = {**manifest.provenance, "images": {"path": f"{server.url}/images"}}
    shards_here = [e.model_copy(update={"path": str(root / "manifests" / e.path)}) for e in manifest.shards]
    write_manifest(manifest.model_copy(update={"provenance": images_at_url, "shards": shards_here}),
                   tmp_path / "long.json")
    files, http = stats(str(root / "manifests" / "long.json")), stats(str(tmp_path / "long.json"))
    assert http.pop("provenance")["images"] == f"{server.url}/images"
    assert files.pop("manifest") != http.pop("manifest") and files.pop("provenance") and http == files
    assert http["caption_coverage"] == {"long": 18, "short": 18, "orig": 0}  # the image stage's captions are empty


def test_missing_and_truncated_remote_shards_are_named_before_training(served, tmp_path):
    root, server = served
    broken = root / "broken"
    shutil.copytree(root / "latents", broken)
    manifest_text = (root / "manifests" / "long.json").read_text().replace("../latents/", "../broken/")
    (root / "manifests" / "broken.json").write_text(manifest_text)
    url = f"{server.url}/manifests/broken.json"
    manifest = load_manifest(url)
    tar = sorted(broken.glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-512])
    with pytest.raises(DataError, match=rf"shard 1 .*{server.url}/broken/{tar.name}.* recorded"):
        check_data(manifest, url)
    tar.unlink()
    with pytest.raises(ManifestError, match=rf"shard 1 .*does not exist at {server.url}/broken/{tar.name}"):
        load_manifest(url, check_files=True)
    with pytest.raises(DataError, match=rf"the tar {server.url}/broken/{tar.name} does not exist"):
        check_data(manifest, url)
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(f"{server.url}/manifests/nothing.json")


def test_a_protocol_without_its_package_is_named(tmp_path):
    with pytest.raises(storage.RemoteError, match="nosuchproto"):
        storage.read_bytes("nosuchproto://bucket/manifests/long.json")
    assert storage.join("s3://bucket/data/", "images", "000001.tar") == "s3://bucket/data/images/000001.tar"
    assert storage.join("s3://bucket/manifests", "../latents/000001.tar") == "s3://bucket/latents/000001.tar"
    assert storage.parent("s3://bucket/manifests/long.json") == "s3://bucket/manifests"
    assert storage.join(tmp_path, "x") == str(Path(tmp_path, "x")) and not storage.is_remote("file:///x")


def test_uploads_are_whole_retried_and_a_killed_writer_leaves_nothing_at_the_url(tmp_path, monkeypatch):
    """What the stages writing to a URL rest on: a file put there is the file (503s retried), a
    delete of a missing one is no error, and a shard writer that dies before its commit leaves
    nothing at the URL and only temporaries in its staging folder, which the next one removes."""
    from curate.shards import ShardWriter, open_shard, remove_temporaries, staging_dir

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    local = tmp_path / "blob"
    local.write_bytes(os.urandom((9 << 20) + 123))  # several of the HTTP client's 5 MB upload chunks
    with serve(tmp_path / "www") as server:
        server.fail_next = 2
        storage.write_file(local, f"{server.url}/a/b/blob")
        assert (tmp_path / "www/a/b/blob").read_bytes() == local.read_bytes()
        storage.write_bytes(f"{server.url}/a/note.json", b"{}")
        assert storage.read_bytes(f"{server.url}/a/note.json") == b"{}"
        storage.remove(f"{server.url}/a/note.json")
        storage.remove(f"{server.url}/a/note.json")
        assert storage.list_names(f"{server.url}/a") == ["b"]

        out = f"{server.url}/stage"
        writer = ShardWriter(out, 3, {})
        writer.add("k", {"txt": b"hello"})
        writer._raw.flush()
        assert open_shard(out, 3) is None and not (tmp_path / "www/stage").exists()
        assert [p.name for p in staging_dir(out).iterdir()] == [writer.tmp_tar.name]
        remove_temporaries(out, 3)  # what the next run does first
        assert list(staging_dir(out).iterdir()) == []
        writer = ShardWriter(out, 3, {})
        writer.add("k", {"txt": b"hello"})
        shard = writer.commit(stage="test", fingerprint="f", config_hash="c")
        assert open_shard(out, 3).meta == shard.meta and shard.intact()
        assert sorted(p.name for p in (tmp_path / "www/stage").iterdir()) == ["000003.parquet", "000003.tar"]
        assert list(staging_dir(out).iterdir()) == []
        # A store that keeps refusing: the error names the URL, and the shard is left uncommitted.
        writer = ShardWriter(out, 4, {})
        writer.add("k", {"txt": b"hello"})
        server.fail_next = 100
        with pytest.raises(storage.RemoteError, match=f"{out}/000004.parquet: deleting it failed 5 times"):
            writer.commit(stage="test", fingerprint="f", config_hash="c")
        server.fail_next = 0
        assert open_shard(out, 4) is None and list(staging_dir(out).iterdir()) == []


def test_a_store_that_refuses_uploads_is_named_before_any_work(tmp_path, monkeypatch):
    from curate.runner import CurateError, ShardTask, Stage, run_stage

    class Counting(Stage):
        name = "counting"
        processed = 0

        def plan(self):
            return [ShardTask(0, "f", 1)]

        def process(self, task, writer, progress):
            Counting.processed += 1
            writer.add("k", {"txt": b"x"})

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    with serve(tmp_path / "www") as server:
        server.read_only = True
        with pytest.raises(CurateError, match=f"{server.url}/out: cannot write there: .* writing it was refused"):
            run_stage(Counting(), f"{server.url}/out", progress=False)
        assert Counting.processed == 0 and server.requests < 10  # not retried
        server.read_only = False
        assert run_stage(Counting(), f"{server.url}/out", progress=False).complete
    assert sorted(p.name for p in (tmp_path / "www/out").iterdir()) == ["000000.parquet", "000000.tar", "_stage.json"]


def test_final_passes_of_two_workers_at_once_rewrite_a_shard_at_a_url_alike(tmp_path, monkeypatch, caplog):
    """Two workers may run the final pass at once: one that finds the shard it would rewrite
    already rewritten (before it reads it, or while it reads it) leaves it as the other wrote it."""
    from curate.shards import ShardWriter, reject_samples

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    with serve(tmp_path / "www") as server:
        out = f"{server.url}/stage"
        writer = ShardWriter(out, 0, {})
        for key in ("a", "b", "c"):
            writer.add(key, {"txt": key.encode() * 100})
        stale = writer.commit(stage="test", fingerprint="f", config_hash="c")
        first = reject_samples(stale, {"b": "same as a"}, "duplicate")
        tar, index = (tmp_path / "www/stage/000000.tar").read_bytes(), (tmp_path / "www/stage/000000.parquet").read_bytes()
        puts = server.puts
        assert reject_samples(stale, {"b": "same as a"}, "duplicate") == first  # rewritten before it looked
        assert server.puts == puts

        # Rewritten while it is read: the bytes read are not the tar its index described.
        writer = ShardWriter(out, 1, {})
        for key in ("a", "b", "c"):
            writer.add(key, {"txt": key.encode() * 100})
        stale = writer.commit(stage="test", fingerprint="f", config_hash="c")
        replaced = tmp_path / "www/stage/000001.tar"
        opened = storage.open_stream

        def open_then_replace(path):
            stream = opened(path)
            replaced.write_bytes(tar)  # the other worker's upload lands between two ranged reads
            return stream

        monkeypatch.setattr(storage, "CHUNK", 512)
        monkeypatch.setattr(storage, "open_stream", open_then_replace)
        puts = server.puts
        with caplog.at_level("INFO", logger="curate"):
            reject_samples(stale, {"b": "same as a"}, "duplicate")
        assert "rewritten by another worker's final pass while it was read" in caplog.text
        assert server.puts == puts and replaced.read_bytes() == tar  # nothing uploaded over it
    assert index  # the first rewrite's index was there throughout


def test_a_worker_sees_shards_that_another_machine_put_in_a_bucket_after_it_listed_it(s3_bucket, tmp_path,
                                                                                      monkeypatch):
    """s3fs remembers a folder's listing; a worker whose listing predates another machine's upload
    would take that machine's shard for missing and never finish the stage. The runner's checks ask
    for the listing afresh (storage.forget_listings)."""
    from fsspec.core import url_to_fs
    from s3fs import S3FileSystem

    from curate.runner import ShardTask, _all_done
    from curate.shards import ShardWriter, open_shard

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    out = f"{s3_bucket}/stage"
    writer = ShardWriter(out, 0, {})
    writer.add("a", {"txt": b"a"})
    writer.commit(stage="test", fingerprint="f0", config_hash="c")
    this, _ = url_to_fs(out)  # this worker's filesystem: it lists the folder
    assert this.ls(out, detail=False) and open_shard(out, 1) is None

    elsewhere = ShardWriter(tmp_path / "elsewhere", 1, {})
    elsewhere.add("b", {"txt": b"b"})
    elsewhere.commit(stage="test", fingerprint="f1", config_hash="c")
    other = S3FileSystem(skip_instance_cache=True)  # another machine's uploads, unknown to this one
    for name in ("000001.tar", "000001.parquet"):
        other.put_file(str(tmp_path / "elsewhere" / name), f"{out}/{name}")
    assert not this.exists(f"{out}/000001.parquet")  # s3fs's remembered listing: stale
    tasks = [ShardTask(0, "f0", 1), ShardTask(1, "f1", 1)]
    assert _all_done(out, tasks, "c", {"0": "f0", "1": "f1"})
