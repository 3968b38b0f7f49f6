#!/usr/bin/env bash
# The whole pipeline on the bundled images with tiny local models. Run it with `make demo`.
# Every stage is resumable: running the demo again skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=demo/out

echo "== 1. ingest: demo/images -> $DATA/images"
curate ingest demo/images --out "$DATA/images" --shard-size 16 --workers 2 --no-progress

echo "== stats"
curate stats "$DATA/images"
