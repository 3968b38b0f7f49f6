"""`curate ingest` from folders, tars and HF datasets; reruns, kills and workers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import polars as pl
import pytest
from conftest import encode, kill_at, noise_image, run_cli, samples, snapshot, write_good_images
from PIL import Image

from curate import storage
from curate.ingest import IngestStage
from curate.runner import STAGE_FILE, CurateError, WorkerShare, run_stage
from curate.shards import committed_shards, read_index
from curate.sources import FolderSource, TarSource, open_source

EXPECTED_REASONS = {"empty_file": 1, "truncated": 1, "not_an_image": 1, "too_small": 1,
                    "too_many_pixels": 1, "duplicate": 1}


def ingest(src: Path, out: Path, share: WorkerShare | None = None, **kwargs):
    stage = IngestStage(open_source(str(src)), out, **{"shard_size": 100, **kwargs})
    return run_stage(stage, out, share=share, progress=False)


def test_folder_ingest_counts_every_reason(mixed_folder: Path, tmp_path: Path):
    out = tmp_path / "images"
    result = ingest(mixed_folder, out)
    assert result.complete
    stage = json.loads((out / STAGE_FILE).read_text())
    totals = stage["totals"]
    assert totals["seen"] == 17
    assert totals["ok"] == 11
    assert totals["reasons"] == EXPECTED_REASONS
    assert totals["ok"] + totals["rejected"] == totals["seen"]
    assert totals["flags"]["animated"] == 1
    assert totals["flags"]["exif_rotated"] == 1
    for mode, n in {"CMYK": 1, "RGBA": 1, "P": 2, "I;16": 1}.items():  # the GIF is P too
        assert totals["flags"][f"mode_{mode}"] == n, mode
    assert stage["versions"]["pillow"]
    assert stage["config"]["min_side"] == 64

    index = pl.concat([read_index(s.index_path) for s in committed_shards(out)])
    by_source = {r["source"]: r for r in index.to_dicts()}
    assert by_source["bad_bomb.png"]["reason"] == "too_many_pixels"
    assert "900000000 pixels" in by_source["bad_bomb.png"]["detail"]
    assert by_source["z_duplicate.jpg"]["detail"] == "same bytes as a_rgb.jpg"
    # EXIF orientation 6: stored 120x70, displayed 70x120
    assert (by_source["k_rotated.jpg"]["width"], by_source["k_rotated.jpg"]["height"]) == (70, 120)
    assert by_source["i_16bit.png"]["mode"] == "I;16"
    assert by_source["a_rgb.jpg"]["caption"] == "a photo of noise"
    assert by_source["b_png.png"]["caption"] == "json caption"

    # Original bytes, unchanged, under the content key; metadata and caption beside them.
    got = samples(out)
    assert len(got) == 11
    for rel in ("a_rgb.jpg", "nested/deeper/e.tiff", "j_animated.gif", "f_cmyk.jpg"):
        row = by_source[rel]
        assert got[row["key"]]["jpg"] == (mixed_folder / rel).read_bytes()
    meta = json.loads(got[by_source["b_png.png"]["key"]]["json"])
    assert meta["format"] == "PNG" and meta["source_meta"]["sidecar"]["license"] == "cc0"
    assert got[by_source["a_rgb.jpg"]["key"]]["txt"] == b"a photo of noise"
    assert got[by_source["c.webp" if "c.webp" in by_source else "nested/c.webp"]["key"]]["txt"] == b""


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch):
    from conftest import png_header_only

    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(png_header_only(20000, 20000))
    write_good_images(src, 1)
    loaded = []
    original_load = Image.Image.load
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: loaded.append(self.size) or original_load(self))
    out = tmp_path / "out"
    result = ingest(src, out, workers=1)
    assert result.summary["totals"]["reasons"] == {"too_many_pixels": 1}
    assert (20000, 20000) not in loaded and loaded, "the bomb's pixels must never be decoded"


def test_rerun_skips_committed_and_redoes_changed_shards(tmp_path: Path):
    src = tmp_path / "src"
    write_good_images(src, 12)
    out = tmp_path / "out"
    first = ingest(src, out, shard_size=4)
    assert first.processed == [0, 1, 2]
    before = snapshot(out)
    again = ingest(src, out, shard_size=4)
    assert again.processed == [] and again.skipped == [0, 1, 2]
    assert snapshot(out) == before
    # One changed file: only its shard is redone.
    (src / "good_0005.jpg").write_bytes(encode(noise_image(999), "JPEG"))
    holding = [t.shard_id for t in FolderSource(src).plan(4) if ("good_0005.jpg", []) in t.payload]
    changed = ingest(src, out, shard_size=4)
    assert changed.processed == holding and len(holding) == 1
    # A changed setting redoes everything.
    assert ingest(src, out, shard_size=4, min_side=50).processed == [0, 1, 2]


def test_shrunk_input_removes_stale_shards(tmp_path: Path):
    src = tmp_path / "src"
    paths = write_good_images(src, 9)
    out = tmp_path / "out"
    ingest(src, out, shard_size=3)
    for p in paths[6:]:
        p.unlink()
    result = ingest(src, out, shard_size=3)
    assert [s.shard_id for s in committed_shards(out)] == [0, 1]
    assert result.summary["totals"]["seen"] == 6


def _make_dup_heavy_folder(src: Path, n: int = 60) -> None:
    """Shards of 8: copies of the same images land in different shards and in the same one."""
    write_good_images(src, n, size=(160, 120))
    for i in range(0, n, 7):
        (src / f"zz_copy_{i:04d}.jpg").write_bytes((src / f"good_{i:04d}.jpg").read_bytes())
    (src / "bad.jpg").write_bytes(b"")


def test_duplicates_across_shards_are_resolved_in_shard_order(tmp_path: Path):
    src = tmp_path / "src"
    _make_dup_heavy_folder(src)
    out = tmp_path / "out"
    result = ingest(src, out, shard_size=8)
    totals = result.summary["totals"]
    assert totals["reasons"] == {"duplicate": 9, "empty_file": 1}
    assert totals["ok"] == 60
    assert len(samples(out)) == 60  # no key twice anywhere
    rewritten = [s for s in committed_shards(out) if s.meta.depends_on]
    assert rewritten and all(s.intact() for s in rewritten)
    # Rerunning finds everything committed, rewritten shards included.
    assert ingest(src, out, shard_size=8).processed == []


def test_two_ranks_split_shards_and_equal_one_worker(tmp_path: Path):
    src = tmp_path / "src"
    _make_dup_heavy_folder(src)
    one = tmp_path / "one"
    ingest(src, one, shard_size=8)
    two = tmp_path / "two"
    r0 = ingest(src, two, shard_size=8, share=WorkerShare(0, 2))
    assert not r0.complete  # rank 1's shards are missing: rank 0 cannot finish the stage
    r1 = ingest(src, two, shard_size=8, share=WorkerShare(1, 2))
    assert r1.complete
    assert set(r0.processed).isdisjoint(r1.processed)
    assert sorted(r0.processed + r1.processed) == list(range(9))
    assert snapshot(one) == snapshot(two)


@pytest.mark.parametrize("store", ["http", "s3"])
def test_two_workers_ingesting_into_a_url_equal_one_worker_here(tmp_path: Path, monkeypatch, request, store: str):
    """`curate ingest photos/ --out s3://bucket/images` by two workers that share no folder: their
    shards uploaded, then the last one's final pass rewrites, where they lie, the shards that hold
    later copies of another shard's images; the stage is the one a single local worker writes."""
    import contextlib

    from conftest import download
    from file_server import serve

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    src = tmp_path / "src"
    _make_dup_heavy_folder(src)
    here = tmp_path / "here"
    ingest(src, here, shard_size=8, near_duplicates=4)
    www = tmp_path / "www"
    with serve(www) if store == "http" else contextlib.nullcontext() as server:
        out = f"{server.url if server else request.getfixturevalue('s3_bucket')}/images"
        first = ingest(src, out, shard_size=8, near_duplicates=4, share=WorkerShare(0, 2))
        second = ingest(src, out, shard_size=8, near_duplicates=4, share=WorkerShare(1, 2))
        assert not first.complete and second.complete
        assert second.summary["totals"] == json.loads((here / STAGE_FILE).read_text())["totals"]
        assert second.summary["summary"] == json.loads((here / STAGE_FILE).read_text())["summary"]
        assert ingest(src, out, shard_size=8, near_duplicates=4).processed == []  # rewritten shards count
        if store == "s3":
            download(out, www / "images")
    assert any(s.meta.depends_on for s in committed_shards(here))
    assert snapshot(www / "images") == snapshot(here)
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]


def test_number_of_decoding_workers_does_not_change_output(tmp_path: Path, mixed_folder: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    ingest(mixed_folder, a, shard_size=5, workers=1)
    ingest(mixed_folder, b, shard_size=5, workers=2)
    assert snapshot(a) == snapshot(b)


def _visible_shards_are_whole(out: Path) -> None:
    for shard in committed_shards(out):
        assert shard.tar_path.exists()


def test_sigkill_at_any_moment_then_rerun_equals_clean_run(tmp_path: Path):
    src = tmp_path / "src"
    _make_dup_heavy_folder(src, n=120)
    clean = tmp_path / "clean"
    run_cli("ingest", str(src), "--out", str(clean), "--shard-size", "8", "--workers", "1", "--no-progress")
    reference = snapshot(clean)
    assert len(reference) == 18  # 120 images, 18 copies, 1 empty file: 139 inputs in shards of 8

    killed = tmp_path / "killed"
    args = ["ingest", str(src), "--out", str(killed), "--shard-size", "8", "--workers", "1", "--no-progress"]
    kills = kill_at(args, killed, (1, 5, 11, 18), check=_visible_shards_are_whole)
    assert kills >= 2, "the run finished before it could be killed; make the input larger"
    run_cli("ingest", str(src), "--out", str(killed), "--shard-size", "8", "--workers", "1", "--no-progress")
    assert snapshot(killed) == reference
    assert not [p for p in os.listdir(killed) if ".tmp-" in p]
    assert json.loads((killed / STAGE_FILE).read_text())["totals"] == \
        json.loads((clean / STAGE_FILE).read_text())["totals"]


def test_reingesting_our_own_tars_keeps_keys_and_bytes(mixed_folder: Path, tmp_path: Path):
    first = tmp_path / "first"
    ingest(mixed_folder, first)
    second = tmp_path / "second"
    result = run_stage(IngestStage(open_source(str(first)), second), second, progress=False)
    assert result.summary["totals"]["ok"] == 11
    assert samples(first).keys() == samples(second).keys()
    for key, members in samples(second).items():
        assert members["jpg"] == samples(first)[key]["jpg"]


def test_tars_at_a_url_ingest_as_their_files(mixed_folder: Path, tmp_path: Path, monkeypatch):
    """`curate ingest http://host/out/` (img2dataset's output in a bucket): the folder listed, or a
    brace pattern of tars, each tar streamed; the shards are the local folder's."""
    from file_server import serve

    first = tmp_path / "first"
    ingest(mixed_folder, first, shard_size=4)
    local = tmp_path / "local"
    ingest(first, local)
    last = len(list(first.glob("*.tar"))) - 1
    assert last > 0
    with serve(tmp_path) as server:
        for name, spec in (("folder", f"{server.url}/first/"), ("braces", f"{server.url}/first/{{000000..{last:06d}}}.tar")):
            out = tmp_path / name
            assert [str(p) for p in TarSource(spec).paths][-1].endswith(f"/first/{last:06d}.tar")
            assert ingest(spec, out).complete
            assert snapshot(out) == snapshot(local), name
        with pytest.raises(CurateError, match="a source at a URL is webdataset tars"):
            open_source(f"{server.url}/first/", kind="folder")
        # A store that keeps failing is an error, not a broken tar whose rest would be lost.
        monkeypatch.setattr(storage, "RETRY_WAIT", 0.0)
        source = TarSource(f"{server.url}/first/")
        task = source.plan(100)[0]
        server.fail_next = 100
        with pytest.raises(storage.RemoteError, match="503"):
            list(source.records(task))


def test_broken_tar_member_is_recorded(tmp_path: Path):
    src = tmp_path / "src"
    write_good_images(src, 6, size=(200, 150))
    out = tmp_path / "shards"
    ingest(src, out)
    tar = out / "000000.tar"
    data = tar.read_bytes()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000000.tar").write_bytes(data[: int(len(data) * 0.6)])
    result = run_stage(IngestStage(open_source(str(broken)), tmp_path / "re"), tmp_path / "re", progress=False)
    totals = result.summary["totals"]
    assert totals["reasons"].get("unreadable", 0) + totals["reasons"].get("truncated", 0) >= 1
    assert totals["ok"] >= 2


def test_a_tar_cut_inside_a_members_header_is_recorded_not_ended_silently(tmp_path: Path):
    """tarfile takes a header cut short for the end of the archive: the samples after it would be
    lost without a word."""
    import tarfile

    src = tmp_path / "src"
    write_good_images(src, 6, size=(200, 150))
    out = tmp_path / "shards"
    ingest(src, out)
    data = (out / "000000.tar").read_bytes()
    with tarfile.open(out / "000000.tar") as tar:
        members = tar.getmembers()
    cut_at = members[9].offset + 200  # inside the fourth sample's first header (jpg, json and txt each)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000000.tar").write_bytes(data[:cut_at])
    result = run_stage(IngestStage(open_source(str(broken)), tmp_path / "re"), tmp_path / "re", progress=False)
    totals = result.summary["totals"]
    assert (totals["ok"], totals["reasons"]) == (3, {"unreadable": 1})
    rejected = read_index(tmp_path / "re" / "000000.parquet").filter(pl.col("status") != "ok")
    assert "cut off inside a member's header" in rejected["detail"][0]
    # A whole tar reads as before: nothing more than its samples.
    whole = run_stage(IngestStage(open_source(str(out)), tmp_path / "again"), tmp_path / "again", progress=False)
    assert whole.summary["totals"]["reasons"] == {}


@pytest.mark.skipif(not __import__("PIL.features").features.check("avif"), reason="PIL without AVIF")
def test_an_image_whose_decoder_raises_an_unusual_error_is_recorded_not_a_crash(tmp_path: Path):
    # PIL's AVIF decoder raises RuntimeError on damaged image data: a rejection like any other.
    data = bytearray(encode(noise_image(1), "AVIF"))
    start = data.find(b"mdat") + 8
    data[start:start + 32] = bytes(32)
    src = tmp_path / "src"
    write_good_images(src, 2)
    (src / "damaged.jpg").write_bytes(bytes(data))  # a web file's name says little of its format
    result = ingest(src, tmp_path / "out")
    totals = result.summary["totals"]
    assert totals["ok"] == 2 and totals["reasons"] == {"corrupt": 1}


def test_postscript_is_not_an_image_and_never_runs_ghostscript(tmp_path: Path, monkeypatch):
    # PIL renders EPS by running Ghostscript on the bytes: a program run on crawled data (shards
    # are data, never code). A stand-in gs here says whether anything ran it.
    from PIL import EpsImagePlugin

    from curate.buckets import preprocess
    from curate.images import check_image

    ran = tmp_path / "ghostscript-ran"
    gs = tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(gs))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\nshowpage\n"
    assert check_image(eps).reason == "not_an_image"
    with pytest.raises(ValueError, match="no image format recognised"):
        preprocess(eps, resolution=64)
    assert not ran.exists()


def test_hf_dataset_saved_to_disk(tmp_path: Path):
    import datasets

    files = write_good_images(tmp_path / "raw", 5)
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "text": [f"caption {i}" for i in range(5)], "id": list(range(5))}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hfds"))
    out = tmp_path / "out"
    result = ingest(tmp_path / "hfds", out, shard_size=2)
    assert result.summary["totals"]["ok"] == 5
    assert result.summary["config"]["source"] == {"kind": "hf", "split": None, "image_column": "image",
                                                  "caption_column": "text"}
    index = pl.concat([read_index(s.index_path) for s in committed_shards(out)])
    assert index["caption"].to_list() == [f"caption {i}" for i in range(5)]
    got = samples(out)
    assert sorted(m["jpg"] for m in got.values()) == sorted(p.read_bytes() for p in files)


def test_shards_read_back_with_webdataset_and_datasets(mixed_folder: Path, tmp_path: Path):
    import datasets
    import webdataset as wds

    out = tmp_path / "out"
    ingest(mixed_folder, out, shard_size=6)
    tars = sorted(str(p) for p in out.glob("*.tar"))
    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        assert isinstance(sample["jpg"], Image.Image)
        assert sample["json"]["key"] == sample["__key__"]
        n += 1
    assert n == 11
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert len(ds) == 11
    assert {ds[i]["jpg"].size for i in range(len(ds))} >= {(96, 80)}
    assert set(ds[0]["json"]) >= {"key", "width", "height", "format", "mode"}


def test_cli_ingest_then_stats(mixed_folder: Path, tmp_path: Path):
    out = tmp_path / "images"
    proc = run_cli("ingest", str(mixed_folder), "--out", str(out), "--workers", "2")
    assert "complete" in proc.stdout and "too_many_pixels" in proc.stdout
    stats = run_cli("stats", str(out))
    assert "seen" in stats.stdout and "17" in stats.stdout and "duplicate" in stats.stdout
    raw = json.loads(run_cli("stats", str(out), "--json").stdout)
    assert raw["totals"]["reasons"] == EXPECTED_REASONS
    plot = run_cli("stats", str(out), "--plot", str(tmp_path / "lengths.png"), check=False)
    assert plot.returncode == 2 and "no caption variants to plot" in plot.stderr


@pytest.mark.parametrize("setup", ["missing", "empty_folder", "no_images", "empty_url_list"])
def test_bad_src_is_a_clear_error_with_exit_2(tmp_path: Path, setup: str):
    src = tmp_path / "src"
    if setup == "empty_folder":
        src.mkdir()
    elif setup == "no_images":
        src.mkdir()
        (src / "readme.txt").write_text("nothing here")
    elif setup == "empty_url_list":
        src = tmp_path / "urls.csv"
        src.write_text("url,caption\n")
    proc = run_cli("ingest", str(src), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("curate: error:") and str(src) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_stats_on_a_folder_that_is_not_a_stage(tmp_path: Path):
    proc = run_cli("stats", str(tmp_path), check=False)
    assert proc.returncode == 2 and "not a stage output" in proc.stderr


def test_folder_plan_does_not_depend_on_listing_order(tmp_path: Path):
    src = tmp_path / "src"
    write_good_images(src / "b", 3)
    write_good_images(src / "a", 3, start_seed=10)
    tasks = FolderSource(src, order="path").plan(4)
    assert [rel for rel, _ in tasks[0].payload][:3] == ["a/good_0010.jpg", "a/good_0011.jpg", "a/good_0012.jpg"]
    assert [t.num_inputs for t in tasks] == [4, 2]
    # The spread order: by a hash of the relative path, whatever the file system lists first.
    spread = [rel for t in FolderSource(src).plan(4) for rel, _ in t.payload]
    assert spread == sorted(spread, key=lambda rel: hashlib.blake2b(rel.encode(), digest_size=8).digest())
    assert sorted(spread) == [rel for t in tasks for rel, _ in t.payload]


def test_a_folder_takes_jpegs_of_every_suffix_and_says_what_it_skips(tmp_path: Path, caplog):
    src = tmp_path / "src"
    write_good_images(src, 3)
    (src / "good_0000.jpg").rename(src / "photo.jfif")
    (src / "good_0001.jpg").rename(src / "photo.JPE")
    (src / "notes.pdf").write_bytes(b"%PDF-1.4")
    (src / "clip.mp4").write_bytes(b"\0")
    (src / "more.pdf").write_bytes(b"%PDF-1.4")
    with caplog.at_level("INFO", logger="curate"):
        files = sorted(rel for t in FolderSource(src).plan(10) for rel, _ in t.payload)
    assert files == ["good_0002.jpg", "photo.JPE", "photo.jfif"]
    assert "skipped 3 files that are neither images nor captions (.pdf 2, .mp4 1)" in caplog.text
    out = tmp_path / "out"
    assert run_stage(IngestStage(open_source(str(src)), out), out, progress=False).summary["totals"]["ok"] == 3


def test_the_spread_order_puts_every_subfolder_in_every_shard(tmp_path: Path):
    src = tmp_path / "src"
    for i, name in enumerate(("cats", "dogs", "owls")):
        write_good_images(src / name, 40, start_seed=100 * i)
    folders_per_shard = [{rel.split("/")[0] for rel, _ in t.payload} for t in FolderSource(src).plan(20)]
    assert len(folders_per_shard) == 6 and all(f == {"cats", "dogs", "owls"} for f in folders_per_shard)
    in_path_order = [{rel.split("/")[0] for rel, _ in t.payload} for t in FolderSource(src, order="path").plan(20)]
    assert in_path_order == [{"cats"}, {"cats"}, {"dogs"}, {"dogs"}, {"owls"}, {"owls"}]


def test_a_stage_ingested_in_path_order_is_continued_in_it(tmp_path: Path):
    src = tmp_path / "src"
    write_good_images(src / "a", 4)
    write_good_images(src / "b", 4, start_seed=10)
    out = tmp_path / "out"
    run_stage(IngestStage(FolderSource(src, order="path"), out, shard_size=3), out, progress=False)
    before = snapshot(out)
    # What the stage was made before the spread order existed: curate ingest keeps its order, says so,
    # and redoes nothing; --order spread redoes it.
    proc = run_cli("ingest", str(src), "--out", str(out), "--shard-size", "3", "--workers", "1", "--no-progress")
    assert "was ingested in path order" in proc.stderr and snapshot(out) == before
    run_cli("ingest", str(src), "--out", str(out), "--shard-size", "3", "--workers", "1", "--no-progress",
            "--order", "spread")
    assert snapshot(out) != before
    fresh = tmp_path / "fresh"
    proc = run_cli("ingest", str(src), "--out", str(fresh), "--shard-size", "3", "--workers", "1", "--no-progress")
    assert "path order" not in proc.stderr and snapshot(fresh) == snapshot(out)
    # Other sources keep their own order: --order is refused there.
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in committed_shards(fresh):
        (tars / shard.tar_path.name).write_bytes(shard.tar_path.read_bytes())
    proc = run_cli("ingest", str(tars), "--out", str(tmp_path / "t"), "--order", "path", check=False)
    assert proc.returncode == 2 and "--order orders a folder's images" in proc.stderr


def _image_parquet(path: Path, images: list[bytes | None], captions: list[str], row_group_size: int) -> None:
    """A parquet file as the Hugging Face Hub stores a dataset with an Image feature: a struct of
    the image's bytes and path per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = [{"bytes": data, "path": f"{i}.jpg"} for i, data in enumerate(images)]
    pq.write_table(pa.table({"image": column, "text": captions}), path, row_group_size=row_group_size)


def test_a_row_group_larger_than_a_shard_is_read_a_batch_at_a_time(tmp_path: Path, caplog):
    """pandas and pyarrow write row groups of up to a million rows: shards cut inside one take
    their own rows (read in batches across the batch boundaries), and the plan says what it costs."""
    images = [encode(noise_image(i, (64, 64)), "JPEG", quality=80) for i in range(150)]
    _image_parquet(tmp_path / "big.parquet", images, [f"caption {i}" for i in range(150)], row_group_size=150)
    with caplog.at_level("WARNING", logger="curate"):
        result = ingest(tmp_path / "big.parquet", tmp_path / "out", shard_size=20)
    assert "row groups of up to 150 rows, 7 shards' worth" in caplog.text
    assert result.summary["totals"]["ok"] == 150 and len(committed_shards(tmp_path / "out")) == 8
    index = pl.concat([read_index(s.index_path) for s in committed_shards(tmp_path / "out")])
    assert index["caption"].to_list() == [f"caption {i}" for i in range(150)]
    assert index["source"].to_list() == [f"big.parquet[{i}]" for i in range(150)]


def test_parquet_files_of_images_ingest_by_row_groups_here_and_at_a_url(tmp_path: Path):
    """`curate ingest DATA/*.parquet` (or their folder, or its URL: ``hf://datasets/...`` on the
    Hub): each file cut into shards of --shard-size rows across its row groups; the images and
    captions are the rows', a row without bytes is recorded, and over HTTP the shards are the
    files'."""
    from file_server import serve

    files = write_good_images(tmp_path / "raw", 7)
    images = [f.read_bytes() for f in files]
    folder = tmp_path / "pq"
    folder.mkdir()
    _image_parquet(folder / "train-00000.parquet", images[:4], [f"caption {i}" for i in range(4)], row_group_size=3)
    _image_parquet(folder / "train-00001.parquet", [*images[4:], None], [f"caption {i}" for i in range(4, 8)],
                   row_group_size=2)
    local = tmp_path / "local"
    result = ingest(folder, local, shard_size=3)
    assert result.summary["config"]["source"] == {"kind": "parquet", "image_column": "image", "caption_column": "text"}
    assert result.summary["totals"]["ok"] == 7 and result.summary["totals"]["reasons"] == {"unreadable": 1}
    index = pl.concat([read_index(s.index_path) for s in committed_shards(local)])
    assert len(committed_shards(local)) == 4  # rows 0-2 and 3 of each file
    assert index["caption"].to_list() == [f"caption {i}" for i in range(8)]
    assert index["source"].to_list() == [f"train-0000{i // 4}.parquet[{i % 4}]" for i in range(8)]
    assert sorted(m["jpg"] for m in samples(local).values()) == sorted(images)
    with serve(tmp_path) as server:
        for name, spec in (("listed", f"{server.url}/pq/"),
                           ("braces", f"{server.url}/pq/train-{{00000..00001}}.parquet"),
                           ("glob", f"{server.url}/pq/train-*.parquet")):
            out = tmp_path / name
            assert ingest(spec, out, shard_size=3).complete
            assert snapshot(out) == snapshot(local), name
        with pytest.raises(CurateError, match="no .parquet files found"):
            open_source(f"{server.url}/pq/test-*.parquet")
        with pytest.raises(CurateError, match="no such parquet file"):
            open_source(f"{server.url}/pq/absent.parquet")
    # Through a link, from another working folder: the same labels, so a rerun finds its shards done.
    (tmp_path / "link").symlink_to(folder)
    assert ingest(tmp_path / "link", local, shard_size=3).processed == []
    # What a parquet file is taken for: images in it, or a list of URLs to download.
    assert open_source(str(folder / "train-00000.parquet")).kind == "parquet"
    assert open_source(str(tmp_path / "pq" / "*.parquet")).kind == "parquet"
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_parquet(tmp_path / "urls.parquet")
    assert open_source(str(tmp_path / "urls.parquet")).kind == "urls"
    pl.DataFrame({"jpg": [images[0]], "note": ["x"]}).write_parquet(tmp_path / "raw.parquet")
    assert open_source(str(tmp_path / "raw.parquet")).image_column == "jpg"  # raw bytes under a usual name
    with pytest.raises(CurateError, match="no image column"):
        open_source(str(tmp_path / "urls.parquet"), kind="parquet")


def test_numbers_out_of_range_and_a_file_given_as_a_folder_are_clear_errors(mixed_folder: Path, tmp_path: Path,
                                                                           capsys):
    from curate.cli import main

    for argv, message in ((["recaption", "x", "--decode-workers", "-1"], "--decode-workers must be at least 0"),
                          (["recaption", "x", "--retries", "-1"], "--retries must be at least 0"),
                          (["encode-latents", "x", "--bucket-multiple", "0"], "--bucket-multiple must be at least 1"),
                          (["ingest", "x", "--download-threads", "0"], "--download-threads must be at least 1")):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["manifest", "m.json", "--captions", "long=1", "--name", "a/b"])
    assert "--name 'a/b': a name that begins file names, without /" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("")
    assert main(["ingest", str(mixed_folder), "--out", str(tmp_path / "file.txt")]) == 2
    assert capsys.readouterr().err.startswith("curate: error: [Errno 17] File exists")
    assert main(["recaption", "x", "--out", "y", "--backend", "transformers", "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "--endpoint is the openai backend's server" in capsys.readouterr().err
    assert main(["dedup", str(tmp_path), "--out", str(tmp_path / "near.txt")]) == 2
    assert "name it NAME.parquet" in capsys.readouterr().err
    assert main(["stats", str(tmp_path / "file.txt")]) == 2 and main(["stats", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err
    assert "file.txt: not a stage folder (of shards) nor a manifest" in err and "no.json: no such stage folder" in err


def _tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_key_with_several_dots_keeps_its_caption(tmp_path: Path):
    # webdataset's key ends at the basename's first dot: img.0001.jpg and img.0001.txt are the fields
    # "0001.jpg" and "0001.txt" of sample "img". The image was found by its last suffix; so is its caption.
    images = write_good_images(tmp_path / "raw", 3)
    tar = _tar_of(tmp_path / "odd.tar", [
        ("img.0001.jpg", images[0].read_bytes()), ("img.0001.txt", b"a caption beside several dots"),
        ("v.2.jpg", images[1].read_bytes()), ("v.2.json", json.dumps({"caption": "from the json"}).encode()),
        ("B.JPG", images[2].read_bytes()), ("B.TXT", b"upper case"),
    ])
    source = TarSource(str(tar))
    records = [r for task in source.plan(100) for r in source.records(task)]
    assert [(r.caption, r.error) for r in records] == [
        ("a caption beside several dots", None), ("from the json", None), ("upper case", None)]
    assert [r.data for r in records] == [p.read_bytes() for p in images]


def test_caption_files_with_a_byte_order_mark_are_read_as_text(tmp_path: Path):
    # Windows editors save captions with a BOM (UTF-8's, or UTF-16 as "Unicode"): the mark is not part
    # of the caption, and a .json behind one is still read.
    src = tmp_path / "src"
    images = write_good_images(src, 4)
    (src / f"{images[0].stem}.txt").write_bytes("\ufeffa caption after a BOM".encode())
    (src / f"{images[1].stem}.json").write_bytes(("\ufeff" + json.dumps({"caption": "json after a BOM"})).encode())
    (src / f"{images[2].stem}.txt").write_bytes("utf-16 caption, café".encode("utf-16"))
    (src / f"{images[3].stem}.json").write_bytes(json.dumps({"text": "utf-16 json"}).encode("utf-16"))
    source = FolderSource(src, order="path")
    assert [r.caption for task in source.plan(100) for r in source.records(task)] == [
        "a caption after a BOM", "json after a BOM", "utf-16 caption, café", "utf-16 json"]
    tar = _tar_of(tmp_path / "bom.tar", [("k.jpg", images[0].read_bytes()), ("k.txt", "\ufeffin a tar".encode())])
    tars = TarSource(str(tar))
    assert [r.caption for task in tars.plan(100) for r in tars.records(task)] == ["in a tar"]


def test_a_sidecar_with_an_upper_case_suffix_is_read(tmp_path: Path):
    # Images are found whatever the case of their suffix (DSC_0001.JPG); so are their captions.
    src = tmp_path / "src"
    images = write_good_images(src, 2)
    (src / "DSC_0001.JPG").write_bytes(images[0].read_bytes())
    (src / "DSC_0001.TXT").write_bytes(b"camera caption")
    images[0].unlink()
    (src / f"{images[1].stem}.JSON").write_text(json.dumps({"caption": "upper json"}))
    source = FolderSource(src, order="path")
    assert [(r.source, r.caption) for task in source.plan(100) for r in source.records(task)] == [
        ("DSC_0001.JPG", "camera caption"), (images[1].name, "upper json")]


def test_an_hf_dataset_built_from_polars_keeps_its_captions(tmp_path: Path):
    # polars (and so Dataset.from_polars, or a dataset loaded from its parquet) types text as
    # large_string: still the caption column.
    import datasets

    files = write_good_images(tmp_path / "raw", 2)
    table = pl.DataFrame({"image": [p.read_bytes() for p in files], "caption": ["first", "second"]})
    datasets.Dataset.from_polars(table).save_to_disk(str(tmp_path / "hfds"))
    source = open_source(str(tmp_path / "hfds"))
    assert source.caption_column == "caption"
    assert [r.caption for task in source.plan(100) for r in source.records(task)] == ["first", "second"]


def test_a_caption_column_that_is_not_text_is_a_clear_error(tmp_path: Path):
    # COCO-style datasets hold a list of captions per image: named as the caption column, that was
    # a traceback in the middle of the first shard ('list' object has no attribute 'encode').
    import datasets

    files = write_good_images(tmp_path / "raw", 1)
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": files[0].read_bytes(), "path": None}],
                                     "captions": [["one", "two"]]}, features=features)
    ds.save_to_disk(str(tmp_path / "hfds"))
    ds.to_parquet(str(tmp_path / "images.parquet"))
    (tmp_path / "urls.jsonl").write_text(json.dumps({"url": "http://127.0.0.1:9/a.jpg", "caption": ["a", "b"]}))
    for src in ("hfds", "images.parquet", "urls.jsonl"):
        with pytest.raises(CurateError, match="not text"):
            open_source(str(tmp_path / src), caption_column="captions" if src != "urls.jsonl" else "caption")
        assert open_source(str(tmp_path / src)).caption_column is None  # detection passes over it


def test_a_caption_json_with_a_lone_surrogate_is_ingested_not_a_crash(tmp_path: Path):
    # Alt text cut in the middle of an emoji (JavaScript counts UTF-16 units) is written by JSON
    # encoders as a lone "\ud83d": valid JSON, but text that UTF-8 cannot hold. Writing the sample's
    # metadata crashed the stage (UnicodeEncodeError); the half character is now U+FFFD.
    src = tmp_path / "src"
    images = write_good_images(src, 2)
    (src / f"{images[0].stem}.json").write_text('{"caption": "smile \\ud83d", "note": "x"}')
    tars = tmp_path / "tars"
    tars.mkdir()
    _tar_of(tars / "000000.tar", [("k.jpg", images[1].read_bytes()),
                                  ("k.json", b'{"caption": "in a tar \\udc00", "url": "http://x/k.jpg"}')])
    for source, out in ((src, tmp_path / "from-folder"), (tars, tmp_path / "from-tars")):
        assert ingest(source, out).summary["totals"]["ok"] >= 1
    captions = [read_index(s.index_path)["caption"].to_list() for s in committed_shards(tmp_path / "from-folder")]
    assert "smile \ufffd" in captions[0]
    assert [m["txt"] for m in samples(tmp_path / "from-tars").values()] == ["in a tar \ufffd".encode()]


def test_file_names_that_are_not_utf8_are_ingested_not_a_crash(tmp_path: Path):
    # A folder unzipped from an old archive, or a tar made on a Latin-1 system, has names whose bytes
    # are not UTF-8 (Python keeps them as surrogates): the plan crashed on the folder's spread order,
    # and writing the sample's source crashed the stage. The file is read; its source shows U+FFFD.
    src = tmp_path / "src"
    images = write_good_images(src, 2)
    odd = os.path.join(os.fsencode(src), b"caf\xe9.jpg")
    os.rename(images[0], odd)
    with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "wb") as f:
        f.write(b"a caption beside a Latin-1 name")
    tars = tmp_path / "tars"
    tars.mkdir()
    _tar_of(tars / "000000.tar", [(os.fsdecode(b"caf\xe9.jpg"), images[1].read_bytes())])
    for source, out in ((src, tmp_path / "from-folder"), (tars, tmp_path / "from-tars")):
        assert ingest(source, out).summary["totals"]["ok"] >= 1
    index = read_index(committed_shards(tmp_path / "from-folder")[0].index_path)
    assert index.filter(pl.col("source") == "caf\ufffd.jpg")["caption"].to_list() == ["a caption beside a Latin-1 name"]
    index = read_index(committed_shards(tmp_path / "from-tars")[0].index_path)
    assert index["source"].to_list() == ["000000.tar::caf\ufffd"]


def test_a_dangling_link_in_a_folder_is_a_rejection_not_a_failed_run(tmp_path: Path):
    # A folder assembled with links, one of whose targets went away: the plan's stat failed and the
    # whole run stopped ("No such file or directory"). It is recorded as unreadable like any file that
    # cannot be read, and a rerun once its target is back redoes its shard.
    src = tmp_path / "src"
    images = write_good_images(src, 3)
    target = tmp_path / "elsewhere.jpg"
    (src / "link.jpg").symlink_to(target)
    (src / f"{images[0].stem}.txt").symlink_to(tmp_path / "gone.txt")
    result = ingest(src, tmp_path / "out")
    assert (result.summary["totals"]["ok"], result.summary["totals"]["reasons"]) == (3, {"unreadable": 1})
    target.write_bytes(encode(noise_image(9), "JPEG"))
    again = ingest(src, tmp_path / "out")
    assert again.processed and again.summary["totals"]["ok"] == 4


def test_a_subfolder_that_cannot_be_listed_is_said_not_passed_over(tmp_path: Path, monkeypatch, caplog):
    # os.walk passes over a folder it cannot list (permissions, a stale mount) without a word: its
    # images were silently missing from the stage.
    src = tmp_path / "src"
    write_good_images(src, 2)
    write_good_images(src / "locked", 2, start_seed=5)
    scandir = os.scandir

    def refuse(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with caplog.at_level("WARNING", logger="curate"):
        assert len(FolderSource(src).plan(100)[0].payload) == 2
    assert "locked" in caplog.text and "Permission denied" in caplog.text


def test_a_dictionary_encoded_caption_column_is_text(tmp_path: Path):
    # pandas writes a categorical column as dictionary-encoded text: still the caption column.
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = write_good_images(tmp_path / "raw", 2)
    captions = pa.array(["first", "second"]).dictionary_encode()
    pq.write_table(pa.table({"image": [p.read_bytes() for p in files], "caption": captions}), tmp_path / "i.parquet")
    for column in (None, "caption"):
        source = open_source(str(tmp_path / "i.parquet"), caption_column=column)
        assert [r.caption for task in source.plan(100) for r in source.records(task)] == ["first", "second"]
