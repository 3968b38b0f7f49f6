"""Writing shard tars: `ShardWriter.add` against `tarfile` adding the same members, in one run.

The members are an encode-latents sample's: a 64 KB latent, three captions and a json record.
Both write to a file through the same hashing wrapper; the tars must come out identical.

    python bench/shard_writer.py [--samples 4000]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.shards import ShardWriter, _HashingFile, _tarinfo  # noqa: E402

MEMBERS = {"latent.safetensors": os.urandom(65536), "long.txt": b"l" * 400, "short.txt": b"s" * 80,
           "orig.txt": b"o" * 50, "json": b"{}" * 100}


def with_shard_writer(folder: Path, samples: int) -> tuple[float, bytes]:
    writer = ShardWriter(folder, 0, {})
    start = time.perf_counter()
    for i in range(samples):
        writer.add(f"{i:012d}", MEMBERS)
    seconds = time.perf_counter() - start
    shard = writer.commit(stage="bench", fingerprint="f", config_hash="h")
    return seconds, shard.tar_path.read_bytes()


def with_tarfile(path: Path, samples: int) -> tuple[float, bytes]:
    with open(path, "wb") as raw:
        tar = tarfile.open(fileobj=_HashingFile(raw), mode="w", format=tarfile.USTAR_FORMAT)
        start = time.perf_counter()
        for i in range(samples):
            for ext, data in MEMBERS.items():
                tar.addfile(_tarinfo(f"{i:012d}.{ext}", len(data)), io.BytesIO(data))
        seconds = time.perf_counter() - start
        tar.close()
    return seconds, path.read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours, ours_bytes = with_shard_writer(tmp / "ours", args.samples)
        theirs, theirs_bytes = with_tarfile(tmp / "tarfile.tar", args.samples)
    if ours_bytes != theirs_bytes:
        raise SystemExit("the two tars differ")
    print(f"# bench/shard_writer.py: {args.samples} samples of {len(MEMBERS)} members, "
          f"{sum(map(len, MEMBERS.values()))} bytes each; identical tars")
    print("| writer | ms per sample | tarfile / writer |")
    print("| --- | ---: | ---: |")
    print(f"| ShardWriter.add (tar, index row) | {1000 * ours / args.samples:.3f} | {theirs / ours:.2f} |")
    print(f"| tarfile.addfile | {1000 * theirs / args.samples:.3f} | 1.00 |")


if __name__ == "__main__":
    main()
