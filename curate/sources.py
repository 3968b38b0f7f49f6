"""Where `curate ingest` reads images from: folders, URL lists, webdataset tars, parquet files of
images, HF datasets.

A source splits its input into output shards (``plan``) deterministically, whatever the
number of workers, and yields the records of one shard in a fixed order (``records``). A
record carries the bytes (or a path to read them from), the original caption and where the
sample came from; a record that could not be read at all carries the rejection instead.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import glob
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curate import storage
from curate.images import IMAGE_EXTENSIONS
from curate.runner import CurateError, ShardTask
from curate.shards import index_of, read_index, split_member, stable_hash

log = logging.getLogger("curate")

CAPTION_COLUMNS = ("caption", "text", "alt_text", "alt", "prompt", "description", "txt", "TEXT")
URL_COLUMNS = ("url", "URL", "image_url", "img_url", "link")
URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".txt")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Record:
    source: str  # where the sample came from: a relative path, a URL, tar::member, hf row
    data: bytes | None = None
    path: str | None = None  # read in the worker when data is None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (reason, detail) when nothing could be read

    def __post_init__(self) -> None:
        # What is written as text (the index, KEY.json, KEY.txt) must be UTF-8; ``path`` stays as it is.
        self.source = _utf8_safe(self.source)
        self.caption = _utf8_safe(self.caption)
        self.meta = _utf8_safe(self.meta)


# Surrogates in a Python string are text UTF-8 cannot hold: a file or tar member name whose bytes
# are not UTF-8 (Python keeps each such byte as a surrogate), or a lone surrogate escape in JSON
# ("\ud83d", alt text cut in the middle of an emoji by a count of UTF-16 units; json.loads joins the
# pairs that make a character, so any left is a lone one).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8_safe(value: Any) -> Any:
    """``value`` with every surrogate in its strings (dict keys included) replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_utf8_safe(v) for v in value]
    if isinstance(value, dict):
        return {_utf8_safe(k): _utf8_safe(v) for k, v in value.items()}
    return value


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


# Byte order marks, the longest first (UTF-32 LE's begins with UTF-16 LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _decode_text(data: bytes) -> str:
    """Caption text: UTF-8, or what a byte order mark names (Windows editors write UTF-8 with a BOM,
    and UTF-16 as "Unicode"); the mark is not part of the text."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    return data.decode(encoding, errors="replace")


def _read_caption_file(path: Path) -> tuple[str | None, dict[str, Any]]:
    """A sidecar caption: .txt is the caption; .json may hold caption/text/alt plus metadata."""
    try:
        if path.suffix.lower() == ".txt":
            return _decode_text(path.read_bytes()).strip(), {}
        meta = json.loads(_decode_text(path.read_bytes()))
    except (OSError, ValueError) as e:
        return None, {"sidecar_error": f"{path.name}: {e}"[:200]}
    if not isinstance(meta, dict):
        return None, {"sidecar": meta}
    caption = next((meta[c] for c in CAPTION_COLUMNS if isinstance(meta.get(c), str)), None)
    return caption, {"sidecar": meta}


class Source:
    kind = "source"

    def describe(self) -> dict[str, Any]:
        """Settings of the source that change the output (hashed into the stage config)."""
        return {"kind": self.kind}

    def location(self) -> str:
        raise NotImplementedError

    def plan(self, shard_size: int) -> list[ShardTask]:
        raise NotImplementedError

    def prepare(self, todo: list[ShardTask], out_dir: Path, workers: int) -> None:
        """Fetch what the pending shards need (downloads); most sources need nothing."""

    def records(self, task: ShardTask) -> Iterator[Record]:
        raise NotImplementedError

    def done(self, task: ShardTask) -> None:
        """The shard is committed: drop anything kept for it."""

    def cleanup(self, out_dir: Path) -> None:
        """The stage is complete: drop scratch space."""


# How a folder's images are ordered into shards: "spread" by a hash of the path, "path" sorted.
FOLDER_ORDERS = ("spread", "path")


# A file's size and modification time (ns); (None, None) for one that cannot be stat'ed (a link whose
# target is gone), which is then read, and recorded as unreadable, rather than stop the plan.
_Stat = tuple[int | None, int | None]


def _stat(path: Path) -> _Stat:
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _spread(rel: str) -> tuple[bytes, str]:
    # surrogateescape: a name whose bytes are not UTF-8 is hashed by its bytes.
    return hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest(), rel


class FolderSource(Source):
    """Images under a folder, searched recursively.

    ``order="spread"`` lists them by a hash of their relative path, a fixed pseudo-random order:
    what sits together on disk (a folder per class, per date, per photographer) spreads over every
    shard. The trainer shuffles within blocks of consecutive samples of a shard, so a shard must be
    a sample of the whole dataset, not of one folder. ``order="path"`` is sorted path order, what
    stages ingested before the spread order existed used (``curate ingest`` continues those in it).

    A sidecar ``NAME.txt`` or ``NAME.json`` beside ``NAME.jpg`` holds the original caption.
    """

    kind = "folder"

    def __init__(self, root: str | os.PathLike, order: str = "spread"):
        if order not in FOLDER_ORDERS:
            raise CurateError(f"--order must be one of {', '.join(FOLDER_ORDERS)}, not {order!r}")
        self.root = Path(root)
        self.order = order

    def describe(self) -> dict[str, Any]:
        # Absent for path order, so the stages ingested before "spread" existed keep their config.
        return {"kind": self.kind, **({"order": self.order} if self.order != "path" else {})}

    def location(self) -> str:
        return str(self.root.resolve())

    def _files(self) -> list[tuple[str, _Stat, list[tuple[str, _Stat]]]]:
        images, others, skipped = [], {}, collections.Counter()
        unlisted: list[OSError] = []  # os.walk passes over a folder it cannot list without a word
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=unlisted.append):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                full = Path(dirpath, name)
                rel = full.relative_to(self.root).as_posix()
                suffix = full.suffix.lower()
                if suffix in IMAGE_EXTENSIONS:
                    images.append(rel)
                elif suffix in (".txt", ".json"):
                    # By the name with its suffix in lower case, as images are found: DSC_0001.TXT
                    # is DSC_0001.JPG's caption (NAME.txt first where both are, then the first name
                    # in sorted order).
                    lowered = rel[: len(rel) - len(suffix)] + suffix
                    current = others.get(lowered)
                    if current != lowered and (current is None or rel == lowered or rel < current):
                        others[lowered] = rel
                else:
                    skipped[suffix or "(no suffix)"] += 1
        if unlisted:
            log.warning("%s: %d folders could not be listed, their images left out: %s", self.root, len(unlisted),
                        "; ".join(str(e) for e in unlisted[:5]) + ("; ..." if len(unlisted) > 5 else ""))
        if skipped:  # said, not silently passed over: a format to convert, or a folder of other things
            log.info("%s: skipped %d files that are neither images nor captions (%s)", self.root, skipped.total(),
                     ", ".join(f"{suffix} {count}" for suffix, count in skipped.most_common()))
        out = []
        for rel in sorted(images, key=_spread if self.order == "spread" else None):
            stem = rel.rsplit(".", 1)[0]
            sidecars = [(others[s], _stat(self.root / others[s])) for s in (f"{stem}.txt", f"{stem}.json")
                        if s in others]
            out.append((rel, _stat(self.root / rel), sidecars))
        return out

    def plan(self, shard_size: int) -> list[ShardTask]:
        files = self._files()
        if not files:
            raise CurateError(f"{self.root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        tasks = []
        for shard_id, (start, end) in enumerate(_chunks(len(files), shard_size)):
            chunk = files[start:end]
            # Path, size and mtime of every file (images and sidecars): a changed file changes
            # its shard's fingerprint, and only that shard is redone.
            fingerprint = stable_hash(
                [(rel, *st, [(s, *ss) for s, ss in side]) for rel, st, side in chunk]
            )
            payload = [(rel, [s for s, _ in side]) for rel, _, side in chunk]
            tasks.append(ShardTask(shard_id, fingerprint, len(chunk), payload))
        return tasks

    def records(self, task: ShardTask) -> Iterator[Record]:
        for rel, sidecars in task.payload:
            caption, meta = None, {}
            for sidecar in sidecars:  # .txt before .json: the plain caption wins
                c, m = _read_caption_file(self.root / sidecar)
                caption = caption if caption is not None else c
                meta.update(m)
            yield Record(source=rel, path=str(self.root / rel), caption=caption, meta=meta)


def _group_tar(tar_path: str, label: str) -> Iterator[Record]:
    """Records from a webdataset tar, reading members in order; a broken tar ends in a rejection."""
    key, members, last, cut = None, {}, None, False
    try:
        with storage.open_stream(tar_path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member(info.name)
                if key is not None and k != key:
                    yield _record_from_members(label, key, members)
                    members = {}
                key, last = k, info.name
                members[ext.lower()] = tar.extractfile(info).read()
            # tarfile ends without a word at a header cut short (a copy or download interrupted
            # there): less than a header's 512 bytes after the last member is no end of archive.
            if getattr(tar.fileobj, "comptype", None) == "tar":
                cut = 0 < storage.size(tar_path) - tar.offset < tarfile.BLOCKSIZE
    except storage.RemoteError:
        raise  # the network, not the data: the shard fails and a rerun reads it again
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        if key is not None:
            yield Record(source=f"{label}::{key}", error=("unreadable", f"tar member unreadable: {e}"[:300]))
        else:
            yield Record(source=label, error=("unreadable", f"tar unreadable after {last!r}: {e}"[:300]))
        return
    if key is not None:
        yield _record_from_members(label, key, members)
    if cut:
        yield Record(source=label, error=("unreadable", f"tar cut off inside a member's header after {last!r}: "
                                                        "the samples after it are lost"))


def _field(members: dict[str, bytes], suffix: str) -> str | None:
    """The member of a sample that ends in ``suffix``: ``KEY.suffix``, else one whose name has more
    dots (``img.0001.txt``: webdataset's key ends at the first dot, so its field is ``0001.txt``)."""
    if suffix in members:
        return suffix
    return next((e for e in members if e.rsplit(".", 1)[-1] == suffix), None)


def _record_from_members(label: str, key: str, members: dict[str, bytes]) -> Record:
    source = f"{label}::{key}"
    image_ext = next((e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    meta: dict[str, Any] = {}
    caption = None
    json_ext, txt_ext = _field(members, "json"), _field(members, "txt")
    if json_ext is not None:
        try:
            meta = json.loads(members[json_ext])
        except ValueError:
            meta = {}
        if isinstance(meta, dict):
            caption = next((meta[c] for c in CAPTION_COLUMNS if isinstance(meta.get(c), str)), None)
            meta = {k: v for k, v in meta.items() if isinstance(v, str | int | float | bool) or v is None}
        else:
            meta = {}
    if txt_ext is not None:
        caption = _decode_text(members[txt_ext]).strip()
    if image_ext is None:
        return Record(source=source, error=("unreadable", f"no image member among {sorted(members)}"))
    url = meta.get("url")
    return Record(source=url if isinstance(url, str) else source, data=members[image_ext],
                  caption=caption or None, meta={"tar_member": f"{key}.{image_ext}", **meta})


class TarSource(Source):
    """Existing webdataset tars (img2dataset output for instance); each tar gives one shard. They
    may lie at URLs (curate/storage.py): a folder's (listed), one tar's, or a brace pattern's
    (``https://host/out/{00000..00099}.tar``), each read as a stream with read-ahead."""

    kind = "tars"

    def __init__(self, spec: str):
        self.spec = spec
        self.paths = self._expand(spec)

    @staticmethod
    def _expand(spec: str) -> list[Path | str]:
        return _expand(spec, ".tar")

    def location(self) -> str:
        return self.spec

    def plan(self, shard_size: int) -> list[ShardTask]:
        if not self.paths:
            raise CurateError(f"{self.spec}: no .tar files found")
        if storage.is_remote(self.spec):
            return self._plan_urls()
        common = Path(os.path.commonpath([p.resolve().parent for p in self.paths]))
        tasks = []
        for shard_id, path in enumerate(self.paths):
            st = path.stat()
            label = path.resolve().relative_to(common).as_posix()
            # Sample count unknown until read: a rough guess from the size for the progress bar.
            tasks.append(ShardTask(shard_id, stable_hash([label, st.st_size, st.st_mtime_ns]),
                                   max(1, st.st_size // 150_000), (str(path), label)))
        return tasks

    def _plan_urls(self) -> list[ShardTask]:
        """As for files: labelled by their path under the folder they share, fingerprinted by
        size and the store's ETag or modification time (asked many at a time)."""
        urls = [str(u) for u in self.paths]

        def stat(url: str) -> tuple[int, str]:
            try:
                return storage.version(url)
            except FileNotFoundError:
                raise CurateError(f"{url}: no such tar") from None

        common = posixpath.commonpath([storage.parent(u).split("://", 1)[1] for u in urls])
        tasks = []
        for shard_id, (url, (size, tag)) in enumerate(zip(urls, storage.parallel_map(stat, urls, True), strict=True)):
            label = posixpath.relpath(url.split("://", 1)[1], common)
            tasks.append(ShardTask(shard_id, stable_hash([label, size, tag]), max(1, size // 150_000), (url, label)))
        return tasks

    def records(self, task: ShardTask) -> Iterator[Record]:
        path, label = task.payload
        yield from _group_tar(path, label)
        yield from _img2dataset_failures(index_of(path))


def _img2dataset_failures(parquet: str) -> Iterator[Record]:
    """img2dataset records failed downloads only in the parquet beside its tar (a file or a URL)."""
    if not storage.is_file(parquet):
        return
    try:
        df = read_index(parquet)
    except storage.RemoteError:
        raise
    except Exception:
        return
    if not {"status", "error_message", "url"} <= set(df.columns):
        return  # not img2dataset's table (our own index, for instance)
    for row in df.filter(pl.col("status") != "success").sort("key").iter_rows(named=True):
        yield Record(source=row["url"], error=("download_failed", str(row["error_message"])[:300]))


class UrlListSource(Source):
    """A table of URLs (parquet, csv, tsv, jsonl, or txt with one URL a line), fetched with img2dataset.

    The list is cut into shards of --shard-size rows; each worker downloads its pending
    shards in one img2dataset run (original bytes, no re-encoding) and the results are
    normalised into our shards in the list's row order.
    """

    kind = "urls"

    def __init__(self, path: str | os.PathLike, *, url_column: str | None = None,
                 caption_column: str | None = None, threads: int = 32, timeout: int = 10, retries: int = 2):
        self.path = Path(path)
        self.table = self._read(self.path)
        self.url_column = self._pick(url_column, URL_COLUMNS, "url")
        # Detected among the columns that read as text (numbers do, as their digits; lists do not).
        texts = tuple(c for c in CAPTION_COLUMNS if c in self.table.columns and not self.table.schema[c].is_nested())
        self.caption_column = self._pick(caption_column, texts, "caption", required=False)
        for column in (self.url_column, self.caption_column):
            if column is not None and self.table.schema[column].is_nested():
                raise CurateError(f"{self.path}: column {column!r} holds {self.table.schema[column]}, not text; "
                                  f"name another with --{'url' if column == self.url_column else 'caption'}-column")
        self.threads, self.timeout, self.retries = threads, timeout, retries
        self.downloads: dict[int, Path] = {}

    @staticmethod
    def _read(path: Path) -> pl.DataFrame:
        name = path.name.lower()
        try:
            if name.endswith(".parquet"):
                return pl.read_parquet(path)
            if name.endswith(".csv"):
                return pl.read_csv(path, infer_schema=False)
            if name.endswith(".tsv"):
                return pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
            if name.endswith((".jsonl", ".ndjson", ".json")):
                with path.open("rb") as f:  # polars' JSON readers stop at a UTF-8 byte order mark
                    source = path.read_bytes()[len(codecs.BOM_UTF8):] if f.read(3) == codecs.BOM_UTF8 else path
                return pl.read_json(source) if name.endswith(".json") else pl.read_ndjson(source)
            # utf-8-sig: a byte order mark (Notepad's UTF-8) is not part of the first URL.
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
            return pl.DataFrame({"url": lines})
        except Exception as e:
            raise CurateError(f"{path}: cannot read the URL list: {e}") from e

    def _pick(self, given: str | None, candidates: tuple[str, ...], what: str, required: bool = True) -> str | None:
        if given is not None:
            if given not in self.table.columns:
                raise CurateError(f"{self.path}: no column {given!r} (columns: {self.table.columns})")
            return given
        found = next((c for c in candidates if c in self.table.columns), None)
        if found is None and required:
            raise CurateError(f"{self.path}: no {what} column found among {self.table.columns}; "
                              f"name it with --{what}-column")
        return found

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url_column": self.url_column, "caption_column": self.caption_column}

    def location(self) -> str:
        return str(self.path.resolve())

    def _rows(self) -> pl.DataFrame:
        cols = {"url": pl.col(self.url_column).cast(pl.Utf8)}
        if self.caption_column:
            cols["caption"] = pl.col(self.caption_column).cast(pl.Utf8)
        else:
            cols["caption"] = pl.lit(None, dtype=pl.Utf8)
        return self.table.select(**cols)

    def plan(self, shard_size: int) -> list[ShardTask]:
        rows = self._rows()
        if rows.height == 0:
            raise CurateError(f"{self.path}: the URL list is empty")
        self.shard_size = shard_size
        tasks = []
        for shard_id, (start, end) in enumerate(_chunks(rows.height, shard_size)):
            chunk = rows.slice(start, end - start)
            digest = hashlib.sha256()
            for url, caption in chunk.iter_rows():
                digest.update(f"{url}\t{caption}\n".encode())
            tasks.append(ShardTask(shard_id, digest.hexdigest(), chunk.height, (start, end)))
        return tasks

    def prepare(self, todo: list[ShardTask], out_dir: Path, workers: int) -> None:
        from curate.download import download_urls

        rows = self._rows()
        batch = pl.concat([rows.slice(t.payload[0], t.payload[1] - t.payload[0]) for t in todo])
        scratch = out_dir / "_downloads" / stable_hash([t.fingerprint for t in todo])[:16]
        shards = download_urls(batch, scratch, shard_size=self.shard_size, processes=workers,
                               threads=self.threads, timeout=self.timeout, retries=self.retries)
        # All pending chunks are full except perhaps the list's last, which comes last:
        # img2dataset's n-th shard is our n-th pending shard.
        self.downloads = {t.shard_id: shards[i] for i, t in enumerate(todo)}

    def records(self, task: ShardTask) -> Iterator[Record]:
        from curate.download import read_download

        yield from read_download(self.downloads[task.shard_id])

    def done(self, task: ShardTask) -> None:
        prefix = self.downloads.pop(task.shard_id, None)
        if prefix is not None:
            for p in prefix.parent.glob(prefix.name + "*"):
                p.unlink(missing_ok=True)

    def cleanup(self, out_dir: Path) -> None:
        shutil.rmtree(out_dir / "_downloads", ignore_errors=True)


# Columns that may hold image bytes in parquet files: a Hugging Face Image feature (a struct of
# bytes and path), or raw bytes under one of these names.
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")


class ParquetSource(Source):
    """Parquet files that hold the images themselves (how the Hugging Face Hub stores datasets with
    an Image feature, and many dumps): a file, a folder, a glob or brace pattern, or URLs of them
    (``hf://datasets/ORG/NAME/data/train-*.parquet`` through huggingface_hub's filesystem, ``s3://``,
    ``https://``). Each file is cut into shards of --shard-size rows, read a few row groups at a time
    (at a URL by ranged requests), so nothing is downloaded or converted whole before work starts.
    The image column is an Image feature's struct (its ``bytes``) or a binary column; the caption
    column as for the other sources."""

    kind = "parquet"

    def __init__(self, spec: str, *, image_column: str | None = None, caption_column: str | None = None):
        self.spec = spec
        # Local files by their resolved paths: their labels (in the fingerprints and the source
        # column) must not depend on the working folder or a link it was reached through.
        self.paths = [storage.resolved(p) for p in _expand(spec, ".parquet")]
        if not self.paths:
            raise CurateError(f"{spec}: no .parquet files found")
        try:
            with _parquet_file(self.paths[0]) as file:
                schema = file.schema_arrow
        except FileNotFoundError:
            raise CurateError(f"{self.paths[0]}: no such parquet file") from None
        except (OSError, ValueError) as e:  # a failed request (RemoteError), not a parquet file
            raise CurateError(f"{self.paths[0]}: cannot read it as parquet: {e}") from None
        self.image_column = image_column or image_column_of(schema)
        if self.image_column is None or self.image_column not in schema.names:
            raise CurateError(f"{self.paths[0]}: no image column (an Image feature, or bytes named "
                              f"{', '.join(IMAGE_COLUMNS)}) among {', '.join(schema.names)}; name it with --image-column")
        if caption_column is not None and caption_column not in schema.names:
            raise CurateError(f"{self.paths[0]}: no column {caption_column!r} (columns: {', '.join(schema.names)})")
        if caption_column is not None and not _is_text(schema.field(caption_column).type):
            raise CurateError(f"{self.paths[0]}: column {caption_column!r} holds {schema.field(caption_column).type}, "
                              "not text; name another with --caption-column")
        self.caption_column = caption_column or next(
            (c for c in CAPTION_COLUMNS if c in schema.names and _is_text(schema.field(c).type)), None)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_column": self.image_column, "caption_column": self.caption_column}

    def location(self) -> str:
        return self.spec

    def plan(self, shard_size: int) -> list[ShardTask]:
        remote = storage.is_remote(self.paths[0])

        def stat(path: str) -> tuple[int, str, int, int]:
            try:
                size, tag = storage.version(path)
                with _parquet_file(path) as file:
                    meta = file.metadata
                    largest = max((meta.row_group(g).num_rows for g in range(meta.num_row_groups)), default=0)
                    return size, tag, meta.num_rows, largest
            except FileNotFoundError:
                raise CurateError(f"{path}: no such parquet file") from None

        common = posixpath.commonpath([storage.parent(p).split("://", 1)[-1] for p in self.paths])
        tasks: list[ShardTask] = []
        stats = list(storage.parallel_map(stat, self.paths, remote))
        largest = max(group for *_, group in stats)
        if largest > 4 * shard_size:
            log.warning("%s: row groups of up to %d rows, %d shards' worth: each shard reads its row group from its "
                        "start to its own rows (--shard-size %d reads each once)", self.spec, largest,
                        largest // shard_size, largest)
        for path, (size, tag, rows, _) in zip(self.paths, stats, strict=True):
            label = posixpath.relpath(path.split("://", 1)[-1], common)
            for start, end in _chunks(rows, shard_size):
                tasks.append(ShardTask(len(tasks), stable_hash([label, size, tag, start, end]), end - start,
                                       (path, label, start, end)))
        if not tasks:
            raise CurateError(f"{self.spec}: the parquet files hold no rows")
        return tasks

    def records(self, task: ShardTask) -> Iterator[Record]:
        path, label, start, end = task.payload
        with _parquet_file(path) as file:
            yield from self._rows(file, label, start, end)

    def _rows(self, file: Any, label: str, start: int, end: int) -> Iterator[Record]:
        columns = [self.image_column] + ([self.caption_column] if self.caption_column else [])
        # The row groups that hold rows [start, end), each read a batch of rows at a time: a row
        # group may hold far more rows than a shard (pandas and pyarrow write up to a million),
        # and only a batch is held in memory (the rows before the shard's are read and dropped).
        first = 0
        for group in range(file.metadata.num_row_groups):
            count = file.metadata.row_group(group).num_rows
            if first + count > start and first < end:
                position = first
                for batch in file.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group], columns=columns,
                                               use_threads=False):
                    lo, hi = max(start, position) - position, min(end, position + batch.num_rows) - position
                    if hi > lo:
                        yield from self._records(batch, label, position, lo, hi)
                    position += batch.num_rows
                    if position >= end:
                        break
            first += count
            if first >= end:
                break

    def _records(self, batch: Any, label: str, position: int, lo: int, hi: int) -> Iterator[Record]:
        images = batch.column(self.image_column).slice(lo, hi - lo).to_pylist()
        captions = (batch.column(self.caption_column).slice(lo, hi - lo).to_pylist() if self.caption_column
                    else [None] * (hi - lo))
        for offset, (image, caption) in enumerate(zip(images, captions, strict=True)):
            source = f"{label}[{position + lo + offset}]"
            data = image.get("bytes") if isinstance(image, dict) else image
            if isinstance(data, bytes | bytearray) and data:
                yield Record(source=source, data=bytes(data), caption=caption)
            else:
                yield Record(source=source, caption=caption,
                             error=("unreadable", f"no image bytes in column {self.image_column!r}"))


_PARQUET_BATCH = 64  # rows decoded at a time
_PARQUET_BUFFER = 1 << 23  # bytes read at a time


@contextlib.contextmanager
def _parquet_file(path: str) -> Iterator[Any]:
    """A parquet file to read, here or at a URL (ranged requests with read-ahead: the footer, then
    the row groups asked for)."""
    import pyarrow.parquet as pq

    if not storage.is_remote(path):
        # A buffered stream: a batch's pages are read, not the row group's whole column chunk.
        file = pq.ParquetFile(storage.local_path(path), buffer_size=_PARQUET_BUFFER)  # native reads
        try:
            yield file
        finally:
            file.close()
        return
    with storage.open_stream(path) as stream:
        yield pq.ParquetFile(stream, buffer_size=_PARQUET_BUFFER)


def _holds_images(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return image_column_of(pq.read_schema(path)) is not None
    except (OSError, ValueError):  # not readable parquet: the URL list reader names the problem
        return False


def _parquet_at_url(spec: str) -> bool:
    """Whether a URL names parquet files: by its suffix, else by what its folder lists."""
    lowered = spec.lower()
    if lowered.endswith(".parquet") or ".parquet" in lowered.rsplit("/", 1)[-1]:
        return True
    if lowered.endswith(".tar") or "{" in spec:
        return False
    try:
        names = storage.list_names(spec)
    except FileNotFoundError:
        return False
    return any(n.endswith(".parquet") for n in names) and not any(n.endswith(".tar") for n in names)


def image_column_of(schema: Any) -> str | None:
    """The column of image bytes in a parquet schema: an Image feature's struct (with a binary
    ``bytes`` field), else a binary column of a usual name; None when there is none."""
    import pyarrow as pa

    for field_ in schema:
        t = field_.type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type):
            return field_.name
    return next((c for c in IMAGE_COLUMNS if c in schema.names and _is_binary(schema.field(c).type)), None)


def _is_binary(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_text(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):  # dictionary-encoded text: a pandas categorical, for one
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _expand(spec: str, suffix: str) -> list[Path | str]:
    """The files a source names: one, a folder's (recursively; a URL's listed), or a glob or brace
    pattern's, sorted; hidden ones left out."""
    if storage.is_remote(spec):
        import braceexpand

        if "{" in spec or storage.has_magic(spec.split("://", 1)[1]):
            expanded = braceexpand.braceexpand(spec)
            return sorted({url for item in expanded
                           for url in (storage.glob(item) if storage.has_magic(item.split("://", 1)[1]) else [item])
                           if not posixpath.basename(url).startswith(".")})
        if spec.lower().endswith(suffix):
            return [spec]
        try:
            names = storage.list_names(spec)
        except FileNotFoundError:
            return []
        return [storage.join(spec, n) for n in names if n.endswith(suffix) and not n.startswith(".")]
    path = Path(spec)
    if path.is_dir():
        paths = sorted(path.rglob(f"*{suffix}"))
    elif path.is_file():
        paths = [path]
    else:
        import braceexpand

        paths = sorted({Path(p) for pattern in braceexpand.braceexpand(spec) for p in glob.glob(pattern)})
    return [p for p in paths if not p.name.startswith(".")]


def _is_hf_text(feature: Any) -> bool:
    """A text feature of a datasets.Dataset: string, or large_string (polars' text, and so that of
    Dataset.from_polars and of datasets read from parquet files polars wrote)."""
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


class HFSource(Source):
    """A Hugging Face dataset: ``hf:NAME[:SPLIT]`` from the Hub, or a ``save_to_disk`` folder."""

    kind = "hf"

    def __init__(self, spec: str, *, split: str | None = None, image_column: str | None = None,
                 caption_column: str | None = None):
        import datasets

        self.spec = spec
        if spec.startswith("hf:"):
            name, _, hub_split = spec[3:].partition(":")
            split = hub_split or split or "train"
            try:
                ds = datasets.load_dataset(name, split=split)
            except Exception as e:
                raise CurateError(f"{spec}: cannot load the dataset: {e}") from e
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                split = split or ("train" if "train" in ds else next(iter(ds)))
                if split not in ds:
                    raise CurateError(f"{spec}: no split {split!r} (splits: {list(ds)})")
                ds = ds[split]
        self.split = split
        self.image_column = image_column or self._detect_image_column(ds)
        if self.image_column not in ds.column_names:
            raise CurateError(f"{spec}: no column {self.image_column!r} (columns: {ds.column_names})")
        if caption_column is not None and caption_column not in ds.column_names:
            raise CurateError(f"{spec}: no column {caption_column!r} (columns: {ds.column_names})")
        if caption_column is not None and not _is_hf_text(ds.features[caption_column]):
            raise CurateError(f"{spec}: column {caption_column!r} holds {ds.features[caption_column]}, not text; "
                              "name another with --caption-column")
        self.caption_column = caption_column or next(
            (c for c in CAPTION_COLUMNS if c in ds.column_names and _is_hf_text(ds.features[c])), None
        )
        if isinstance(ds.features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))  # original bytes
        self.ds = ds

    def _detect_image_column(self, ds) -> str:
        import datasets

        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                return name
        for name in ("image", "img", "jpg", "png"):
            if name in ds.column_names:
                return name
        raise CurateError(f"{self.spec}: no image column found among {ds.column_names}; name it with --image-column")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "split": self.split, "image_column": self.image_column,
                "caption_column": self.caption_column}

    def location(self) -> str:
        return self.spec

    def plan(self, shard_size: int) -> list[ShardTask]:
        if len(self.ds) == 0:
            raise CurateError(f"{self.spec}: the dataset has no rows")
        return [
            ShardTask(shard_id, stable_hash([self.ds._fingerprint, start, end]), end - start, (start, end))
            for shard_id, (start, end) in enumerate(_chunks(len(self.ds), shard_size))
        ]

    def records(self, task: ShardTask) -> Iterator[Record]:
        start, end = task.payload
        columns = [self.image_column] + ([self.caption_column] if self.caption_column else [])
        rows = self.ds.select_columns(columns).select(range(start, end))
        for offset, row in enumerate(rows):
            source = f"{self.spec}[{start + offset}]"
            image = row[self.image_column]
            caption = row.get(self.caption_column) if self.caption_column else None
            if isinstance(image, dict) and image.get("bytes") is not None:
                yield Record(source=source, data=image["bytes"], caption=caption)
            elif isinstance(image, dict) and image.get("path"):
                yield Record(source=source, path=image["path"], caption=caption)
            elif isinstance(image, bytes | bytearray):
                yield Record(source=source, data=bytes(image), caption=caption)
            else:
                yield Record(source=source, error=("unreadable", f"no image bytes in column {self.image_column!r}"))


def open_source(
    spec: str,
    *,
    kind: str = "auto",
    url_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    split: str | None = None,
    download_threads: int = 32,
    download_timeout: int = 10,
    download_retries: int = 2,
    order: str = "spread",
) -> Source:
    """Pick the source type from SRC (or --source-type) and open it; a bad SRC is a CurateError."""
    if storage.is_remote(spec):  # at a URL: webdataset tars (img2dataset's output in a bucket) or parquet files
        if kind == "auto":
            kind = "parquet" if _parquet_at_url(spec) else "tars"
        if kind == "parquet":
            return ParquetSource(spec, image_column=image_column, caption_column=caption_column)
        if kind != "tars":
            raise CurateError(f"{spec}: a source at a URL is webdataset tars (a folder of them, one tar, or a "
                              f"{{00000..00099}}.tar pattern) or parquet files of images, not --source-type {kind}")
        return TarSource(spec)
    path = Path(spec)
    if kind == "auto":
        if spec.startswith("hf:"):
            kind = "hf"
        elif path.is_dir() and any((path / m).exists() for m in HF_MARKERS):
            kind = "hf"
        elif path.is_dir():
            has_images = any(Path(f).suffix.lower() in IMAGE_EXTENSIONS
                             for _, _, files in os.walk(path) for f in files)
            kind = ("folder" if has_images else "tars" if list(path.rglob("*.tar"))
                    else "parquet" if list(path.rglob("*.parquet")) else "folder")
        elif path.is_file() and path.name.lower().endswith(".tar"):
            kind = "tars"
        elif path.is_file() and path.name.lower().endswith(".parquet") and (image_column or _holds_images(path)):
            kind = "parquet"  # images in the file itself; a parquet of URLs is a URL list
        elif path.is_file() and path.name.lower().endswith(URL_LIST_SUFFIXES):
            kind = "urls"
        elif any(ch in spec for ch in "*?{") and spec.lower().endswith(".parquet"):
            kind = "parquet"
        elif any(ch in spec for ch in "*?{") and TarSource._expand(spec):
            kind = "tars"
        elif not path.exists():
            raise CurateError(f"{spec}: no such file or folder")
        else:
            raise CurateError(f"{spec}: not a folder of images, URL list ({', '.join(URL_LIST_SUFFIXES)}), "
                              "webdataset tar or Hugging Face dataset")
    if kind not in ("hf", "tars", "parquet") and not path.exists():
        raise CurateError(f"{spec}: no such file or folder")
    if kind == "folder":
        return FolderSource(path, order=order)
    if kind == "tars":
        return TarSource(spec)
    if kind == "parquet":
        return ParquetSource(spec, image_column=image_column, caption_column=caption_column)
    if kind == "urls":
        return UrlListSource(path, url_column=url_column, caption_column=caption_column,
                             threads=download_threads, timeout=download_timeout, retries=download_retries)
    if kind == "hf":
        return HFSource(spec, split=split, image_column=image_column, caption_column=caption_column)
    raise CurateError(f"unknown source type {kind!r}")
