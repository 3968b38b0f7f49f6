"""`curate dedup`'s clustering against brute force, measured in one run.

Synthetic CLIP-like embeddings (768-d, L2-normalised): ``--concepts`` centres with images spread
around each (as photos of one subject lie near each other in CLIP space), and ``--planted``
near-copies of random images (cosine about 0.97 to their original, as a re-encode or a small crop
gives). For each ``--cluster-size``: the seconds of :func:`curate.dedup.find_duplicates` and its
recall of the planted copies (a copy whose original landed in another cluster is missed); and
brute force (every pair compared, one cluster) on the same data for its seconds and as the
reference: the duplicates found with clusters against those it finds.

    python bench/dedup.py [--images 50000] [--planted 500] [--cluster-sizes 500,2000] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.dedup import find_duplicates  # noqa: E402


def embeddings(images: int, planted: int, concepts: int, seed: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """(float16 unit vectors [images + planted, 768], planted copy row -> its original's row)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(concepts, 768))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(concepts, size=images)] * 2.0 + rng.normal(size=(images, 768)) / np.sqrt(768) * 2.5
    originals = rng.choice(images, size=planted, replace=False)
    copies = x[originals] + rng.normal(size=(planted, 768)) / np.sqrt(768) * 0.6
    x = np.concatenate([x, copies])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), {images + i: int(o) for i, o in enumerate(originals)}


def timed(x: np.ndarray, threshold: float, cluster_size: int, device: str) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    found = find_duplicates(x, threshold, cluster_size=cluster_size, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--planted", type=int, default=500)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--cluster-sizes", default="500,2000")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    started = time.perf_counter()
    x, planted = embeddings(args.images, args.planted, args.concepts)
    real = x.astype(np.float32)
    copies = np.array(sorted(planted))
    cosine = (real[copies] * real[[planted[c] for c in copies]]).sum(axis=1)
    brute_seconds, brute = timed(x, args.threshold, len(x), args.device)
    reference = set(brute["index"].tolist())
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(x)} embeddings (768-d, "
          f"{args.concepts} concepts, {args.planted} planted copies at cosine {cosine.mean():.3f} on average), "
          f"threshold {args.threshold}\n")
    print("| clusters | images a cluster | seconds | planted copies found | duplicates found / brute force's |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    rows = [(1, len(x), brute_seconds, brute)]
    for size in (int(s) for s in args.cluster_sizes.split(",")):
        seconds, found = timed(x, args.threshold, size, args.device)
        rows.append((int(np.ceil(len(x) / size)), size, seconds, found))
    for clusters, size, seconds, found in rows:
        hits = set(found["index"].tolist())
        recall = len(hits & set(planted)) / len(planted)
        print(f"| {clusters} | {size} | {seconds:.2f} | {recall:.3f} | {len(hits & reference)} / {len(reference)} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
