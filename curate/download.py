"""URL lists through img2dataset, and its webdataset output read back in list order.

img2dataset does the downloading (threads, retries, user agent, opt-out headers); we ask it
for the original bytes (``disable_all_reencoding``) so that ingest validates and keys the
same bytes whatever the source, and we read its shards back in the order of the URL list
(it writes samples in completion order).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from curate.shards import split_member
from curate.sources import Record

log = logging.getLogger("curate")


def download_urls(
    rows: pl.DataFrame,
    scratch: Path,
    *,
    shard_size: int,
    processes: int,
    threads: int,
    timeout: int,
    retries: int,
) -> list[Path]:
    """Download ``rows`` (url, caption) into img2dataset shards of ``shard_size``; return their prefixes.

    Rerunning with the same rows and scratch folder reuses the shards img2dataset finished.
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks online at import
    from img2dataset import download

    scratch.mkdir(parents=True, exist_ok=True)
    url_list = scratch / "urls.parquet"
    rows.write_parquet(url_list)
    out = scratch / "out"
    log.info("downloading %d URLs with img2dataset into %s", rows.height, out)
    # img2dataset prints its own progress to stdout; keep our stdout for our output.
    with contextlib.redirect_stdout(io.StringIO()):
        download(
            url_list=str(url_list),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_format="webdataset",
            output_folder=str(out),
            processes_count=max(1, processes),
            thread_count=threads,
            number_sample_per_shard=shard_size,
            disable_all_reencoding=True,
            encode_format="jpg",
            timeout=timeout,
            retries=retries,
            enable_wandb=False,
            incremental_mode="incremental",
            compute_hash=None,
            extract_exif=False,
            oom_shard_count=6,
        )
    n_shards = -(-rows.height // shard_size)
    return [out / f"{i:06d}" for i in range(n_shards)]


def read_download(prefix: Path) -> Iterator[Record]:
    """One img2dataset shard as records in URL-list order, failures included with their error."""
    table = pl.read_parquet(f"{prefix}.parquet").sort("key")
    tar_path = Path(f"{prefix}.tar")
    with tarfile.open(tar_path, mode="r:") if tar_path.exists() else contextlib.nullcontext() as tar:
        members = {}
        if tar is not None:
            for info in tar.getmembers():
                key, ext = split_member(info.name)
                if ext == "jpg":
                    members[key] = info
        for row in table.iter_rows(named=True):
            url = row["url"]
            caption = row.get("caption") or None
            if row["status"] != "success":
                yield Record(source=url, caption=caption,
                             error=("download_failed", str(row.get("error_message") or row["status"])[:300]))
            elif row["key"] not in members:
                yield Record(source=url, caption=caption,
                             error=("unreadable", "img2dataset reported success but wrote no image"))
            else:
                data = tar.extractfile(members[row["key"]]).read()
                yield Record(source=url, data=data, caption=caption, meta={"url": url})
