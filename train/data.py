"""Training data: one item per optimizer step, micro-batches of latents and captions from a manifest.

The batch sequence is a pure function of (seed, manifest, global_batch, micro_batch, workers,
shuffle_buffer): not of the number of ranks, and not of where a run was resumed. That is
what makes a 2-GPU run see exactly the batches of a 1-GPU run with gradient accumulation,
and what lets a checkpoint resume with nothing but its step number.

How (the terms the code uses):

- A step consumes ``slots = global_batch / micro_batch`` micro-batches; rank ``r`` of ``W``
  owns slots ``[r * accum, (r + 1) * accum)`` with ``accum = slots / W``.
- ``k = max(workers, 1)`` loader processes per rank. There are ``S = slots * k`` independent
  *streams*, stream ``j = slot * k + phase``. The micro-batch of slot ``q`` at step ``s`` is
  batch number ``s // k`` of stream ``(q, s % k)``. Worker ``w`` serves the steps with phase
  ``(start_step + w) % k``, so every stream is read by exactly one process, sequentially.
- A stream is an infinite sequence of micro-batches planned from metadata only (each
  shard's parquet index: its ok keys in tar order and their buckets), one *stream epoch*
  after another. Epoch ``e`` orders the shards by a permutation seeded from (seed, e), the
  same for all streams. With at least ``S`` shards, stream ``j`` takes ``order[j::S]``;
  with fewer, every stream walks all shards and keeps the samples whose position in the
  epoch's concatenation is ``j`` modulo ``S`` (each stream then reads every shard). Streams
  with fewer shards (S not dividing their number) begin their next epoch sooner: one epoch's
  worth of steps is not exactly each sample once, though a run draws every sample alike.
- Shuffling is a *block* shuffle: the stream's samples of an epoch are cut into blocks of
  ``shuffle_buffer`` samples and each block is permuted (seeded from seed, e, j, block).
  Memory is one block per stream, not the dataset; samples move at most one block away
  from their shard neighbours, so a shard should sample the whole dataset (ingest spreads a
  folder's images over the shards by a hash of their path; URL lists, tars and datasets keep
  their order, so shuffle one that is sorted).
- Bucket batching: every bucket shape has a pending list; a sample joins its bucket's list
  and a full list (``micro_batch`` samples) is emitted. Pending lists carry over block and
  epoch boundaries, so a stream with fewer samples per epoch than a micro-batch still yields.
- Per sample, from (seed, stream epoch, key): the caption variant (drawn with the manifest's
  ``captions`` weights, with fallbacks when a sample lacks it) and, for ``stored: dist``
  latents, a fresh draw ``mean + std * eps`` (a new one every epoch).
- A merged manifest (``parts``) is planned like any other: its shards are one list, a part
  repeated ``r`` times lists its shards ``r`` times. A sample draws its caption by its part's
  weights, and the ``c``-th listing (c > 0) of a shard seeds its samples' draws from
  (seed, epoch, key, c), so that the copies of a repeated sample differ.
- A manifest's subset (``curate manifest --where ...``) is planned over the samples it uses: a
  shard's count is its entry's ``samples``, and the n-th sample the plan takes from a shard is the
  n-th used one, whose place in the tar the entry's mask gives; the reader reads past the others.
- Resuming at batch ``n`` of a stream replays the metadata plan to ``n`` (no tar reading),
  then reads the current block from the shard holding its first unread sample and re-reads
  the pending carry-over samples from their shards.

Tars are read forward, header by header, with webdataset's grouping of members into samples
(``_TarSamples``); a sample's bytes are read only when the plan uses it, and a stream that passes
over samples (a subset's unused ones, a resume) seeks to the next one it uses by the offsets its
index records (``tar_offset``; shards written before indexes had them are walked instead).
Every key read is checked against the index (a shard rewritten after planning is an error naming it, never a silent
reshuffle). ``check_data`` validates the whole dataset before the first step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate import storage
from curate.buckets import IMAGE_MEMBER, preprocess
from curate.manifest import (
    Manifest,
    ManifestError,
    ShardEntry,
    part_captions,
    shard_parts,
    shard_urls,
    verify_shards,
)
from curate.procs import die_with_parent
from curate.shards import OK, ShardError, index_of, read_meta, stable_hash
from curate.vae import model_channels, model_downsample, sample_latent, to_model_input

__all__ = [
    "DATA_ORDER_VERSION",
    "DataError",
    "DataSettings",
    "DataSummary",
    "LatentLoader",
    "MicroBatch",
    "StepBatch",
    "check_data",
    "fingerprint",
    "fingerprint_diff",
    "first_samples",
    "sample_seed",
]


# Bumped whenever the planning or per-sample randomness changes: a checkpoint made with another
# version would resume onto a different batch sequence.
DATA_ORDER_VERSION = 1

# Domain tags keep the RNG streams of shard order and block shuffles independent.
_SHARD_ORDER, _BLOCK_SHUFFLE = 0, 1
# Per-shard index metadata kept by one loader process; the plan touches a stream's shards in
# order, so a small LRU holds everything in use.
_INDEX_CACHE = 64

FALLBACKS = ("renormalised", "other_variant", "empty")


class DataError(ValueError):
    """Training data that cannot be used; the message names the shard (or setting) and the problem."""


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class DataSettings:
    """What decides the batch sequence (all but prefetch and pin_memory) and how it is loaded."""

    seed: int
    global_batch: int  # samples per optimizer step, over all ranks
    micro_batch: int  # samples per forward pass
    workers: int = 2  # DataLoader processes per rank; part of the data order (streams)
    shuffle_buffer: int = 1000  # block size of the block shuffle, in samples per stream
    sample_latents: bool = True  # stored "dist": draw mean + std * eps (else use the mean)
    prefetch: int = 2  # steps each worker prepares ahead
    pin_memory: bool = False
    # PRXPipeline's prompt cleaning (curate.text.clean_caption) done here, in the workers: it
    # costs 65-260 us per caption, too much for the training process at a global batch of 256.
    clean_captions: bool = False

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise DataError(f"data seed must be >= 0, got {self.seed}")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise DataError(f"global_batch ({self.global_batch}) and micro_batch "
                            f"({self.micro_batch}) must be positive")
        if self.global_batch % self.micro_batch:
            raise DataError(f"global_batch {self.global_batch} is not divisible by micro_batch "
                            f"{self.micro_batch}")
        if self.workers < 0 or self.shuffle_buffer < 1 or self.prefetch < 1:
            raise DataError(f"workers must be >= 0, shuffle_buffer and prefetch >= 1 (got "
                            f"{self.workers}, {self.shuffle_buffer}, {self.prefetch})")

    @property
    def slots(self) -> int:
        """Micro-batches per optimizer step, over all ranks."""
        return self.global_batch // self.micro_batch

    @property
    def streams_per_slot(self) -> int:
        """``k``: one stream per loader process (the main process when workers is 0)."""
        return max(self.workers, 1)

    @property
    def streams(self) -> int:
        return self.slots * self.streams_per_slot

    def accum(self, world_size: int) -> int:
        """Micro-batches per rank and step; the slots must split evenly over the ranks."""
        if self.slots % world_size:
            raise DataError(f"global_batch {self.global_batch} / micro_batch {self.micro_batch} = "
                            f"{self.slots} micro-batches per step cannot be split evenly over "
                            f"{world_size} ranks")
        return self.slots // world_size


@dataclass
class MicroBatch:
    """One forward pass worth of samples, all of one bucket shape."""

    latents: torch.Tensor  # [B, model channels, h, w] float32, already through to_model_input
    captions: list[str]
    keys: list[str]
    variants: list[str]  # the caption variant used per sample ("" when no caption was found)
    fallbacks: dict[str, int] = field(default_factory=dict)  # FALLBACKS kind -> samples
    cleaned: bool = False  # captions already through curate.text.clean_caption
    # Precomputed text embeddings (a manifest with text shards), else None: [B, max_tokens, dim] in
    # the stored dtype, each caption's valid tokens first and zeros after, and the mask [B, max_tokens]
    # of those tokens. A sample without a caption ("") has an all-False mask: the trainer gives it the
    # empty prompt's embedding, as it does to dropped captions.
    context: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    # The samples' images as encode-latents cropped them for the VAE, uint8 [B, 3, H, W], when the
    # loader was given the image stage (REPA's teacher sees them), else None.
    images: torch.Tensor | None = None

    def pin_memory(self) -> MicroBatch:
        # DataLoader(pin_memory=True) calls this on objects it does not know.
        pinned = {name: getattr(self, name).pin_memory() for name in ("latents", "context", "context_mask", "images")
                  if getattr(self, name) is not None}
        return dataclasses.replace(self, **pinned)


@dataclass
class StepBatch:
    """Everything one rank consumes in one optimizer step: its ``accum`` micro-batches in slot order."""

    step: int
    micro: list[MicroBatch]

    def pin_memory(self) -> StepBatch:
        return StepBatch(self.step, [m.pin_memory() for m in self.micro])


@dataclass(frozen=True)
class DataSummary:
    samples: int
    shards: int
    buckets: dict[tuple[int, int], int]  # (height, width) in pixels -> samples
    model_channels: int
    captions: dict[str, int]  # caption variant -> samples whose index lists it
    streams: int | None  # S, when settings were given
    notes: list[str]


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """The seed of one sample's caption choice and latent draw in one stream epoch (63 bits)."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fingerprint(settings: DataSettings, manifest: Manifest) -> dict[str, Any]:
    """Everything that decides the batch sequence, for a checkpoint to refuse a resume that
    would silently train on another order. World size, prefetch and pin_memory are absent on
    purpose: they do not change it."""
    # A shard's subset joins its entry only when there is one, so that checkpoints made before subsets
    # existed keep their fingerprint.
    shards = [(s.sha256 or s.path, s.samples) if s.subset is None else (s.sha256 or s.path, s.samples, s.subset.mask)
              for s in manifest.shards]
    return {
        "data_order": DATA_ORDER_VERSION,
        "seed": settings.seed,
        "global_batch": settings.global_batch,
        "micro_batch": settings.micro_batch,
        "streams_per_slot": settings.streams_per_slot,  # workers 0 and 1 give the same order
        "shuffle_buffer": settings.shuffle_buffer,
        "sample_latents": settings.sample_latents,
        "captions": dict(manifest.captions),
        "shards": stable_hash(shards),
        "latent": stable_hash(manifest.latent.model_dump(mode="json")),
        # A merged manifest's parts draw their captions by their own weights (absent otherwise, so
        # that the fingerprints of checkpoints made before merging existed still match).
        **({"part_captions": part_captions(manifest)} if manifest.parts is not None else {}),
    }


def fingerprint_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields that differ, as ``name: saved -> current`` lines (empty when resumable)."""
    return [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]


# --------------------------------------------------------------------------- shards and their indexes


def _streams_note(manifest: Manifest, settings: DataSettings, source: str) -> str | None:
    """Refuse a dataset too small for the streams; say when streams outnumber shards (every
    stream then reads every shard and keeps its share of the samples)."""
    streams = settings.streams
    nonempty = sum(1 for s in manifest.shards if s.samples > 0)
    if nonempty >= streams:
        return None
    if manifest.samples < streams:
        raise DataError(f"{source}: {manifest.samples} samples cannot feed {streams} streams "
                        "(global_batch / micro_batch x max(workers, 1)); use fewer workers or a "
                        "larger micro-batch")
    return (f"{nonempty} shards for {streams} streams: every stream reads every shard and keeps "
            f"1/{streams} of its samples (more shards read less)")


def _shard_paths(
    manifest: Manifest, manifest_path: str | os.PathLike, allow_pipe: bool, text: bool = False
) -> list[str]:
    """The tars (``text``: the text shards), local paths or URLs (``curate.storage``); ``pipe:``
    URLs are refused because the plan needs the index beside every tar."""
    try:
        urls = shard_urls(manifest, manifest_path, allow_pipe=allow_pipe, text=text)
    except ManifestError as e:
        raise DataError(str(e)) from None
    paths = []
    entries = manifest.text.shards if text and manifest.text else manifest.shards
    for i, (entry, url) in enumerate(zip(entries, urls, strict=True)):
        if url.startswith("pipe:"):
            raise DataError(
                f"{manifest_path}: shard {i} ({entry.path}) is a pipe: URL; training reads files or "
                "URLs (the batch plan is made from the parquet index beside each tar): point the "
                "manifest at the files, or at their URLs (s3://, gs://, https://...)")
        paths.append(storage.local_path(url))
    return paths


ImageStages = str | os.PathLike | list[str] | list[os.PathLike] | list[str | os.PathLike]


def image_shard_paths(manifest: Manifest, images: ImageStages) -> list[str]:
    """The image stage's tar of every latent shard (stages keep their input's shard ids); ``images``:
    the stage, or one per part of a merged manifest (``curate.manifest.image_stages``)."""
    stages = list(images) if isinstance(images, list) else [images] * len(part_captions(manifest))
    if len(stages) != len(part_captions(manifest)):
        raise DataError(f"{len(stages)} image stages given for the {len(part_captions(manifest))} parts of "
                        f"manifest {manifest.name!r}")
    return [storage.join(stages[part], os.path.basename(entry.path))
            for part, entry in zip(shard_parts(manifest), manifest.shards, strict=True)]


def _bucket_code(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (h.astype(np.int64) << 32) | w.astype(np.int64)


def _bucket_hw(code: int) -> tuple[int, int]:
    return code >> 32, code & 0xFFFFFFFF


@dataclass(frozen=True)
class _ShardInfo:
    keys: list[str]  # ok keys in tar order
    buckets: np.ndarray  # int64 bucket codes (pixels), parallel to keys
    used: np.ndarray  # int64 positions in keys of the samples the manifest uses (a subset's, or all)
    # Each ok sample's byte offset in the tar and, with text shards, in its text shard: what lets
    # the reader seek to a sample rather than walk to it; None for shards written before indexes
    # recorded them.
    offsets: np.ndarray | None = None
    text_offsets: np.ndarray | None = None
    has_text: bool = False

    @property
    def seekable(self) -> bool:
        return self.offsets is not None and (self.text_offsets is not None or not self.has_text)


class _ShardTable:
    """The plan's view of the data: the non-empty shards in manifest order (empty ones can never
    yield, and leaving them out means every stream owns at least one sample when shards >= S),
    their ok counts from the manifest, and keys and buckets read from the indexes on demand."""

    def __init__(self, manifest: Manifest, paths: list[str], source: str, text_paths: list[str] | None = None,
                 image_paths: list[str] | None = None):
        keep = [i for i, s in enumerate(manifest.shards) if s.samples > 0]
        self.paths = [paths[i] for i in keep]
        self.labels = [f"{source}: shard {i} ({manifest.shards[i].path})" for i in keep]
        # Text shard i holds shard i's samples in the same order (curate encode-text).
        self.text_paths = [text_paths[i] for i in keep] if text_paths is not None else None
        # Image shard i holds shard i's samples in the same order, among others (ingest's shard,
        # whose images encode-latents rejected or skipped are not in the latent shard).
        self.image_paths = [image_paths[i] for i in keep] if image_paths is not None else None
        # The samples used of each shard: all its accepted ones, or the subset's (curate manifest --where).
        self.counts = np.array([manifest.shards[i].samples for i in keep], dtype=np.int64)
        self.entries = [manifest.shards[i] for i in keep]
        # The caption selection of each shard's part (a merged manifest's datasets keep their own).
        selections, part_of = part_captions(manifest), shard_parts(manifest)
        self.captions = [selections[part_of[i]] for i in keep]
        # A merged manifest lists a repeated dataset's shards several times: copy c > 0 of a shard
        # draws its own captions and latents (its samples would otherwise repeat them within an epoch).
        seen: Counter[str] = Counter()
        self.copy = []
        for i in keep:
            self.copy.append(seen[manifest.shards[i].path])
            seen[manifest.shards[i].path] += 1
        self._cache: OrderedDict[int, _ShardInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def info(self, i: int) -> _ShardInfo:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        index = index_of(self.paths[i])
        # pyarrow without threads, not polars: this runs in forked DataLoader workers, and polars'
        # thread pool, started in the parent (check_data, the curate stages), deadlocks after fork.
        try:
            ok = _ok_rows(index, ["key", "bucket_h", "bucket_w"])
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.labels[i]}: cannot read its index {index}: {e}") from e
        text_offsets = None
        if self.text_paths is not None:
            try:
                text_offsets = _offsets(_ok_rows(index_of(self.text_paths[i]), []), self.entries[i].accepted)
            except (OSError, pa.ArrowException):
                pass  # the reader names an unreadable text shard when it opens it
        if ok.num_rows != self.entries[i].accepted:
            raise DataError(f"{self.labels[i]}: its index lists {ok.num_rows} ok samples but the "
                            f"manifest says {self.entries[i].accepted}: the shard changed after the manifest "
                            "was written")
        if ok["bucket_h"].null_count or ok["bucket_w"].null_count:
            raise DataError(f"{self.labels[i]}: ok samples without a bucket in {index}")
        info = _ShardInfo(ok["key"].to_pylist(),
                          _bucket_code(ok["bucket_h"].to_numpy(), ok["bucket_w"].to_numpy()),
                          self.entries[i].positions(), _offsets(ok, self.entries[i].accepted), text_offsets,
                          has_text=self.text_paths is not None)
        self._cache[i] = info
        if len(self._cache) > _INDEX_CACHE:
            self._cache.popitem(last=False)
        return info


def _ok_rows(index: str, columns: list[str]) -> pa.Table:
    """The ok rows of an index: ``columns``, and ``tar_offset`` when the index records it (read in
    the same pass). pyarrow without threads: see ``_ShardTable.info``."""
    source = storage.parquet_source(index)  # fetched once at a URL, however many reads follow
    offsets = ["tar_offset"] if "tar_offset" in pq.read_schema(source).names else []
    table = pq.read_table(source, columns=[*columns, "status", *offsets], use_threads=False)
    return table.filter(pc.equal(table["status"], OK))


def _offsets(ok: pa.Table, accepted: int) -> np.ndarray | None:
    """The ok samples' byte offsets in their tar (``_ok_rows``), or None when the index does not
    record them all (written before indexes did) or lists another number of samples."""
    if "tar_offset" not in ok.column_names or ok["tar_offset"].null_count or ok.num_rows != accepted:
        return None
    return ok["tar_offset"].to_numpy()


# --------------------------------------------------------------------------- the plan (metadata only)


class _Ref(NamedTuple):
    """One planned use of a sample: unique within a stream (a sample recurs once per epoch)."""

    epoch: int
    seq: int  # position in the stream's sequence for the epoch, i.e. tar reading order
    shard: int  # index into the _ShardTable
    ordinal: int  # position among the shard's ok samples, which is its position in the tar (used or not)
    bucket: int  # bucket code (pixels)


class _Plan:
    """Stream ``j``'s micro-batches as lists of refs, from the indexes alone (no tar reading)."""

    def __init__(self, table: _ShardTable, j: int, n_streams: int, seed: int, shuffle_buffer: int,
                 micro_batch: int):
        self.table, self.j, self.n_streams = table, j, n_streams
        self.seed, self.buffer, self.micro = seed, shuffle_buffer, micro_batch
        self.epoch = -1
        self.count = 0  # samples of this stream in the current epoch
        self.next_block = 0
        self.block: list[_Ref] = []  # the current block, permuted
        self.pos = 0  # refs of the block already added to pending lists
        self.pending: dict[int, list[_Ref]] = {}  # bucket code -> refs waiting for a full batch
        self.emitted = 0

    def _start_epoch(self) -> None:
        self.epoch += 1
        n, S, j = len(self.table), self.n_streams, self.j
        order = np.random.default_rng([self.seed, _SHARD_ORDER, self.epoch]).permutation(n)
        if n >= S:
            shards, stride, offset = order[j::S], 1, 0
        else:
            shards, stride, offset = order, S, j
        counts = self.table.counts[shards]
        total = int(counts.sum())
        self.count = total if stride == 1 else max(0, math.ceil((total - offset) / stride))
        if self.count == 0:
            # Never spin over empty epochs looking for a batch that cannot come.
            raise DataError(f"stream {j} of {S} gets no sample in epoch {self.epoch} ({total} samples "
                            f"in {n} non-empty shards): the dataset needs at least {S} samples "
                            "(global_batch / micro_batch x max(workers, 1) streams); use fewer "
                            "workers or a larger micro-batch")
        self.shards, self.stride, self.offset = shards, stride, offset
        self.shard_counts, self.cum = counts, np.cumsum(counts)
        self.next_block = 0

    def _new_block(self) -> list[_Ref]:
        """Start the next block; returns its refs in sequence (tar) order."""
        if self.epoch < 0 or self.next_block * self.buffer >= self.count:
            self._start_epoch()
        b = self.next_block
        self.next_block += 1
        seq = np.arange(b * self.buffer, min((b + 1) * self.buffer, self.count), dtype=np.int64)
        position = self.offset + seq * self.stride  # in the concatenation of self.shards' used samples
        which = np.searchsorted(self.cum, position, side="right")
        used = position - (self.cum[which] - self.shard_counts[which])  # among the shard's used samples
        shard = self.shards[which]
        bucket = np.empty(len(seq), dtype=np.int64)
        ordinal = np.empty(len(seq), dtype=np.int64)
        for s in np.unique(shard):
            mask = shard == s
            info = self.table.info(int(s))
            ordinal[mask] = info.used[used[mask]]
            bucket[mask] = info.buckets[ordinal[mask]]
        refs = [_Ref(self.epoch, int(q), int(s), int(o), int(bk))
                for q, s, o, bk in zip(seq, shard, ordinal, bucket, strict=True)]
        perm = np.random.default_rng([self.seed, _BLOCK_SHUFFLE, self.epoch, self.j, b]).permutation(len(refs))
        self.block = [refs[p] for p in perm]
        self.pos = 0
        return refs

    def next_batch(self, on_block: Callable[[list[_Ref]], None] | None = None) -> list[_Ref]:
        """The next micro-batch's refs; ``on_block`` gets each new block's refs (to read them)."""
        while True:
            if self.pos >= len(self.block):
                refs = self._new_block()
                if on_block is not None:
                    on_block(refs)
            ref = self.block[self.pos]
            self.pos += 1
            waiting = self.pending.setdefault(ref.bucket, [])
            waiting.append(ref)
            if len(waiting) == self.micro:
                del self.pending[ref.bucket]
                self.emitted += 1
                return waiting


# --------------------------------------------------------------------------- reading tars


@dataclass
class _Sample:
    key: str
    mean: torch.Tensor
    std: torch.Tensor | None
    texts: dict[str, str]  # variant (orig included) -> caption as stored
    listed: list[str] | None  # the json's "captions": the variants the curator accepted
    embeddings: dict[str, torch.Tensor] | None = None  # variant -> [tokens, dim], from a text shard
    image: bytes | None = None  # the original image's bytes, from the image stage


_BLOCK = 512


class _TarSamples:
    """A tar's samples in order (a local file, or a URL read by ``curate.storage.RangeReader``), as
    (key, {ext: (offset, size)}): members grouped by key as
    webdataset groups them. Bytes are read only for the samples passed to ``read``; the members of
    the others are seeked over, so that a manifest's subset that uses a tenth of a shard reads about
    a tenth of its bytes. The headers (ustar, with pax and GNU long names) are parsed here, their
    checksums verified, rather than by ``tarfile``, whose TarInfo parsing made reading 4.8x slower
    (BENCHMARKS.md, bench/subset.py)."""

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        try:
            self._file: storage.LocalFile | storage.RangeReader | None = storage.open_reader(path)
        except OSError as e:
            raise DataError(f"{label}: cannot read {path}: {e}") from e
        self._items = self._group(0)

    def seek(self, offset: int) -> None:
        """Go on from the sample whose first header is at byte ``offset`` (an index's ``tar_offset``)."""
        self._items.close()
        self._items = self._group(offset)

    def _fail(self, why: str) -> DataError:
        return DataError(f"{self.label}: cannot read {self.path}: {why}")

    def _members(self, offset: int) -> Iterator[tuple[str, int, int]]:
        """(name, data offset, size) of each regular file from the header at ``offset`` on, in order."""
        long_name = None
        while True:
            header = self._file.pread(_BLOCK, offset)
            if len(header) < _BLOCK:
                raise self._fail(f"it ends inside a header at byte {offset} (no end-of-archive marker)")
            if not header[0] and header.count(0) == _BLOCK:
                return  # end of archive
            if sum(header) - sum(header[148:156]) + 8 * 32 != _octal(header[148:156]):
                raise self._fail(f"the header at byte {offset} has a wrong checksum")
            size, kind = _octal(header[124:136]), header[156:157]
            start = offset + _BLOCK
            offset = start + -(-size // _BLOCK) * _BLOCK
            if kind in (b"L", b"x"):  # the next member's name: GNU long name, or pax records
                data = self._file.pread(size, start)
                long_name = data.rstrip(b"\0").decode() if kind == b"L" else _pax_path(data) or long_name
                continue
            name = long_name or _nts(header[0:100])
            if header[257:262] == b"ustar" and header[345] and long_name is None:
                name = _nts(header[345:500]) + "/" + name
            long_name = None
            if kind in (b"0", b"\0", b"7"):
                yield name, start, size

    def _group(self, offset: int) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
        key, members = None, {}
        try:
            for name, start, size in self._members(offset):
                # webdataset's split (base_plus_ext): the key is the path up to the first dot of
                # its last component, which must not start with one.
                base = name.rfind("/") + 1
                dot = name.find(".", base)
                if dot <= base:
                    continue
                k, ext = name[:dot], name[dot + 1:]
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members[ext] = (start, size)
        except DataError:
            raise
        except (OSError, ValueError) as e:  # a header number that is not one
            raise self._fail(str(e)) from e
        if key is not None:
            yield key, members

    def __iter__(self) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
        return self._items

    def __next__(self) -> tuple[str, dict[str, tuple[int, int]]]:
        return next(self._items)

    def read(self, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        """The bytes of a sample's members, in one read (they lie together, headers between them)."""
        first = min(start for start, _ in members.values())
        end = max(start + size for start, size in members.values())
        try:
            span = self._file.pread(end - first, first)
        except OSError as e:
            raise self._fail(str(e)) from e
        if len(span) != end - first:
            raise self._fail(f"it ends inside a sample ({len(span)} of {end - first} bytes at byte {first})")
        return {ext: span[start - first: start - first + size] for ext, (start, size) in members.items()}

    def close(self) -> None:
        self._items.close()
        if self._file is not None:
            self._file.close()
            self._file = None


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _octal(field: bytes) -> int:
    """A header number: octal digits, or base-256 (GNU) when the first byte's high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"a header number is not octal: {field!r}") from None


def _pax_path(records: bytes) -> str | None:
    """The ``path`` of pax extended-header records (``LENGTH path=VALUE\\n``), if any."""
    while records:
        length = records.partition(b" ")[0]
        record, records = records[: int(length)], records[int(length):]
        field, _, value = record[len(length) + 1:].partition(b"=")
        if field == b"path":
            return value.removesuffix(b"\n").decode("utf-8", "surrogateescape")
    return None


def _decode(key: str, members: dict[str, bytes], label: str, text: dict[str, bytes] | None = None) -> _Sample:
    try:
        tensors = load_safetensors(members["latent.safetensors"])
        listed = None
        if "json" in members:
            listed = json.loads(members["json"]).get("captions")
        texts = {ext[: -len(".txt")]: data.decode("utf-8") for ext, data in members.items()
                 if ext.endswith(".txt")}
    except (KeyError, ValueError, UnicodeDecodeError, RuntimeError) as e:
        raise DataError(f"{label}: sample {key} is not a latent sample "
                        f"(latent.safetensors with a mean, txt captions, json): {e!r}") from e
    embeddings = None
    if text is not None:
        try:
            embeddings = load_safetensors(text["text.safetensors"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise DataError(f"{label}: sample {key} of its text shard has no readable "
                            f"text.safetensors: {e!r}") from e
    return _Sample(key, tensors["mean"], tensors.get("std"), texts, listed, embeddings)


class _Cursor:
    """Sequential reader over shards: serves refs in the order given, reopening a shard only
    when asked for a sample behind its position (a restore, or a new epoch)."""

    def __init__(self, table: _ShardTable):
        self.table = table
        self.shard: int | None = None
        self.next_ordinal = 0
        self._samples: _TarSamples | None = None
        self._texts: _TarSamples | None = None  # the text shard, in step
        self._images: _TarSamples | None = None  # the image shard, ahead

    def close(self) -> None:
        for reader in (self._samples, self._texts, self._images):
            if reader is not None:
                reader.close()
        self._samples = self._texts = self._images = None
        self.shard = None

    def _open(self, shard: int) -> None:
        self.close()
        self.shard, self.next_ordinal = shard, 0
        self._samples = _TarSamples(self.table.paths[shard], self.table.labels[shard])
        if self.table.text_paths is not None:
            self._texts = _TarSamples(self.table.text_paths[shard], self.table.labels[shard] + " (text)")
        if self.table.image_paths is not None:
            self._images = _TarSamples(self.table.image_paths[shard], self.table.labels[shard] + " (images)")

    def _image_of(self, key: str, shard: int) -> bytes:
        """The image shard's bytes for ``key``, seeking over the samples before it (those the latent
        shard does not hold, or does not use)."""
        for found, members in self._images:
            if found == key:
                if IMAGE_MEMBER not in members:
                    break
                return self._images.read({IMAGE_MEMBER: members[IMAGE_MEMBER]})[IMAGE_MEMBER]
        raise DataError(f"{self.table.labels[shard]}: sample {key} is not in its image shard "
                        f"{self.table.image_paths[shard]} (after the samples before it): the image stage "
                        "is not the one these latents were encoded from")

    def read(self, refs: list[_Ref]) -> dict[_Ref, _Sample]:
        out: dict[_Ref, _Sample] = {}
        last: tuple[_Ref, _Sample] | None = None
        for ref in refs:
            if last is not None and (last[0].shard, last[0].ordinal) == (ref.shard, ref.ordinal):
                out[ref] = last[1]  # the same sample pending from two epochs (tiny datasets)
                continue
            if self.shard != ref.shard or self.next_ordinal > ref.ordinal:
                self._open(ref.shard)
            info = self.table.info(ref.shard)
            if ref.ordinal > self.next_ordinal and info.seekable:
                # Samples to pass over (a subset's unused ones, or a resumed stream's read ones):
                # straight to this one, in the tar and in its text shard.
                self._samples.seek(int(info.offsets[ref.ordinal]))
                if self._texts is not None:
                    self._texts.seek(int(info.text_offsets[ref.ordinal]))
                self.next_ordinal = ref.ordinal
            keys = info.keys
            label = self.table.labels[ref.shard]
            while True:
                item = next(self._samples, None)
                ordinal = self.next_ordinal
                if item is None:
                    raise DataError(f"{label}: the tar ends after {ordinal} samples but its index "
                                    f"lists {len(keys)}: the shard changed after planning")
                self.next_ordinal += 1
                if item[0] != keys[ordinal]:
                    raise DataError(f"{label}: sample {ordinal} of the tar is {item[0]} but the index "
                                    f"lists {keys[ordinal]}: the shard changed after planning")
                text = None
                if self._texts is not None:
                    text = next(self._texts, None)
                    if text is None or text[0] != item[0]:
                        raise DataError(f"{label}: sample {ordinal} is {item[0]} but its text shard "
                                        f"{self.table.text_paths[ref.shard]} has "
                                        f"{'no more samples' if text is None else text[0]} there: "
                                        "the text shards were made from other latents")
                if ordinal == ref.ordinal:
                    break
            # Only now the bytes: the samples walked past (a subset's unused ones) cost a tar header each.
            sample = _decode(item[0], self._samples.read(item[1]), label,
                             None if text is None else self._texts.read(text[1]))
            sample.image = self._image_of(item[0], ref.shard) if self._images is not None else None
            out[ref] = sample
            last = (ref, sample)
        return out


# --------------------------------------------------------------------------- micro-batches


def _pick(weights: dict[str, float], u: float) -> str:
    total, acc = sum(weights.values()), 0.0
    for name, w in weights.items():
        acc += w / total
        if u < acc:
            return name
    return next(reversed(weights))  # u within rounding of 1


def choose_caption(
    weights: dict[str, float], texts: dict[str, str], listed: list[str] | None, rng: np.random.Generator
) -> tuple[str, str, str | None]:
    """A sample's caption for a manifest's ``captions`` weights: (variant, caption, fallback kind
    or None). ``texts``: variant (orig included) -> caption as stored; ``listed``: the json's
    ``captions``, the variants the curator accepted. A variant counts as present when its txt is
    non-empty and, for curated variants, it is listed ("orig" is never listed)."""
    present = {v: t for v, t in texts.items()
               if t.strip() and (v == "orig" or listed is None or v in listed)}
    chosen = _pick(weights, rng.random())
    if chosen in present:
        return chosen, present[chosen], None
    among = {v: w for v, w in weights.items() if v in present}
    if among:
        v = _pick(among, rng.random())
        return v, present[v], "renormalised"
    # Any caption beats none: curated variants first (sorted, for determinism), then the original.
    for v in [*sorted(listed or ()), "orig", *sorted(present)]:
        if v in present:
            return v, present[v], "other_variant"
    return "", "", "empty"


class _Builder:
    """Per-sample choices (caption variant, latent draw) and the stacked model input."""

    def __init__(self, manifest: Manifest, settings: DataSettings, table: _ShardTable, images: bool = False):
        self.spec = manifest.latent
        self.table = table
        self.images = images
        self.seed = settings.seed
        self.draw = settings.sample_latents and self.spec.stored == "dist"
        self.text = manifest.text
        self.clean = settings.clean_captions and self.text is None  # embeddings need no cleaning

    def build(self, refs: list[_Ref], samples: list[_Sample], label: Callable[[int], str]) -> MicroBatch:
        latents, captions, variants, keys = [], [], [], []
        fallbacks: Counter[str] = Counter()
        ds = self.spec.downsample
        for ref, s in zip(refs, samples, strict=True):
            copy = self.table.copy[ref.shard]
            h = sample_seed(self.seed, ref.epoch, s.key if copy == 0 else f"{s.key}\0{copy}")
            variant, text, kind = choose_caption(self.table.captions[ref.shard], s.texts, s.listed,
                                                 np.random.default_rng(h))
            if kind is not None:
                fallbacks[kind] += 1
            bh, bw = _bucket_hw(ref.bucket)
            expected = (self.spec.channels, bh // ds, bw // ds)
            if tuple(s.mean.shape) != expected:
                raise DataError(f"{label(ref.shard)}: sample {s.key} has a latent of shape "
                                f"{list(s.mean.shape)}, but its bucket {bh}x{bw} and the manifest's "
                                f"latent spec imply {list(expected)}")
            if self.draw:
                if s.std is None:
                    raise DataError(f"{label(ref.shard)}: sample {s.key} has no std, but the "
                                    "manifest says the latents are stored as distributions")
                z = sample_latent(s.mean, s.std, torch.Generator().manual_seed(h))
            else:
                z = s.mean.float()
            latents.append(z)
            captions.append(text)
            variants.append(variant)
            keys.append(s.key)
        x = to_model_input(torch.stack(latents), self.spec).float().contiguous()
        images = self.crop_images(refs, samples, label) if self.images else None
        context = mask = None
        if self.text is not None:
            context, mask = self.context(refs, samples, variants, label)
        if self.clean:
            from curate.text import clean_caption

            captions = [clean_caption(c) for c in captions]
        return MicroBatch(x, captions, keys, variants, dict(fallbacks), cleaned=self.clean,
                          context=context, context_mask=mask, images=images)

    def crop_images(self, refs: list[_Ref], samples: list[_Sample], label: Callable[[int], str]) -> torch.Tensor:
        """The originals cropped exactly as encode-latents cropped them for the VAE (same function,
        to the bucket it chose, which the index records), so image pixel (y, x) is the pixel latent
        (y / d, x / d) encodes. Not to the closest of the manifest's buckets: a merged manifest lists
        every part's, and a part encoded with fewer (or without buckets) chose among its own."""
        out = []
        for ref, s in zip(refs, samples, strict=True):
            try:
                image, _ = preprocess(s.image, resolution=self.spec.resolution, buckets=[_bucket_hw(ref.bucket)])
            except ValueError as e:
                raise DataError(f"{label(ref.shard)}: the image of sample {s.key} cannot be decoded: {e}") from e
            out.append(image)
        return torch.stack(out)

    def context(self, refs: list[_Ref], samples: list[_Sample], variants: list[str],
                label: Callable[[int], str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen captions' stored embeddings, valid tokens first, padded to ``max_tokens``."""
        spec = self.text
        context = torch.zeros(len(samples), spec.max_tokens, spec.dim, dtype=getattr(torch, spec.dtype))
        mask = torch.zeros(len(samples), spec.max_tokens, dtype=torch.bool)
        for i, (ref, s, variant) in enumerate(zip(refs, samples, variants, strict=True)):
            if not variant:
                continue  # no caption at all: the trainer uses the empty prompt's embedding
            rows = s.embeddings.get(variant)
            if rows is None or rows.ndim != 2 or rows.shape[1] != spec.dim or not 0 < rows.shape[0] <= spec.max_tokens:
                raise DataError(f"{label(ref.shard)}: sample {s.key}'s text shard has no "
                                f"[1..{spec.max_tokens}, {spec.dim}] embedding for its {variant!r} caption "
                                f"(it holds {sorted(s.embeddings)})")
            context[i, : rows.shape[0]] = rows
            mask[i, : rows.shape[0]] = True
        return context, mask


class _Stream:
    """A plan plus the samples it needs in memory: the current block and the pending carry-over."""

    def __init__(self, table: _ShardTable, builder: _Builder, j: int, settings: DataSettings):
        self.table, self.builder = table, builder
        self.plan = _Plan(table, j, settings.streams, settings.seed, settings.shuffle_buffer,
                          settings.micro_batch)
        self.cursor = _Cursor(table)
        self.store: dict[_Ref, _Sample] = {}

    def restore(self, batches: int) -> None:
        """Position at batch number ``batches``: replay the plan, then read what it still needs."""
        if batches == 0:
            return
        for _ in range(batches):
            self.plan.next_batch()
        pending = sorted((r for refs in self.plan.pending.values() for r in refs),
                         key=lambda r: (r.shard, r.ordinal))
        carry = _Cursor(self.table)  # its own cursor: pending samples lie behind the block's
        try:
            self.store.update(carry.read(pending))
        finally:
            carry.close()
        rest = sorted(self.plan.block[self.plan.pos:], key=lambda r: r.seq)
        self.store.update(self.cursor.read(rest))

    def _load_block(self, refs: list[_Ref]) -> None:
        self.store.update(self.cursor.read(refs))

    def next_micro(self) -> MicroBatch:
        refs = self.plan.next_batch(self._load_block)
        samples = [self.store.pop(r) for r in refs]
        return self.builder.build(refs, samples, lambda i: self.table.labels[i])

    def close(self) -> None:
        self.cursor.close()


class _StepDataset(IterableDataset):
    """Yields this rank's StepBatch for the steps its process serves (see the module docstring)."""

    def __init__(self, manifest: Manifest, paths: list[str], source: str, settings: DataSettings,
                 slots: range, start_step: int, text_paths: list[str] | None = None,
                 image_paths: list[str] | None = None):
        super().__init__()
        self.manifest, self.paths, self.source = manifest, paths, source
        self.text_paths, self.image_paths = text_paths, image_paths
        self.settings, self.slots, self.start_step = settings, slots, start_step

    def __iter__(self) -> Iterator[StepBatch]:
        k = self.settings.streams_per_slot
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if (1 if info is None else info.num_workers) != (k if self.settings.workers else 1):
            raise RuntimeError(f"served by {info.num_workers if info else 0} workers, planned for "
                               f"{self.settings.workers}")
        first = self.start_step + worker
        table = _ShardTable(self.manifest, self.paths, self.source, self.text_paths, self.image_paths)
        builder = _Builder(self.manifest, self.settings, table, images=self.image_paths is not None)
        streams = [_Stream(table, builder, q * k + first % k, self.settings) for q in self.slots]
        try:
            for stream in streams:
                stream.restore(first // k)
            step = first
            while True:
                yield StepBatch(step, [stream.next_micro() for stream in streams])
                step += k
        finally:
            for stream in streams:
                stream.close()


# --------------------------------------------------------------------------- held-out samples


class HeldOutSample(NamedTuple):
    key: str
    latent: torch.Tensor  # [C, h, w] float32: the stored mean through the latent spec (a model input)
    caption: str  # "" when the sample has no caption


def first_samples(manifest: Manifest, manifest_path: str | os.PathLike, n: int, *, seed: int,
                  allow_pipe: bool = False) -> list[HeldOutSample]:
    """The first ``n`` samples of ``manifest`` in shard order, each once (a merged manifest's repeats
    and a sample in two parts count once), their captions drawn by their part's weights from
    (seed, key): a fixed set, for the validation loss (train/validation.py)."""
    paths = _shard_paths(manifest, manifest_path, allow_pipe)
    selections, part_of = part_captions(manifest), shard_parts(manifest)
    out: list[HeldOutSample] = []
    seen: set[str] = set()
    for i, (entry, path) in enumerate(zip(manifest.shards, paths, strict=True)):
        label = f"{manifest_path}: shard {i} ({entry.path})"
        samples = _TarSamples(path, label)
        try:
            for key, members in _used_samples(samples, entry, label):
                if key in seen:
                    continue
                seen.add(key)
                s = _decode(key, samples.read(members), label)
                rng = np.random.default_rng(sample_seed(seed, 0, key))
                _, caption, _ = choose_caption(selections[part_of[i]], s.texts, s.listed, rng)
                latent = to_model_input(s.mean.float()[None], manifest.latent)[0].contiguous()
                out.append(HeldOutSample(key, latent, caption))
                if len(out) == n:
                    return out
        finally:
            samples.close()
    return out


def _used_samples(samples: _TarSamples, entry: ShardEntry, label: str) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a shard that its manifest entry uses, in tar order: every one, or a subset's,
    to which the reader seeks when the index records where they lie (a held-out subset may use one
    sample in a thousand), checking each key against the index."""
    if entry.subset is None:
        yield from samples
        return
    used = entry.subset.used()
    index = index_of(samples.path)
    try:
        ok = _ok_rows(index, ["key"])
        offsets = _offsets(ok, entry.accepted)
    except (OSError, pa.ArrowException):
        offsets = None  # walking the tar needs no index
    if offsets is None:  # an index from before offsets: walk
        yield from (item for ordinal, item in enumerate(samples) if ordinal < len(used) and used[ordinal])
        return
    keys = ok["key"].to_pylist()
    for ordinal in np.flatnonzero(used):
        samples.seek(int(offsets[ordinal]))
        item = next(samples, None)
        if item is None or item[0] != keys[ordinal]:
            raise DataError(f"{label}: its index places sample {keys[ordinal]} at byte {offsets[ordinal]}, where "
                            f"the tar holds {'nothing' if item is None else item[0]}: the shard changed after it was "
                            "indexed")
        yield item


# --------------------------------------------------------------------------- the loader


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the training process (a Ctrl-C or Slurm's SIGTERM
    reaches the whole process group; the trainer checkpoints and stops them), and die with it."""
    import signal

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LatentLoader:
    """This rank's infinite sequence of StepBatch, from ``start_step`` on.

    ``images``: the image stage the latents were encoded from, or one per part of a merged manifest
    (``curate.manifest.image_stages``);
    each micro-batch then also carries its samples' images, cropped as for the VAE.
    ``workers`` > 0 reads in DataLoader processes (worker ``w`` serves steps
    ``start_step + w + i * workers``; the DataLoader's in-order round robin delivers them in
    step order, which is checked). ``fallbacks`` counts the caption fallbacks delivered so far.
    Use as a context manager, or call ``close``, to stop the workers.
    """

    def __init__(self, manifest: Manifest, manifest_path: str | os.PathLike, settings: DataSettings,
                 *, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 allow_pipe: bool = False, images: ImageStages | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of {world_size}")
        if start_step < 0:
            raise DataError(f"start_step must be >= 0, got {start_step}")
        self.settings, self.rank, self.world_size = settings, rank, world_size
        self.start_step = start_step
        self.accum = settings.accum(world_size)
        paths = _shard_paths(manifest, manifest_path, allow_pipe)
        text_paths = _shard_paths(manifest, manifest_path, allow_pipe, text=True) if manifest.text else None
        _streams_note(manifest, settings, str(manifest_path))  # too few samples: an error here too
        slots = range(rank * self.accum, (rank + 1) * self.accum)
        image_paths = image_shard_paths(manifest, images) if images is not None else None
        self._dataset = _StepDataset(manifest, paths, str(manifest_path), settings, slots, start_step,
                                     text_paths, image_paths)
        self._active: Iterator[StepBatch] | None = None
        self.fallbacks: Counter[str] = Counter()

    def __iter__(self) -> Iterator[StepBatch]:
        self.close()  # a new iteration starts over at start_step
        self._active = self._generate()
        return self._active

    def _generate(self) -> Iterator[StepBatch]:
        s = self.settings
        if s.workers == 0:
            source: Iterator[StepBatch] = iter(self._dataset)
        else:
            loader = DataLoader(
                self._dataset, batch_size=None, num_workers=s.workers, pin_memory=s.pin_memory,
                prefetch_factor=s.prefetch, worker_init_fn=_worker_init,
                # Its own generator: the workers' base seed must not consume the global torch RNG,
                # which the training loop may use for noise and timesteps.
                generator=torch.Generator().manual_seed(s.seed))
            source = iter(loader)
        expected = self.start_step
        try:
            for item in source:
                if item.step != expected:
                    raise RuntimeError(f"data loader delivered step {item.step} where step "
                                       f"{expected} was due; the batch order would be wrong")
                for micro in item.micro:
                    self.fallbacks.update(micro.fallbacks)
                yield item
                expected += 1
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            elif hasattr(source, "close"):
                source.close()

    def close(self) -> None:
        """Stop the workers (if any) and drop their prefetched steps."""
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None

    def __enter__(self) -> LatentLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- checking before training


def check_data(
    manifest: Manifest,
    manifest_path: str | os.PathLike,
    *,
    verify: Literal["none", "size", "checksums"] = "size",
    allow_pipe: bool = False,
    settings: DataSettings | None = None,
    images: ImageStages | None = None,
) -> DataSummary:
    """Validate every shard of ``manifest`` before the first step; raise DataError naming the
    shard and the problem.

    Checks: the tar and its index exist; (``size``) the tar has the size its index recorded;
    (``checksums``) it hashes to the manifest's sha256 (reads every byte); the index records the
    manifest's sha256 when both know one (a shard re-committed after the manifest); the index
    lists as many ok samples as the manifest says, each with a bucket whose sides the VAE's
    grid divides; every caption variant the manifest selects is listed by some sample. ``orig``
    (the original captions) is accepted whenever there are samples: encode-latents writes
    ``KEY.orig.txt`` for every sample, and the index does not record whether it is empty; an
    empty one falls back like any missing caption. With ``settings`` it also checks that every
    stream gets samples, and notes when streams outnumber shards. With ``images`` (the image
    stage, for REPA) every latent shard's image shard is committed and holds its keys in order.
    """
    if verify not in ("none", "size", "checksums"):
        raise ValueError(f"verify must be none, size or checksums, not {verify!r}")
    source = str(manifest_path)
    paths = _shard_paths(manifest, manifest_path, allow_pipe)
    spec = manifest.latent
    grid = model_downsample(spec)
    buckets: Counter[tuple[int, int]] = Counter()
    selections, part_of = part_captions(manifest), shard_parts(manifest)
    listed: list[Counter[str]] = [Counter() for _ in selections]  # per part: variant -> samples listing it
    notes: list[str] = []
    ok_keys: list[list[str]] = []
    labels = [f"{source}: shard {i} ({entry.path})" for i, entry in enumerate(manifest.shards)]
    read = _read_each([(label, tar, entry.sha256) for label, tar, entry in zip(labels, paths, manifest.shards,
                                                                              strict=True)],
                      verify, ["key", "status", "bucket_h", "bucket_w", "captions"])
    for i, (entry, label, (_, df)) in enumerate(zip(manifest.shards, labels, read, strict=True)):
        missing = [c for c in ("key", "status", "bucket_h", "bucket_w", "captions") if c not in df.columns]
        if missing:
            raise DataError(f"{label}: its index has no {', '.join(missing)} column(s): not a "
                            "latent shard (written by curate encode-latents)")
        ok = df.filter(pl.col("status") == OK)
        if ok.height != entry.accepted:
            raise DataError(f"{label}: its index lists {ok.height} ok samples but the manifest "
                            f"says {entry.accepted}")
        ok_keys.append(ok["key"].to_list())  # every accepted sample: the text and image shards hold them all
        if entry.subset is not None:
            ok = ok.filter(pl.Series(entry.subset.used()))
        if ok["bucket_h"].null_count() or ok["bucket_w"].null_count():
            raise DataError(f"{label}: ok samples without a bucket in its index")
        shard_buckets = Counter(zip(ok["bucket_h"].to_list(), ok["bucket_w"].to_list(), strict=True))
        for h, w in shard_buckets:
            if h % grid or w % grid:
                raise DataError(f"{label}: bucket {h}x{w} is not divisible by {grid}, the "
                                "model-space grid of the manifest's latent spec")
        buckets.update(shard_buckets)
        for variants in ok["captions"].to_list():
            listed[part_of[i]].update(variants or ())
    text_paths = None
    if manifest.text is not None:
        text_paths = _check_text_shards(manifest, manifest_path, ok_keys, verify, allow_pipe)
    if images is not None:
        _check_image_shards(manifest, images, ok_keys, verify, source)
    if verify == "checksums":
        try:
            verify_shards(manifest, paths, checksums=True, source=source)
            if text_paths is not None:
                verify_shards(manifest, text_paths, checksums=True, source=source, text=True)
        except ManifestError as e:
            raise DataError(str(e)) from None
        if any(s.sha256 is None for s in manifest.shards):
            notes.append("some shards have no sha256 in the manifest; their checksums were not verified")
    for part, (selection, have) in enumerate(zip(selections, listed, strict=True)):
        field = "captions" if manifest.parts is None else f"parts.{part}.captions"
        of = "" if manifest.parts is None else f" of part {manifest.parts[part].name!r}"
        samples = manifest.samples if manifest.parts is None else manifest.parts[part].samples
        for variant in selection:
            if variant != "orig" and have[variant] == 0:
                raise DataError(f"{source}: field '{field}' selects {variant!r}, but no sample{of} has "
                                f"that caption (the shards have: {', '.join(sorted(have)) or 'none'}, and "
                                "'orig', the original captions)")
            if variant != "orig" and have[variant] < samples:
                notes.append(f"{samples - have[variant]} of {samples} samples{of} have no {variant!r} caption; "
                             "they fall back to another variant")
    total_listed = sum(listed, Counter())
    streams = None
    if settings is not None:
        streams = settings.streams
        note = _streams_note(manifest, settings, source)
        if note:
            notes.append(note)
    return DataSummary(samples=manifest.samples, shards=len(manifest.shards),
                       buckets=dict(sorted(buckets.items())), model_channels=model_channels(spec),
                       captions=dict(sorted(total_listed.items())), streams=streams, notes=notes)


def _check_image_shards(manifest: Manifest, images: ImageStages, ok_keys: list[list[str]], verify: str,
                        source: str) -> None:
    """Each latent shard's image shard is committed and lists the latent keys, in their order,
    among its accepted images (the loader reads both tars forward in step)."""
    tars = image_shard_paths(manifest, images)
    labels = [f"{source}: the image shard of shard {i} ({entry.path})" for i, entry in enumerate(manifest.shards)]
    read = _read_each([(label, tar, None) for label, tar in zip(labels, tars, strict=True)],
                      "size" if verify != "none" else "none", ["key", "status"])
    checked: set[str] = set()  # a merged manifest may list a shard several times
    for label, tar, keys, (_, df) in zip(labels, tars, ok_keys, read, strict=True):
        if tar in checked:
            continue
        checked.add(tar)
        if "key" not in df.columns or "status" not in df.columns:
            raise DataError(f"{label}: its index has no key and status columns: not an image stage")
        position = {k: j for j, k in enumerate(df.filter(pl.col("status") == OK)["key"].to_list())}
        found = [position.get(k, -1) for k in keys]
        if -1 in found:
            raise DataError(f"{label}: {tar} lacks sample {keys[found.index(-1)]} of the latents: the "
                            "image stage is not the one they were encoded from (repa.images names another)")
        if found != sorted(found):
            raise DataError(f"{label}: {tar} holds the latents' samples in another order")


def _read_committed(label: str, tar: str, sha256: str | None, verify: str,
                    columns: list[str]) -> tuple[Any, pl.DataFrame]:
    """A shard's index metadata and rows (``columns``, those it has), after checking that the shard
    is committed and whole."""
    index = index_of(tar)
    try:
        tar_size = storage.size(tar)
    except FileNotFoundError:
        raise DataError(f"{label}: the tar {tar} does not exist") from None
    except OSError as e:
        raise DataError(f"{label}: cannot read the tar {tar}: {e}") from None
    try:
        source = storage.parquet_source(index)  # fetched once at a URL, however many reads follow
        meta = read_meta(source)
        names = set(pq.read_schema(source).names)
        df = pl.from_arrow(pq.read_table(source, columns=[c for c in columns if c in names]))
    except FileNotFoundError:
        raise DataError(f"{label}: its index {index} does not exist (a shard without its "
                        "index was never committed)") from None
    except (ShardError, OSError, pa.ArrowException) as e:
        raise DataError(f"{label}: cannot read its index {index}: {e}") from e
    if verify != "none" and meta.tar_bytes is not None and tar_size != meta.tar_bytes:
        raise DataError(f"{label}: the tar {tar} has {tar_size} bytes but its index "
                        f"recorded {meta.tar_bytes} (truncated, or rewritten after it was committed)")
    if sha256 and meta.tar_sha256 and sha256 != meta.tar_sha256:
        raise DataError(f"{label}: its index records another sha256 than the manifest: the "
                        "shard was re-committed after the manifest was written")
    return meta, df


def _read_each(shards: list[tuple[str, str, str | None]], verify: str,
               columns: list[str]) -> Iterator[tuple[Any, pl.DataFrame]]:
    """``_read_committed`` of each (label, tar, sha256), in order and as the caller goes (so the first
    problem in shard order is the one named), many at a time when they are URLs. A tar listed several
    times (a merged manifest's repeated part) is read once."""
    listed = Counter(tar for _, tar, _ in shards)
    first: dict[str, tuple[str, str, str | None]] = {}
    for label, tar, sha256 in shards:
        first.setdefault(tar, (label, tar, sha256))
    remote = any(map(storage.is_remote, first))
    results = storage.parallel_map(lambda item: _read_committed(*item, verify, columns), first.values(), remote)
    again: dict[str, tuple[Any, pl.DataFrame]] = {}  # the results of tars listed more than once
    for _, tar, _ in shards:
        if tar not in again:
            result = next(results)  # distinct tars come in the order of their first listing
            if listed[tar] > 1:
                again[tar] = result
        else:
            result = again[tar]
        yield result


def _check_text_shards(manifest: Manifest, manifest_path: str | os.PathLike, ok_keys: list[list[str]],
                       verify: str, allow_pipe: bool) -> list[str]:
    """Text shard i is committed, was made by encode-text, and lists shard i's keys in its order;
    every selected caption variant was encoded. Returns the text shards' paths."""
    spec = manifest.text
    source = str(manifest_path)
    for part, selection in enumerate(part_captions(manifest)):
        absent = [v for v in selection if v not in spec.variants]
        if absent:
            field = "captions" if manifest.parts is None else f"parts.{part}.captions"
            raise DataError(f"{source}: field '{field}' selects {', '.join(map(repr, absent))}, but the text "
                            f"shards hold embeddings of {', '.join(spec.variants)} only")
    paths = _shard_paths(manifest, manifest_path, allow_pipe, text=True)
    labels = [f"{source}: text shard {i} ({entry.path})" for i, entry in enumerate(spec.shards)]
    read = _read_each([(label, tar, entry.sha256) for label, tar, entry in zip(labels, paths, spec.shards, strict=True)],
                      verify, ["key", "status"])
    checked: set[str] = set()  # a merged manifest may list a shard several times
    for i, (label, tar, keys, (meta, df)) in enumerate(zip(labels, paths, ok_keys, read, strict=True)):
        if tar in checked:
            continue
        checked.add(tar)
        if meta.stage != "encode-text":
            raise DataError(f"{label}: written by {meta.stage!r}, not by curate encode-text")
        text_keys = df.filter(pl.col("status") == OK)["key"].to_list()
        if text_keys != keys:
            raise DataError(f"{label}: its samples are not those of shard {i} in the same order "
                            f"({len(text_keys)} against {len(keys)}): the text shards were made from "
                            "other latents; rerun curate encode-text")
    return paths
