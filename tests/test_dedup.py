"""`curate dedup`: SemDeDup-style near-duplicates over `curate score --embeddings`' CLIP image
embeddings (a tiny random CLIPModel), checked against brute force, and left out with --exclude."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import encode
from PIL import Image, ImageDraw

from curate.cli import main as curate_main
from curate.dedup import find_duplicates
from curate.runner import CurateError
from curate.shards import committed_shards
from curate.subset import SubsetRules, _read_table, images_left_out


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

    capsys.readouterr()
    assert curate_main(["dedup", str(scores), "--threshold", "0.99", "--cluster-size", "4", "--device", "cpu"]) == 0
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
    left_out = images_left_out(images, SubsetRules(exclude=scores / "duplicates-0.99.parquet"), "test")
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
