"""`curate ingest SRC --out DATA/images`: raw images from anywhere into clean shards.

Each image is read, keyed by its content, decoded once to validate it and stored with its
original bytes. Per output shard: ``KEY.jpg`` (the original bytes, whatever their format:
img2dataset's convention, so every sample has the same fields), ``KEY.json`` (metadata)
and ``KEY.txt`` (the original caption, empty if none). The final pass drops duplicates that
landed in different shards, keeping the first in shard order, so the accepted samples do
not depend on how many workers ran. With ``near_duplicates`` (bits), each image's 64-bit
perceptual hash goes into the index (``phash``) and the final pass also drops, in shard order,
every image whose hash lies within that many bits of an image kept before it: re-encoded,
resized or lightly edited copies.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from curate import storage
from curate.images import ImageCheck, allow_pixels, read_and_check, read_and_check_batch
from curate.runner import ShardTask, Stage, stage_config
from curate.shards import (
    OK,
    ShardWriter,
    committed_shards,
    read_index,
    reject_samples,
    stable_hash,
    work_dir,
)
from curate.sources import FolderSource, Record, Source

log = logging.getLogger("curate")

IMAGE_FIELD = "jpg"
INDEX_SCHEMA = {
    "source": pl.Utf8,
    "width": pl.Int32,
    "height": pl.Int32,
    "format": pl.Utf8,
    "mode": pl.Utf8,
    "bytes": pl.Int64,
    "caption": pl.Utf8,
}


def _init_worker(max_pixels: int) -> None:
    from curate.procs import die_with_parent

    die_with_parent()
    allow_pixels(max_pixels)


def _batched(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ingested_in_path_order(stage: IngestStage) -> bool:
    """Whether ``stage``'s output folder holds shards that the same stage committed with its folder
    source in path order (before the spread order existed): a rerun then continues in that order
    instead of redoing every shard, and every stage after it."""
    source = stage.source
    if not isinstance(source, FolderSource) or source.order == "path":
        return False
    if isinstance(stage.out_dir, Path) and not stage.out_dir.is_dir():
        return False
    ordered = source.order
    source.order = "path"
    try:
        path_order = stable_hash(stage_config(stage))
    finally:
        source.order = ordered
    return any(shard.meta.config_hash == path_order for shard in committed_shards(stage.out_dir))


class IngestStage(Stage):
    name = "ingest"
    version = 1
    index_schema = INDEX_SCHEMA
    packages = ("kiln", "pillow", "polars", "pyarrow", "webdataset", "img2dataset", "datasets")

    def __init__(self, source: Source, out_dir: str | os.PathLike, *, shard_size: int = 1000,
                 min_side: int = 64, max_pixels: int = 89_478_485, workers: int = 1,
                 near_duplicates: int | None = None):
        if shard_size < 1 or min_side < 1 or max_pixels < 1 or workers < 1:
            raise ValueError("shard_size, min_side, max_pixels and workers must be positive")
        if near_duplicates is not None and not 0 <= near_duplicates <= MAX_NEAR_DUPLICATE_BITS:
            raise ValueError(f"near_duplicates must be 0 to {MAX_NEAR_DUPLICATE_BITS} bits, got {near_duplicates}")
        self.near_duplicates = near_duplicates
        if near_duplicates is not None:
            self.index_schema = {**INDEX_SCHEMA, "phash": pl.Int64}
        self.source = source
        self.out_dir = storage.as_location(out_dir)
        self.shard_size, self.min_side, self.max_pixels = shard_size, min_side, max_pixels
        self.workers = workers
        self.pool = None

    def config(self) -> dict[str, Any]:
        config = {"source": self.source.describe(), "shard_size": self.shard_size,
                  "min_side": self.min_side, "max_pixels": self.max_pixels}
        if self.near_duplicates is not None:  # absent when off: stages ingested before it existed stay valid
            config["near_duplicates"] = self.near_duplicates
        return config

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source.location()}

    def plan(self) -> list[ShardTask]:
        return self.source.plan(self.shard_size)

    def prepare(self, todo: list[ShardTask]) -> None:
        self.source.prepare(todo, work_dir(self.out_dir), self.workers)

    def __enter__(self) -> IngestStage:
        allow_pixels(self.max_pixels)
        if self.workers > 1:
            # spawn, not fork: polars and pyarrow hold threads that fork would copy mid-state.
            # The workers import only curate.images (PIL), so they start in a fraction of a second.
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.max_pixels,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def _checked(self, records: Iterable[Record]) -> Iterator[tuple[Record, str | None, ImageCheck | None]]:
        """(record with its bytes, key, check) in input order; with a pool, a bounded window
        of batches is in flight so that memory stays flat whatever the shard size."""

        def merge(record: Record, result: tuple) -> tuple[Record, str | None, ImageCheck | None]:
            data, key, check, error = result
            record.data, record.error = data, record.error or error
            return record, key, check

        if self.pool is None:
            for record in records:
                if record.error is not None:
                    yield record, None, None
                else:
                    yield merge(record, read_and_check(record.data, record.path, self.min_side, self.max_pixels,
                                                       self.near_duplicates is not None))
            return
        window: deque = deque()

        def drain() -> Iterator[tuple[Record, str | None, ImageCheck | None]]:
            batch, pending = window.popleft()
            results = iter(pending.get())
            for record in batch:
                yield (record, None, None) if record.error is not None else merge(record, next(results))

        for batch in _batched(records, 8):
            todo = [(r.data, r.path) for r in batch if r.error is None]
            window.append((batch, self.pool.apply_async(
                read_and_check_batch, (todo, self.min_side, self.max_pixels, self.near_duplicates is not None))))
            if len(window) >= 4 * self.workers:
                yield from drain()
        while window:
            yield from drain()

    def process(self, task: ShardTask, writer: ShardWriter, progress: Callable[[int], None]) -> None:
        first_source: dict[str, str] = {}
        for record, key, check in self._checked(self.source.records(task)):
            progress(1)
            row = {"source": record.source, "caption": record.caption,
                   "bytes": len(record.data) if record.data is not None else None}
            if record.error is not None:
                reason, detail = record.error
                writer.reject(key, reason, row=row, detail=detail)
                continue
            row.update(width=check.width, height=check.height, format=check.format, mode=check.mode)
            if self.near_duplicates is not None:
                row["phash"] = _signed(check.phash)
            if check.reason is not None:
                writer.reject(key, check.reason, row=row, detail=check.detail)
            elif key in first_source:
                writer.reject(key, "duplicate", row=row, detail=f"same bytes as {first_source[key]}")
            else:
                first_source[key] = record.source
                meta = {"key": key, **{k: v for k, v in row.items() if k != "caption"},
                        "orientation": check.orientation, "animated": check.animated,
                        "original_caption": record.caption, **({"source_meta": record.meta} if record.meta else {})}
                writer.add(key, {IMAGE_FIELD: record.data,
                                 "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode(),
                                 "txt": (record.caption or "").encode()},
                           row=row, flags=check.flags)
        self.source.done(task)

    def finalize(self, out_dir: Path | str, tasks: list[ShardTask]) -> dict[str, Any]:
        self._drop_cross_shard_duplicates(out_dir)
        if self.near_duplicates is not None:
            self._drop_near_duplicates(out_dir, self.near_duplicates)
        self.source.cleanup(work_dir(self.out_dir))
        return summarize_images(out_dir)

    def _drop_cross_shard_duplicates(self, out_dir: Path | str) -> None:
        """Keep the first accepted copy of each key in shard order; reject the later ones."""

        def first_copies(rows: dict[str, list[Any]]) -> dict[int, tuple[int, str]]:
            first: dict[str, int] = {}
            found = {}
            for i, key in enumerate(rows["key"]):
                if key in first:
                    found[i] = (first[key], f"same bytes as {rows['source'][first[key]]}")
                else:
                    first[key] = i
            return found

        _reject_in_shard_order(out_dir, "duplicate", [], first_copies)

    def _drop_near_duplicates(self, out_dir: Path | str, bits: int) -> None:
        """Reject, in shard order, every image whose hash is within ``bits`` of a kept one's.

        Greedy in a fixed order, so the result depends on neither the number of workers nor a
        kill in between: a rerun finds the same kept images (the rejected ones are no longer
        candidates either way) and rejects the rest again.
        """

        def near_copies(rows: dict[str, list[Any]]) -> dict[int, tuple[int, str]]:
            hashes = [value & _MASK64 if value is not None else None for value in rows["phash"]]
            return {i: (j, f"pHash {distance} bits from {rows['key'][j]} ({rows['source'][j]})")
                    for i, (j, distance) in near_duplicate_pairs(hashes, bits).items()}

        _reject_in_shard_order(out_dir, "near_duplicate", ["phash"], near_copies)


def _reject_in_shard_order(out_dir: Path | str, reason: str, columns: list[str],
                           earlier: Callable[[dict[str, list[Any]]], dict[int, tuple[int, str]]]) -> None:
    """Reject the accepted samples that an earlier accepted sample makes redundant, as ``reason``.

    ``earlier`` is given every shard's accepted rows in shard order (``shard``, ``key``,
    ``source`` and ``columns``, as lists) and maps each redundant row to (the earlier row, the
    detail to record). A shard that loses samples to another shard's depends on that shard, so
    that redoing it redoes this pass for them.
    """
    shards = committed_shards(out_dir)
    fingerprints = {s.shard_id: s.meta.fingerprint for s in shards}
    rows: dict[str, list[Any]] = {"shard": [], "key": [], "source": [], **{c: [] for c in columns}}
    for shard in shards:
        df = read_index(shard.index_path, columns=["key", "status", "source", *columns]).filter(pl.col("status") == OK)
        rows["shard"] += [shard.shard_id] * df.height
        for column in ("key", "source", *columns):
            rows[column] += df[column].to_list()
    owners = rows["shard"]
    rejections: dict[int, dict[str, str]] = {}
    depends: dict[int, dict[str, str]] = {}
    for i, (j, detail) in earlier(rows).items():
        rejections.setdefault(owners[i], {})[rows["key"][i]] = detail
        if owners[j] != owners[i]:
            depends.setdefault(owners[i], {})[str(owners[j])] = fingerprints[owners[j]]
    by_id = {s.shard_id: s for s in shards}
    for shard_id, found in sorted(rejections.items()):
        log.info("ingest: shard %d has %d samples rejected as %s", shard_id, len(found), reason)
        reject_samples(by_id[shard_id], found, reason, depends_on=depends.get(shard_id))


MAX_NEAR_DUPLICATE_BITS = 8
_MASK64 = (1 << 64) - 1


def _signed(value: int | None) -> int | None:
    """A 64-bit hash as parquet's Int64 holds it (two's complement)."""
    return None if value is None else value - (1 << 64) if value >= 1 << 63 else value


def near_duplicate_pairs(hashes: list[int | None], bits: int) -> dict[int, tuple[int, int]]:
    """Greedy near-duplicate search in list order: ``{i: (j, distance)}`` for every hash within
    ``bits`` (Hamming) of an earlier hash ``j`` that was itself kept (the nearest, then the first);
    ``None`` (not hashed) is never a near-duplicate.

    Two 64-bit hashes within ``bits`` of each other agree exactly on at least one of ``bits + 1``
    disjoint blocks of their bits (pigeonhole). So, block by block, the hashes are sorted by that
    block and only neighbours in a run of equal blocks are compared, in numpy: the work is the
    number of such candidate pairs, about ``n^2 (bits + 1) / 2^(64 / (bits + 1) + 1)`` for
    unrelated hashes, not ``n^2 / 2``. The greedy pass then runs over the close pairs alone.
    """
    import numpy as np

    index = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)
    values = np.array([hashes[i] for i in index], dtype=np.uint64)
    firsts, seconds, distances = [], [], []
    blocks = bits + 1
    bounds = [round(k * 64 / blocks) for k in range(blocks + 1)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        block = (values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(block, kind="stable")  # within a run of equal blocks, in list order
        block = block[order]
        active = np.arange(len(order) - 1)  # positions p whose run may reach p + offset
        offset = 1
        while active.size:
            active = active[block[active] == block[active + offset]]
            first, second = order[active], order[active + offset]
            distance = _popcount(values[first] ^ values[second])
            close = distance <= bits
            firsts.append(first[close])
            seconds.append(second[close])
            distances.append(distance[close])
            offset += 1
            active = active[active + offset < len(order)]
    if not firsts:
        return {}
    pairs = np.unique(np.stack([np.concatenate(seconds), np.concatenate(distances).astype(np.int64),
                                np.concatenate(firsts)], axis=1), axis=0)  # by later hash, distance, earlier
    kept = np.ones(len(values), dtype=bool)
    found: dict[int, tuple[int, int]] = {}
    for later, distance, earlier in pairs.tolist():
        if kept[later] and kept[earlier]:  # earlier < later: its fate is already decided
            kept[later] = False
            found[int(index[later])] = (int(index[earlier]), int(distance))
    return found


def _popcount(x: Any) -> Any:
    import numpy as np

    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[np.ascontiguousarray(x).view(np.uint8).reshape(-1, 8)].sum(1)


def summarize_images(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """Formats, modes and sizes of the accepted images (for _stage.json and `curate stats`)."""
    paths = [str(s.index_path) for s in committed_shards(stage_dir)]
    if not paths:
        return {}
    columns = ["status", "format", "mode", "width", "height", "bytes"]
    if storage.is_remote(stage_dir):  # fetched many at a time
        rows = pl.concat(list(storage.parallel_map(lambda p: read_index(p, columns=columns), paths, True))).lazy()
    else:
        rows = pl.scan_parquet(paths)
    ok = rows.filter(pl.col("status") == OK).select(columns[1:]).collect()
    if ok.height == 0:
        return {"images": 0}

    def counts(column: str) -> dict[str, int]:
        vc = ok[column].fill_null("?").value_counts(sort=True)
        return {str(k): int(v) for k, v in vc.iter_rows()}

    def quantiles(column: str) -> dict[str, float]:
        s = ok[column].cast(pl.Float64)
        return {"min": s.min(), "p50": s.quantile(0.5), "p95": s.quantile(0.95), "max": s.max()}

    short_side = ok.select(pl.min_horizontal("width", "height").alias("short"))["short"]
    return {
        "images": ok.height,
        "formats": counts("format"),
        "modes": counts("mode"),
        "short_side": {"min": short_side.min(), "p50": short_side.quantile(0.5), "max": short_side.max()},
        "megapixels_p50": round(float((ok["width"] * ok["height"]).quantile(0.5)) / 1e6, 3),
        "bytes": quantiles("bytes"),
        "total_bytes": int(ok["bytes"].sum()),
    }
