"""Folder ingest throughput against a bare single-process loop, measured in one run.

The bare loop is what a user would write by hand: read each file, decode it fully with
PIL, append the bytes to a tar. `curate ingest` does that plus content keys, EXIF
orientation, validation, the parquet index, fsync and atomic commits. Figures are ratios
of images/s in the same run on the same files (page cache warm for both). With
``--near-duplicates BITS`` each image is also hashed (pHash) and the final pass searches the
hashes; that search alone is timed too, on random 64-bit hashes (unrelated images), at the
counts and thresholds of ``--search``. The same images are also ingested from parquet files
that hold them (the Hugging Face Hub's Image-feature layout, row groups of 100), as
``curate ingest DIR_OF_PARQUET`` reads a dataset downloaded from the Hub.

    python bench/ingest.py [--images 2000] [--side 1024] [--repeats 3] [--search 100000:4,1000000:4,100000:8,300000:8]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.ingest import IngestStage, near_duplicate_pairs  # noqa: E402
from curate.runner import run_stage  # noqa: E402
from curate.sources import FolderSource, ParquetSource  # noqa: E402


def make_images(root: Path, n: int, side: int) -> None:
    """Photo-like JPEGs: smooth gradients, shapes and mild noise (decode cost like real photos).

    A few noisy backgrounds are made once; each image draws its own shapes on one, so every
    file is different (no duplicates) and generation stays fast.
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    h, w = side * 3 // 4, side
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    backgrounds = []
    for _ in range(16):
        c0, c1 = rng.random(3) * 255, rng.random(3) * 255
        t = ((xx * rng.random() + yy * rng.random()) / (w + h))[..., None]
        arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 3))
        backgrounds.append(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))
    for i in range(n):
        img = backgrounds[i % len(backgrounds)].copy()
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.integers(0, w), rng.integers(0, h)
            r = int(rng.integers(10, side // 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(root / f"img_{i:05d}.jpg", quality=90)
        (root / f"img_{i:05d}.txt").write_text(f"image number {i}")


def bare_loop(src: Path, out: Path) -> None:
    out.mkdir(parents=True)
    with tarfile.open(out / "000000.tar", "w") as tar:
        for path in sorted(src.glob("*.jpg")):
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                img.load()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_parquet(src: Path, out: Path, rows_per_file: int = 1000, row_group: int = 100) -> None:
    """The folder's images and captions as parquet files: an Image-feature struct column
    (``{bytes, path}``, as ``datasets`` writes it) and a ``text`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    paths = sorted(src.glob("*.jpg"))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for start in range(0, len(paths), rows_per_file):
        part = paths[start: start + rows_per_file]
        table = pa.table({
            "image": pa.array([{"bytes": p.read_bytes(), "path": p.name} for p in part], type=image_type),
            "text": [p.with_suffix(".txt").read_text() for p in part],
        })
        pq.write_table(table, out / f"train-{start // rows_per_file:05d}.parquet", row_group_size=row_group)


def curate_ingest(src: Path, out: Path, workers: int, near_duplicates: int | None = None) -> None:
    source = ParquetSource(str(src)) if any(src.glob("*.parquet")) else FolderSource(src)
    stage = IngestStage(source, out, shard_size=1000, workers=workers, near_duplicates=near_duplicates)
    run_stage(stage, out, progress=False)


def _keys(stage: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {k for index in stage.glob("*.parquet") for k in pq.read_table(index, columns=["key"])["key"].to_pylist()}


def timed(fn, out: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        fn(out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search", default="100000:4,1000000:4,100000:8,300000:8",
                        help="COUNT:BITS pairs: the near-duplicate search alone on random hashes")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        make_images(src, args.images, args.side)
        mb = sum(p.stat().st_size for p in src.glob("*.jpg")) / 1e6
        bare_loop(src, Path(tmp) / "warm")  # warm the page cache for everyone
        bare = timed(lambda o: bare_loop(src, o), Path(tmp) / "bare", args.repeats)
        rows = [("bare loop (1 process)", bare)]
        for workers in sorted({1, 2, cores}):
            t = timed(lambda o, w=workers: curate_ingest(src, o, w), Path(tmp) / f"w{workers}", args.repeats)
            rows.append((f"curate ingest --workers {workers}", t))
        t = timed(lambda o: curate_ingest(src, o, cores, near_duplicates=4), Path(tmp) / "near", args.repeats)
        rows.append((f"curate ingest --workers {cores} --near-duplicates 4", t))
        parquet = Path(tmp) / "parquet"
        write_parquet(src, parquet)
        t = timed(lambda o: curate_ingest(parquet, o, cores), Path(tmp) / "pq", args.repeats)
        rows.append((f"curate ingest --workers {cores}, the images in parquet files", t))
        same = _keys(Path(tmp) / "pq") == _keys(Path(tmp) / f"w{cores}")
    print(f"# bench/ingest.py: {args.images} JPEGs {args.side}x{args.side * 3 // 4} ({mb:.0f} MB), "
          f"{cores} cores, {platform.processor() or platform.machine()}, median of {args.repeats}")
    print(f"parquet ingest kept the folder's samples (content keys): {same}")
    print("| run | images/s | ratio to bare loop |")
    print("| --- | ---: | ---: |")
    for name, t in rows:
        print(f"| {name} | {args.images / t:.0f} | {bare / t:.2f} |")
    if args.search:
        print("\n| hashes | bits | search seconds |")
        print("| ---: | ---: | ---: |")
        rng = random.Random(0)
        for item in args.search.split(","):
            count, bits = (int(v) for v in item.split(":"))
            hashes = [rng.getrandbits(64) for _ in range(count)]
            start = time.perf_counter()
            near_duplicate_pairs(hashes, bits)
            print(f"| {count} | {bits} | {time.perf_counter() - start:.1f} |")


if __name__ == "__main__":
    main()
