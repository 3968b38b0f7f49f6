"""Subsets of a manifest (`curate manifest --where/--fraction`), measured in one run (CPU).

1. Tar reading: every sample of the same latent shards read by webdataset's tar iterator (what
   the loader used before) against the loader's own reader (``train.data._TarSamples``, which
   parses the headers itself and reads a sample's bytes only when asked). Goal: no slower.
2. Loader over a subset: LatentLoader's samples per second (one process, one stream: the read
   path alone) over the full manifest, and over subsets of half and a tenth of its samples,
   counted per sample delivered. A subset's unused samples are seeked over, so a tenth should
   cost well under ten times per sample; the table says how much it does cost.
3. Choosing a subset: ``curate.subset.subset_manifest`` (a ``--where`` over index columns and a
   joined ``--scores`` table, and a ``--fraction``) on indexes of ``--index-shards`` x 1000
   samples, against reading those indexes once (``latent_index_rows``): seconds per million
   samples, and the ratio.

The sides of each comparison run interleaved, --repeats times; tables give the median and every run.

    python bench/subset.py [--quick] [--repeats 5] [--batches 100] [--shards 8] [--per-shard 500] [--index-shards 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from latent_data import make_latent_dataset  # noqa: E402
from webdataset.tariterators import base_plus_ext, tar_file_iterator  # noqa: E402

from curate.cli import main as curate_main  # noqa: E402
from curate.manifest import (  # noqa: E402
    LatentSpec,
    Manifest,
    ShardEntry,
    latent_index_rows,
    load_manifest,
    write_manifest,
)
from curate.subset import SubsetRules, subset_manifest  # noqa: E402
from train.data import DataSettings, LatentLoader, _TarSamples  # noqa: E402


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name].append(fn())
            print(f"  {name}: {results[name][-1]:.4g}", file=sys.stderr, flush=True)
    return results


def read_webdataset(tars: list[Path]) -> float:
    """Seconds to read every sample, grouped by key, through webdataset's tar iterator."""
    start = time.perf_counter()
    for tar in tars:
        with open(tar, "rb") as f:
            key, members = None, {}
            for item in tar_file_iterator(f):
                k, ext = base_plus_ext(item["fname"])
                if k != key:
                    key, members = k, {}
                members[ext] = item["data"]
    return time.perf_counter() - start


def read_own(tars: list[Path]) -> float:
    """Seconds to read every sample through the loader's reader."""
    start = time.perf_counter()
    for tar in tars:
        reader = _TarSamples(str(tar), "bench")
        for _, members in reader:
            reader.read(members)
        reader.close()
    return time.perf_counter() - start


def loader_rate(path: Path, batches: int) -> float:
    """Samples per second that one loader stream delivers (first batch left out: opening)."""
    manifest = load_manifest(path)
    settings = DataSettings(seed=0, global_batch=16, micro_batch=16, workers=0, shuffle_buffer=256)
    with LatentLoader(manifest, path, settings) as loader:
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * 16 / (time.perf_counter() - start)


def index_dataset(root: Path, shards: int, per_shard: int = 1000) -> tuple[Path, Path]:
    """Latent indexes (no tars: choosing a subset reads the indexes only) and a scores table."""
    rng = np.random.default_rng(0)
    keys_all = []
    for shard in range(shards):
        keys = [f"{shard:08x}{i:024x}" for i in range(per_shard)]
        keys_all += keys
        w, h = rng.integers(256, 2048, per_shard), rng.integers(256, 2048, per_shard)
        pl.DataFrame({"key": keys, "status": ["ok"] * per_shard, "reason": [None] * per_shard,
                      "detail": [None] * per_shard, "flags": [[]] * per_shard,
                      "bucket_h": [256] * per_shard, "bucket_w": [256] * per_shard,
                      "orig_w": w, "orig_h": h, "captions": [["long", "short"]] * per_shard},
                     schema_overrides={"flags": pl.List(pl.String), "bucket_h": pl.Int32, "bucket_w": pl.Int32,
                                       "orig_w": pl.Int32, "orig_h": pl.Int32}
                     ).write_parquet(root / f"{shard:06d}.parquet")
    entries = [ShardEntry(path=f"{shard:06d}.tar", samples=per_shard) for shard in range(shards)]
    spec = LatentSpec(vae="test", vae_id="test", vae_class="AutoencoderKL", channels=16, downsample=8,
                      stored="dist", dtype="bfloat16", resolution=256, buckets=[(256, 256)])
    manifest = write_manifest(Manifest(name="big", shards=entries, samples=shards * per_shard, latent=spec,
                                       captions={"long": 1.0}), root / "big.json")
    scores = root / "aesthetic.parquet"
    pl.DataFrame({"key": keys_all, "aesthetic": rng.uniform(3, 8, len(keys_all))}).write_parquet(scores)
    return manifest, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, small data")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--batches", type=int, default=100, help="16-sample batches timed per loader run")
    parser.add_argument("--index-shards", type=int, default=200, help="shards of 1000 samples for choosing")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.shards, args.per_shard, args.batches, args.index_shards = 1, 4, 200, 10, 20
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_latent_dataset(tmp / "latents", shards=args.shards, per_shard=args.per_shard, channels=16,
                                   sizes=[(32, 32)], variants=("long",), stored="dist", dtype="bfloat16")
        tars = sorted(data["latents"].glob("*.tar"))
        read_own(tars), read_webdataset(tars)  # warm the page cache
        reading = interleaved({"webdataset": lambda: read_webdataset(tars), "own": lambda: read_own(tars)},
                              args.repeats)

        paths = {"all": data["long"]}
        for fraction in ("0.5", "0.1"):
            with contextlib.redirect_stdout(io.StringIO()):
                curate_main(["manifest", str(data["long"]), "--fraction", fraction, "--name", f"f{fraction}"])
            paths[fraction] = data["long"].parent / f"f{fraction}.json"
        loading = interleaved({name: lambda p=p: loader_rate(p, args.batches) for name, p in paths.items()},
                              args.repeats)

        (tmp / "index").mkdir()
        manifest_path, scores = index_dataset(tmp / "index", args.index_shards)
        manifest = load_manifest(manifest_path)
        rules = SubsetRules(where=["orig_w >= 512 AND orig_h >= 512", "aesthetic >= 5.5"], scores=[scores],
                            fraction=0.5)

        def choose() -> float:
            start = time.perf_counter()
            subset_manifest(manifest, manifest_path, rules)
            return time.perf_counter() - start

        def read_indexes() -> float:
            start = time.perf_counter()
            latent_index_rows(manifest, manifest_path, ["key"])
            return time.perf_counter() - start

        choosing = interleaved({"indexes": read_indexes, "subset": choose}, args.repeats)

    def runs(values: list[float], fmt: str = "{:.3g}") -> str:
        return ", ".join(fmt.format(v) for v in values)

    med = {name: statistics.median(v) for name, v in {**reading, **loading, **choosing}.items()}
    samples = args.shards * args.per_shard
    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
          f"{args.repeats} repeat(s), {time.perf_counter() - started:.0f} s in all\n")
    print(f"1. Reading {samples} samples ({args.shards} shards of 16 x 32 x 32 bf16 mean and std, ~66 KB a sample):\n")
    print("| reader | seconds (median) | runs | samples/s |")
    print("| --- | --- | --- | --- |")
    for name in ("webdataset", "own"):
        print(f"| {name} | {med[name]:.3f} | {runs(reading[name])} | {samples / med[name]:.0f} |")
    print(f"\nown / webdataset, samples/s: **{med['webdataset'] / med['own']:.2f}**\n")
    print("2. One loader stream, samples delivered per second:\n")
    print("| manifest | samples/s (median) | runs | ratio to all |")
    print("| --- | --- | --- | --- |")
    for name in paths:
        label = "all samples" if name == "all" else f"--fraction {name}"
        print(f"| {label} | {med[name]:.0f} | {runs(loading[name], '{:.0f}')} | {med[name] / med['all']:.2f} |")
    million = args.index_shards * 1000 / 1e6
    print(f"\n3. Choosing a subset of {args.index_shards * 1000} samples (two --where, a --scores join, "
          "a --fraction):\n")
    print("| step | seconds (median) | runs | seconds per million samples |")
    print("| --- | --- | --- | --- |")
    for name in ("indexes", "subset"):
        print(f"| {name} | {med[name]:.3f} | {runs(choosing[name])} | {med[name] / million:.2f} |")
    print(f"\nsubset / reading the indexes once: **{med['subset'] / med['indexes']:.2f}**")


if __name__ == "__main__":
    main()
