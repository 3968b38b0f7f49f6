"""train.data: the batch sequence is independent of world size and resume point, covers every
sample once per epoch, applies the manifest's latent spec, chooses captions by weight with
fallbacks, and check_data names what is wrong with a dataset before training starts."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import torch
from latent_data import caption_text, make_latent_dataset, sample_key
from safetensors.torch import load as load_safetensors

from curate.manifest import Manifest, ShardEntry, load_manifest, write_manifest
from curate.shards import iter_tar_samples, read_index
from curate.tiny import build_tiny_flux2_vae, build_tiny_flux_vae
from curate.vae import model_channels, sample_latent, to_model_input
from train.data import (
    DataError,
    DataSettings,
    LatentLoader,
    StepBatch,
    _Plan,
    _shard_paths,
    _ShardTable,
    check_data,
    fingerprint,
    fingerprint_diff,
    sample_seed,
)


def settings(**kw) -> DataSettings:
    base = {"seed": 3, "global_batch": 4, "micro_batch": 2, "workers": 0, "shuffle_buffer": 5}
    return DataSettings(**{**base, **kw})


def collect(path: Path, st: DataSettings, steps: int, *, manifest: Manifest | None = None,
            **kw) -> list[StepBatch]:
    manifest = manifest or load_manifest(path)
    with LatentLoader(manifest, path, st, **kw) as loader:
        return [batch for _, batch in zip(range(steps), loader, strict=False)]


def flat(batch: StepBatch) -> list[tuple[str, str, str, torch.Tensor]]:
    """(key, caption, variant, model-space latent) per sample, in slot order."""
    return [(k, c, v, m.latents[i]) for m in batch.micro
            for i, (k, c, v) in enumerate(zip(m.keys, m.captions, m.variants, strict=True))]


def assert_same(a: list[StepBatch], b: list[StepBatch]) -> None:
    assert [x.step for x in a] == [y.step for y in b]
    for x, y in zip(a, b, strict=True):
        fx, fy = flat(x), flat(y)
        assert [s[:3] for s in fx] == [s[:3] for s in fy], f"step {x.step}"
        assert all(torch.equal(p[3], q[3]) for p, q in zip(fx, fy, strict=True)), f"step {x.step}"


def buckets_of(root: Path) -> dict[str, tuple[int, int]]:
    rows = pl.concat([read_index(p) for p in sorted((root / "latents").glob("*.parquet"))])
    ok = rows.filter(pl.col("status") == "ok")
    return dict(zip(ok["key"], zip(ok["bucket_h"], ok["bucket_w"], strict=True), strict=True))


@pytest.fixture(scope="module")
def buckets_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3 shards x 8 samples of three latent shapes, rejected rows in between."""
    return make_latent_dataset(tmp_path_factory.mktemp("buckets"), channels=4,
                               sizes=[(4, 4), (2, 6), (6, 2)], rejected_every=3)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # As tests/test_vae.py: tiny VAEs built once per module into a temporary folder.
    root = tmp_path_factory.mktemp("vaes")
    return {"flux": build_tiny_flux_vae(root / "flux"), "flux2": build_tiny_flux2_vae(root / "flux2")}


# --------------------------------------------------------------------------- order


def test_two_ranks_see_exactly_what_one_rank_accumulating_sees(buckets_data):
    st = settings(global_batch=8, micro_batch=2, workers=2)
    one = collect(buckets_data["mix"], st, 6)
    ranks = [collect(buckets_data["mix"], st, 6, rank=r, world_size=2) for r in (0, 1)]
    assert all(len(b.micro) == 4 for b in one) and all(len(b.micro) == 2 for b in ranks[0])
    joined = [StepBatch(a.step, a.micro + b.micro) for a, b in zip(*ranks, strict=True)]
    assert_same(one, joined)
    # Not one micro-batch repeated: the steps carry different samples.
    assert len({k for b in one for k, *_ in flat(b)}) > 8


def _resume_points_cover_carry_over(path: Path, st: DataSettings, points: list[int]) -> None:
    """The resume points include one in the middle of a block with pending samples carried
    from an earlier block, and one with pending samples from the previous stream epoch: what a
    restore must re-read besides the rest of the current block."""
    manifest = load_manifest(path)
    table = _ShardTable(manifest, _shard_paths(manifest, path, False), str(path))
    k = st.streams_per_slot
    mid_block = previous_epoch = False
    for s in points:
        plan = _Plan(table, s % k, st.streams, st.seed, st.shuffle_buffer, st.micro_batch)
        for _ in range(s // k):
            plan.next_batch()
        pending = [r for refs in plan.pending.values() for r in refs]
        current = (plan.epoch, plan.next_block - 1)
        earlier = any((r.epoch, r.seq // st.shuffle_buffer) != current for r in pending)
        mid_block |= 0 < plan.pos < len(plan.block) and earlier
        previous_epoch |= any(r.epoch < plan.epoch for r in pending)
    assert mid_block and previous_epoch


@pytest.mark.parametrize("workers, points", [(0, list(range(1, 16))), (2, [3, 8, 11])])
def test_resume_at_any_step_yields_exactly_the_steps_of_an_uninterrupted_run(buckets_data, workers, points):
    # Three bucket shapes, micro-batches of 3 and blocks of 3: carry-over at almost every step.
    st = settings(workers=workers, global_batch=6, micro_batch=3, shuffle_buffer=3)
    ref = collect(buckets_data["mix"], st, 16)
    _resume_points_cover_carry_over(buckets_data["mix"], st, points)
    for s in points:
        assert_same(collect(buckets_data["mix"], st, 16 - s, start_step=s), ref[s:])


def test_one_epoch_covers_every_sample_once_in_single_bucket_batches(tmp_path: Path):
    # 8 shards >= 4 streams: each stream owns 2 shards (12 samples, 6 per shape) per epoch, so
    # 12 steps of 2 x 2 samples are exactly one epoch.
    data = make_latent_dataset(tmp_path, shards=8, per_shard=6, channels=4, sizes=[(4, 4), (2, 6)],
                               rejected_every=4)
    bucket = buckets_of(tmp_path)
    index = pl.concat([read_index(p) for p in sorted((tmp_path / "latents").glob("*.parquet"))])
    rejected = set(index.filter(pl.col("status") == "rejected")["key"])
    assert len(bucket) == 48 and len(rejected) == 8
    steps = collect(data["long"], settings(workers=2, shuffle_buffer=4), 24)
    epochs = [[k for b in steps[e * 12:(e + 1) * 12] for k, *_ in flat(b)] for e in (0, 1)]
    for keys in epochs:
        assert Counter(keys) == Counter(set(bucket)), "each ok sample exactly once per epoch"
        assert not rejected & set(keys)
    assert epochs[0] != epochs[1]  # reshuffled
    for b in steps:
        for m in b.micro:
            assert len({bucket[k] for k in m.keys}) == 1
            h, w = bucket[m.keys[0]]
            assert m.latents.shape == (2, 4, h // 8, w // 8) and m.latents.dtype == torch.float32


def test_fewer_shards_than_streams_still_covers_every_sample_once(buckets_data):
    # 3 shards, 8 streams (4 slots x 2 workers): every stream reads every shard and keeps every
    # 8th sample, 3 per epoch; a step takes one sample per slot, so 6 steps are one epoch.
    st = settings(workers=2, global_batch=4, micro_batch=1, shuffle_buffer=100)
    steps = collect(buckets_data["long"], st, 6)
    assert Counter(k for b in steps for k, *_ in flat(b)) == Counter(set(buckets_of(buckets_data["root"])))


def test_the_shuffle_permutes_blocks_of_shuffle_buffer_consecutive_samples(tmp_path: Path):
    # One stream (workers 0, one slot) over 2 shards of 8: an epoch is 16 steps of one sample.
    data = make_latent_dataset(tmp_path, shards=2, per_shard=8, channels=4, sizes=[(2, 2)])
    index = _index_of(0, 16)
    st = settings(global_batch=1, micro_batch=1, shuffle_buffer=4)
    order = [index[b.micro[0].keys[0]] for b in collect(data["long"], st, 32)]
    epochs = [order[:16], order[16:]]
    for epoch in epochs:
        blocks = [epoch[i:i + 4] for i in range(0, 16, 4)]
        # Each block holds 4 neighbours in the tar (shards are read whole, one after the other)...
        assert all(sorted(b) == list(range(min(b), min(b) + 4)) and min(b) % 4 == 0 for b in blocks)
        assert sorted(epoch) == list(range(16))
    # ...in an order that is not the tar's, and differs between epochs.
    assert any(b != sorted(b) for e in epochs for b in (e[i:i + 4] for i in range(0, 16, 4)))
    assert epochs[0] != epochs[1]


# --------------------------------------------------------------------------- latents


def _first_stored(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    manifest = load_manifest(path)
    tar = _shard_paths(manifest, path, False)[0]
    return {key: load_safetensors(m["latent.safetensors"]) for key, m in iter_tar_samples(tar)}


@pytest.mark.parametrize("kind, channels", [("flux", 16), ("flux2", 32)])
def test_latents_go_through_the_manifests_latent_spec(tmp_path: Path, vae_dirs, kind, channels):
    data = make_latent_dataset(tmp_path, shards=1, per_shard=4, channels=channels, sizes=[(4, 4)],
                               vae_dir=vae_dirs[kind])
    manifest = load_manifest(data["long"])
    spec = manifest.latent
    assert (spec.normalization is not None) == (kind == "flux2")
    assert spec.normalization is not None or spec.scaling_factor != 1.0  # not an identity
    stored = _first_stored(data["long"])
    st = settings(global_batch=2, micro_batch=2, sample_latents=False)
    m = collect(data["long"], st, 1)[0].micro[0]
    assert m.latents.shape[1] == model_channels(spec) == (16 if kind == "flux" else 128)
    raw = stored[m.keys[0]]["mean"][None].float()
    assert torch.equal(m.latents[:1], to_model_input(raw, spec))
    assert not torch.allclose(m.latents[:1].reshape(-1)[:64], raw.reshape(-1)[:64])
    # sample_latents: a draw from the stored distribution, seeded per (seed, epoch, key).
    m = collect(data["long"], settings(global_batch=2, micro_batch=2), 1)[0].micro[0]
    z = stored[m.keys[0]]
    g = torch.Generator().manual_seed(sample_seed(3, 0, m.keys[0]))
    assert torch.equal(m.latents[:1], to_model_input(sample_latent(z["mean"], z["std"], g)[None], spec))


def test_a_fresh_latent_draw_every_epoch_the_same_in_every_rerun(tmp_path: Path):
    data = make_latent_dataset(tmp_path, shards=1, per_shard=4, channels=4, sizes=[(2, 2)])
    stored = _first_stored(data["long"])
    st = settings(global_batch=4, micro_batch=4)  # one stream of 4 samples: a step is an epoch

    def by_key(runs: list[StepBatch]) -> list[dict[str, torch.Tensor]]:
        return [{k: z for k, _, _, z in flat(b)} for b in runs]

    first, again = by_key(collect(data["long"], st, 3)), by_key(collect(data["long"], st, 3))
    for key, z in stored.items():
        draws = [epoch[key] for epoch in first]
        assert all(torch.equal(a[key], b[key]) for a, b in zip(first, again, strict=True))
        assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
        # Draws scatter around the stored mean by about its std (0.05-0.1), not more.
        assert (draws[0] - z["mean"].float()).abs().max() < 1.0
    means = by_key(collect(data["long"], settings(global_batch=4, micro_batch=4, sample_latents=False), 2))
    for key, z in stored.items():
        assert torch.equal(means[0][key], means[1][key])
        assert torch.equal(means[0][key], z["mean"].float())
    # Latents stored as means only: the mean every epoch, whatever sample_latents says.
    only_means = make_latent_dataset(tmp_path / "means", shards=1, per_shard=4, channels=4,
                                     sizes=[(2, 2)], stored="mean")
    stored = _first_stored(only_means["long"])
    for epoch in by_key(collect(only_means["long"], st, 2)):
        assert all(torch.equal(epoch[k], z["mean"].float()) for k, z in stored.items())


# --------------------------------------------------------------------------- captions


def _index_of(seed: int, n: int) -> dict[str, int]:
    return {sample_key(seed, i): i for i in range(n)}


def test_caption_variants_are_drawn_at_the_manifests_rates(tmp_path: Path):
    data = make_latent_dataset(tmp_path, shards=2, per_shard=8, channels=4, sizes=[(2, 2)])
    index = _index_of(0, 16)
    st = settings(global_batch=16, micro_batch=8)
    mix = load_manifest(data["mix"])
    skewed = mix.model_copy(update={"captions": {"long": 0.8, "short": 0.2}})
    for manifest, rate in ((mix, 0.5), (skewed, 0.8)):
        samples = [s for b in collect(data["mix"], st, 30, manifest=manifest) for s in flat(b)]
        assert len(samples) == 480
        for key, caption, variant, _ in samples:
            assert caption == caption_text(variant, index[key])
        share = Counter(v for _, _, v, _ in samples)["long"] / len(samples)
        assert abs(share - rate) < 0.07, (rate, share)
    # Each sample's variant changes between epochs (drawn per epoch, not fixed per sample).
    per_key = {}
    for b in collect(data["mix"], st, 10):
        for key, _, variant, _ in flat(b):
            per_key.setdefault(key, set()).add(variant)
    assert sum(len(v) == 2 for v in per_key.values()) > 8


def test_missing_captions_fall_back_and_are_counted(tmp_path: Path):
    missing = {0: ("long",), 1: ("long", "short"), 2: ("long", "short", "orig")}
    data = make_latent_dataset(tmp_path, shards=1, per_shard=8, channels=4, sizes=[(2, 2)],
                               missing=missing)
    index = _index_of(0, 8)
    st = settings(global_batch=8, micro_batch=8)  # one step = one epoch of all 8 samples
    with LatentLoader(load_manifest(data["long"]), data["long"], st) as loader:
        # zip with the range first: it stops before pulling a third step from the loader.
        seen = {key: (caption, variant) for _, b in zip(range(2), loader, strict=False)
                for key, caption, variant, _ in flat(b)}
        assert loader.fallbacks == {"other_variant": 4, "empty": 2}
    assert seen[sample_key(0, 0)] == (caption_text("short", 0), "short")
    assert seen[sample_key(0, 1)] == (caption_text("orig", 1), "orig")
    assert seen[sample_key(0, 2)] == ("", "")
    assert all(seen[k] == (caption_text("long", i), "long") for k, i in index.items() if i > 2)
    # Under the mix, a sample without "long" always gets its "short" caption.
    with LatentLoader(load_manifest(data["mix"]), data["mix"], st) as loader:
        got = [(c, v) for _, b in zip(range(12), loader, strict=False)
               for k, c, v, _ in flat(b) if k == sample_key(0, 0)]
        assert got == [(caption_text("short", 0), "short")] * 12
        assert loader.fallbacks["renormalised"] > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataset_smaller_than_a_micro_batch_still_yields(tmp_path: Path, workers):
    shards = max(workers, 1)  # one 5-sample shard per stream: each epoch of a stream has 5 samples
    data = make_latent_dataset(tmp_path, shards=shards, per_shard=5, channels=4, sizes=[(2, 2)])
    st = settings(global_batch=8, micro_batch=8, workers=workers)
    steps = collect(data["long"], st, 4)
    for b in steps:
        assert len(b.micro[0].keys) == 8
    keys = Counter(k for b in steps for k, *_ in flat(b))
    assert set(keys) == set(_index_of(0, 5 * shards)) and sum(keys.values()) == 32


def test_too_few_samples_for_the_streams_is_an_error_not_a_hang(tmp_path: Path):
    data = make_latent_dataset(tmp_path, shards=1, per_shard=3, channels=4, sizes=[(2, 2)])
    st = settings(global_batch=8, micro_batch=2)  # 4 streams, 3 samples
    with pytest.raises(DataError, match="3 samples cannot feed 4 streams"):
        LatentLoader(load_manifest(data["long"]), data["long"], st)
    with pytest.raises(DataError, match="3 samples cannot feed 4 streams"):
        check_data(load_manifest(data["long"]), data["long"], settings=st)


# --------------------------------------------------------------------------- checks


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    return make_latent_dataset(tmp_path, channels=4, sizes=[(4, 4), (2, 6)], rejected_every=3)


def test_check_data_summarises_a_good_dataset(dataset):
    summary = check_data(load_manifest(dataset["mix"]), dataset["mix"], verify="checksums",
                         settings=settings(global_batch=8, workers=2))
    assert (summary.samples, summary.shards, summary.model_channels) == (24, 3, 4)
    assert summary.buckets == {(16, 48): 12, (32, 32): 12}
    assert summary.captions == {"long": 24, "short": 24} and summary.streams == 8
    assert any("3 shards for 8 streams" in n for n in summary.notes)


def _flip_caption_byte(tar: Path) -> None:
    blob = bytearray(tar.read_bytes())
    at = blob.index(b"long caption of sample 9")
    blob[at] = ord("L")
    tar.write_bytes(bytes(blob))


def _with(path: Path, **update) -> Manifest:
    manifest = load_manifest(path)
    return manifest.model_copy(update=update)


@pytest.mark.parametrize("case, verify, match", [
    ("missing tar", "size", r"shard 1 \(.*000001.tar\): the tar .* does not exist"),
    ("missing index", "size", r"shard 1 .*its index .*000001.parquet does not exist"),
    ("truncated", "size", r"shard 1 .*bytes but its index recorded"),
    ("checksum", "checksums", r"shard 1 .*does not match its sha256"),
    ("unknown caption", "size", r"selects 'medium', but no sample has that caption"),
    ("count", "size", r"shard 0 .*lists 8 ok samples but the manifest says 9"),
    # URLs are read (tests/test_remote.py); one whose protocol's package is not installed (gcsfs) is named.
    ("gs", "size", r"shard 0 \(gs://bucket/000000.tar\): cannot read the tar .*gcsfs"),
    ("pipe", "size", r"runs a shell command"),
])
def test_check_data_names_the_shard_and_the_problem(dataset, case, verify, match):
    path, latents = dataset["long"], dataset["latents"]
    manifest = load_manifest(path)
    if case == "missing tar":
        (latents / "000001.tar").unlink()
    elif case == "missing index":
        (latents / "000001.parquet").unlink()
    elif case == "truncated":
        tar = latents / "000001.tar"
        tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    elif case == "checksum":
        _flip_caption_byte(latents / "000001.tar")
        check_data(manifest, path, verify="size")  # same size: only hashing notices
    elif case == "unknown caption":
        manifest = _with(path, captions={"medium": 1.0})
    elif case == "count":
        shards = [manifest.shards[0].model_copy(update={"samples": 9}), *manifest.shards[1:]]
        manifest = _with(path, shards=shards, samples=25)
    else:
        url = {"gs": "gs://bucket/000000.tar", "pipe": "pipe:cat 000000.tar"}[case]
        manifest = _with(path, shards=[ShardEntry(path=url, samples=8), *manifest.shards[1:]])
    with pytest.raises(DataError, match=match):
        check_data(manifest, path, verify=verify)
    if case == "pipe":
        with pytest.raises(DataError, match=match):
            LatentLoader(manifest, path, settings())


def test_a_shard_rewritten_after_the_manifest_is_refused(dataset):
    # A re-committed shard (new index, new sha256) no longer matches the manifest.
    src = dataset["latents"] / "000002.tar"
    other = make_latent_dataset(dataset["root"] / "other", channels=4, seed=1)
    for ext in ("tar", "parquet"):
        os.replace(other["latents"] / f"000002.{ext}", src.with_suffix(f".{ext}"))
    with pytest.raises(DataError, match=r"shard 2 .*re-committed after the manifest"):
        check_data(load_manifest(dataset["long"]), dataset["long"], verify="none")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tar_whose_samples_moved_after_planning_stops_the_loader(dataset, workers):
    tar = dataset["latents"] / "000000.tar"
    samples = list(iter_tar_samples(tar))
    samples[0], samples[1] = samples[1], samples[0]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    manifest = load_manifest(dataset["long"])
    st = settings(workers=workers, global_batch=2, micro_batch=1, shuffle_buffer=100)
    with pytest.raises(DataError, match=r"shard 0 .*sample 0 of the tar is .* but the index lists"):
        collect(dataset["long"], st, 30, manifest=manifest)


def test_settings_and_world_size_must_divide(dataset):
    with pytest.raises(DataError, match="not divisible by micro_batch"):
        settings(global_batch=10, micro_batch=4)
    with pytest.raises(DataError, match="cannot be split evenly over 3 ranks"):
        LatentLoader(load_manifest(dataset["long"]), dataset["long"], settings(), world_size=3)


def test_fingerprint_changes_with_what_changes_the_order(dataset):
    long, mix = load_manifest(dataset["long"]), load_manifest(dataset["mix"])
    base = fingerprint(settings(workers=1), long)
    assert fingerprint(settings(workers=0, prefetch=4, pin_memory=True), long) == base
    assert json.loads(json.dumps(base)) == base  # storable in a checkpoint as is
    for changed, field in ((settings(seed=4, workers=1), "seed"), (settings(workers=2), "streams_per_slot"),
                           (settings(workers=1, shuffle_buffer=6), "shuffle_buffer"),
                           (settings(workers=1, micro_batch=1), "micro_batch")):
        diff = fingerprint_diff(base, fingerprint(changed, long))
        assert len(diff) == 1 and diff[0].startswith(field), diff
    assert fingerprint_diff(base, fingerprint(settings(workers=1), mix)) == [
        "captions: {'long': 1.0} -> {'long': 0.5, 'short': 0.5}"]
    assert fingerprint(settings(workers=0), long) == fingerprint(settings(workers=1), long)
    assert fingerprint(settings(workers=1), mix) != fingerprint(settings(workers=1), long)
    moved = long.model_copy(update={"shards": long.shards[:2], "samples": 16})
    assert [d.split(":")[0] for d in fingerprint_diff(base, fingerprint(settings(workers=1), moved))] == ["shards"]


# --------------------------------------------------------------------------- workers


@pytest.mark.timeout(60)
def test_worker_processes_deliver_steps_in_order_and_stop_on_close(dataset, tmp_path: Path):
    manifest = load_manifest(dataset["mix"])
    before = {p.pid for p in multiprocessing.active_children()}
    loader = LatentLoader(manifest, dataset["mix"], settings(workers=2, pin_memory=False), start_step=7)
    it = iter(loader)
    assert [next(it).step for _ in range(5)] == [7, 8, 9, 10, 11]
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2 and all(p.is_alive() for p in workers)
    loader.close()
    assert not any(p.is_alive() for p in workers)
    with pytest.raises(StopIteration):
        next(it)
    # Iterating again starts over at start_step, with fresh workers; the context manager stops them.
    with loader:
        assert next(iter(loader)).step == 7
        workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert workers and not any(p.is_alive() for p in workers)


def test_manifest_written_elsewhere_resolves_shards_relative_to_itself(dataset, tmp_path: Path):
    # A copy of the manifest in another folder, with absolute shard paths, reads the same data.
    manifest = load_manifest(dataset["long"])
    paths = _shard_paths(manifest, dataset["long"], False)
    moved = manifest.model_copy(update={"shards": [s.model_copy(update={"path": p})
                                                   for s, p in zip(manifest.shards, paths, strict=True)]})
    elsewhere = write_manifest(moved, tmp_path / "elsewhere" / "long.json")
    assert_same(collect(elsewhere, settings(), 4), collect(dataset["long"], settings(), 4))


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_tar_reader_groups_members_as_webdataset_does_and_reads_only_what_is_asked(tmp_path: Path, tar_format):
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    from train.data import _TarSamples

    path = tmp_path / "mixed.tar"
    deep = "d/" + "x" * 120  # a name beyond ustar's 100 bytes: GNU long name or pax path (ustar: prefix)
    names = ["a.latent.safetensors", "a.txt", f"{deep}/b.json", f"{deep}/b.long.txt", "c.seg.png", ".hidden",
             "c.txt", "noext", "e.json"]
    with tarfile.open(path, "w", format=tar_format) as tar:
        directory = tarfile.TarInfo("adir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for i, name in enumerate(names):
            data = f"{name}:{i}".encode() * (i * 97 + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected: list[tuple[str, dict[str, bytes]]] = []
    with open(path, "rb") as f:
        for item in tar_file_iterator(f):
            key, ext = base_plus_ext(item["fname"])
            if key is None:
                continue
            if not expected or expected[-1][0] != key:
                expected.append((key, {}))
            expected[-1][1][ext] = item["data"]
    reader = _TarSamples(str(path), "test")
    got = [(key, reader.read(members)) for key, members in reader]
    reader.close()
    assert got == expected and [k for k, _ in got] == ["a", f"{deep}/b", "c", "e"]
    # Samples passed over are never read: only the asked one's bytes come back.
    reader = _TarSamples(str(path), "test")
    items = list(reader)
    assert reader.read(items[2][1]) == expected[2][1]
    reader.close()


def test_the_tar_reader_names_a_truncated_or_corrupt_tar(tmp_path: Path):
    from train.data import _TarSamples

    path = tmp_path / "good.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.bin", "b.bin"):
            info = tarfile.TarInfo(name)
            info.size = 4000
            tar.addfile(info, io.BytesIO(bytes(4000)))
    whole = path.read_bytes()
    for cut in (4700, 512 + 1000):  # inside b's header; inside a's data, before b's header
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        with pytest.raises(DataError, match=r"^shard 7: cannot read .*cut.tar: it ends inside a header at byte 4608"):
            list(_TarSamples(str(tmp_path / "cut.tar"), "shard 7"))
    bad = bytearray(whole)
    bad[4608 + 10] ^= 0xFF  # b's header, in its name
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(DataError, match="the header at byte 4608 has a wrong checksum"):
        list(_TarSamples(str(tmp_path / "bad.tar"), "shard 7"))
