"""Sample-level subsets (`curate manifest long.json --where ... --name NAME`): the shards stay as
they are, the manifest marks the samples used, and every reader (loader, resume, check_data,
validation set, evaluation, stats) reads those and only those."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from latent_data import add_image_stage, add_text_shards, make_latent_dataset, sample_key, step_keys

from curate.cli import main as curate_main
from curate.manifest import (
    ManifestError,
    ShardEntry,
    image_stages,
    latent_index_rows,
    load_manifest,
    parse_manifest,
    shard_subset,
)
from eval.evalset import choose_samples
from train.data import DataError, DataSettings, LatentLoader, check_data, fingerprint, first_samples

# 3 shards of 6 accepted samples, a rejected row after every 2nd (so index rows and tar places
# differ), latent grids alternating 4x4 and 4x6: bucket 32x32 for even samples, 32x48 for odd ones.
SHARDS, PER_SHARD = 3, 6
WIDE = {sample_key(0, i) for i in range(SHARDS * PER_SHARD) if i % 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("subset")
    data = make_latent_dataset(root, shards=SHARDS, per_shard=PER_SHARD, sizes=[(4, 4), (4, 6)],
                               variants=("long", "short"), rejected_every=2, seed=0)
    data["images"] = add_image_stage(data, seed=0)
    return data


def subset(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = curate_main(["manifest", *args])
    return code, out.getvalue(), err.getvalue()


def epoch_keys(path: Path, **kw) -> list[str]:
    """The keys of one epoch through one stream."""
    manifest = load_manifest(path)
    settings = DataSettings(seed=3, global_batch=1, micro_batch=1, workers=0, shuffle_buffer=4)
    with LatentLoader(manifest, path, settings, **kw) as loader:
        return [k for batch, _ in zip(loader, range(manifest.samples), strict=False) for m in batch.micro
                for k in m.keys]


def test_a_mask_marks_the_samples_used_and_a_wrong_one_names_its_field():
    used = np.array([True, False, True, True, False, False, False, False, True, False])
    entry = ShardEntry(path="000000.tar", samples=4, subset=shard_subset(used))
    assert entry.accepted == 10 and entry.positions().tolist() == [0, 2, 3, 8]
    assert np.array_equal(entry.subset.used(), used)
    assert shard_subset(np.ones(5, dtype=bool)) is None  # every sample: no subset
    manifest = json.loads(json.dumps({"name": "m", "samples": 3, "captions": {"long": 1.0},
                                      "shards": [{"path": "000000.tar", "samples": 3,
                                                  "subset": entry.subset.model_dump()}],
                                      "latent": {"vae": "v", "vae_id": "v", "vae_class": "AutoencoderKL",
                                                 "channels": 4, "downsample": 8, "stored": "mean",
                                                 "dtype": "float32", "resolution": 32}}))
    with pytest.raises(ManifestError, match=r"field 'shards.0': .*samples is 3 but its subset uses 4 of 10"):
        parse_manifest(manifest)
    manifest["shards"][0] |= {"samples": 4, "subset": {"of": 20, "mask": entry.subset.mask}}
    with pytest.raises(ManifestError, match=r"'shards.0.subset'.*mask holds 2 bytes, but 20 samples take 3"):
        parse_manifest(manifest)


def test_where_keeps_the_samples_it_holds_for_and_every_reader_reads_only_those(dataset):
    out = dataset["long"].parent / "wide.json"
    code, printed, _ = subset(str(dataset["long"]), "--where", "bucket_w > 32", "--name", "wide")
    assert code == 0, printed
    assert "subset: kept 9 of 18 samples (50.0%)" in printed and "--where bucket_w > 32: drops 9" in printed
    manifest = load_manifest(out, check_files=True)
    assert manifest.samples == 9 and [e.samples for e in manifest.shards] == [3, 3, 3]
    assert all(e.subset.of == PER_SHARD for e in manifest.shards)
    assert manifest.provenance["subsets"][0]["where"] == ["bucket_w > 32"]
    # An epoch reads each kept sample once, and no other.
    assert Counter(epoch_keys(out)) == Counter(WIDE)
    # ... and so do the originals beside them (REPA), which the cursor skips in step.
    assert Counter(epoch_keys(out, images=image_stages(manifest))) == Counter(WIDE)
    summary = check_data(manifest, out, verify="checksums", images=image_stages(manifest))
    assert summary.samples == 9 and summary.buckets == {(32, 48): 9} and summary.captions["long"] == 9
    assert {s.key for s in first_samples(manifest, out, 100, seed=0)} == WIDE
    assert {s.key for s in choose_samples(manifest, out, 100, seed=0)} == WIDE
    assert set(latent_index_rows(manifest, out, ["key"])["key"]) == WIDE
    assert curate_main(["stats", str(out)]) == 0


def test_a_subset_run_resumes_onto_the_same_batches(dataset):
    code, _, _ = subset(str(dataset["long"]), "--fraction", "0.6", "--name", "some")
    assert code == 0
    path = dataset["long"].parent / "some.json"
    settings = DataSettings(seed=1, global_batch=2, micro_batch=1, workers=0, shuffle_buffer=3)
    full = step_keys(path, settings, 0, 16)
    assert step_keys(path, settings, 5, 11) == full[5:] and step_keys(path, settings, 13, 3) == full[13:]
    assert fingerprint(settings, load_manifest(path)) != fingerprint(settings, load_manifest(dataset["long"]))


def test_a_manifest_without_subsets_keeps_its_fingerprint_and_its_bytes(dataset, tmp_path: Path):
    from curate.manifest import write_manifest
    from curate.shards import stable_hash

    manifest = load_manifest(dataset["long"])
    # Written without a "subset" key, as before subsets existed: a rerun of encode-latents rewrites
    # the same bytes, so the manifest sha256 that a run's checkpoints hold still matches.
    assert '"subset"' not in write_manifest(manifest, tmp_path / "again.json").read_text()
    st = DataSettings(seed=0, global_batch=2, micro_batch=2)
    assert fingerprint(st, manifest)["shards"] == stable_hash([(s.sha256, s.samples) for s in manifest.shards])


def test_scores_by_key_or_source_and_samples_without_a_score(dataset, tmp_path: Path):
    keys = [sample_key(0, i) for i in range(SHARDS * PER_SHARD)]
    # Scores for all but the last 3 samples: aesthetic = i.
    pl.DataFrame({"key": keys[:-3], "aesthetic": [float(i) for i in range(len(keys) - 3)]}).write_parquet(
        tmp_path / "aesthetic.parquet")
    code, printed, err = subset(str(dataset["long"]), "--scores", str(tmp_path / "aesthetic.parquet"),
                                "--where", "aesthetic >= 10", "--name", "pretty", "--out", str(tmp_path / "p.json"))
    assert code == 0, err
    assert "--where aesthetic >= 10: drops 13 (3 with no value for it)" in printed
    assert set(latent_index_rows(load_manifest(tmp_path / "p.json"), tmp_path / "p.json", ["key"])["key"]) == set(
        keys[10:15])
    # The top quarter by score (DataComp's filters keep a top fraction): a quantile over the samples.
    code, printed, err = subset(str(dataset["long"]), "--scores", str(tmp_path / "aesthetic.parquet"),
                                "--where", "aesthetic >= QUANTILE_CONT(aesthetic, 0.75)", "--name", "top",
                                "--out", str(tmp_path / "top.json"))
    assert code == 0, err
    top = set(latent_index_rows(load_manifest(tmp_path / "top.json"), tmp_path / "top.json", ["key"])["key"])
    assert top == set(keys[11:15])  # scores 0..14: the 75th percentile is 10.5
    # By the image stage's source, from a csv, with a column of the image stage.
    pl.DataFrame({"source": [f"synthetic/{k}.jpg" for k in keys], "watermark": [i % 3 == 0 for i in range(18)]}
                 ).write_csv(tmp_path / "wm.csv")
    code, printed, err = subset(str(dataset["long"]), "--scores", str(tmp_path / "wm.csv"), "--where",
                                "NOT watermark AND width < 40", "--name", "clean", "--out", str(tmp_path / "c.json"))
    assert code == 0, err
    kept = set(latent_index_rows(load_manifest(tmp_path / "c.json"), tmp_path / "c.json", ["key"])["key"])
    assert kept == {keys[i] for i in range(18) if i % 3 and i % 2 == 0}


def test_a_score_stage_folder_gives_its_columns(dataset, tmp_path: Path):
    from curate.shards import ShardWriter, stable_hash

    keys = [sample_key(0, i) for i in range(SHARDS * PER_SHARD)]
    scores = tmp_path / "scores" / "clip"
    for shard in range(SHARDS):  # as curate score writes them: one index per image shard, no tar
        writer = ShardWriter(scores, shard, {"clip_long": pl.Float32}, with_tar=False)
        for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
            writer.add(keys[i], {}, row={"clip_long": i / 100}, flags=["long_truncated"] if i % 4 == 0 else [])
        writer.commit(stage="score", fingerprint=stable_hash([shard]), config_hash="test")
    out = tmp_path / "s.json"
    code, printed, err = subset(str(dataset["long"]), "--scores", str(scores), "--where",
                                "clip_long >= 0.06 AND NOT array_contains(score_flags, 'long_truncated')",
                                "--name", "s", "--out", str(out))
    assert code == 0, err
    kept = set(latent_index_rows(load_manifest(out), out, ["key"])["key"])
    assert kept == {keys[i] for i in range(6, 18) if i % 4}
    assert "a folder, but no stage's committed shards" in subset(str(dataset["long"]), "--scores", str(tmp_path),
                                                                  "--where", "x > 1", "--name", "s", "--out",
                                                                  str(out))[2]


def test_keep_exclude_and_a_subset_of_a_subset(dataset, tmp_path: Path):
    keys = [sample_key(0, i) for i in range(SHARDS * PER_SHARD)]
    (tmp_path / "keep.txt").write_text("\n".join(keys[:12]) + "\n")
    pl.DataFrame({"key": keys[:3]}).write_parquet(tmp_path / "drop.parquet")
    first = tmp_path / "first.json"
    assert subset(str(dataset["long"]), "--keep", str(tmp_path / "keep.txt"), "--exclude",
                  str(tmp_path / "drop.parquet"), "--name", "first", "--out", str(first))[0] == 0
    assert load_manifest(first).samples == 9
    second = tmp_path / "second.json"
    code, printed, _ = subset(str(first), "--where", "bucket_w = 32", "--name", "second", "--out", str(second))
    assert code == 0 and "kept 4 of 9 samples" in printed
    manifest = load_manifest(second)
    assert set(epoch_keys(second)) == {keys[i] for i in range(3, 12) if i % 2 == 0}
    assert [s["kept"] for s in manifest.provenance["subsets"]] == [9, 4]
    # The last shard has nothing left: it is not listed.
    assert len(manifest.shards) == 2


def test_key_lists_and_tables_saved_with_a_byte_order_mark_match_their_first_key(dataset, tmp_path: Path):
    keys = [sample_key(0, i) for i in range(SHARDS * PER_SHARD)]
    (tmp_path / "keep.txt").write_text("\n".join(keys[:6]) + "\n", encoding="utf-8-sig")  # Notepad's UTF-8
    (tmp_path / "drop.jsonl").write_text(f'{{"key": "{keys[0]}"}}\n', encoding="utf-8-sig")
    (tmp_path / "drop.csv").write_text(f"key\n{keys[1]}\n", encoding="utf-8-sig")
    out = tmp_path / "bom.json"
    code, _, err = subset(str(dataset["long"]), "--keep", str(tmp_path / "keep.txt"), "--exclude",
                          str(tmp_path / "drop.jsonl"), "--exclude", str(tmp_path / "drop.csv"), "--name", "bom",
                          "--out", str(out))
    assert code == 0, err
    assert set(epoch_keys(out)) == set(keys[2:6])


def test_a_fraction_is_drawn_per_key_so_smaller_fractions_nest(dataset, tmp_path: Path):
    def kept(fraction: str, seed: str = "0") -> set[str]:
        out = tmp_path / f"f{fraction}-{seed}.json"
        assert subset(str(dataset["long"]), "--fraction", fraction, "--seed", seed, "--name", "f", "--out",
                      str(out))[0] == 0
        return set(latent_index_rows(load_manifest(out), out, ["key"])["key"])

    small, large = kept("0.3"), kept("0.7")
    assert small < large and 0 < len(small) < len(large) < 18
    assert kept("0.3", "1") != small
    # Any integer seed draws (a negative one raised numpy's OverflowError), and the seeds of 64 bits
    # draw as they did.
    assert kept("0.5", "-1") == kept("0.5", str(2**64 - 1)) != kept("0.5", "1")


def test_a_subset_of_a_merged_manifest_keeps_its_parts_and_repeats(dataset, tmp_path: Path):
    other = make_latent_dataset(tmp_path / "b", shards=2, per_shard=3, variants=("long",), seed=1)
    sources = [f"a={dataset['long']}", f"b={other['long']}:2"]
    # b's samples all have 4x4 latents: none is wider than 32 px.
    _, _, err = subset(*sources, "--where", "bucket_w > 32", "--name", "x", "--out", str(tmp_path / "x.json"))
    assert "no sample of part 'b' passes the rules" in err
    out = tmp_path / "mixed.json"
    code, printed, err = subset(*sources, "--fraction", "0.5", "--name", "mixed", "--out", str(out))
    assert code == 0, err
    manifest = load_manifest(out, check_files=True)
    a, b = manifest.parts
    assert b.repeat == 2 and b.shards % 2 == 0 and 0 < b.samples < 12 and 0 < a.samples < 18
    counts = Counter(epoch_keys(out))
    b_keys = {sample_key(1, i) for i in range(6)} & set(counts)
    assert len(b_keys) == b.samples // 2 and all(counts[k] == 2 for k in b_keys)  # kept once, read twice
    assert sum(counts.values()) == manifest.samples == a.samples + b.samples
    assert check_data(manifest, out).samples == manifest.samples


def test_text_shards_follow_the_subset(tmp_path: Path):
    data = make_latent_dataset(tmp_path / "t", shards=2, per_shard=4, variants=("long",), seed=2)
    written = add_text_shards(data, tmp_path / "encoder", dim=8, max_tokens=16)
    out = tmp_path / "t-sub.json"
    assert subset(str(written["long"]), "--where", "key <> '" + sample_key(2, 1) + "'", "--name", "s", "--out",
                  str(out))[0] == 0
    manifest = load_manifest(out, check_files=True)
    assert manifest.samples == 7 and [e.samples for e in manifest.text.shards] == [4, 4]
    check_data(manifest, out)
    settings = DataSettings(seed=0, global_batch=1, micro_batch=1, workers=0, shuffle_buffer=8)
    with LatentLoader(manifest, out, settings) as loader:
        batches = [b for b, _ in zip(loader, range(7), strict=False)]
    assert sample_key(2, 1) not in {k for b in batches for k in b.micro[0].keys}
    assert all(b.micro[0].context_mask.any() for b in batches)


def test_hold_out_and_captions_carry_the_subset(dataset, tmp_path: Path):
    out = tmp_path / "h.json"
    code, printed, err = subset(str(dataset["long"]), "--where", "bucket_w = 32", "--captions", "short=1",
                                "--hold-out", "1", "--name", "h", "--out", str(out))
    assert code == 0, err
    train, held = load_manifest(out), load_manifest(tmp_path / "h-heldout.json")
    assert train.samples + held.samples == 9 and train.captions == {"short": 1.0}
    assert set(epoch_keys(out)) | set(epoch_keys(tmp_path / "h-heldout.json")) == {
        sample_key(0, i) for i in range(18) if i % 2 == 0}


def test_bad_rules_are_named(dataset, tmp_path: Path):
    src = str(dataset["long"])
    out = ["--name", "bad", "--out", str(tmp_path / "bad.json")]
    assert "no source has; the columns are: the latent index: key" in subset(src, "--where", "nosuch > 1", *out)[2]
    assert "not a SQL expression" in subset(src, "--where", "orig_w >=", *out)[2]
    assert "not true or false" in subset(src, "--where", "orig_w + 1", *out)[2]
    assert "--scores only gives columns to --where" in subset(src, "--scores", "x.parquet", *out)[2]
    assert "between 0 and 1" in subset(src, "--fraction", "1.5", *out)[2]
    err = subset(src, "--where", "orig_w > 10000", *out)[2]
    assert "no sample passes the rules (of 18: --where orig_w > 10000 drops 18)" in err
    # A rule of one value for all (an aggregate, a constant) counts every sample it drops (it said 1).
    err = subset(src, "--where", "MAX(orig_w) > 10000", *out)[2]
    assert "no sample passes the rules (of 18: --where MAX(orig_w) > 10000 drops 18)" in err
    pl.DataFrame({"key": ["a", "a"], "s": [1, 2]}).write_parquet(tmp_path / "twice.parquet")
    assert "lists key 'a' more than once" in subset(src, "--scores", str(tmp_path / "twice.parquet"), "--where",
                                                    "s > 0", *out)[2]
    pl.DataFrame({"key": ["a"], "width": [1]}).write_parquet(tmp_path / "clash.parquet")
    assert "column(s) width are already the images stage's" in subset(
        src, "--scores", str(tmp_path / "clash.parquet"), "--where", "width > 0", *out)[2]
    pl.DataFrame({"id": ["a"]}).write_parquet(tmp_path / "nokey.parquet")
    assert "needs exactly one of the columns key" in subset(src, "--keep", str(tmp_path / "nokey.parquet"), *out)[2]
    assert not (tmp_path / "bad.json").exists()


def test_a_shard_that_changed_under_a_subset_is_named(dataset, tmp_path: Path):
    code, _, _ = subset(str(dataset["long"]), "--where", "bucket_w > 32", "--name", "w2", "--out",
                        str(tmp_path / "w2.json"))
    data = json.loads((tmp_path / "w2.json").read_text())
    used = np.array([True] * 6 + [False] * 2)
    data["shards"][0]["subset"] = shard_subset(used).model_dump()
    data["shards"][0]["samples"] = 6
    data["samples"] = sum(s["samples"] for s in data["shards"])
    (tmp_path / "w2.json").write_text(json.dumps(data))
    manifest = load_manifest(tmp_path / "w2.json")
    with pytest.raises(DataError, match="lists 6 ok samples but the manifest says 8"):
        check_data(manifest, tmp_path / "w2.json")
    with pytest.raises(ManifestError, match="lists 6 accepted samples but the manifest says 8"):
        latent_index_rows(manifest, tmp_path / "w2.json", ["key"])


def test_unique_keeps_a_sample_of_several_parts_in_the_first_only(dataset, tmp_path: Path):
    half = tmp_path / "half.json"
    assert subset(str(dataset["long"]), "--fraction", "0.5", "--name", "half", "--out", str(half))[0] == 0
    kept = load_manifest(half).samples
    sources = [f"half={half}", f"all={dataset['long']}:2"]
    code, printed, err = subset(*sources, "--name", "both", "--out", str(tmp_path / "both.json"))
    assert code == 0, err
    assert f"note: {kept} samples (the same image content) are in more than one part" in printed
    out = tmp_path / "unique.json"
    code, printed, err = subset(*sources, "--unique", "--name", "unique", "--out", str(out))
    assert code == 0, err
    assert f"--unique (first part only): drops {2 * kept}" in printed and "more than one part" not in printed
    manifest = load_manifest(out, check_files=True)
    assert [(p.name, p.samples, p.repeat) for p in manifest.parts] == [
        ("half", kept, 1), ("all", 2 * (SHARDS * PER_SHARD - kept), 2)]
    counts = Counter(epoch_keys(out))
    assert len(counts) == SHARDS * PER_SHARD  # every sample, in one part only
    assert "--unique" in subset(str(dataset["long"]), "--unique", "--name", "u", "--out", str(tmp_path / "u.json"))[2]


def test_indexes_record_where_each_sample_lies_and_the_reader_seeks_there(dataset, tmp_path: Path):
    import pyarrow.parquet as pq

    from curate.shards import committed_shards, reject_samples
    from train.data import _TarSamples

    shard = committed_shards(dataset["latents"])[1]
    index = pl.read_parquet(shard.index_path)
    assert index.filter(pl.col("status") != "ok")["tar_offset"].null_count() == 3  # the rejected rows
    ok = index.filter(pl.col("status") == "ok")
    reader = _TarSamples(str(shard.tar_path), "test")
    walked = [(key, reader.read(members)) for key, members in reader]
    for (key, members), offset in zip(walked, ok["tar_offset"], strict=True):
        reader.seek(offset)
        found, at = next(reader)
        assert found == key and reader.read(at) == members
    reader.close()
    # Spans cover the samples back to back, and a rewritten shard records its new places.
    assert (ok["tar_offset"] + ok["tar_length"]).to_list()[:-1] == ok["tar_offset"].to_list()[1:]
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in (shard.index_path, shard.tar_path):
        (copy / path.name).write_bytes(path.read_bytes())
    rewritten = reject_samples(committed_shards(copy)[0], {ok["key"][0]: "test"}, "duplicate")
    again = pl.read_parquet(rewritten.index_path).filter(pl.col("status") == "ok")
    assert again["tar_offset"][0] == 0 and again["key"].to_list() == ok["key"].to_list()[1:]
    # An index from before offsets were recorded still reads: the reader walks the tar instead.
    table = pq.read_table(shard.index_path)
    meta = table.schema.metadata
    stripped = table.drop_columns(["tar_offset", "tar_length"]).replace_schema_metadata(meta)
    old = tmp_path / "old"
    shutil.copytree(dataset["root"], old)
    pq.write_table(stripped, old / "latents" / shard.index_path.name)
    moved = old / "manifests" / "wide.json"
    assert subset(str(old / "manifests" / "long.json"), "--where", "bucket_w > 32", "--name", "wide", "--out",
                  str(moved))[0] == 0
    assert Counter(epoch_keys(moved)) == Counter(WIDE)


def test_hold_out_samples_draws_them_from_every_shard(dataset, tmp_path: Path):
    out = tmp_path / "train.json"
    code, printed, err = subset(str(dataset["long"]), "--hold-out-samples", "5", "--captions", "short=1",
                                "--name", "train", "--out", str(out))
    assert code == 0, err
    train, held = load_manifest(out, check_files=True), load_manifest(tmp_path / "train-heldout.json")
    assert (train.samples, held.samples) == (13, 5) and held.captions == train.captions == {"short": 1.0}
    assert held.provenance["held_out"]["this"] == "held out"
    held_keys = set(epoch_keys(tmp_path / "train-heldout.json"))
    assert len(held_keys) == 5 and not held_keys & set(epoch_keys(out))
    # The same draw every time, and fewer held out lie among more held out.
    assert subset(str(dataset["long"]), "--hold-out-samples", "3", "--name", "small", "--out",
                  str(tmp_path / "small.json"))[0] == 0
    assert set(epoch_keys(tmp_path / "small-heldout.json")) < held_keys
    # What the validation loss reads: the first samples of the held-out manifest, all held out.
    assert {s.key for s in first_samples(held, tmp_path / "train-heldout.json", 10, seed=0)} == held_keys
    err = subset(str(dataset["long"]), "--hold-out-samples", "18", "--name", "x", "--out", str(tmp_path / "x.json"))[2]
    assert "has 18 samples; hold out at least 1 and leave at least 1" in err
    with pytest.raises(SystemExit):  # one kind of hold-out at a time (argparse says so)
        subset(str(dataset["long"]), "--hold-out", "1", "--hold-out-samples", "2", "--name", "x")


def test_unique_applies_after_the_other_rules(dataset, tmp_path: Path):
    """The same images in a second dataset whose image stage says every image is 32 px wide:
    ``--where 'width < 40'`` drops the wide ones from the first part only, so --unique keeps
    them in the second, where they pass, rather than lose them for being listed first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.manifest import write_manifest

    copy = tmp_path / "copy"
    shutil.copytree(dataset["root"], copy)
    for index in sorted((copy / "images").glob("*.parquet")):
        table = pq.read_table(index)
        narrow = pa.array([32] * table.num_rows, type=table.schema.field("width").type)
        pq.write_table(table.set_column(table.schema.get_field_index("width"), "width", narrow), index)
    second = load_manifest(copy / "manifests" / "long.json")
    write_manifest(second.model_copy(update={"provenance": {**second.provenance,
                                                            "images": {"path": str(copy / "images")}}}),
                   copy / "manifests" / "long.json")
    out = tmp_path / "u.json"
    code, printed, err = subset(f"first={dataset['long']}", f"second={copy / 'manifests' / 'long.json'}",
                                "--where", "width < 40", "--unique", "--name", "u", "--out", str(out))
    assert code == 0, err
    manifest = load_manifest(out)
    assert [(p.name, p.samples) for p in manifest.parts] == [("first", 9), ("second", 9)]
    counts = Counter(epoch_keys(out))
    assert len(counts) == SHARDS * PER_SHARD and set(counts.values()) == {1}


def test_a_score_column_named_as_the_rows_own_bookkeeping_is_refused(dataset, tmp_path: Path):
    """A table's ``shard`` (the tar a sample came from, say), ``ordinal`` or ``part`` column would
    be shadowed by the rows' own positions: ``--where 'shard = 7'`` chose by the manifest's shard
    position instead, silently. Such a column is named and refused."""
    keys = [sample_key(0, i) for i in range(SHARDS * PER_SHARD)]
    for column in ("shard", "ordinal", "part"):
        table = tmp_path / f"{column}.parquet"
        pl.DataFrame({"key": keys, column: [7] * len(keys)}).write_parquet(table)
        code, _, err = subset(str(dataset["long"]), "--scores", str(table), "--where", f"{column} = 7",
                              "--name", "s", "--out", str(tmp_path / "s.json"))
        assert code == 2 and f"its column(s) {column} are names the subset's rows use" in err, err
    assert not (tmp_path / "s.json").exists()


def _caption_stage(data: dict[str, Path], variants: tuple[str, ...]) -> None:
    """A caption stage for ``data`` with ``variants`` (as `curate recaption` writes its columns:
    VARIANT, VARIANT_words, VARIANT_flags), named by its long manifest's provenance."""
    from curate.manifest import write_manifest
    from curate.shards import ShardWriter, committed_shards

    out = Path(data["root"]) / "captions"
    schema = {}
    for v in variants:
        schema |= {v: pl.String, f"{v}_words": pl.Int32, f"{v}_flags": pl.List(pl.String)}
    for shard in committed_shards(data["latents"]):
        ok = pl.read_parquet(shard.index_path).filter(pl.col("status") == "ok")
        writer = ShardWriter(out, shard.shard_id, schema, with_tar=False)
        for i, key in enumerate(ok["key"]):
            writer.add(key, {}, row={c: f"{v} caption" if c == v else i if c.endswith("_words") else []
                                     for v in variants for c in (v, f"{v}_words", f"{v}_flags")})
        writer.commit(stage="recaption", fingerprint=f"test-{shard.shard_id}", config_hash="test")
    manifest = load_manifest(data["long"])
    write_manifest(manifest.model_copy(update={"provenance": {**manifest.provenance,
                                                              "captions": {"path": str(out.resolve())}}}),
                   data["long"])


def test_a_merged_manifests_stages_may_differ_in_their_columns(tmp_path: Path):
    """Two datasets captioned with other variants: a --where on a column only one part's caption
    stage has sees null in the other part's samples (it raised polars' ColumnNotFoundError when the
    first part had it, and named it unknown when only a later part had)."""
    both = make_latent_dataset(tmp_path / "both", shards=2, per_shard=4, variants=("long", "short"), seed=0)
    long_only = make_latent_dataset(tmp_path / "long", shards=1, per_shard=4, variants=("long",), seed=1)
    _caption_stage(both, ("long", "short"))
    _caption_stage(long_only, ("long",))
    rule = ["--where", "short_words IS NULL OR short_words >= 2", "--where",
            "short_flags IS NULL OR array_length(short_flags) = 0"]
    for order in ([f"both={both['long']}", f"long={long_only['long']}"],
                  [f"long={long_only['long']}", f"both={both['long']}"]):
        out = tmp_path / "m.json"
        code, printed, err = subset(*order, *rule, "--name", "m", "--out", str(out))
        assert code == 0, err
        parts = {p.name: p.samples for p in load_manifest(out).parts}
        assert parts == {"both": 4, "long": 4}, printed  # the 2nd half of each shard of both; all of long
    err = subset(f"both={both['long']}", f"long={long_only['long']}", "--where", "short_words >= 2", "--name", "m",
                 "--out", str(tmp_path / "none.json"))[2]
    assert "no sample of part 'long' passes the rules" in err


def test_a_text_tables_column_types_are_read_from_all_its_rows(dataset, tmp_path: Path):
    """A csv or jsonl score table whose first rows hold whole numbers (written as ``5``, as R and
    JavaScript write 5.0) or no value, and later ones fractions: its types come from every row, not
    polars' first 100 (it was refused as unreadable, or read as text that --where cannot compare)."""
    keys = [sample_key(0, i) for i in range(SHARDS * PER_SHARD)]
    others = [f"{i:032x}" for i in range(150)]  # another dataset's samples, first
    rows = [(k, str(i % 10), "") for i, k in enumerate(others)] + [(k, f"{i}.5", f"{i}.5") for i, k in enumerate(keys)]
    (tmp_path / "s.csv").write_text("key,whole,empty\n" + "".join(f"{k},{w},{e}\n" for k, w, e in rows))
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"key": k, "whole": float(w) if "." in w else int(w),
                                                          "empty": float(e) if e else None}) + "\n"
                                              for k, w, e in rows))
    for table in ("s.csv", "s.jsonl"):
        for column in ("whole", "empty"):
            out = tmp_path / f"{column}.json"
            code, printed, err = subset(str(dataset["long"]), "--scores", str(tmp_path / table), "--where",
                                        f"{column} >= 10", "--name", column, "--out", str(out))
            assert code == 0, err
            assert set(latent_index_rows(load_manifest(out), out, ["key"])["key"]) == set(keys[10:])


def test_held_out_samples_are_drawn_apart_from_fractions(dataset, tmp_path: Path):
    """The held-out samples were the ones of the smallest draws of ``--fraction``'s seed 0: a
    fraction of the training manifest then kept fewer samples than asked (those of the smallest
    draws were held out: a 10% of 19,000 after 1,000 held out kept 1,030), and a fraction of the
    whole set held every held-out sample. The held-out samples come from a draw of their own."""
    def keys(path: Path) -> set[str]:
        return set(latent_index_rows(load_manifest(path), path, ["key"])["key"])

    assert subset(str(dataset["long"]), "--hold-out-samples", "5", "--name", "train", "--out",
                  str(tmp_path / "train.json"))[0] == 0
    held = keys(tmp_path / "train-heldout.json")
    for source, fraction, name in ((dataset["long"], "0.3", "all"), (tmp_path / "train.json", "0.5", "half")):
        assert subset(str(source), "--fraction", fraction, "--name", name, "--out", str(tmp_path / f"{name}.json"))[0] == 0
    assert len(held & keys(tmp_path / "all.json")) < len(held)
    assert len(keys(tmp_path / "half.json")) == 7  # of the 13 samples left to train on (it kept 4)
