"""The shard contract: a webdataset tar plus a parquet index beside it.

    DATA/STAGE/000042.tar       samples: members ``KEY.EXT`` grouped by key (plain webdataset)
    DATA/STAGE/000042.parquet   one row per *input* sample (ok or rejected, with the reason),
                                and file-level metadata: input fingerprint, config hash,
                                counts, the tar's size and sha256

Both are written under hidden temporary names, flushed to disk and renamed; the index is
renamed last and is the commit marker, so a shard without its index does not exist and a
reader never sees half a shard. Stages whose output is a table only (captions) write the
index without a tar.

A stage's folder may be a URL (``--out s3://bucket/latents/flux2-256``): the shard is then written
under the same hidden names in a local staging folder (:func:`staging_dir`) and uploaded, tar first
and index last, each in one PUT, which an object store makes visible whole; the index is again the
commit marker.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import socket
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

# Keys are part of the contract; images.py computes them so decoding workers import nothing heavy.
from curate.images import sample_key  # noqa: F401
from curate.storage import fsync_dir, fsync_file

log = logging.getLogger("curate")

OK = "ok"
REJECTED = "rejected"
META_KEY = b"kiln"
SHARD_RE = re.compile(r"^(\d{6,})\.parquet$")
TAR_RE = re.compile(r"^(\d{6,})\.tar$")

# Columns every index has; stages add their own after these.
BASE_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.Utf8,
    "status": pl.Utf8,
    "reason": pl.Utf8,
    "detail": pl.Utf8,
    "flags": pl.List(pl.Utf8),
    # Where an accepted sample's members lie in the tar: the byte offset of its first member's
    # header and the bytes through its last member's padding (null without a tar, or rejected). A
    # reader of a subset seeks to the samples it uses instead of walking the tar to them.
    "tar_offset": pl.Int64,
    "tar_length": pl.Int64,
}


class ShardError(RuntimeError):
    """A shard on disk is missing, inconsistent or not ours."""


class UnreadableIndex(ShardError):
    """A shard's index that is not readable Parquet: cut off (by a copy) or damaged. The stage that
    writes the shard redoes it; a reader is stopped with its name."""


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class ShardMeta:
    """File-level metadata stored in the index; what the runner checks to skip a shard."""

    stage: str
    shard_id: int
    fingerprint: str
    config_hash: str
    counts: dict[str, Any]
    tar_bytes: int | None = None
    tar_sha256: str | None = None
    seconds: float = 0.0
    # Other shards whose content decided this one (cross-shard deduplication):
    # {shard_id: input fingerprint}. If any of them changes, this shard is redone.
    depends_on: dict[str, str] = field(default_factory=dict)
    format_version: int = 1

    @classmethod
    def from_json(cls, blob: bytes | str) -> ShardMeta:
        return cls(**json.loads(blob))


@dataclass(frozen=True)
class Shard:
    """A committed shard: its paths (URLs for a stage read where it lies) and metadata."""

    shard_id: int
    index_path: Path | str
    tar_path: Path | str | None
    meta: ShardMeta
    # The index's size where open_shard asked a URL's (read_index's file_size): not part of what
    # the shard is, which its paths and metadata say (a shard compares equal however it was found).
    index_bytes: int | None = field(default=None, compare=False)

    def intact(self) -> bool:
        """Whether the tar on disk is the one the index describes (size check, no hashing)."""
        from curate import storage

        if self.meta.tar_bytes is None:
            return True
        try:
            return self.tar_path is not None and storage.size(self.tar_path) == self.meta.tar_bytes
        except FileNotFoundError:
            return False


class _Hashing(io.RawIOBase):
    """Pass-through wrapper that hashes and counts the bytes of a tar that go through it."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def _count(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)


class _HashingFile(_Hashing):
    """The tar being written."""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self._count(b)
        return self.raw.write(b)

    def tell(self) -> int:
        return self.size


class _HashingReader(_Hashing):
    """A tar being read, to check one read at a URL against its index (an object replaced while
    it is read in ranges gives bytes of both)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self._count(data)
        return len(data)

    def drain(self) -> tuple[int, str]:
        """Read to the end; (bytes, sha256) of the whole file."""
        while block := self.raw.read(1 << 20):
            self._count(block)
        return self.size, self.sha.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed ownership and mtime so that the same samples give byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _tarfile_header(name: str, size: int) -> bytes:
    """What ``tarfile`` writes before a ``_tarinfo(name, size)`` member of a USTAR tar."""
    return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


_USTAR_TEMPLATE = _tarfile_header("", 0)
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)  # header fields
# The template's byte sum without name, size and checksum, plus the checksum field as spaces.
_TEMPLATE_SUM = (sum(_USTAR_TEMPLATE) - sum(_USTAR_TEMPLATE[_NAME]) - sum(_USTAR_TEMPLATE[_SIZE])
                 - sum(_USTAR_TEMPLATE[_CHKSUM]) + 8 * ord(" "))


def _member_header(name: str, size: int) -> bytes:
    """The header tarfile writes for ``_tarinfo(name, size)`` in USTAR format, byte for byte,
    at a tenth of its cost (it was most of a stage's tar writing); names over 100 bytes and
    sizes over 8 GiB go through tarfile (a split name, or its error)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > 100 or size >= 8**11:
        return _tarfile_header(name, size)
    name_field = encoded.ljust(100, tarfile.NUL)
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(name_field) + sum(size_field)
    return b"".join((name_field, _USTAR_TEMPLATE[100:124], size_field, _USTAR_TEMPLATE[136:148],
                     b"%06o\0 " % checksum, _USTAR_TEMPLATE[156:]))


class _TarStream:
    """A USTAR tar written member by member, byte for byte what ``tarfile`` writes for
    ``_tarinfo`` members (headers, padding, end of archive), without its per-member overhead."""

    def __init__(self, out: _HashingFile):
        self.out = out

    def add(self, name: str, data: bytes) -> None:
        self.out.write(_member_header(name, len(data)))
        self.out.write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self.out.write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        # Two zero blocks, then zeros up to a whole record, as tarfile (and tar -b20) end a tar.
        self.out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.out.size % tarfile.RECORDSIZE:
            self.out.write(tarfile.NUL * (tarfile.RECORDSIZE - self.out.size % tarfile.RECORDSIZE))


def _fsync_replace(tmp: Path, final: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, final)


def staging_dir(out_dir: str | os.PathLike) -> Path:
    """Where the shards of a stage at a URL are written before their upload: a folder of
    ``$KILN_STAGING`` (default: the system's temporary folder) named after the URL, so that a rerun
    finds and removes what a killed one left there."""
    import tempfile

    from curate import storage

    root = os.environ.get("KILN_STAGING") or tempfile.gettempdir()
    return Path(root) / f"kiln-staging-{stable_hash(storage.resolved(out_dir))[:16]}"


def work_dir(out_dir: str | os.PathLike) -> Path:
    """The local folder a stage's temporaries go to (its shards', a source's downloads): the
    stage's own, or its staging folder for a URL."""
    from curate import storage

    return staging_dir(out_dir) if storage.is_remote(out_dir) else Path(out_dir)


_WRITERS_TEMPORARY = re.compile(r"^\.\d{6,}\.(tar|parquet)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
ORPHAN_AGE = 3600.0  # seconds untouched before a dead writer's temporary is removed


def remove_temporaries(out_dir: str | os.PathLike, shard_id: int) -> list[int]:
    """Delete what a killed writer of this shard left behind (never visible to readers), but not
    what another process on this machine is writing now (deleting it would fail that process on
    a vanished file): returns those processes' ids."""
    writing = []
    for tmp in glob.glob(str(work_dir(out_dir) / f".{shard_name(shard_id)}.*.tmp-*")):
        pid = _local_writer(os.path.basename(tmp))
        if pid is not None and pid != os.getpid() and _running(pid):
            writing.append(pid)
        else:
            Path(tmp).unlink(missing_ok=True)
    return writing


def _local_writer(name: str) -> int | None:
    """The id of the process on this machine that wrote the shard temporary ``name``; None for
    another machine's (or a name of another form)."""
    match = _WRITERS_TEMPORARY.match(name)
    return int(match["pid"]) if match is not None and match["host"] == socket.gethostname() else None


def remove_orphaned_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the shard temporaries in ``out_dir``'s work folder that writers on this machine
    left when they were killed: a run that later skips the shard (another worker redid it, or a
    final pass's rewrite was cut off) would otherwise keep them, a shard's size each, for good.
    Only a writer's of this host whose process is gone, untouched for ``ORPHAN_AGE`` (two
    containers may share a host name but not their process ids). Returns what it removed."""
    folder = work_dir(out_dir)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        pid = _local_writer(path.name)
        if pid is None or _running(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime > ORPHAN_AGE:
                path.unlink()
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class ShardWriter:
    """Writes one shard: ``add`` accepted samples, ``reject`` the others, then ``commit``.

    ``schema`` holds the stage's own index columns (after the base columns); every row gets
    every column, missing values as null, so that all shards of a stage share one schema.
    ``out_dir`` may be a URL: the shard is staged locally and uploaded at ``commit``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_id: int,
        schema: Mapping[str, pl.DataType],
        *,
        with_tar: bool = True,
    ):
        from curate import storage

        self.remote = storage.is_remote(out_dir)
        self.out_dir = storage.as_location(out_dir)
        work = work_dir(out_dir)
        work.mkdir(parents=True, exist_ok=True)
        self.shard_id = shard_id
        self.schema = {**BASE_SCHEMA, **schema}
        self.rows: list[dict[str, Any]] = []
        self._spans: dict[str, tuple[int, int]] = {}  # key -> (tar_offset, tar_length)
        self._deferred: list[Callable[[], None]] = []
        self.started = time.perf_counter()
        name = shard_name(shard_id)
        # The host too: two machines' finalizers may rewrite one shard in a folder they share.
        suffix = f".tmp-{socket.gethostname()}-{os.getpid()}"
        final = storage.join if self.remote else (lambda folder, file: Path(folder) / file)
        self.final_tar = final(self.out_dir, f"{name}.tar") if with_tar else None
        self.final_index = final(self.out_dir, f"{name}.parquet")
        self.tmp_tar = work / f".{name}.tar{suffix}" if with_tar else None
        self.tmp_index = work / f".{name}.parquet{suffix}"
        self._raw = open(self.tmp_tar, "wb") if self.tmp_tar else None  # noqa: SIM115
        self._hashing = _HashingFile(self._raw) if self._raw else None
        self._tar = _TarStream(self._hashing) if self._hashing else None

    def defer(self, work: Callable[[], None]) -> None:
        """Work that finishes this shard (writing what a stage produced) and may wait: ``commit``
        runs it first, and the runner commits in the background while the next shard is
        processed."""
        self._deferred.append(work)

    def add(
        self,
        key: str,
        members: Mapping[str, bytes],
        row: Mapping[str, Any] | None = None,
        flags: Iterable[str] = (),
    ) -> None:
        """An accepted sample: its members go to the tar (in the given order) and a row to the index."""
        self.write_members(key, members)
        self.rows.append({**(row or {}), "key": key, "status": OK, "reason": None,
                          "detail": None, "flags": sorted(set(flags))})

    def write_members(self, key: str, members: Mapping[str, bytes]) -> None:
        """Members ``KEY.EXT`` into the tar, without an index row (``add`` does both)."""
        if self._tar is not None and members:
            start = self._hashing.size
            for ext, data in members.items():
                self._tar.add(f"{key}.{ext}", data)
            self._spans[key] = (start, self._hashing.size - start)

    def reject(
        self,
        key: str | None,
        reason: str,
        row: Mapping[str, Any] | None = None,
        detail: str | None = None,
        flags: Iterable[str] = (),
    ) -> None:
        """A rejected input sample: recorded in the index with its reason, nothing in the tar."""
        self.rows.append({**(row or {}), "key": key, "status": REJECTED, "reason": reason,
                          "detail": detail, "flags": sorted(set(flags))})

    def frame(self) -> pl.DataFrame:
        rows = []
        for r in self.rows:
            offset, length = self._spans.get(r["key"], (None, None)) if r["status"] == OK else (None, None)
            rows.append({**{k: r.get(k) for k in self.schema}, "tar_offset": offset, "tar_length": length})
        return pl.DataFrame(rows, schema=self.schema, orient="row")

    def commit(
        self,
        *,
        stage: str,
        fingerprint: str,
        config_hash: str,
        depends_on: Mapping[str, str] | None = None,
        seconds: float | None = None,
        upload: bool = True,
        replacing: bool = False,
    ) -> Shard:
        """Run the deferred work, then flush, fsync and rename: tar first, index last (the index
        is the commit marker); for a URL, upload them in that order (with ``upload=False``, only
        stage them: :meth:`upload` then finishes the commit). ``seconds``: the shard's time
        before this call (the deferred work's is added); by default the time since the writer was
        made."""
        started = time.perf_counter()
        while self._deferred:
            self._deferred.pop(0)()
        seconds = time.perf_counter() - (self.started if seconds is None else started - seconds)
        df = self.frame()
        tar_bytes = tar_sha = None
        if self._tar is not None:
            self._tar.close()
            tar_bytes, tar_sha = self._hashing.size, self._hashing.sha.hexdigest()
            self._raw.close()
        meta = ShardMeta(
            stage=stage,
            shard_id=self.shard_id,
            fingerprint=fingerprint,
            config_hash=config_hash,
            counts=count_rows(df),
            tar_bytes=tar_bytes,
            tar_sha256=tar_sha,
            seconds=round(seconds, 4),
            depends_on=dict(depends_on or {}),
        )
        table = df.to_arrow()
        table = table.replace_schema_metadata({META_KEY: json.dumps(asdict(meta)).encode()})
        pq.write_table(table, self.tmp_index)
        if self.remote:
            if upload:
                self.upload(replacing=replacing)
            return Shard(self.shard_id, self.final_index, self.final_tar, meta)
        if self.tmp_tar is not None:
            if not replacing and self.final_index.exists():
                # A shard redone (its input or setting changed) loses its index first, as upload does: a
                # kill after the tar's rename would leave the old index describing the new tar, a shard
                # that a rerun with the old setting skips whenever the two tars are the same size.
                self.final_index.unlink()
                fsync_dir(self.out_dir)
            _fsync_replace(self.tmp_tar, self.final_tar)
        _fsync_replace(self.tmp_index, self.final_index)
        fsync_dir(self.out_dir)
        return Shard(self.shard_id, self.final_index, self.final_tar, meta)

    def upload(self, *, replacing: bool = False) -> None:
        """Upload a staged shard: tar, then index (the commit). The staged copies are removed
        whether it succeeds or fails (a failed shard stays uncommitted, to be redone).
        ``replacing``: the rewrite of a committed shard (the final pass), whose index stays
        readable throughout, as a rename keeps it locally: workers that run the final pass at
        once read it and rewrite it alike, and the old index over the new tar (another size)
        is not intact, so a kill in between redoes the shard."""
        from curate import storage

        try:
            # Otherwise an index left from an earlier run goes first: until the new one is up, the
            # shard is uncommitted rather than an old index describing a new tar.
            if not replacing:
                storage.remove(self.final_index)
            if self.tmp_tar is not None:
                storage.write_file(self.tmp_tar, self.final_tar)
            storage.write_file(self.tmp_index, self.final_index)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (the shard stays uncommitted)."""
        if self._raw is not None:
            self._raw.close()
        for tmp in (self.tmp_tar, self.tmp_index):
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def count_rows(df: pl.DataFrame) -> dict[str, Any]:
    """``seen = ok + rejected``, rejections by reason, flags by name."""
    statuses = Counter(df["status"].to_list())
    reasons = Counter(r for r in df.filter(pl.col("status") == REJECTED)["reason"].to_list())
    flags = Counter(f for fl in df["flags"].to_list() for f in (fl or []))
    return {
        "seen": df.height,
        "ok": statuses.get(OK, 0),
        "rejected": statuses.get(REJECTED, 0),
        "reasons": dict(sorted(reasons.items())),
        "flags": dict(sorted(flags.items())),
    }


def add_counts(total: dict[str, Any], counts: Mapping[str, Any]) -> dict[str, Any]:
    """Sum two count records (as made by ``count_rows``)."""
    out = {k: total.get(k, 0) + counts.get(k, 0) for k in ("seen", "ok", "rejected")}
    for group in ("reasons", "flags"):
        merged = Counter(total.get(group, {}))
        merged.update(counts.get(group, {}))
        out[group] = dict(sorted(merged.items()))
    return out


def read_meta(index_path: str | os.PathLike | Any, file_size: int | None = None) -> ShardMeta:
    """A shard's metadata from its index: a path, a URL (its footer fetched: storage.parquet_source,
    ``file_size`` its size when known), or what pyarrow reads (bytes)."""
    from curate import storage

    remote = isinstance(index_path, str | os.PathLike) and storage.is_remote(index_path)
    try:
        schema = pq.read_schema(storage.parquet_source(index_path, file_size) if remote else index_path)
    except pa.ArrowInvalid as e:  # pyarrow's message does not name the file
        raise UnreadableIndex(f"{index_path}: not a readable shard index, cut off or damaged ({e})") from e
    blob = (schema.metadata or {}).get(META_KEY)
    if blob is None:
        raise ShardError(f"{index_path}: not a shard index written by this toolkit (no metadata)")
    return ShardMeta.from_json(blob)


def index_columns(index_path: str | os.PathLike, file_size: int | None = None) -> list[str]:
    """An index's column names, from its schema alone (a URL's footer fetched; ``file_size`` as
    for read_index)."""
    from curate import storage

    return pq.read_schema(storage.parquet_source(index_path, file_size)).names


def index_of(tar: str | os.PathLike) -> str:
    """The index beside a shard's tar (a path or a URL): ``000123.tar`` -> ``000123.parquet``."""
    return os.path.splitext(os.fspath(tar))[0] + ".parquet"


def read_index(index_path: str | os.PathLike, columns: list[str] | None = None,
               file_size: int | None = None) -> pl.DataFrame:
    """An index's rows (``columns``, or all). A URL's is fetched whole, or, when only some columns
    are asked for and it is large, its footer and those columns (storage.parquet_source; its size
    ``file_size`` when known: ``Shard.index_bytes``)."""
    from curate import storage

    if not storage.is_remote(index_path):
        return pl.read_parquet(index_path, columns=columns)
    source = (io.BytesIO(storage.read_bytes(index_path)) if columns is None
              else storage.parquet_source(index_path, file_size))
    if isinstance(source, io.BytesIO):
        return pl.read_parquet(source, columns=columns)
    return pl.from_arrow(pq.read_table(source, columns=columns, use_threads=False, pre_buffer=True))


def open_shard(out_dir: str | os.PathLike, shard_id: int) -> Shard | None:
    """The committed shard with this id, or None if it is not committed. ``out_dir`` may be a URL
    (an image stage read where it lies): the shard's paths are then URLs."""
    from curate import storage

    if storage.is_remote(out_dir):
        index = storage.join(out_dir, f"{shard_name(shard_id)}.parquet")
        try:
            index_size = storage.size(index)
        except (FileNotFoundError, NotADirectoryError):
            return None
        meta = read_meta(index, index_size)
        tar = storage.join(out_dir, f"{shard_name(shard_id)}.tar") if meta.tar_bytes is not None else None
        return Shard(shard_id, index, tar, meta, index_size)
    out_dir = Path(out_dir)
    index = out_dir / f"{shard_name(shard_id)}.parquet"
    if not index.exists():
        return None
    meta = read_meta(index)
    tar = out_dir / f"{shard_name(shard_id)}.tar" if meta.tar_bytes is not None else None
    return Shard(shard_id, index, tar, meta)


def committed_shards(stage_dir: str | os.PathLike) -> list[Shard]:
    """Every committed shard of a stage output, in id order (a URL's listed, and its indexes'
    metadata fetched many at a time)."""
    from curate import storage

    remote = storage.is_remote(stage_dir)
    opened = storage.parallel_map(lambda i: open_shard(stage_dir, i), listed_shard_ids(stage_dir), remote)
    return [s for s in opened if s is not None]


def listed_shard_ids(stage_dir: str | os.PathLike, *, missing_ok: bool = True) -> list[int]:
    """The ids of the shards a stage folder (or URL) lists, committed or not, in order; none for a
    folder that is not there (FileNotFoundError without ``missing_ok``)."""
    from curate import storage

    try:
        names = storage.list_names(stage_dir)
    except (FileNotFoundError, NotADirectoryError):
        if not missing_ok:
            raise
        return []
    return sorted(int(m.group(1)) for name in names if (m := SHARD_RE.match(name)))


def check_intact(shards: list[Shard], stage_dir: str | os.PathLike) -> None:
    """Refuse an input stage whose tars are not the ones their indexes describe: cut off by a copy,
    or replaced since (a size each, asked many at a time at a URL), before any work reads them."""
    from curate import storage

    def problem(shard: Shard) -> str | None:
        if shard.intact() or shard.tar_path is None:
            return None
        try:
            found = storage.size(shard.tar_path)
        except FileNotFoundError:
            return f"{shard.tar_path}: missing, but its index {shard.index_path} is there"
        return (f"{shard.tar_path}: {found} bytes, but its index recorded {shard.meta.tar_bytes} (cut off, or "
                "replaced after it was committed)")

    for found in storage.parallel_map(problem, shards, storage.is_remote(stage_dir)):
        if found:
            raise ShardError(f"{found}: rerun the stage that made {stage_dir} (it makes such a shard again)")


def delete_shard(shard: Shard) -> None:
    """Uncommit first (index), then remove the tar, so the shard vanishes atomically."""
    from curate import storage

    for path in (shard.index_path, shard.tar_path):
        if path is not None:
            storage.remove(path)


def split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    dirname, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext


def iter_tar_samples(
    tar_path: str | os.PathLike | BinaryIO, wanted: Callable[[str, str], bool] | None = None, *,
    what: str | None = None,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each group of consecutive members sharing a key.

    With ``wanted(key, ext)`` only those members are read and the rest are seeked over (the tar
    is opened seekable, not as a stream); samples with no wanted member are not yielded.
    ``tar_path`` may be an open binary file (``what`` names it in errors).
    """
    source = {"fileobj": tar_path} if hasattr(tar_path, "read") else {"name": tar_path}
    try:
        tar = tarfile.open(**source, mode="r|" if wanted is None else "r:")
    except tarfile.TarError as e:
        raise ShardError(f"{what or tar_path}: not a readable tar: {e}") from e
    try:
        with tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member(info.name)
                if key is not None and k != key:
                    if members:
                        yield key, members
                    members = {}
                key = k
                if wanted is None or wanted(k, ext):
                    members[ext] = tar.extractfile(info).read()
            if key is not None and members:
                yield key, members
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{what or tar_path}: cut off or damaged ({e}); to make a committed shard again, delete "
                         "its index (NNNNNN.parquet beside it) and rerun the stage that made it") from e


def samples_at(
    tar: str | os.PathLike, spans: list[tuple[int, int]], wanted: Callable[[str, str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of the samples in the byte spans (offset, length) an index locates
    (``tar_offset``, ``tar_length``: one sample's, or a run of consecutive samples'), in the order
    given: one read per span, side by side for a URL, so that a few samples of a remote shard cost
    their own bytes and no more. ``wanted`` as for :func:`iter_tar_samples`."""
    from curate import storage

    def read(span: tuple[int, int]) -> bytes:
        return storage.read_range(tar, *span)

    for (offset, _), data in zip(spans, storage.parallel_map(read, spans, storage.is_remote(tar)), strict=True):
        yield from iter_tar_samples(io.BytesIO(data), wanted, what=f"{tar} at byte {offset}")


def owned_samples(
    tar: str, owned: Callable[[int, str], bool], wanted: Callable[[str, str], bool] | None = None
) -> Iterator[tuple[str, dict[str, bytes] | None]]:
    """Every sample of a tar at a URL, in tar order, as (key, its ``wanted`` members) for those
    that ``owned(i, key)`` takes (``i`` counts samples from 0) and (key, None) for the others: the
    index beside the tar lists the samples and where each lies, and only the owned ones are
    fetched. What a decoding worker reads a remote image shard with: N workers, each owning every
    Nth sample, fetch each byte once between them (walking the tar, each would fetch all of it)."""
    from curate import storage

    # pyarrow on one thread, not polars: this runs in forked DataLoader workers, where polars'
    # thread pool, used by the parent before the fork, deadlocks.
    index = pq.read_table(io.BytesIO(storage.read_bytes(index_of(tar))), use_threads=False,
                          columns=["key", "status", "tar_offset", "tar_length"]).to_pylist()
    rows = sorted((r for r in index if r["status"] == OK), key=lambda r: r["tar_offset"] or 0)
    if any(r["tar_offset"] is None or r["tar_length"] is None for r in rows):
        raise ShardError(f"{tar}: its index does not locate its samples (written before indexes recorded "
                         "tar_offset): read it from a local copy")
    keys = [r["key"] for r in rows]
    mine = [i for i, key in enumerate(keys) if owned(i, key)]
    # Owned samples that lie end to end (a worker's chunk of consecutive samples) in one request.
    spans: list[list[int]] = []
    for i in mine:
        offset, length = rows[i]["tar_offset"], rows[i]["tar_length"]
        if spans and spans[-1][0] + spans[-1][1] == offset:
            spans[-1][1] += length
        else:
            spans.append([offset, length])
    fetched = samples_at(tar, [(o, n) for o, n in spans])  # every member, so that each sample comes
    taken = set(mine)
    for i, key in enumerate(keys):
        if i not in taken:
            yield key, None
            continue
        got, members = next(fetched, (None, {}))
        if got != key:
            raise ShardError(f"{tar}: its index places sample {key!r} where the tar holds {got!r}")
        yield key, {ext: data for ext, data in members.items() if wanted is None or wanted(key, ext)}


def reject_samples(
    shard: Shard,
    rejections: Mapping[str, str],
    reason: str,
    *,
    depends_on: Mapping[str, str] | None = None,
) -> Shard:
    """Rewrite a committed shard with some accepted samples turned into rejections.

    ``rejections`` maps key -> detail. The rows keep their place in the index (nothing is
    lost from the accounting); the members leave the tar. The new tar and index are
    committed the same way as a fresh shard, so a kill during the rewrite leaves either the
    old shard, the new one, or an index whose tar size does not match (which the runner
    treats as uncommitted and redoes).
    """
    from curate import storage

    remote = storage.is_remote(shard.index_path)  # at a URL: read as a stream, the new one uploaded
    out_dir = storage.parent(shard.index_path) if remote else Path(shard.index_path).parent
    if remote and (current := open_shard(out_dir, shard.shard_id)) != shard:
        log.info("%s: rewritten by another worker's final pass already", shard.index_path)
        return current
    old = read_index(shard.index_path)
    stage_schema = {k: v for k, v in old.schema.items() if k not in BASE_SCHEMA}
    writer = ShardWriter(out_dir, shard.shard_id, stage_schema, with_tar=shard.tar_path is not None)
    try:
        if shard.tar_path is not None:
            with contextlib.ExitStack() as stack:
                tar = _HashingReader(stack.enter_context(storage.open_stream(shard.tar_path))) if remote \
                    else shard.tar_path
                try:
                    for key, members in iter_tar_samples(tar, what=str(shard.tar_path)):
                        if key not in rejections:
                            writer.write_members(key, members)
                    changed = remote and tar.drain() != (shard.meta.tar_bytes, shard.meta.tar_sha256)
                except Exception:
                    # A tar replaced mid-read may not even parse: changed if it or its index is.
                    if not remote or (open_shard(out_dir, shard.shard_id) == shard and shard.intact()):
                        raise
                    changed = True
                if changed:  # replaced while it was read: by another worker's same rewrite
                    log.info("%s: rewritten by another worker's final pass while it was read", shard.tar_path)
                    writer.abort()
                    return open_shard(out_dir, shard.shard_id)
        for row in old.iter_rows(named=True):
            if row["status"] == OK and row["key"] in rejections:
                row.update(status=REJECTED, reason=reason, detail=rejections[row["key"]])
            writer.rows.append(row)
        meta = shard.meta
        return writer.commit(
            stage=meta.stage,
            fingerprint=meta.fingerprint,
            config_hash=meta.config_hash,
            depends_on={**meta.depends_on, **(depends_on or {})},
            seconds=meta.seconds,
            replacing=True,
        )
    except BaseException:
        writer.abort()
        raise
