"""URL-list ingest through img2dataset, from an HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
from pathlib import Path

import polars as pl
import pytest
from conftest import samples, write_good_images

from curate.ingest import IngestStage
from curate.runner import run_stage
from curate.shards import committed_shards, read_index
from curate.sources import open_source


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def image_server(tmp_path: Path):
    root = tmp_path / "www"
    files = write_good_images(root, 7, size=(120, 90))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_url_list_ingest_through_img2dataset(image_server, tmp_path: Path, fmt: str, monkeypatch):
    """The csv list's stage is written to a URL (uploaded shard by shard, img2dataset's downloads in
    the local staging folder), the parquet list's to a folder."""
    from file_server import serve

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    base, files = image_server
    urls = [f"{base}/{p.name}" for p in files] + [f"{base}/missing.jpg", f"{base}/broken.jpg"]
    urls.insert(3, f"{base}/{files[0].name}")  # the same image under a second URL
    table = pl.DataFrame({"URL": urls, "TEXT": [f"alt text {i}" for i in range(len(urls))]})
    url_list = tmp_path / f"urls.{fmt}"
    {"parquet": table.write_parquet, "csv": table.write_csv, "jsonl": table.write_ndjson}[fmt](url_list)

    with contextlib.ExitStack() as stack:
        if fmt == "csv":
            out, here = f"{stack.enter_context(serve(tmp_path / 'www')).url}/images", tmp_path / "www" / "images"
        else:
            out = here = tmp_path / "images"
        source = open_source(str(url_list), download_timeout=5, download_retries=0)
        assert (source.url_column, source.caption_column) == ("URL", "TEXT")
        result = run_stage(IngestStage(source, out, shard_size=4, workers=1), out, progress=False)
        # A rerun downloads nothing again.
        again = run_stage(IngestStage(open_source(str(url_list)), out, shard_size=4), out, progress=False)
        assert again.processed == []
    totals = result.summary["totals"]
    assert totals["seen"] == 10
    assert totals["ok"] == 7
    assert totals["reasons"]["download_failed"] == 1
    assert totals["reasons"]["duplicate"] == 1
    assert sum(totals["reasons"].values()) == 3  # broken.jpg: truncated or corrupt
    assert not (here / "_downloads").exists()
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]

    index = pl.concat([read_index(s.index_path) for s in committed_shards(here)])
    assert index["source"].to_list() == urls  # the list's order, whatever order downloads finished in
    assert index.filter(pl.col("source") == f"{base}/missing.jpg")["detail"][0]
    got = samples(here)
    assert sorted(m["jpg"] for m in got.values()) == sorted(p.read_bytes() for p in files)
    assert index["caption"].to_list() == [f"alt text {i}" for i in range(len(urls))]


def test_url_list_without_url_column_is_a_clear_error(tmp_path: Path):
    from curate.runner import CurateError

    url_list = tmp_path / "list.csv"
    url_list.write_text("link_to_image,caption\nhttp://127.0.0.1:9/a.jpg,x\n")
    with pytest.raises(CurateError, match="no url column"):
        open_source(str(url_list))
    assert open_source(str(url_list), url_column="link_to_image").url_column == "link_to_image"


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "json", "txt"])
def test_url_list_formats_are_read(tmp_path: Path, fmt: str):
    table = pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"], "caption": ["a", "b"]})
    path = tmp_path / f"list.{fmt}"
    if fmt == "tsv":
        table.write_csv(path, separator="\t")
    elif fmt == "jsonl":
        table.write_ndjson(path)
    elif fmt == "json":
        table.write_json(path)
    else:
        path.write_text("\n".join(table["url"]) + "\n")
    source = open_source(str(path))
    tasks = source.plan(shard_size=1)
    assert [t.num_inputs for t in tasks] == [1, 1]
    assert source._rows()["url"].to_list() == table["url"].to_list()
    assert source.caption_column == (None if fmt == "txt" else "caption")


def test_a_txt_url_list_with_a_byte_order_mark_keeps_its_first_url(tmp_path: Path):
    # Notepad's UTF-8 begins with a BOM: it was read into the first URL, which then failed to download.
    path = tmp_path / "list.txt"
    path.write_bytes("\ufeffhttp://127.0.0.1:9/a.jpg\r\nhttp://127.0.0.1:9/b.jpg\r\n".encode())
    assert open_source(str(path))._rows()["url"].to_list() == ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"]
    path = tmp_path / "list.jsonl"  # polars' reader stopped at the mark: no list at all
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"url": "http://127.0.0.1:9/a.jpg", "caption": "a"}).encode())
    assert open_source(str(path))._rows().rows() == [("http://127.0.0.1:9/a.jpg", "a")]
