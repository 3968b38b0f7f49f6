"""`curate dedup`: SemDeDup-style near-duplicates over `curate score --embeddings`' CLIP image
embeddings (a tiny random CLIPModel), checked against brute force, and left out with --exclude."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import encode
from latent_data import make_latent_dataset
from PIL import Image, ImageDraw

from curate.cli import main as curate_main
from curate.dedup import find_duplicates, find_matches
from curate.manifest import latent_index_rows, load_manifest
from curate.runner import CurateError
from curate.shards import ShardWriter, committed_shards, stable_hash
from curate.subset import EMBEDDING_COLUMN, SubsetRules, _read_table, images_left_out


def _planted(seed: int = 0) -> np.ndarray:
    """60 random unit vectors in 32 dimensions (pairwise cosines near 0) with near-copies planted:
    rows 20 and 41 of row 5, row 50 of row 10."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 32))
    for copy, of in ((20, 5), (41, 5), (50, 10)):
        x[copy] = x[of] + rng.normal(scale=0.02, size=32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _brute_force(x: np.ndarray, threshold: float) -> dict[int, int]:
    """Each row's most similar earlier row where that similarity reaches the threshold."""
    similarity = x.astype(np.float32) @ x.astype(np.float32).T
    found = {}
    for j in range(1, len(x)):
        i = int(np.argmax(similarity[:j, j]))
        if similarity[i, j] >= threshold:
            found[j] = i
    return found


def test_duplicates_are_the_brute_force_ones_within_clusters():
    x = _planted()
    one = find_duplicates(x, 0.95, cluster_size=1000, device="cpu")  # one cluster: every pair compared
    assert dict(zip(one["index"].tolist(), one["of"].tolist(), strict=True)) == _brute_force(x, 0.95)
    assert one["index"].tolist() == [20, 41, 50] and one["of"].tolist()[::2] == [5, 10]
    assert one["of"][1] in (5, 20) and (one["similarity"] >= 0.95).all() and set(one["cluster"]) == {0}
    # Six clusters: the near-copies share one with their original, the rest is not compared.
    six = find_duplicates(x, 0.95, cluster_size=10, device="cpu")
    assert six["index"].tolist() == [20, 41, 50]
    again = find_duplicates(x, 0.95, cluster_size=10, device="cpu")
    assert all(np.array_equal(six[k], again[k]) for k in six)  # seeded
    assert len(find_duplicates(x, 1.0, device="cpu")["index"]) == 0
    with pytest.raises(CurateError, match="--threshold 1.5"):
        find_duplicates(x, 1.5)
    with pytest.raises(CurateError, match="--cluster-size 0"):
        find_duplicates(x, 0.9, cluster_size=0)


def _brute_force_matches(x: np.ndarray, reference: np.ndarray, threshold: float) -> dict[int, int]:
    """Each row's most similar reference row where that similarity reaches the threshold."""
    similarity = x.astype(np.float32) @ reference.astype(np.float32).T
    best = similarity.argmax(axis=1)
    return {i: int(best[i]) for i in range(len(x)) if similarity[i, best[i]] >= threshold}


def test_matches_against_a_reference_are_the_brute_force_ones_within_clusters():
    x = _planted()  # 60 rows; the reference: 40 other random rows and near-copies of rows 7 and 33
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(42, 32))
    reference[40], reference[41] = x[7] + rng.normal(scale=0.02, size=32), x[33] + rng.normal(scale=0.02, size=32)
    reference = (reference / np.linalg.norm(reference, axis=1, keepdims=True)).astype(np.float16)
    one = find_matches(x, reference, 0.95, device="cpu")  # a reference within one cluster: every pair compared
    assert dict(zip(one["index"].tolist(), one["of"].tolist(), strict=True)) == \
        _brute_force_matches(x, reference, 0.95) == {7: 40, 33: 41}
    assert (one["similarity"] >= 0.95).all() and set(one["cluster"]) == {0}
    # Clusters fitted on the reference: the near-copies still meet, and the result is seeded.
    seven = find_matches(x, reference, 0.95, cluster_size=6, device="cpu")
    assert seven["index"].tolist() == [7, 33] and seven["of"].tolist() == [40, 41]
    assert all(np.array_equal(seven[k], find_matches(x, reference, 0.95, cluster_size=6, device="cpu")[k])
               for k in seven)
    with pytest.raises(CurateError, match="--threshold 0"):
        find_matches(x, reference, 0)
    # No rows to compare (a held-out manifest of every scored image leaves none): nothing found.
    assert all(len(v) == 0 for v in find_matches(x[:0], reference, 0.95, device="cpu").values())


def test_identical_embeddings_reach_a_threshold_of_one():
    """float16 storage moves a row's norm by ~1e-4: an image's identical copy (the same pixels in
    other bytes) read 0.9999 about half the time, and --threshold 1 missed it."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    copies = np.concatenate([x, x])  # row 100 + i is row i again
    found = find_duplicates(copies, 1.0, device="cpu")
    assert found["index"].tolist() == list(range(100, 200)) and found["of"].tolist() == list(range(100))
    assert (found["similarity"] <= 1.0).all()
    matches = find_matches(x, x[::-1], 1.0, device="cpu")
    assert matches["index"].tolist() == list(range(100)) and matches["of"].tolist() == list(range(99, -1, -1))


def _score_stage(out: Path, keys: list[str], embeddings: np.ndarray, model: str = "tiny-clip") -> Path:
    """A score stage holding ``embeddings`` as `curate score --embeddings` writes them (two shards)."""
    schema = {EMBEDDING_COLUMN: pl.Array(pl.Float32, embeddings.shape[1])}
    half = len(keys) // 2
    for shard_id, rows in enumerate((range(half), range(half, len(keys)))):
        writer = ShardWriter(out, shard_id, schema, with_tar=False)
        for i in rows:
            writer.add(keys[i], {}, row={EMBEDDING_COLUMN: embeddings[i].astype(np.float32).tolist()})
        writer.commit(stage="score", fingerprint=stable_hash([shard_id]), config_hash=stable_hash([model]))
    (out / "_stage.json").write_text(json.dumps({"stage": "score", "config": {"model": model, "revision": None,
                                                 "local_model_files": None, "embeddings": True},
                                                 "provenance": {"model_id": model}}))
    return out


def test_dedup_against_a_held_out_manifest_or_a_benchmark_stage(tmp_path: Path, capsys):
    data = make_latent_dataset(tmp_path / "data", shards=4, per_shard=5)
    assert curate_main(["manifest", str(data["long"]), "--hold-out", "1", "--name", "train"]) == 0
    train, heldout = tmp_path / "data" / "manifests" / "train.json", tmp_path / "data" / "manifests" / "train-heldout.json"
    train_keys, held_keys = (latent_index_rows(load_manifest(m), m, ["key"])["key"].to_list() for m in (train, heldout))
    keys = sorted(train_keys + held_keys)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(keys), 24))
    row = {k: i for i, k in enumerate(keys)}
    # Two training images are near-copies of held-out ones; a third is near another training image.
    pairs = {train_keys[2]: held_keys[0], train_keys[9]: held_keys[3], train_keys[5]: train_keys[6]}
    for copy, of in pairs.items():
        x[row[copy]] = x[row[of]] + rng.normal(scale=0.02, size=24)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = _score_stage(tmp_path / "scores", keys, x)

    capsys.readouterr()
    assert curate_main(["dedup", str(scores), "--against", str(heldout), "--threshold", "0.95", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 of 15 images are near-duplicates of one of the 5 images of" in out, out
    table = pl.read_parquet(scores / "duplicates-of-train-heldout-0.95.parquet")
    assert dict(zip(table["key"], table["duplicate_of"], strict=True)) == {
        train_keys[2]: held_keys[0], train_keys[9]: held_keys[3]}
    assert table["key"].to_list() == sorted(table["key"].to_list(), key=row.get)  # the dataset's order
    # The table is what --exclude takes: the training manifest without them.
    assert curate_main(["manifest", str(train), "--exclude", str(scores / "duplicates-of-train-heldout-0.95.parquet"),
                        "--name", "train-clean"]) == 0
    assert load_manifest(train.parent / "train-clean.json").samples == 13
    # --exclude repeats: the near-duplicates within the set too (train_keys[6] of train_keys[5]...).
    assert curate_main(["dedup", str(scores), "--threshold", "0.95", "--device", "cpu"]) == 0
    within = set(pl.read_parquet(scores / "duplicates-0.95.parquet")["key"])
    assert len(within) == 3 and within <= set(keys)
    capsys.readouterr()
    assert curate_main(["manifest", str(train), "--exclude", str(scores / "duplicates-of-train-heldout-0.95.parquet"),
                        "--exclude", str(scores / "duplicates-0.95.parquet"), "--name", "train-cleaner"]) == 0
    printed = capsys.readouterr().out
    assert "--exclude" in printed and "duplicates-0.95.parquet" in printed, printed
    cleaner = load_manifest(train.parent / "train-cleaner.json")
    assert cleaner.samples == 15 - len(set(train_keys) & (within | {train_keys[2], train_keys[9]}))
    assert [e["path"].rsplit("/", 1)[1] for e in cleaner.provenance["subsets"][-1]["exclude"]] == [
        "duplicates-of-train-heldout-0.95.parquet", "duplicates-0.95.parquet"]
    capsys.readouterr()
    assert curate_main(["stats", str(scores)]) == 0
    assert "duplicates-of-train-heldout-0.95.parquet: 2 near-duplicate images" in capsys.readouterr().out

    # A benchmark's own score stage (the same model): its images against every image here.
    bench_x = np.concatenate([x[[row[held_keys[0]], row[train_keys[5]]]] + rng.normal(scale=0.01, size=(2, 24)),
                              rng.normal(size=(3, 24))])
    bench_x /= np.linalg.norm(bench_x, axis=1, keepdims=True)
    bench = _score_stage(tmp_path / "bench", [f"b{i}" for i in range(5)], bench_x)
    assert curate_main(["dedup", str(scores), "--against", str(bench), "--threshold", "0.95", "--cluster-size", "2",
                        "--device", "cpu"]) == 0
    table = pl.read_parquet(scores / "duplicates-of-bench-0.95.parquet")
    # held_keys[0] and its training copy, train_keys[5] and its near twin train_keys[6].
    assert dict(zip(table["key"], table["duplicate_of"], strict=True)) == {
        held_keys[0]: "b0", train_keys[2]: "b0", train_keys[5]: "b1", train_keys[6]: "b1"}

    # Refused: another model's embeddings, the stage itself, a manifest of images it has not
    # scored, --prefer, and what is neither a manifest nor a score stage.
    other = _score_stage(tmp_path / "other", [f"b{i}" for i in range(5)], bench_x, model="another-clip")
    capsys.readouterr()
    assert curate_main(["dedup", str(scores), "--against", str(other)]) == 2
    assert "embedded by another-clip (revision None, files None)" in capsys.readouterr().err
    # The same Hub model at two commits (curate score records the snapshot it read) is another model.
    for stage, commit in ((scores, "a" * 40), (bench, "b" * 40)):
        record = json.loads((stage / "_stage.json").read_text())
        record["provenance"]["model_commit"] = commit
        (stage / "_stage.json").write_text(json.dumps(record))
    assert curate_main(["dedup", str(scores), "--against", str(bench)]) == 2
    assert f"at commits {'a' * 40} and {'b' * 40}" in capsys.readouterr().err
    assert curate_main(["dedup", str(scores), "--against", str(scores)]) == 2
    assert "the stage itself" in capsys.readouterr().err
    partial = _score_stage(tmp_path / "partial", [k for k in keys if k != held_keys[4]],
                           np.delete(x, row[held_keys[4]], axis=0))
    assert curate_main(["dedup", str(partial), "--against", str(heldout)]) == 2
    assert "1 of its 5 samples have no embedding in" in capsys.readouterr().err
    assert curate_main(["dedup", str(scores), "--against", str(heldout), "--prefer", "clip_long"]) == 2
    assert "--prefer chooses which image of a group stays" in capsys.readouterr().err
    assert curate_main(["dedup", str(scores), "--against", str(tmp_path / "data")]) == 2
    assert "neither a manifest nor a complete `curate score` stage" in capsys.readouterr().err


def _drawn(i: int) -> Image.Image:
    colours = ["red", "green", "blue", "yellow", "purple", "white", "black", "orange"]
    image = Image.new("RGB", (96, 80), colours[i])
    ImageDraw.Draw(image).ellipse((10 + 5 * i, 10, 60 + 3 * i, 70 - 4 * i), fill=colours[(i + 3) % 8])
    return image


def test_dedup_of_a_score_stage_is_what_exclude_leaves_out(tmp_path: Path, capsys):
    from curate.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):  # distinct pictures (cosines up to about 0.98 with this CLIP)
        (src / f"a_{i}.jpg").write_bytes(encode(_drawn(i), "JPEG", quality=90))
    # A re-encoded copy (a byte copy ingest rejects itself) and a smaller, harder compressed one.
    (src / "b_copy_of_1.jpg").write_bytes(encode(_drawn(1), "JPEG", quality=85))
    (src / "c_smaller_2.jpg").write_bytes(encode(_drawn(2).resize((90, 75)), "JPEG", quality=50))  # cosine 0.9999
    images, scores = tmp_path / "images", tmp_path / "scores"
    assert curate_main(["ingest", str(src), "--out", str(images), "--shard-size", "4", "--workers", "1",
                        "--no-progress"]) == 0
    common = ["--model", str(clip), "--batch-size", "3", "--decode-workers", "0", "--device", "cpu", "--no-progress"]
    assert curate_main(["score", str(images), "--out", str(tmp_path / "plain"), *common]) == 0
    assert curate_main(["dedup", str(tmp_path / "plain")]) == 2
    assert "score with `curate score ... --embeddings`" in capsys.readouterr().err
    assert curate_main(["score", str(images), "--out", str(scores), "--embeddings", *common]) == 0
    rows = pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(scores)])
    assert rows["image_embedding"].dtype == pl.Array(pl.Float32, 16)
    assert np.allclose(np.linalg.norm(rows["image_embedding"].to_numpy(), axis=1), 1, atol=1e-5)
    assert json.loads((scores / "_stage.json").read_text())["config"]["embeddings"] is True
    # What --where reads of a score folder leaves the embeddings out.
    assert "image_embedding" not in _read_table(scores, "--scores").columns

    recorded = SubsetRules(scores=[scores]).record()  # the folder's shard indexes, hashed

    capsys.readouterr()
    assert curate_main(["dedup", str(scores), "--threshold", "0.99", "--cluster-size", "4", "--device", "cpu"]) == 0
    assert SubsetRules(scores=[scores]).record() == recorded  # the table beside the shards is not one of them
    out = capsys.readouterr().out
    assert "2 of 10 images are near-duplicates of one kept before them" in out, out
    table = pl.read_parquet(scores / "duplicates-0.99.parquet")
    image_rows = pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(images)])
    source = dict(zip(image_rows["key"], image_rows["source"], strict=True))
    assert {source[k]: source[o] for k, o in zip(table["key"], table["duplicate_of"], strict=True)} == {
        "b_copy_of_1.jpg": "a_1.jpg", "c_smaller_2.jpg": "a_2.jpg"}
    assert table["similarity"].min() >= 0.99
    capsys.readouterr()
    assert curate_main(["stats", str(scores)]) == 0
    assert "duplicates-0.99.parquet: 2 near-duplicate images to leave out" in capsys.readouterr().out
    # The table is what --exclude takes: the stages after leave those images out.
    left_out = images_left_out(images, SubsetRules(exclude=[scores / "duplicates-0.99.parquet"]), "test")
    assert set(left_out) == set(table["key"])
    # Another threshold reads the stored embeddings again: between the two similarities, the closer
    # copy alone remains.
    similarity = dict(zip(table["key"], table["similarity"], strict=True))
    closer = max(similarity, key=similarity.get)
    between = sum(similarity.values()) / 2
    assert curate_main(["dedup", str(scores), "--threshold", repr(between), "--out", str(tmp_path / "t.parquet"),
                        "--device", "cpu"]) == 0
    assert pl.read_parquet(tmp_path / "t.parquet")["key"].to_list() == [closer]
    # --prefer chooses which image of a group stays: here the smaller (the image stage's columns);
    # equal sizes keep the dataset's order.
    assert curate_main(["dedup", str(scores), "--threshold", "0.99", "--prefer", "-(width * height)", "--out",
                        str(tmp_path / "small.parquet"), "--device", "cpu"]) == 0
    small = pl.read_parquet(tmp_path / "small.parquet")
    assert {source[k]: source[o] for k, o in zip(small["key"], small["duplicate_of"], strict=True)} == {
        "b_copy_of_1.jpg": "a_1.jpg", "a_2.jpg": "c_smaller_2.jpg"}
    assert curate_main(["dedup", str(scores), "--prefer", "sharpness", "--device", "cpu"]) == 2
    assert "--prefer 'sharpness': cannot evaluate it on the columns key, clip_orig" in capsys.readouterr().err
    assert len(committed_shards(scores)) == 3  # the tables beside the shards are not shards


def test_a_score_stage_and_a_held_out_manifest_at_urls_dedup_as_their_files(tmp_path: Path, capsys):
    """`curate dedup URL --out FILE` and `--against MANIFEST-URL`: the embeddings and the manifest's
    latent indexes read over HTTP give the files' tables; without --out the table goes beside the
    stage's shards at its URL, and --out may be a URL too."""
    from file_server import serve

    data = make_latent_dataset(tmp_path / "data", shards=2, per_shard=5)
    assert curate_main(["manifest", str(data["long"]), "--hold-out", "1", "--name", "train"]) == 0
    heldout = tmp_path / "data" / "manifests" / "train-heldout.json"
    held_keys = latent_index_rows(load_manifest(heldout), heldout, ["key"])["key"].to_list()
    keys = sorted(latent_index_rows(load_manifest(data["long"]), data["long"], ["key"])["key"].to_list())
    rng = np.random.default_rng(1)
    x = rng.normal(size=(len(keys), 16))
    row = {k: i for i, k in enumerate(keys)}
    others = [k for k in keys if k not in held_keys]
    for copy, of in ((others[0], held_keys[1]), (others[3], others[2])):
        x[row[copy]] = x[row[of]] + rng.normal(scale=0.02, size=16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = _score_stage(tmp_path / "scores", keys, x)
    runs = {"within": [], "against": ["--against", "HERE/data/manifests/train-heldout.json"]}
    tables = {}
    with serve(tmp_path) as server:
        for side, here in (("files", str(tmp_path)), ("http", server.url)):
            for name, extra in runs.items():
                out = tmp_path / f"{side}-{name}.parquet"
                args = [a.replace("HERE", here) for a in extra]
                assert curate_main(["dedup", f"{here}/scores", *args, "--out", str(out), "--device", "cpu"]) == 0
                tables[side, name] = pl.read_parquet(out)
        assert not list(scores.glob("duplicates-*.parquet"))  # --out, not the stage folder
        assert curate_main(["dedup", f"{server.url}/scores", "--device", "cpu"]) == 0
        assert f"--exclude {server.url}/scores/duplicates-0.95.parquet" in capsys.readouterr().out
        assert curate_main(["dedup", f"{server.url}/scores", "--out", f"{server.url}/tables/d.parquet", "--device",
                            "cpu"]) == 0
        assert pl.read_parquet(scores / "duplicates-0.95.parquet").equals(tables["files", "within"])
        assert pl.read_parquet(tmp_path / "tables" / "d.parquet").equals(tables["files", "within"])
        # The stage against itself, named with a trailing slash: refused like the plain name.
        assert curate_main(["dedup", f"{server.url}/scores", "--against", f"{server.url}/scores/", "--out",
                            str(tmp_path / "self.parquet"), "--device", "cpu"]) == 2
        assert "the stage itself" in capsys.readouterr().err
    for name in runs:
        assert tables["http", name].equals(tables["files", name]), name
    assert tables["files", "against"]["key"].to_list() == [others[0]]
    assert tables["files", "within"].height == 2  # one of each planted pair
