"""A real HTTP file server on 127.0.0.1 that answers range requests, as object stores do.

What it can be told to do, for the remote-shard tests and ``bench/remote.py``: add ``latency``
seconds to every answer (an object store's first byte is tens of milliseconds away), fail the
next ``fail_next`` requests with 503 (a store's "slow down"), or ignore ``Range`` headers (a server
that cannot serve ranges, whose whole-file answers must not be taken for ranges). It counts the
requests, the most answered at once, and the answers and body bytes it sent by path. A folder answers with an index page of links (fsspec lists
folders by them). It sends each answer's body at ``download_rate`` bytes a second at most, when set (a store's
bandwidth per request), and takes uploads (at most ``upload_rate`` bytes a second each, when set) as a WebDAV server or an object store's HTTP endpoint does: PUT
stores the body (plain or chunked) whole (or answers 403 when ``read_only``), under a temporary name then renamed, so a reader never
sees part of it, creating folders as needed; DELETE removes a file.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str | os.PathLike, latency: float = 0.0, upload_rate: float = 0.0,
                 download_rate: float = 0.0):
        self.root, self.latency = Path(root), latency
        self.upload_rate = upload_rate  # bytes/s an upload takes at most (a store's bandwidth); 0: no limit
        self.download_rate = download_rate  # bytes/s an answer's body is sent at, at most; 0: no limit
        self.fail_next = 0
        self.ignore_ranges = False
        self.requests = 0
        self.bytes_sent = 0
        self.sent: Counter[str] = Counter()  # body bytes by path (/images/000000.tar)
        self.answers: Counter[str] = Counter()  # answers with a body, by path
        self.received: Counter[str] = Counter()  # bytes uploaded, by path
        self.read_only = False  # answer uploads and deletes 403, as a store to read-only credentials
        self.keeps_files = False  # answer deletes 403, as a bucket whose policy allows writes but not deletes
        self.lists_folders = True  # False: a folder's URL answers 404, as a store's endpoint that lists nothing
        self.puts = 0
        self.in_flight = self.peak = 0  # requests being answered; the most at once
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    # The connections open now: closed with the server, so that a client's pooled keep-alive
    # connection cannot reach this server's handler after a later server took over its port (a
    # HEAD answered by the old server's files, the GET after it by the new one's).
    def process_request(self, request, client_address) -> None:
        with self.lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.lock:
            open_now = list(self.connections)
        for connection in open_now:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(SimpleHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp's pool expects
    disable_nagle_algorithm = True  # else headers and body, written apart, wait on delayed ACKs (40 ms)

    def __init__(self, request, client_address, server: FileServer):
        super().__init__(request, client_address, server, directory=str(server.root))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _answer(self, body: bool, respond=None) -> None:
        server = self.server
        respond = respond or self._respond
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.peak = max(server.peak, server.in_flight)
            fail = server.fail_next > 0
            server.fail_next -= fail
        try:
            respond(body, fail)
        finally:
            with server.lock:
                server.in_flight -= 1

    def _respond(self, body: bool, fail: bool) -> None:
        server = self.server
        if self._failed_after_latency(fail):
            return
        path = Path(self.translate_path(self.path))
        if path.is_dir() and not server.lists_folders:
            self._reply(404)
            return
        if path.is_dir():  # an index page of links, as nginx's autoindex (what fsspec lists a folder by)
            names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
            page = "".join(f'<a href="{name}">{name}</a>\n' for name in names).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            if body:
                self.wfile.write(page)
            return
        if not path.is_file():
            self._reply(404)
            return
        data_size = path.stat().st_size
        start, end = 0, data_size
        match = _RANGE.match(self.headers.get("Range", ""))
        if match and not server.ignore_ranges:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1 if match.group(2) else data_size, data_size)
            if start >= data_size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{data_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{data_size}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", email.utils.formatdate(path.stat().st_mtime, usegmt=True))  # no ETag
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            with server.lock:  # counted before the client can have them: a test reads these as soon as it has
                server.bytes_sent += len(data)
                server.sent[self.path] += len(data)
                server.answers[self.path] += 1
            if server.download_rate:
                time.sleep(len(data) / server.download_rate)
            self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError(f"{self.path}: the client died mid-upload")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", 0))
        data = self.rfile.read(length)
        if len(data) != length:  # the client died mid-upload: a store keeps nothing of it
            raise ConnectionError(f"{self.path}: {len(data)} of {length} bytes uploaded")
        return data

    def _failed_after_latency(self, fail: bool) -> bool:
        """Wait the server's latency, then give the 503 it was told to give, if any: whether it did."""
        if self.server.latency:
            time.sleep(self.server.latency)
        if fail:
            self._reply(503, "Slow Down")
        return fail

    def _refused_write(self, fail: bool) -> bool:
        """For an upload or a delete: the latency, then a 503 or a read-only server's 403, if any."""
        if self._failed_after_latency(fail):
            return True
        # Read once: a test that turns read_only off once its client saw the 403 must not make
        # this handler go on to store the file and send a second answer on the connection (the
        # client would take it for the answer to its next request).
        refused = self.server.read_only
        if refused:
            self._reply(403, "Forbidden")
        return refused

    def _reply(self, code: int, reason: str | None = None) -> None:
        """An answer without a body."""
        self.send_response(code, reason)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _store(self, body: bool, fail: bool) -> None:
        started = time.monotonic()
        data = self._body()  # read whatever the answer: the connection is kept alive
        if self.server.upload_rate:
            time.sleep(max(0.0, len(data) / self.server.upload_rate - (time.monotonic() - started)))
        if self._refused_write(fail):
            return
        path = Path(self.translate_path(self.path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.upload-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        with self.server.lock:
            self.server.puts += 1
            self.server.received[self.path] += len(data)
        self._reply(201)

    def _delete(self, body: bool, fail: bool) -> None:
        if self._refused_write(fail):
            return
        if self.server.keeps_files:
            self._reply(403, "Forbidden")
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self._reply(404)
            return
        path.unlink()
        self._reply(204)

    def do_PUT(self) -> None:  # noqa: N802
        self._answer(body=False, respond=self._store)

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer(body=False, respond=self._delete)

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)


@contextlib.contextmanager
def serve(root: str | os.PathLike, latency: float = 0.0) -> Iterator[FileServer]:
    """Serve ``root`` on 127.0.0.1 in a thread for the ``with`` block."""
    server = FileServer(root, latency)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join()


def main() -> None:
    """Standalone, for benchmarks (a server in its own process shares no GIL with the reader):
    ``python tests/file_server.py ROOT --latency 0.025`` prints ``READY URL`` and serves until killed."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--upload-rate", type=float, default=0.0, help="bytes/s an upload takes at most")
    parser.add_argument("--download-rate", type=float, default=0.0, help="bytes/s an answer's body is sent at")
    args = parser.parse_args()
    server = FileServer(args.root, args.latency, args.upload_rate, args.download_rate)
    print(f"READY {server.url}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
