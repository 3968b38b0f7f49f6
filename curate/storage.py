"""Reading shards where they lie: local files, or object stores and HTTP servers through fsspec.

A manifest, its shards' tars and indexes, and an image stage may be URLs (``s3://``, ``gs://``,
``https://``..., any protocol fsspec knows; ``s3fs`` or ``gcsfs`` installed for theirs), so that a
run trains from an object store with no copy and no mount. Stages that write their shards there
(``--out s3://...``) upload each one whole (:func:`write_file`, one PUT, which an object store makes
visible at once or not at all), its index last: see curate/shards.py.

The curate stages read an image stage at a URL too (encode-latents, recaption, score): its
folder listed, its indexes fetched whole (a large one read for some columns: its footer and those
columns' bytes, :func:`parquet_source`), and the samples a worker decodes fetched at the offsets
their index records (:func:`read_range`, one request per run of consecutive samples), so that N
decoding workers fetch each byte once; ingest streams webdataset tars (:func:`open_stream`).

A tar is read through :class:`RangeReader`: ranged GETs of ``CHUNK`` bytes, the next ``AHEAD``
chunks fetched at once in the background while the current one is read, so that a reader walking a
shard forward (the trainer's streams) waits on the network only when it outruns it, and a store's
latency is paid once per ``AHEAD`` chunks rather than per chunk. A request that fails is retried
(``RETRIES`` times, waiting ``RETRY_WAIT`` seconds, doubled each time: object stores answer 503 to
bursts as a matter of course); a missing file is not retried.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import os
import posixpath
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

CHUNK = 4 << 20  # bytes a ranged request fetches
AHEAD = 4  # chunks fetched ahead of a forward walk
BEHIND = 2  # chunks kept behind it (samples up to BEHIND chunks long are read once): 7 in memory per open tar
RETRIES = 4
RETRY_WAIT = 1.0
PARALLEL = 32  # requests in flight when many small files are read (indexes, sizes)
WHOLE = 1 << 20  # a Parquet file up to this size is fetched whole; a larger one, its footer and columns
TAIL = 64 << 10  # bytes of a larger one's end fetched first: its footer, and often its last columns

T = TypeVar("T")
R = TypeVar("R")


def _pin_inherited_filesystems() -> None:
    """In a forked child (DataLoader workers), keep the parent's fsspec filesystems alive for good.

    fsspec starts a new event loop and new instances in the child, and drops the inherited ones;
    collecting one closes its HTTP connections, and closing a socket unregisters it from the event
    loop's epoll, which the child shares with the parent: the parent's loop then never hears the
    answer on that connection, and its next request waits forever (seen in the tests, one run in a
    few). Never collected, the copies close nothing; the child ends with ``os._exit``."""
    spec = sys.modules.get("fsspec.spec")
    if spec is None:
        return
    classes = [spec.AbstractFileSystem]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        _INHERITED.extend(vars(cls).get("_cache", {}).values())


_INHERITED: list[Any] = []
os.register_at_fork(after_in_child=_pin_inherited_filesystems)


class RemoteError(OSError):
    """A remote file that could not be read after the retries, or whose server misbehaved."""


# A path given that is not there, or a file where a folder is due (or the reverse), or not ours to
# write: the OS's message names it, so the command-line tools report it as the user's error.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_remote(path: str | os.PathLike) -> bool:
    """A URL that fsspec reads (``file://`` is local)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    return os.fspath(path).removeprefix("file://")


def absolute(path: str | os.PathLike) -> str:
    """A URL as it is, a local path made absolute: how a record names a file for later."""
    return os.fspath(path) if is_remote(path) else str(Path(local_path(path)).absolute())


def resolved(path: str | os.PathLike) -> str:
    """A URL without a trailing slash, a local path absolute with its links resolved: how a stage
    records its inputs, and how two names of one folder compare equal."""
    return os.fspath(path).rstrip("/") if is_remote(path) else str(Path(local_path(path)).resolve())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base / parts``, for a folder's URL as for a local folder. A URL's ``..`` are resolved here:
    an object store's keys are plain strings, where ``a/../b`` is not ``b``."""
    if is_remote(base):
        scheme, rest = os.fspath(base).split("://", 1)
        host, _, path = rest.partition("/")
        return f"{scheme}://{host}{posixpath.normpath(posixpath.join('/' + path, *parts))}"
    return str(Path(local_path(base), *parts))


def parent(path: str | os.PathLike) -> str:
    """The folder holding ``path`` (absolute and resolved, for a local one)."""
    if is_remote(path):
        return os.fspath(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(local_path(path)).resolve().parent)


def sibling(path: str | os.PathLike, name: str) -> Path | str:
    """The file ``name`` in the folder that holds ``path``: a URL's, or a local path's (as it was
    given, relative or not)."""
    return join(parent(path), name) if is_remote(path) else Path(local_path(path)).with_name(name)


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as e:  # the protocol's package: s3fs, gcsfs, adlfs...
        raise RemoteError(f"{url}: this protocol needs a package that is not installed: {e}") from None
    except ValueError as e:  # an unknown protocol
        raise RemoteError(f"{url}: {e}") from None


def _missing(e: BaseException) -> bool:
    """A missing file, not a failed request: fsspec's HTTP ``info`` turns any failure into
    FileNotFoundError (a 503 included), with the real one as its cause; s3fs's ranged reads give
    boto's NoSuchKey as the cause, its status in its response."""
    cause = e.__cause__
    return cause is None or _status(cause) in (404, 410)


def _status(e: BaseException) -> int | None:
    """The HTTP status of a failed request: aiohttp's (fsspec's HTTP), or botocore's (s3fs)."""
    status = getattr(e, "status", None)
    response = getattr(e, "response", None)
    if status is None and isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status


def _retried(url: str, what: str, call: Callable[[], T]) -> T:
    wait = RETRY_WAIT
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except FileNotFoundError as e:
            if _missing(e):
                raise
            if attempt == RETRIES:
                raise RemoteError(f"{url}: {what} failed {RETRIES + 1} times; last: {e.__cause__!r}") from e
            time.sleep(wait)
            wait *= 2
        except (PermissionError, RemoteError):
            raise
        except Exception as e:  # noqa: BLE001 - network errors come as each backend's own types
            if getattr(e, "status", None) in (401, 403):  # refused, not failed: asking again changes nothing
                raise RemoteError(f"{url}: {what} was refused: {type(e).__name__}: {e}") from e
            if attempt == RETRIES:
                raise RemoteError(f"{url}: {what} failed {RETRIES + 1} times; last: "
                                  f"{type(e).__name__}: {e}") from e
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file (a manifest, an index)."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    url = os.fspath(path)
    fs, inner = _filesystem(url)
    return _retried(url, "reading it", lambda: fs.cat_file(inner))


def list_names(path: str | os.PathLike, files_only: bool = False) -> list[str]:
    """The names in a folder, sorted (``files_only``: not its subfolders'): a URL's from its store's
    listing (an HTTP server's from its index page, as fsspec reads one). FileNotFoundError when
    there is no such folder."""
    if not is_remote(path):
        names = os.listdir(local_path(path))
        return sorted(n for n in names if not files_only or os.path.isfile(os.path.join(local_path(path), n)))
    url = os.fspath(path).rstrip("/")
    fs, inner = _filesystem(url)
    fs.invalidate_cache(inner)  # a listing is asked for to see what is there now
    entries = _retried(url, "listing it", lambda: fs.ls(inner, detail=True))
    return sorted(posixpath.basename(str(entry["name"]).rstrip("/")) for entry in entries
                  if not files_only or entry.get("type") != "directory")


def has_magic(text: str) -> bool:
    """Whether ``text`` holds glob characters (``*``, ``?``, ``[``)."""
    return any(c in text for c in "*?[")


def glob(pattern: str) -> list[str]:
    """The URLs a glob pattern names, sorted: with the pattern in its last part (``.../train-*.parquet``,
    the usual case) the folder is listed and its names matched; a pattern in an earlier part goes
    through the store's own glob."""
    folder, _, name = pattern.rstrip("/").rpartition("/")
    if not has_magic(folder):
        try:
            names = list_names(folder)
        except FileNotFoundError:
            return []
        return [join(folder, n) for n in names if fnmatch.fnmatchcase(n, name)]
    fs, inner = _filesystem(pattern)
    found = _retried(pattern, "globbing it", lambda: fs.glob(inner))
    return sorted(fs.unstrip_protocol(p) for p in found)


def as_location(path: str | os.PathLike) -> Path | str:
    """A folder or file as the stages hold it: a Path, or a URL kept a string (Path folds "//")."""
    return os.fspath(path) if is_remote(path) else Path(path)


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def write_file(local: str | os.PathLike, url: str) -> None:
    """Upload a local file to ``url`` (an object store's PUT is atomic: readers see the old object
    or the new one, never part of it), then check the size the store reports. An HTTP server is
    sent a PUT, as WebDAV and object stores' HTTP endpoints take it."""
    fs, inner = _filesystem(url)
    sent = os.path.getsize(local)
    # Over HTTP with its length: fsspec would stream it chunked, which some servers refuse.
    headers = {**getattr(fs, "kwargs", {}).get("headers", {}), "Content-Length": str(sent)}
    extra = {"method": "put", "headers": headers} if _is_http(url) else {}
    _retried(url, "uploading it", lambda: fs.put_file(os.fspath(local), inner, **extra))
    fs.invalidate_cache(inner)
    stored = size(url)
    if sent != stored:
        raise RemoteError(f"{url}: uploaded {sent} bytes, the store holds {stored}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside the local file ``path`` (its folder made if missing) for the block to
    write the file to; renamed over ``path`` when the block ends (after an fsync of the file and
    its folder with ``fsync``), removed if the block raises. Readers see the old file or the new
    one, whole, and a kill leaves at most a hidden temporary file."""
    path = Path(local_path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_file(path: str | os.PathLike) -> None:
    """Put a written file's bytes on the disk before it is renamed into place (a crash then leaves
    the old file or the new one whole, never a renamed empty one)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (the directory entry, not only the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fetch_file(url: str, local: str | os.PathLike) -> None:
    """Download ``url`` to ``local`` (a checkpoint: too large to hold in memory): under a temporary
    name beside it, size-checked, then renamed, so that ``local`` is whole or absent."""
    fs, inner = _filesystem(url)
    with replacing(local) as tmp:
        _retried(url, "downloading it", lambda: fs.get_file(inner, os.fspath(tmp)))
        expected, got = size(url), os.path.getsize(tmp)
        if expected != got:
            raise RemoteError(f"{url}: downloaded {got} bytes, the store holds {expected}")


def write_bytes(url: str, data: bytes) -> None:
    """Store ``data`` at ``url`` in one PUT (a _stage.json, a small index)."""
    fs, inner = _filesystem(url)
    _retried(url, "writing it", lambda: fs.pipe_file(inner, data))
    fs.invalidate_cache(inner)


def write_whole(path: str | os.PathLike, data: bytes) -> Path | str:
    """Write a small file whole, here or at a URL: locally under a temporary name, then renamed
    (its folder made if missing, :func:`replacing`); at a URL in one PUT. Returns where it went."""
    if is_remote(path):
        write_bytes(os.fspath(path), data)
        return os.fspath(path)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(local_path(path))


def write_text(path: str | os.PathLike, text: str) -> Path | str:
    """:func:`write_whole` of ``text`` (UTF-8)."""
    return write_whole(path, text.encode())


def remove(path: str | os.PathLike) -> None:
    """Delete a file here or at a URL; a missing one is no error."""
    if not is_remote(path):
        Path(local_path(path)).unlink(missing_ok=True)
        return
    url = os.fspath(path)
    fs, inner = _filesystem(url)

    async def http_delete() -> None:
        # fsspec's HTTP has no delete: a plain DELETE, as WebDAV takes it, through the filesystem's
        # own session and options (its headers and credentials).
        session = await fs.set_session()
        async with session.delete(fs.encode_url(inner), **fs.kwargs) as answer:
            if answer.status in (404, 410):
                raise FileNotFoundError(url)
            answer.raise_for_status()

    def delete() -> None:
        if _is_http(url):
            from fsspec.asyn import sync

            sync(fs.loop, http_delete)
        else:
            fs.rm_file(inner)

    try:
        _retried(url, "deleting it", delete)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(inner)


def forget_listings(url: str) -> None:
    """Drop what fsspec remembers of a folder's listing (s3fs and gcsfs keep one), so that files
    that other workers wrote since are seen."""
    fs, inner = _filesystem(url)
    fs.invalidate_cache(inner)


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """``length`` bytes from ``offset`` in one request (a sample that an index locates): for reads
    that jump, where :class:`RangeReader`'s chunks would fetch megabytes around each sample."""
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            return os.pread(f.fileno(), length, offset)
    url = os.fspath(path)
    fs, inner = _filesystem(url)
    data = _retried(url, f"reading bytes {offset}-{offset + length - 1}",
                    lambda: fs.cat_file(inner, start=offset, end=offset + length))
    if len(data) != length:
        raise RemoteError(f"{url}: asked for bytes {offset}-{offset + length - 1}, the server sent {len(data)} "
                          "bytes: it ignores range requests, or the file changed after it was indexed")
    return data


def size(path: str | os.PathLike) -> int:
    """The file's size in bytes; FileNotFoundError when there is none."""
    return version(path)[0]


def version(path: str | os.PathLike) -> tuple[int, str]:
    """(size, what changes when the content does): a local file's mtime, a URL's ETag (or an HTTP
    server's content digest) or modification time as its store reports it ("" when it reports
    none of them)."""
    if not is_remote(path):
        st = os.stat(local_path(path))
        return st.st_size, str(st.st_mtime_ns)
    url = os.fspath(path)
    fs, inner = _filesystem(url)
    info = _retried(url, "asking its size", lambda: fs.info(inner))
    if info.get("type") == "directory" or info.get("size") is None:
        raise FileNotFoundError(f"{url}: not a file, or the server does not say its size")
    tag = next((str(info[k]) for k in ("ETag", "etag", "Content-MD5", "Digest", "LastModified", "last_modified",
                                       "Last-Modified", "mtime", "updated")
                if info.get(k)), "")
    return int(info["size"]), tag


def is_file(path: str | os.PathLike) -> bool:
    try:
        size(path)
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file named as a folder
        return False
    return True


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    if not is_remote(path):
        with open(local_path(path), "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()
    reader = RangeReader(os.fspath(path))
    try:
        offset = 0
        while block := reader.pread(CHUNK, offset):
            digest.update(block)
            offset += len(block)
    finally:
        reader.close()
    return digest.hexdigest()


def parallel_map(fn: Callable[[T], R], items: Iterable[T], remote: bool) -> Iterator[R]:
    """``map(fn, items)``, lazily and in order; with ``remote``, up to ``PARALLEL`` calls at a time
    (each waits on the network, so thousands of shards' indexes take seconds rather than minutes).
    Stopping early (an error found in an earlier result) cancels the calls not started."""
    if not remote:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(PARALLEL)
    try:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * PARALLEL:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Waiting for the threads to end: a DataLoader forks its workers next, and a fork while
        # threads of this pool still run can leave a lock held forever in the child.
        pool.shutdown(wait=True, cancel_futures=True)


class LocalFile:
    """A local file read by offset (``os.pread``): the interface :class:`RangeReader` shares."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(local_path(path), os.O_RDONLY)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RangeReader:
    """A remote file read by offset through ranged requests of ``chunk`` bytes, each chunk fetched
    once while it is read; reading on from the furthest chunk read (or ``BEHIND`` before it) makes sure the
    next ``ahead`` chunks are being fetched, side by side, so a forward walk overlaps the network with the
    reading. Opening one asks the file's size (so no request runs past its end); a chunk of another
    length than asked for is an error rather than wrong bytes (a server that ignores ranges, a file
    changed while read)."""

    def __init__(self, url: str, chunk: int | None = None, ahead: int | None = None):
        self.path, self.chunk, self.ahead = url, chunk or CHUNK, AHEAD if ahead is None else ahead
        self.size = size(url)
        self._fs, self._inner = _filesystem(url)
        self._chunks: dict[int, Future[bytes]] = {}
        self._pool = ThreadPoolExecutor(max(self.ahead, 1), thread_name_prefix="range-reader")
        self._front = -1  # the furthest chunk a forward walk has reached (reading from the start is one)

    def _fetch(self, k: int) -> bytes:
        start = k * self.chunk
        end = min(start + self.chunk, self.size)
        data = _retried(self.path, f"reading bytes {start}-{end - 1}",
                        lambda: self._fs.cat_file(self._inner, start=start, end=end))
        if len(data) != end - start:
            raise RemoteError(f"{self.path}: asked for bytes {start}-{end - 1}, the server sent {len(data)} "
                              "bytes: it ignores range requests, or the file changed while it was read")
        return data

    def _get(self, k: int) -> Future[bytes]:
        if k not in self._chunks:
            self._chunks[k] = self._pool.submit(self._fetch, k)
        return self._chunks[k]

    def _chunk_bytes(self, k: int) -> bytes:
        future = self._get(k)
        # A forward walk reads behind its furthest chunk too: a sample's data after its next
        # sample's header, a large sample over several chunks.
        if self._front - BEHIND <= k <= self._front + 1:
            self._front = max(self._front, k)
            last = min(self._front + self.ahead, (self.size - 1) // self.chunk)
        else:  # a jump: no read-ahead until a walk goes on from here
            self._front = last = k
        for ahead in range(self._front + 1, last + 1):
            self._get(ahead)
        for old in [i for i in self._chunks if not self._front - BEHIND <= i <= last]:
            self._chunks.pop(old).cancel()
        return future.result()

    def pread(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end of the file), as ``os.pread``."""
        parts, end = [], min(offset + size, self.size)
        while offset < end:
            k, within = divmod(offset, self.chunk)
            piece = self._chunk_bytes(k)[within: within + end - offset]
            parts.append(piece)
            offset += len(piece)
        return b"".join(parts)

    def close(self) -> None:
        self._chunks.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)  # no thread left running (see parallel_map)


class SparseReader:
    """A remote file of known ``size`` read by offset where the reads jump (the interface of
    :class:`RangeReader`): each read one ranged request of its own, the last ``TAIL`` bytes fetched
    once at the first read there. What pyarrow reads a large Parquet file through (as a file:
    :class:`_RangeStream`), so that its footer and the columns asked for are fetched and nothing
    else (a score stage's index holds megabytes of image embeddings that its score columns' readers
    need not fetch). Reads within ``start``, the file's first bytes when they were fetched already,
    cost no request."""

    def __init__(self, url: str, size: int, start: bytes = b""):
        self.path, self.size, self._start = url, size, start
        self._tail_start, self._tail = max(0, size - TAIL), None

    def pread(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end of the file), as ``os.pread``."""
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if end <= len(self._start):
            return self._start[offset:end]
        if offset >= self._tail_start:
            if self._tail is None:
                self._tail = read_range(self.path, self._tail_start, self.size - self._tail_start)
            return self._tail[offset - self._tail_start: end - self._tail_start]
        return read_range(self.path, offset, end - offset)

    def close(self) -> None:
        pass


def parquet_source(path: str | os.PathLike, file_size: int | None = None) -> str | BinaryIO:
    """What pyarrow reads a Parquet file from: a local path; at a URL its bytes when it is small,
    else its :class:`SparseReader` as a file. With ``file_size`` unknown, its first ``WHOLE`` bytes are asked for:
    a small file (most indexes) comes whole in that one request."""
    if not is_remote(path):
        return local_path(path)
    url = os.fspath(path)
    if file_size is None:
        fs, inner = _filesystem(url)
        start = _retried(url, f"reading bytes 0-{WHOLE - 1}", lambda: fs.cat_file(inner, start=0, end=WHOLE))
        if len(start) != WHOLE:  # all of it (more: a server that ignores ranges sent it whole)
            return io.BytesIO(start)
        file_size = size(url)
        return io.BytesIO(start) if file_size == WHOLE else _RangeStream(SparseReader(url, file_size, start))
    return io.BytesIO(read_bytes(url)) if file_size <= WHOLE else _RangeStream(SparseReader(url, file_size))


class _RangeStream(io.RawIOBase):
    """A reader by offset as a file: a :class:`RangeReader` (what ``tarfile`` reads, forward with
    read-ahead), or a :class:`SparseReader`."""

    def __init__(self, reader: RangeReader | SparseReader):
        super().__init__()
        self._reader, self._position = reader, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._reader.size}[whence]
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        data = self._reader.pread(len(buffer), self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()


def open_stream(path: str | os.PathLike) -> BinaryIO:
    """A file to read through (a tar read as a stream): a local file, or a URL read by ranged
    requests with read-ahead and retries (:class:`RangeReader`)."""
    if not is_remote(path):
        return open(local_path(path), "rb")
    return io.BufferedReader(_RangeStream(RangeReader(os.fspath(path))), buffer_size=1 << 20)


def open_reader(path: str) -> LocalFile | RangeReader:
    """A file read by offset: :class:`RangeReader` for a URL, :class:`LocalFile` otherwise."""
    return RangeReader(path) if is_remote(path) else LocalFile(path)
