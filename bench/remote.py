"""Training from shards at URLs (`curate/storage.py`), measured in one run (CPU, 127.0.0.1).

The same shards read from their files, and from a real HTTP server on 127.0.0.1 that answers range
requests (``tests/file_server.py``, in a process of its own) with ``--latencies`` added to each answer: an object store's
first byte is tens of milliseconds away (S3 in-region: 10-100 ms). Latents are FLUX.2's at 256 px
as ``curate encode-latents`` stores them (32 x 32 x 32, mean and std in bf16: 131 KB a sample).

1. One reader walking every shard forward (``train.data._TarSamples``, what a stream does):
   samples/s against the files, and the bytes the server sent over the tars' bytes (goal: 1.00,
   every byte fetched once however the reads fall across chunks).
2. The trainer's loader (``train.data.LatentLoader``, ``--workers`` DataLoader processes, 32
   samples a step): samples/s after the first step, against the files. Goal: more than a GPU
   consumes at 100 ms (a compiled PRX-1.2B step on an H100 takes 256 samples/s, BENCHMARKS.md).
3. ``curate encode-latents``' image loader (``curate.buckets.ShardImageLoader``, ``--workers``
   processes) over an image stage of 256 px noise JPEGs: images/s decoded and cropped, each worker
   fetching its own samples at their index offsets (``curate.shards.owned_samples``), against the
   files; and the bytes the server sent over the tars' bytes (goal 1.00: each image fetched once).
4. ``curate recaption``'s and ``curate score``'s image reader (``curate.images.ImageStream``,
   ``--workers`` processes) over the same image stage: images/s decoded
   and fitted to recaption's default 802,816 pixels, each worker fetching its chunks of 8
   consecutive samples in one request (the default), against a request per image (chunks of 1),
   16 images ahead per worker in both.
5. A stage writing its shards to a URL (``--out http://...``, what a worker on a machine without
   a shared folder does): the runner (``curate.runner.run_stage``) with a stage that only writes
   part 1's latent samples, 8 shards, so that its rate is the ceiling that writing puts on any
   stage: samples/s and MB/s into a local folder and uploaded to the server (each shard staged
   locally, then its tar and index PUT while the next shards are made), with 4 shards uploaded at
   once (the default, ``curate.runner.UPLOADS``) against one at a time.

Configurations run interleaved, ``--repeats`` times; tables give the median and every run.

    python bench/remote.py [--quick] [--repeats 3] [--steps 40] [--workers 2] [--latencies 0,0.025,0.1]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from file_server import serve  # noqa: E402
from latent_data import add_image_stage, make_latent_dataset  # noqa: E402

from curate import runner  # noqa: E402
from curate.buckets import ShardImageLoader  # noqa: E402
from curate.images import ImageStream, fit_pixels  # noqa: E402
from curate.manifest import load_manifest  # noqa: E402
from curate.runner import ShardTask, Stage, run_stage  # noqa: E402
from curate.shards import index_of, iter_tar_samples, read_index  # noqa: E402
from train.data import DataSettings, LatentLoader, _TarSamples  # noqa: E402

BATCH = 32
SHARDS = 8
IMAGES_PER_SHARD = 256
STREAM_CHUNKS = (8, 1)
UPLOADS = (4, 1)


def walk_rate(tars: list[str]) -> float:
    """Samples per second reading every sample of ``tars`` in order, as a stream reads them."""
    start, samples = time.perf_counter(), 0
    for tar in tars:
        reader = _TarSamples(tar, "bench")
        for _, members in reader:
            reader.read(members)
            samples += 1
        reader.close()
    return samples / (time.perf_counter() - start)


def loader_rate(manifest_path: str, steps: int, workers: int) -> float:
    """Samples per second over ``steps`` steps after the first."""
    manifest = load_manifest(manifest_path)
    settings = DataSettings(seed=0, global_batch=BATCH, micro_batch=BATCH, workers=workers, shuffle_buffer=256)
    with LatentLoader(manifest, manifest_path, settings) as loader:
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        return steps * BATCH / (time.perf_counter() - start)


def decode_rate(tars: list[str], workers: int) -> float:
    """Images per second through encode-latents' loader (decoded, cropped to 256 px)."""
    start, images = time.perf_counter(), 0
    loader = ShardImageLoader(list(enumerate(tars)), resolution=256, workers=workers)
    for _, _, tensor, record in loader:
        assert tensor is not None, record
        images += 1
    loader.close()
    return images / (time.perf_counter() - start)


def stream_rate(tars: list[str], counts: list[int], workers: int, chunk: int) -> float:
    """Images per second through recaption's and score's reader, fitted as recaption fits them,
    16 images decoded ahead per worker whatever the chunk."""
    start = time.perf_counter()
    stream = ImageStream(list(enumerate(tars)), functools.partial(fit_pixels, max_pixels=802_816), workers,
                         prefetch=max(1, 16 // chunk), chunk=chunk)
    for shard_id, count in enumerate(counts):
        for key, image, error in stream.take(shard_id, count):
            assert image is not None, (key, error)
    stream.close()
    return sum(counts) / (time.perf_counter() - start)


class CopyStage(Stage):
    """Writes the given samples again, shard by shard: a stage whose only work is its output."""

    name = "copy"

    def __init__(self, shards: list[list[tuple[str, dict[str, bytes]]]]):
        self.shards = shards

    def plan(self) -> list[ShardTask]:
        return [ShardTask(i, str(i), len(samples)) for i, samples in enumerate(self.shards)]

    def process(self, task, writer, progress) -> None:
        for key, members in self.shards[task.shard_id]:
            writer.add(key, members)
        progress(task.num_inputs)


def write_rate(stage: CopyStage, out: str, uploads: int) -> float:
    """Samples per second of the whole stage, from its plan to its _stage.json."""
    runner.UPLOADS = uploads
    start = time.perf_counter()
    result = run_stage(stage, out, progress=False)
    assert result.complete
    return sum(len(s) for s in stage.shards) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, few steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help=f"timed loader steps of {BATCH} samples")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--latencies", default="0,0.025,0.1", help="seconds added to each HTTP answer")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 8
    latencies = [float(x) for x in args.latencies.split(",")]
    sides = ["files", *(f"HTTP, {latency * 1000:.0f} ms" for latency in latencies)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_shard = 256
        data = make_latent_dataset(root, shards=SHARDS, per_shard=per_shard, channels=32, sizes=[(32, 32)],
                                   variants=("long",), stored="dist", dtype="bfloat16")
        tars = sorted(str(p) for p in data["latents"].glob("*.tar"))
        tar_bytes = sum(os.path.getsize(t) for t in tars)
        walk_rate(tars)  # the page cache, for both sides
        walks: dict[str, list[float]] = {side: [] for side in sides}
        loads: dict[str, list[float]] = {side: [] for side in sides}
        decodes: dict[str, list[float]] = {side: [] for side in sides}
        streams: dict[int, dict[str, list[float]]] = {chunk: {side: [] for side in sides} for chunk in STREAM_CHUNKS}
        writes: dict[int, dict[str, list[float]]] = {n: {side: [] for side in sides} for n in UPLOADS}
        copy = CopyStage([[(key, {"latent.safetensors": members["latent.safetensors"]})
                           for key, members in iter_tar_samples(t)] for t in tars])
        stage = make_latent_dataset(root / "stage", shards=4, per_shard=IMAGES_PER_SHARD, channels=16, sizes=[(32, 32)],
                                    variants=("long",))
        image_tars = sorted(str(p) for p in add_image_stage(stage).glob("*.tar"))
        image_bytes = sum(os.path.getsize(t) for t in image_tars)
        decode_rate(image_tars, args.workers)  # the page cache
        stream_counts = [len(read_index(index_of(t)).filter(pl.col("status") == "ok")) for t in image_tars]
        # Every byte fetched once: counted by a server in this process.
        with serve(root) as server:
            walk_rate([f"{server.url}/{Path(t).relative_to(root)}" for t in tars])
            sent = server.bytes_sent / tar_bytes
            decode_rate([f"{server.url}/{Path(t).relative_to(root)}" for t in image_tars], args.workers)
            image_sent = sum(server.sent[f"/{Path(t).relative_to(root)}"] for t in image_tars) / image_bytes
        # Timed against servers of their own processes (one in this one would share its GIL).
        servers = {side: subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "tests" / "file_server.py"),
                                           str(root), "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
                   for side, latency in zip(sides[1:], latencies, strict=True)}
        try:
            urls = {"files": (tars, str(data["long"]), image_tars)}
            bases = {"files": str(root)}
            for side, process in servers.items():
                base = bases[side] = process.stdout.readline().split()[1]
                urls[side] = ([f"{base}/{Path(t).relative_to(root)}" for t in tars],
                              f"{base}/{data['long'].relative_to(root)}",
                              [f"{base}/{Path(t).relative_to(root)}" for t in image_tars])
            for _ in range(args.repeats):
                for side in sides:
                    walks[side].append(walk_rate(urls[side][0]))
                    loads[side].append(loader_rate(urls[side][1], args.steps, args.workers))
                    decodes[side].append(decode_rate(urls[side][2], args.workers))
                    for chunk in STREAM_CHUNKS:
                        streams[chunk][side].append(stream_rate(urls[side][2], stream_counts, args.workers, chunk))
                    for n in UPLOADS:
                        writes[n][side].append(write_rate(copy, f"{bases[side]}/written", n))
                        shutil.rmtree(root / "written")
                    print(f"  {side}: walk {walks[side][-1]:.0f}, loader {loads[side][-1]:.0f} samples/s, "
                          f"images {decodes[side][-1]:.0f}/s, stream "
                          f"{', '.join(f'{streams[c][side][-1]:.0f}' for c in STREAM_CHUNKS)}/s, "
                          f"written {', '.join(f'{writes[n][side][-1]:.0f}' for n in UPLOADS)} samples/s",
                          file=sys.stderr, flush=True)
        finally:
            for process in servers.values():
                process.kill()
                process.wait()

    def paired(where: str, what: str, configs: tuple[int, int], rates: dict[int, dict[str, list[float]]]) -> None:
        first, second = configs
        print(f"| {where} | {what.format(first)} (median) | each run | {what.format(second)} | each run | "
              f"{first} against {second} |")
        print("| --- | ---: | --- | ---: | --- | ---: |")
        for side in sides:
            a, b = rates[first][side], rates[second][side]
            print(f"| {side} | {statistics.median(a):.0f} | {', '.join(f'{v:.0f}' for v in a)} | "
                  f"{statistics.median(b):.0f} | {', '.join(f'{v:.0f}' for v in b)} | "
                  f"{statistics.median(a) / statistics.median(b):.2f} |")

    def table(rates: dict[str, list[float]]) -> None:
        med = {side: statistics.median(v) for side, v in rates.items()}
        print("| read from | samples/s (median) | each run | against the files |")
        print("| --- | ---: | --- | ---: |")
        for side, values in rates.items():
            print(f"| {side} | {med[side]:.0f} | {', '.join(f'{v:.0f}' for v in values)} | "
                  f"{med[side] / med['files']:.2f} |")

    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
          f"{SHARDS} shards of {per_shard} samples, {tar_bytes / SHARDS / per_shard / 1000:.0f} KB a sample; "
          f"{args.repeats} repeat(s), {time.perf_counter() - started:.0f} s in all\n")
    print("1. One reader walking every shard forward:\n")
    table(walks)
    print(f"\nbytes the server sent / bytes of the tars (a walk at 0 ms): {sent:.4f}\n")
    print(f"2. The loader, {args.workers} DataLoader workers, {BATCH} samples a step:\n")
    table(loads)
    print(f"\n3. encode-latents' image loader, {args.workers} workers, {len(image_tars)} shards of {IMAGES_PER_SHARD} noise JPEGs "
          f"({image_bytes / len(image_tars) / IMAGES_PER_SHARD / 1000:.0f} KB an image) to 256 px:\n")
    table(decodes)
    print(f"\nbytes the server sent / bytes of the image tars (0 ms): {image_sent:.4f}")

    print(f"\n4. recaption's and score's image reader, {args.workers} workers, the same image shards fitted to "
          "802,816 pixels:\n")
    paired("read from", "chunks of {}: images/s", STREAM_CHUNKS, streams)

    sample_mb = tar_bytes / SHARDS / per_shard / 1e6
    print(f"\n5. A stage's output written by the runner, {SHARDS} shards of {per_shard} latent samples "
          f"({tar_bytes / SHARDS / 1e6:.0f} MB a shard), into a folder or uploaded:\n")
    paired("written to", "{} uploads at once: samples/s", UPLOADS, writes)
    print("\nMB/s (medians, 4 uploads at once): " + ", ".join(
        f"{side} {statistics.median(v) * sample_mb:.0f}" for side, v in writes[UPLOADS[0]].items()))


if __name__ == "__main__":
    main()
