"""The `curate` command: one subcommand per stage, all on the shared runner."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Stage modules are imported inside the commands: decoding workers are spawned processes that
# re-import the entry script, and they should not pay for polars and pyarrow.


def _default_workers() -> int:
    # Under torchrun several ranks share a node: split its cores between them.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scaling out (defaults from torchrun's RANK/WORLD_SIZE or Slurm)")
    g.add_argument("--rank", type=int, default=None, help="this worker's index")
    g.add_argument("--world-size", type=int, default=None, help="number of workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curate", description="Curate image-text data into training shards.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="images from a folder, URL list, webdataset tars or HF dataset into shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="folder of images | URL list (.parquet .csv .tsv .jsonl .txt) | tar file, "
                               "folder or pattern ('shards/{00000..00009}.tar') | hf:NAME[:SPLIT] | "
                               "datasets save_to_disk folder")
    p.add_argument("--out", required=True, help="output stage folder, e.g. DATA/images")
    p.add_argument("--shard-size", type=int, default=1000, help="input samples per output shard")
    p.add_argument("--min-side", type=int, default=64, help="reject images whose short side is smaller")
    p.add_argument("--max-pixels", type=int, default=89_478_485,
                   help="reject images declaring more pixels, before decoding them")
    p.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes")
    p.add_argument("--source-type", choices=["auto", "folder", "urls", "tars", "hf"], default="auto")
    p.add_argument("--url-column", default=None, help="URL lists: the URL column (detected if omitted)")
    p.add_argument("--caption-column", default=None, help="URL lists and HF datasets: the caption column")
    p.add_argument("--image-column", default=None, help="HF datasets: the image column (detected if omitted)")
    p.add_argument("--split", default=None, help="HF datasets: the split (default train)")
    p.add_argument("--download-threads", type=int, default=32, help="URL lists: threads per process")
    p.add_argument("--download-timeout", type=int, default=10, help="URL lists: seconds per request")
    p.add_argument("--download-retries", type=int, default=2, help="URL lists: retries per URL")
    _add_worker_args(p)

    p = sub.add_parser("stats", help="totals and rejection reasons of a stage output")
    p.add_argument("stage_dir", help="a stage folder, e.g. DATA/images")
    p.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    return parser


def cmd_ingest(args: argparse.Namespace) -> int:
    from curate.ingest import IngestStage
    from curate.runner import resolve_share, run_stage
    from curate.sources import open_source

    share = resolve_share(args.rank, args.world_size)
    source = open_source(
        args.src, kind=args.source_type, url_column=args.url_column, caption_column=args.caption_column,
        image_column=args.image_column, split=args.split, download_threads=args.download_threads,
        download_timeout=args.download_timeout, download_retries=args.download_retries,
    )
    stage = IngestStage(source, args.out, shard_size=args.shard_size, min_side=args.min_side,
                        max_pixels=args.max_pixels, workers=args.workers)
    result = run_stage(stage, args.out, share=share, progress=not args.no_progress)
    if result.complete:
        from curate.stats import format_stats

        print(format_stats(result.summary, args.out))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from curate.stats import format_stats, stage_stats

    stats = stage_stats(args.stage_dir)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats, args.stage_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in ("workers", "shard_size", "min_side", "max_pixels"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    from curate.runner import CurateError

    try:
        return {"ingest": cmd_ingest, "stats": cmd_stats}[args.command](args)
    except CurateError as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
