"""A score stage's scores read at a URL (`curate manifest --scores http://...`), measured in one run
(CPU, 127.0.0.1).

A `curate score --embeddings` shard's index holds each image's CLIP embedding (768 float32, 3 KB a
sample) beside its few scores: megabytes a shard, which the readers of the scores do not need.
``curate.subset._stage_scores`` (what ``--scores`` runs on a folder) reads such a stage at a URL
served by ``tests/file_server.py`` in a process of its own, with ``--latency`` added to each answer
and each answer's body sent at ``--rate`` bytes a second at most (an object store's first byte is
tens of milliseconds away, and one request streams some 100 MB/s from S3), two ways, after one
untimed read each, interleaved ``--repeats`` times:

- ranged: what the code does, an index over ``storage.WHOLE`` (1 MiB) read by its footer and the
  columns asked for (``storage.parquet_source``; its size known from ``open_shard``);
- whole: ``storage.WHOLE`` raised past every index's size, so that each is fetched whole (what
  every read did before).

The bytes each way fetches are counted in a separate pass, by a server in this process, untimed.

    python bench/remote_index.py [--shards 32] [--per-shard 2000] [--dim 768] [--latency 0.025] [--rate 1e8]
                                 [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from curate import storage  # noqa: E402
from curate.shards import ShardWriter  # noqa: E402
from curate.subset import EMBEDDING_COLUMN, _stage_scores  # noqa: E402

SCORES = ("clip_long", "clip_short", "aesthetic")


def write_score_stage(folder: Path, shards: int, per_shard: int, dim: int) -> int:
    """A score stage's shards (indexes only, as `curate score` writes them); returns their bytes."""
    rng = np.random.default_rng(0)
    schema = {name: pl.Float32 for name in SCORES} | {EMBEDDING_COLUMN: pl.Array(pl.Float32, dim)}
    for shard_id in range(shards):
        writer = ShardWriter(folder, shard_id, schema, with_tar=False)
        embeddings = rng.standard_normal((per_shard, dim), dtype=np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        for i in range(per_shard):
            row = {name: float(rng.random()) for name in SCORES} | {EMBEDDING_COLUMN: embeddings[i].tolist()}
            writer.add(f"{shard_id:06d}{i:05d}", {}, row)
        writer.commit(stage="score", fingerprint=str(shard_id), config_hash="bench")
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def read_scores(url: str, whole: bool) -> pl.DataFrame:
    saved = storage.WHOLE
    storage.WHOLE = 1 << 62 if whole else saved
    try:
        return _stage_scores(url, "--scores")
    finally:
        storage.WHOLE = saved


def bytes_sent(root: Path, whole: bool) -> int:
    """The body bytes a server (this time in this process, which counts them) sends for one read."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from file_server import serve

    with serve(root) as server:
        read_scores(f"{server.url}/scores", whole)
        return server.bytes_sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=768, help="the embedding's width (CLIP ViT-L/14: 768)")
    parser.add_argument("--latency", type=float, default=0.025, help="seconds added to each HTTP answer")
    parser.add_argument("--rate", type=float, default=1e8, help="bytes/s of one answer's body (0: no limit)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stage_bytes = write_score_stage(root / "scores", args.shards, args.per_shard, args.dim)
        server = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "tests" / "file_server.py"),
                                   str(root), "--latency", str(args.latency), "--download-rate", str(args.rate)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split()[1] + "/scores"
            local = _stage_scores(root / "scores", "--scores")
            seconds: dict[str, list[float]] = {"ranged": [], "whole": []}
            for side in seconds:  # the connections opened, the modules imported
                read_scores(url, whole=side == "whole")
            for _ in range(args.repeats):
                for side in seconds:
                    start = time.perf_counter()
                    table = read_scores(url, whole=side == "whole")
                    seconds[side].append(time.perf_counter() - start)
                    assert table.equals(local), f"{side}: the scores read at the URL differ from the files'"
        finally:
            server.terminate()
            server.wait()

        fetched = {side: bytes_sent(root, whole=side == "whole") for side in seconds}
    med = {side: statistics.median(runs) for side, runs in seconds.items()}
    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
          f"{args.repeats} repeat(s); {args.latency * 1000:.0f} ms added to each answer, "
          f"{args.rate / 1e6:.0f} MB/s a body\n")
    print(f"A score stage of {args.shards} shards x {args.per_shard} samples ({len(SCORES)} scores and a "
          f"{args.dim}-float embedding a sample): {stage_bytes / 1e6:.1f} MB of indexes, "
          f"{stage_bytes / args.shards / 1e6:.2f} MB a shard\n")
    print("| read | seconds (median) | runs | MB fetched | share of the indexes' bytes |")
    print("| --- | ---: | --- | ---: | ---: |")
    for side in seconds:
        runs = ", ".join(f"{s:.2f}" for s in seconds[side])
        print(f"| {side} | {med[side]:.2f} | {runs} | {fetched[side] / 1e6:.1f} | {fetched[side] / stage_bytes:.2f} |")
    print(f"\nwhole / ranged: seconds **{med['whole'] / med['ranged']:.2f}x**, "
          f"bytes **{fetched['whole'] / fetched['ranged']:.1f}x**")


if __name__ == "__main__":
    main()
