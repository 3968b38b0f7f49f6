"""`curate dedup`'s clustering against brute force, measured in one run.

Synthetic CLIP-like embeddings (768-d, L2-normalised): ``--concepts`` centres with images spread
around each (as photos of one subject lie near each other in CLIP space), and ``--planted``
near-copies of random images (cosine about 0.97 to their original, as a re-encode or a small crop
gives). For each ``--cluster-size``: the seconds of :func:`curate.dedup.find_duplicates` and its
recall of the planted copies (a copy whose original landed in another cluster is missed); and
brute force (every pair compared, one cluster) on the same data for its seconds and as the
reference: the duplicates found with clusters against those it finds.

Then decontamination (``--against``, :func:`curate.dedup.find_matches`): ``--reference`` of the
images (the planted copies' originals among them) are the evaluation set, every other image is
compared with it, with clusters fitted on it, against brute force (the reference in one cluster).

    python bench/dedup.py [--images 50000] [--planted 500] [--reference 5000] [--cluster-sizes 500,2000]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.dedup import cluster_count, find_duplicates, find_matches  # noqa: E402


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


def timed(search: Callable[[], dict[str, np.ndarray]], device: str) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    found = search()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, found


def table(rows: list[tuple[int, int, float, dict[str, np.ndarray]]], planted: set[int], label: str) -> None:
    """One line per search: its seconds, its recall of the planted copies, its hits against brute force's (the first)."""
    reference = set(rows[0][3]["index"].tolist())
    print(f"| clusters | {label} a cluster | seconds | planted copies found | duplicates found / brute force's |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for clusters, size, seconds, found in rows:
        hits = set(found["index"].tolist())
        recall = len(hits & planted) / len(planted)
        print(f"| {clusters} | {size} | {seconds:.2f} | {recall:.3f} | {len(hits & reference)} / {len(reference)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--planted", type=int, default=500)
    parser.add_argument("--reference", type=int, default=5000, help="images of the --against reference")
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
    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(x)} embeddings (768-d, "
          f"{args.concepts} concepts, {args.planted} planted copies at cosine {cosine.mean():.3f} on average), "
          f"threshold {args.threshold}\n")
    sizes = [int(s) for s in args.cluster_sizes.split(",")]
    rows = []
    for size in [len(x), *sizes]:
        seconds, found = timed(lambda size=size: find_duplicates(x, args.threshold, cluster_size=size,
                                                                 device=args.device), args.device)
        rows.append((cluster_count(len(x), size), size, seconds, found))
    table(rows, set(planted), "images")

    # Decontamination: the originals of the planted copies and other images form the reference.
    originals = np.array(sorted(set(planted.values())))
    others = np.setdiff1d(np.arange(args.images), originals)
    drawn = np.random.default_rng(1).choice(others, args.reference - len(originals), replace=False)
    reference_rows = np.sort(np.concatenate([originals, drawn]))
    candidate_rows = np.setdiff1d(np.arange(len(x)), reference_rows)
    candidates, reference = x[candidate_rows], x[reference_rows]
    print(f"\n--against: {len(candidate_rows)} images against a reference of {len(reference_rows)} (holding the "
          f"originals of the {args.planted} planted copies)\n")
    rows = []
    for size in [len(reference), *sizes]:
        seconds, found = timed(lambda size=size: find_matches(candidates, reference, args.threshold, cluster_size=size,
                                                              device=args.device), args.device)
        found = {**found, "index": candidate_rows[found["index"]]}
        rows.append((cluster_count(len(reference), size), size, seconds, found))
    table(rows, set(planted), "reference images")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
