"""`curate ingest --near-duplicates BITS`: the perceptual hash, the greedy search in shard order,
and the stage's guarantees with it (workers, ranks, an interrupted final pass, reruns)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from conftest import encode, run_cli, snapshot
from PIL import Image

import curate.ingest
from curate.images import check_image, perceptual_hash
from curate.ingest import IngestStage, near_duplicate_pairs
from curate.runner import WorkerShare, run_stage
from curate.shards import committed_shards, read_index
from curate.sources import open_source


def smooth_image(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """Random colours at low resolution, upscaled: an image with structure at every scale, as
    photographs have (pixel noise would have no low frequencies for pHash to see)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_perceptual_hash_is_phash_and_survives_copies():
    from scipy.fft import dct

    image = smooth_image(0)
    # The standard definition (imagehash's): grey 32x32 LANCZOS thumbnail, 2-D DCT-II, 8x8 lowest
    # frequencies against their median, bits in row order.
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0), np.float64)
    low = dct(dct(grey, axis=0), axis=1)[:8, :8]
    expected = int("".join("1" if b else "0" for b in (low > np.median(low)).flatten()), 2)
    assert perceptual_hash(image) == expected

    def hashed(data: bytes) -> int:
        return check_image(data, phash=True).phash

    original = hashed(encode(image, "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter left, displayed upright
    copies = {"jpeg q40": encode(image, "JPEG", quality=40), "resized": encode(image.resize((112, 84)), "PNG"),
              "webp": encode(image, "WEBP", quality=60),
              "exif-rotated": encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes()),
              "large": encode(image.resize((1600, 1200), Image.Resampling.BICUBIC), "JPEG", quality=90)}
    for name, data in copies.items():
        assert distance(original, hashed(data)) <= 4, name
    others = [perceptual_hash(smooth_image(seed)) for seed in range(1, 21)]
    assert min(distance(original, h) for h in others) >= 12
    assert check_image(encode(image, "PNG")).phash is None  # only when asked for


def _brute_force(hashes: list[int], bits: int) -> dict[int, tuple[int, int]]:
    kept, found = [], {}
    for i, h in enumerate(hashes):
        near = [(distance(h, hashes[j]), j) for j in kept if distance(h, hashes[j]) <= bits]
        if near:
            d, j = min(near)
            found[i] = (j, d)
        else:
            kept.append(i)
    return found


@pytest.mark.parametrize("bits", [0, 3, 8])
def test_the_block_index_finds_what_comparing_every_pair_finds(bits):
    rng = random.Random(bits)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for i in rng.sample(range(1, 300), 120):  # plant copies of earlier hashes, a few bits off
        flipped = hashes[rng.randrange(i)]
        for bit in rng.sample(range(64), rng.randrange(0, bits + 3)):
            flipped ^= 1 << bit
        hashes[i] = flipped
    found = near_duplicate_pairs(hashes, bits)
    assert found == _brute_force(hashes, bits)
    assert len(found) > 30


def _folder(src: Path) -> dict[str, str]:
    """24 distinct images and copies of some of them, in the same shard (of 8) and in later ones;
    returns copy name -> original name."""
    src.mkdir(parents=True)
    for i in range(24):
        (src / f"img_{i:02d}.jpg").write_bytes(encode(smooth_image(i), "JPEG", quality=90))
    copies = {"img_01_resized.png": ("img_01", lambda im: encode(im.resize((120, 90)), "PNG")),
              "img_03_q30.jpg": ("img_03", lambda im: encode(im, "JPEG", quality=30)),
              "zz_img_05_webp.webp": ("img_05", lambda im: encode(im, "WEBP", quality=50)),
              "zz_img_20_large.jpg": ("img_20", lambda im: encode(im.resize((480, 360)), "JPEG", quality=85))}
    for name, (original, make) in copies.items():
        (src / name).write_bytes(make(smooth_image(int(original[4:]))))
    (src / "zz_exact_copy.jpg").write_bytes((src / "img_07.jpg").read_bytes())
    return {name: f"img_{original[4:]}.jpg" for name, (original, _) in copies.items()}


def ingest(src: Path, out: Path, share: WorkerShare | None = None, **kwargs):
    # Path order: the copies ("zz_...", "img_01_resized") come after their originals, so the
    # originals are the ones kept.
    stage = IngestStage(open_source(str(src), order="path"), out,
                        **{"shard_size": 8, "near_duplicates": 6, **kwargs})
    return run_stage(stage, out, share=share, progress=False)


def _rejections(out: Path) -> dict[str, tuple[str, str]]:
    rows = {}
    for shard in committed_shards(out):
        df = read_index(shard.index_path)
        for row in df.filter(df["status"] != "ok").iter_rows(named=True):
            rows[Path(row["source"]).name] = (row["reason"], row["detail"])
    return rows


def test_near_duplicates_are_rejected_in_shard_order_whatever_the_workers(tmp_path):
    copies = _folder(tmp_path / "src")
    one = tmp_path / "one"
    result = ingest(tmp_path / "src", one)
    assert result.summary["totals"]["reasons"] == {"near_duplicate": 4, "duplicate": 1}
    rejected = _rejections(one)
    assert rejected["zz_exact_copy.jpg"][0] == "duplicate"
    for copy, original in copies.items():
        reason, detail = rejected[copy]
        assert reason == "near_duplicate" and detail.startswith("pHash ") and detail.endswith(f"{original})"), detail
    assert all(read_index(s.index_path)["phash"].null_count() < len(read_index(s.index_path))
               for s in committed_shards(one))
    # Two decoding workers, and two ranks, give the same shards; rerunning changes nothing.
    two_workers, two_ranks = tmp_path / "workers", tmp_path / "ranks"
    ingest(tmp_path / "src", two_workers, workers=2)
    assert not ingest(tmp_path / "src", two_ranks, share=WorkerShare(1, 2)).complete
    assert ingest(tmp_path / "src", two_ranks, share=WorkerShare(0, 2)).complete
    assert snapshot(one) == snapshot(two_workers) == snapshot(two_ranks)
    assert ingest(tmp_path / "src", one).processed == [] and snapshot(one) == snapshot(two_workers)


def test_an_interrupted_final_pass_reruns_to_the_clean_result(tmp_path, monkeypatch):
    _folder(tmp_path / "src")
    clean = tmp_path / "clean"
    ingest(tmp_path / "src", clean)
    interrupted = tmp_path / "interrupted"
    real, calls = curate.ingest.reject_samples, []

    def dies_on_the_second_near_duplicate_shard(shard, rejections, reason, **kwargs):
        calls.append(reason)
        if calls.count("near_duplicate") == 2:
            raise KeyboardInterrupt  # killed between two shard rewrites
        return real(shard, rejections, reason, **kwargs)

    monkeypatch.setattr(curate.ingest, "reject_samples", dies_on_the_second_near_duplicate_shard)
    with pytest.raises(KeyboardInterrupt):
        ingest(tmp_path / "src", interrupted)
    monkeypatch.setattr(curate.ingest, "reject_samples", real)
    ingest(tmp_path / "src", interrupted)
    assert snapshot(interrupted) == snapshot(clean)


def test_off_by_default_and_the_cli_option(tmp_path):
    _folder(tmp_path / "src")
    plain = tmp_path / "plain"
    result = ingest(tmp_path / "src", plain, near_duplicates=None)
    assert result.summary["totals"]["reasons"] == {"duplicate": 1}
    assert "phash" not in read_index(committed_shards(plain)[0].index_path).columns
    stage = IngestStage(open_source(str(tmp_path / "src")), plain)
    assert "near_duplicates" not in stage.config()  # stages ingested before the option stay valid

    out = tmp_path / "cli"
    run_cli("ingest", str(tmp_path / "src"), "--out", str(out), "--shard-size", "8", "--near-duplicates", "6",
            "--workers", "1", "--no-progress", "--order", "path")
    assert snapshot(out) == snapshot(_reference(tmp_path))
    bad = run_cli("ingest", str(tmp_path / "src"), "--out", str(tmp_path / "x"), "--near-duplicates", "9",
                  check=False)
    assert bad.returncode == 2 and "--near-duplicates must be 0 to 8 bits" in bad.stderr


def _reference(tmp_path: Path) -> Path:
    out = tmp_path / "reference"
    ingest(tmp_path / "src", out)
    return out
