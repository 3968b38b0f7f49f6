"""`curate dedup DATA/scores/clip [--threshold 0.95]`: semantic near-duplicates, to leave out.

ingest's pixel hashes (``--near-duplicates``) find copies of one picture; crops, resizes,
re-encodes, watermarked or recoloured copies and frames of one shoot escape them. SemDeDup (Abbas
et al. 2023) finds those in an embedding space, as done here over the CLIP image embeddings that
``curate score --embeddings`` stored:

    spherical k-means over all embeddings (seeded; about --cluster-size images a cluster, fitted
        on at most 256 images per centroid, then every image assigned)
    within each cluster, the cosine similarity of every pair
    an image is a duplicate of the most similar image before it in the dataset's order (shard,
        then position) when that similarity reaches --threshold; the first of a group stays
    with --prefer EXPR (SQL over the score table and the image stage's columns, as --where),
        the order is by that value, highest first: ``--prefer 'width * height'`` keeps the
        largest image of a group, ``--prefer aesthetic`` the best-looking

The result, ``DATA/scores/clip/duplicates-THRESHOLD.parquet`` (``key``, ``duplicate_of``,
``similarity``, ``cluster``: one row per image to leave out), is what ``--exclude`` takes, in
``curate recaption``, ``curate encode-latents`` and ``curate manifest``. Recomputing for another
threshold reads the stored embeddings only.

Images in different clusters are never compared: a pair that the clustering splits is missed
(near-identical embeddings almost always share a cluster; a larger --cluster-size misses fewer and
costs more). All embeddings are held in memory as float16: N x dim x 2 bytes (1.5 GB a million
images of CLIP ViT-L/14).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from curate.runner import STAGE_FILE, CurateError, resolve_device
from curate.shards import OK, committed_shards
from curate.subset import EMBEDDING_COLUMN

log = logging.getLogger("curate")

__all__ = ["cluster_count", "dedup_scores", "find_duplicates", "spherical_kmeans"]

KMEANS_ITERATIONS = 20
FIT_PER_CENTROID = 256  # k-means is fitted on at most this many images per centroid (as faiss does)
CHUNK = 65_536  # images per similarity product: bounds the memory of a step


def spherical_kmeans(embeddings: torch.Tensor, clusters: int, *, seed: int = 0,
                     iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """The cluster of each L2-normalised row of ``embeddings`` [N, D]: k-means on the cosine
    (centroids renormalised each step), started from ``clusters`` rows drawn with ``seed``; an
    emptied cluster keeps its centroid. Fitted on a seeded sample of at most
    ``FIT_PER_CENTROID * clusters`` rows, then every row is assigned."""
    n = len(embeddings)
    clusters = max(1, min(clusters, n))
    generator = torch.Generator().manual_seed(seed)
    fit = embeddings[torch.randperm(n, generator=generator)[: FIT_PER_CENTROID * clusters].to(embeddings.device)]
    centroids = fit[torch.randperm(len(fit), generator=generator)[:clusters].to(embeddings.device)].float()
    for _ in range(iterations):
        labels = _nearest(fit, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, fit.float())
        filled = sums.norm(dim=1) > 0
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return _nearest(embeddings, centroids)


def cluster_count(images: int, cluster_size: int) -> int:
    """How many clusters ``find_duplicates`` makes of ``images``: about ``cluster_size`` images each."""
    return max(1, min(math.ceil(images / cluster_size), images))


def _nearest(embeddings: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cat([(part.float() @ centroids.T).argmax(dim=1) for part in embeddings.split(CHUNK)])


def find_duplicates(embeddings: np.ndarray, threshold: float, *, cluster_size: int = 1000, seed: int = 0,
                    device: str | None = None) -> dict[str, np.ndarray]:
    """The duplicates among L2-normalised ``embeddings`` [N, D] in the dataset's order: ``index``
    (the duplicate rows, ascending), ``of`` (for each, the most similar earlier row of its
    cluster), ``similarity`` and ``cluster``; see the module note."""
    if not 0 < threshold <= 1:
        raise CurateError(f"--threshold {threshold}: give a cosine similarity in (0, 1]")
    if cluster_size < 1:
        raise CurateError(f"--cluster-size {cluster_size}: give at least 1")
    device = resolve_device(device)
    x = torch.from_numpy(np.ascontiguousarray(embeddings)).to(device)
    labels = spherical_kmeans(x, cluster_count(len(x), cluster_size), seed=seed).cpu()
    # Each cluster's rows, in the dataset's order (a stable sort keeps it).
    order = torch.argsort(labels, stable=True)
    bounds = torch.searchsorted(labels[order], torch.arange(int(labels.max()) + 2))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
    for cluster in range(len(bounds) - 1):
        rows = order[bounds[cluster]: bounds[cluster + 1]]
        if len(rows) < 2:
            continue
        members = x[rows.to(device)].float()
        # Column j's best match among rows i < j, a block of columns at a time.
        best, best_of = [], []
        for start in range(0, len(rows), CHUNK // 16):
            block = members[start: start + CHUNK // 16]
            similarity = members[: start + len(block)] @ block.T  # [i, j]: rows up to the block's last
            earlier = torch.arange(start + len(block), device=device)[:, None] < \
                torch.arange(start, start + len(block), device=device)[None, :]
            values, index = similarity.masked_fill(~earlier, -2.0).max(dim=0)
            best.append(values.cpu())
            best_of.append(index.cpu())
        values, index = torch.cat(best), torch.cat(best_of)
        hit = values >= threshold
        if hit.any():
            found.append((rows[hit].numpy(), rows[index[hit]].numpy(), values[hit].numpy(), cluster))
    if not found:
        return {"index": np.zeros(0, np.int64), "of": np.zeros(0, np.int64), "similarity": np.zeros(0, np.float32),
                "cluster": np.zeros(0, np.int32)}
    index = np.concatenate([f[0] for f in found])
    ordered = np.argsort(index, kind="stable")
    return {"index": index[ordered], "of": np.concatenate([f[1] for f in found])[ordered],
            "similarity": np.concatenate([f[2] for f in found]).astype(np.float32)[ordered],
            "cluster": np.concatenate([np.full(len(f[0]), f[3], np.int32) for f in found])[ordered]}


def dedup_scores(scores_dir: str | os.PathLike, threshold: float = 0.95, *, cluster_size: int = 1000, seed: int = 0,
                 prefer: str | None = None, device: str | None = None,
                 out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Find the duplicates among the images of a ``curate score --embeddings`` stage and write
    them (atomically) to ``out`` (default: ``scores_dir/duplicates-THRESHOLD.parquet``); returns
    a summary. ``prefer``: which image of a group stays (see the module note)."""
    scores_dir = Path(scores_dir)
    if not (scores_dir / STAGE_FILE).is_file():
        raise CurateError(f"{scores_dir}: not a complete `curate score` stage (no {STAGE_FILE})")
    shards = committed_shards(scores_dir)
    if not shards or EMBEDDING_COLUMN not in pl.read_parquet_schema(shards[0].index_path):
        raise CurateError(f"{scores_dir}: holds no image embeddings; score with `curate score ... --embeddings`")
    keys: list[str] = []
    parts: list[np.ndarray] = []
    for shard in shards:
        rows = pl.read_parquet(shard.index_path, columns=["key", "status", EMBEDDING_COLUMN])
        rows = rows.filter((pl.col("status") == OK) & pl.col(EMBEDDING_COLUMN).is_not_null())
        keys.extend(rows["key"].to_list())
        parts.append(rows[EMBEDDING_COLUMN].to_numpy().astype(np.float16))
    if not keys:
        raise CurateError(f"{scores_dir}: no image has an embedding")
    embeddings = np.concatenate(parts)
    # The order in which images are kept: the dataset's, or by --prefer (highest first, ties and
    # nulls in the dataset's order after).
    order = np.arange(len(keys)) if prefer is None else _preferred_order(scores_dir, keys, prefer)
    found = find_duplicates(embeddings[order], threshold, cluster_size=cluster_size, seed=seed, device=device)
    found["index"], found["of"] = order[found["index"]], order[found["of"]]
    ordered = np.argsort(found["index"], kind="stable")  # the table in the dataset's order
    found = {name: values[ordered] for name, values in found.items()}
    table = pl.DataFrame({"key": [keys[i] for i in found["index"]], "duplicate_of": [keys[i] for i in found["of"]],
                          "similarity": found["similarity"], "cluster": found["cluster"]},
                         schema={"key": pl.String, "duplicate_of": pl.String, "similarity": pl.Float32,
                                 "cluster": pl.Int32})
    out = Path(out) if out is not None else scores_dir / f"duplicates-{threshold:g}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    table.write_parquet(tmp)
    os.replace(tmp, out)
    summary = {"images": len(keys), "duplicates": table.height, "threshold": threshold,
               "clusters": cluster_count(len(keys), cluster_size), "cluster_size": cluster_size, "seed": seed,
               "prefer": prefer, "order": f"--prefer {prefer!r} order" if prefer else "the dataset's order",
               "out": str(out)}
    log.info("dedup: %d of %d images are near-duplicates of one kept before them (cosine >= %g, in %s); wrote %s",
             table.height, len(keys), threshold, summary["order"], out)
    return summary


def _preferred_order(scores_dir: Path, keys: list[str], prefer: str) -> np.ndarray:
    """The rows of ``keys`` by ``prefer``'s value over the score stage's and image stage's columns
    (as ``--where`` reads them), highest first; nulls last; ties in the dataset's order."""
    import json

    from curate.subset import _stage_mapping, _stage_scores, _stage_table

    table = _stage_scores(scores_dir, "--prefer").drop("score_flags", strict=False)
    images = json.loads((scores_dir / STAGE_FILE).read_text()).get("provenance", {}).get("images")
    if images and Path(images).is_dir():  # the image stage's columns: width, height, bytes, source...
        mapping = _stage_mapping(Path(images), "image_", {"flags", *table.columns})
        table = table.join(_stage_table(Path(images), mapping), on="key", how="left")
    try:
        values = table.select("key", pl.sql_expr(prefer).cast(pl.Float64).alias("value"))
    except pl.exceptions.PolarsError as e:
        raise CurateError(f"--prefer {prefer!r}: cannot evaluate it on the columns {', '.join(table.columns)}: "
                          f"{e}") from None
    by_key = dict(zip(values["key"].to_list(), values["value"].fill_nan(None).to_list(), strict=True))
    rank = np.array([-np.inf if by_key.get(k) is None else by_key[k] for k in keys])
    return np.lexsort((np.arange(len(keys)), -rank))
