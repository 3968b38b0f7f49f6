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

``--against EVAL`` decontaminates instead: it lists the images that are near-duplicates of an
evaluation set's, so that FID and the validation loss are not measured on images training saw
in another copy. EVAL is a manifest (a held-out set: its samples' embeddings are read from this
stage, and its own samples are not listed) or another score stage with embeddings of the same
model (a benchmark's images, ingested and scored on their own). The clusters are fitted on EVAL's
embeddings, each EVAL image joins the clusters of its 3 nearest centroids, and every image is
compared with the EVAL images of its nearest centroid's cluster; an image is listed when its most
similar one reaches --threshold
(``duplicates-of-EVAL-THRESHOLD.parquet``, ``duplicate_of`` being the EVAL image's key).

Images in different clusters are never compared: a pair that the clustering splits is missed
(near-identical embeddings almost always share a cluster; a larger --cluster-size misses fewer and
costs more). All embeddings are held in memory as float16: N x dim x 2 bytes (1.5 GB a million
images of CLIP ViT-L/14).
"""

from __future__ import annotations

import io
import logging
import math
import os
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from curate import storage
from curate.runner import STAGE_FILE, CurateError, resolve_device, stage_of_kind, stage_record
from curate.shards import OK, committed_shards, index_columns, read_index
from curate.subset import EMBEDDING_COLUMN

log = logging.getLogger("curate")

__all__ = ["cluster_count", "decontaminate", "dedup_scores", "find_duplicates", "find_matches", "fit_centroids",
           "spherical_kmeans"]

KMEANS_ITERATIONS = 20
FIT_PER_CENTROID = 256  # k-means is fitted on at most this many images per centroid (as faiss does)
CHUNK = 65_536  # images per similarity product: bounds the memory of a step
REFERENCE_PROBES = 3  # with --against, each reference image is in the clusters of its 3 nearest centroids
BLOCK_ELEMENTS = 1 << 24  # similarities per product against a reference cluster (64 MiB in float32)
# The embeddings are stored in float16, whose rounding moves a row's norm by up to ~1e-4: each row is
# renormalised in float32 before it is compared, and a similarity within ROUNDING of the threshold
# reaches it (float32's rounding of a dot product of unit rows is under 1e-6 at 1024 dimensions), so
# that --threshold 1 finds identical embeddings (about half of them read 0.9999 unrenormalised).
ROUNDING = 1e-5


def fit_centroids(embeddings: torch.Tensor, clusters: int, *, seed: int = 0,
                  iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Spherical k-means centroids [clusters, D] of the L2-normalised rows of ``embeddings`` [N, D]:
    k-means on the cosine (centroids renormalised each step), started from ``clusters`` rows drawn
    with ``seed`` and fitted on a seeded sample of at most ``FIT_PER_CENTROID * clusters`` rows; an
    emptied cluster keeps its centroid."""
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
    return centroids


def spherical_kmeans(embeddings: torch.Tensor, clusters: int, *, seed: int = 0,
                     iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """The cluster of each L2-normalised row of ``embeddings`` [N, D] (:func:`fit_centroids`, then
    every row assigned to its nearest centroid)."""
    return _nearest(embeddings, fit_centroids(embeddings, clusters, seed=seed, iterations=iterations))


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
    _check_settings(threshold, cluster_size)
    device = resolve_device(device)
    x = torch.from_numpy(np.ascontiguousarray(embeddings)).to(device)
    labels = spherical_kmeans(x, cluster_count(len(x), cluster_size), seed=seed).cpu()
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
    for cluster, rows in _members(labels):
        if len(rows) < 2:
            continue
        members = _unit(x[rows.to(device)])
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
        values, index = torch.cat(best).clamp(max=1.0), torch.cat(best_of)
        hit = values >= threshold - ROUNDING
        if hit.any():
            found.append((rows[hit].numpy(), rows[index[hit]].numpy(), values[hit].numpy(), cluster))
    return _found(found)


def find_matches(embeddings: np.ndarray, reference: np.ndarray, threshold: float, *, cluster_size: int = 1000,
                 seed: int = 0, device: str | None = None) -> dict[str, np.ndarray]:
    """The rows of ``embeddings`` [N, D] whose most similar row of ``reference`` [M, D] (both
    L2-normalised) reaches ``threshold``: ``index`` (ascending), ``of`` (that reference row),
    ``similarity`` and ``cluster`` (the row's). The clusters are fitted on the reference (about
    ``cluster_size`` of its rows each); each reference row is a member of the clusters of its
    ``REFERENCE_PROBES`` nearest centroids, and each row is compared with the members of its own
    nearest centroid's cluster, so a reference of at most ``cluster_size`` rows is compared with
    every row."""
    _check_settings(threshold, cluster_size)
    device = resolve_device(device)
    x = torch.from_numpy(np.ascontiguousarray(embeddings)).to(device)
    ref = torch.from_numpy(np.ascontiguousarray(reference)).to(device)
    centroids = fit_centroids(ref, cluster_count(len(ref), cluster_size), seed=seed)
    labels = _nearest(x, centroids).cpu()
    # Each reference row joins the clusters of its REFERENCE_PROBES nearest centroids: a near-copy
    # that lands across a boundary from its original is still compared with it.
    nearest = torch.cat([(part.float() @ centroids.T).topk(min(REFERENCE_PROBES, len(centroids)), dim=1).indices
                         for part in ref.split(CHUNK)]).cpu()
    ref_rows = torch.arange(len(ref)).repeat_interleave(nearest.shape[1])
    members_of = {cluster: ref_rows[at] for cluster, at in _members(nearest.flatten())}
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
    for cluster, rows in _members(labels):
        members = members_of.get(cluster)
        if members is None:  # no reference row is nearest to this centroid
            continue
        against = _unit(ref[members.to(device)])
        best, best_of = [], []
        for block in rows.split(max(1, BLOCK_ELEMENTS // len(members))):
            values, index = (_unit(x[block.to(device)]) @ against.T).max(dim=1)
            best.append(values.cpu())
            best_of.append(index.cpu())
        values, index = torch.cat(best).clamp(max=1.0), torch.cat(best_of)
        hit = values >= threshold - ROUNDING
        if hit.any():
            found.append((rows[hit].numpy(), members[index[hit]].numpy(), values[hit].numpy(), cluster))
    return _found(found)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Stored (float16) embeddings as float32 rows of norm 1, to compare (see ``ROUNDING``)."""
    return torch.nn.functional.normalize(rows.float(), dim=1)


def _check_settings(threshold: float, cluster_size: int) -> None:
    if not 0 < threshold <= 1:
        raise CurateError(f"--threshold {threshold}: give a cosine similarity in (0, 1]")
    if cluster_size < 1:
        raise CurateError(f"--cluster-size {cluster_size}: give at least 1")


def _members(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(cluster, its rows in ascending order) for every cluster that has rows."""
    if not len(labels):  # no rows (--against a manifest of every scored image: no candidates left)
        return []
    order = torch.argsort(labels, stable=True)  # a stable sort keeps the dataset's order within a cluster
    bounds = torch.searchsorted(labels[order], torch.arange(int(labels.max()) + 2))
    return [(cluster, order[bounds[cluster]: bounds[cluster + 1]]) for cluster in range(len(bounds) - 1)
            if bounds[cluster + 1] > bounds[cluster]]


def _found(found: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]) -> dict[str, np.ndarray]:
    """The per-cluster hits as one result, by ascending row."""
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
    scores_dir = storage.as_location(scores_dir)
    out = _table_path(scores_dir, out, f"duplicates-{threshold:g}.parquet")
    keys, embeddings = _stored_embeddings(scores_dir)
    # The order in which images are kept: the dataset's, or by --prefer (highest first, ties and
    # nulls in the dataset's order after).
    order = np.arange(len(keys)) if prefer is None else _preferred_order(scores_dir, keys, prefer)
    found = find_duplicates(embeddings[order], threshold, cluster_size=cluster_size, seed=seed, device=device)
    found["index"], found["of"] = order[found["index"]], order[found["of"]]
    ordered = np.argsort(found["index"], kind="stable")  # the table in the dataset's order
    found = {name: values[ordered] for name, values in found.items()}
    table = _write_table(found, keys, keys, out)
    summary = {"images": len(keys), "duplicates": table.height, "threshold": threshold,
               "clusters": cluster_count(len(keys), cluster_size), "cluster_size": cluster_size, "seed": seed,
               "prefer": prefer, "order": f"--prefer {prefer!r} order" if prefer else "the dataset's order",
               "out": str(out)}
    log.info("dedup: %d of %d images are near-duplicates of one kept before them (cosine >= %g, in %s); wrote %s",
             table.height, len(keys), threshold, summary["order"], out)
    return summary


def decontaminate(scores_dir: str | os.PathLike, against: str | os.PathLike, threshold: float = 0.95, *,
                  cluster_size: int = 1000, seed: int = 0, device: str | None = None,
                  out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Find the images of a ``curate score --embeddings`` stage that are near-duplicates of an
    evaluation set's images, and write them (atomically) to ``out`` (default:
    ``scores_dir/duplicates-of-NAME-THRESHOLD.parquet``); returns a summary.

    ``against`` is either another score stage with embeddings of the same CLIP model (a benchmark's
    images, ingested and scored on their own), or a manifest (a held-out set such as ``curate
    manifest --hold-out`` writes) whose samples' embeddings are read from ``scores_dir`` itself;
    its own samples are not candidates then."""
    scores_dir, against = storage.as_location(scores_dir), storage.as_location(against)
    is_manifest = str(against).endswith(".json") if storage.is_remote(against) else Path(against).is_file()
    name = posixpath.basename(str(against).rstrip("/"))
    name = posixpath.splitext(name)[0] if is_manifest else name
    out = _table_path(scores_dir, out, f"duplicates-of-{name}-{threshold:g}.parquet")
    keys, embeddings = _stored_embeddings(scores_dir)
    if is_manifest:
        ref_keys = _manifest_keys(against)
        row_of = {k: i for i, k in enumerate(keys)}
        missing = [k for k in ref_keys if k not in row_of]
        if missing:
            raise CurateError(f"--against {against}: {len(missing)} of its {len(ref_keys)} samples have no embedding "
                              f"in {scores_dir} (e.g. {missing[0]}): score the image stage that manifest was encoded "
                              "from with --embeddings, or give a score stage of its images")
        reference = embeddings[[row_of[k] for k in ref_keys]]
        held = set(ref_keys)
        candidates = np.array([i for i, k in enumerate(keys) if k not in held], dtype=np.int64)
    elif stage_of_kind(against, "score", "embeddings (or give a manifest of the evaluation images)") is not None:
        if storage.resolved(against) == storage.resolved(scores_dir):
            raise CurateError(f"--against {against}: the stage itself; its own near-duplicates are "
                              f"`curate dedup {scores_dir}` without --against")
        _check_same_model(scores_dir, against)
        ref_keys, reference = _stored_embeddings(against)
        candidates = np.arange(len(keys))
    else:
        raise CurateError(f"--against {against}: neither a manifest nor a complete `curate score` stage")
    if reference.shape[1] != embeddings.shape[1]:
        raise CurateError(f"--against {against}: its embeddings have {reference.shape[1]} dimensions, "
                          f"{scores_dir}'s {embeddings.shape[1]}")
    found = find_matches(embeddings[candidates], reference, threshold, cluster_size=cluster_size, seed=seed,
                         device=device)
    found["index"] = candidates[found["index"]]
    table = _write_table(found, keys, ref_keys, out)
    summary = {"images": len(candidates), "reference": len(ref_keys), "against": str(against),
               "duplicates": table.height, "threshold": threshold,
               "clusters": cluster_count(len(ref_keys), cluster_size), "cluster_size": cluster_size, "seed": seed,
               "out": str(out)}
    log.info("dedup: %d of %d images are near-duplicates of one of the %d images of %s (cosine >= %g); wrote %s",
             table.height, len(candidates), len(ref_keys), against, threshold, out)
    return summary


def _table_path(scores_dir: Path | str, out: str | os.PathLike | None, name: str) -> Path | str:
    """Where the table goes: ``out``, or ``name`` beside the score stage's shards (a URL's too)."""
    return storage.as_location(out) if out is not None else storage.as_location(storage.join(scores_dir, name))


def _stored_embeddings(scores_dir: Path | str) -> tuple[list[str], np.ndarray]:
    """The keys and float16 embeddings [N, D] of a score stage's images, in the dataset's order
    (at a URL, the indexes fetched many at a time)."""
    if stage_record(scores_dir) is None:
        raise CurateError(f"{scores_dir}: not a complete `curate score` stage (no {STAGE_FILE})")
    shards = committed_shards(scores_dir)
    if not shards or EMBEDDING_COLUMN not in index_columns(shards[0].index_path, shards[0].index_bytes):
        raise CurateError(f"{scores_dir}: holds no image embeddings; score with `curate score ... --embeddings`")
    keys: list[str] = []
    parts: list[np.ndarray] = []
    columns = ["key", "status", EMBEDDING_COLUMN]
    tables = storage.parallel_map(lambda shard: read_index(shard.index_path, columns, shard.index_bytes), shards,
                                  storage.is_remote(scores_dir))
    for rows in tables:
        rows = rows.filter((pl.col("status") == OK) & pl.col(EMBEDDING_COLUMN).is_not_null())
        keys.extend(rows["key"].to_list())
        parts.append(rows[EMBEDDING_COLUMN].to_numpy().astype(np.float16))
    if not keys:
        raise CurateError(f"{scores_dir}: no image has an embedding")
    return keys, np.concatenate(parts)


def _manifest_keys(path: Path | str) -> list[str]:
    """The distinct sample keys a manifest uses, in its order."""
    from curate.manifest import ManifestError, latent_index_rows, load_manifest

    try:
        manifest = load_manifest(path, check_files=False)
        rows = latent_index_rows(manifest, path, ["key"])
    except ManifestError as e:
        raise CurateError(f"--against {path}: {e}") from None
    if rows is None:
        raise CurateError(f"--against {path}: its shard indexes cannot be read (pipe: shards, or index files missing)")
    return rows["key"].unique(maintain_order=True).to_list()


def _check_same_model(scores_dir: Path | str, against: Path | str) -> None:
    """Embeddings compare only within one model's space: the same model, revision and files, and
    the same Hub commit where both stages recorded one."""
    ours, theirs = _embedding_model(scores_dir), _embedding_model(against)
    commits = {ours.pop("commit"), theirs.pop("commit")} - {None}
    if ours != theirs or len(commits) > 1:
        def say(m: dict[str, Any]) -> str:
            return f"{m['model']} (revision {m['revision']}, files {m['files']})"

        raise CurateError(f"--against {against}: embedded by {say(theirs)}, {scores_dir} by {say(ours)}"
                          f"{' at commits ' + ' and '.join(sorted(commits)) if len(commits) > 1 else ''}: "
                          "similarities between two models' embeddings mean nothing; score both with one model")


def _embedding_model(stage: Path | str) -> dict[str, Any]:
    record = stage_record(stage) or {}
    config, provenance = record.get("config", {}), record.get("provenance", {})
    return {"model": provenance.get("model_id", config.get("model")), "revision": config.get("revision"),
            "files": config.get("local_model_files"), "commit": provenance.get("model_commit")}


def _write_table(found: dict[str, np.ndarray], keys: list[str], of_keys: list[str], out: Path | str) -> pl.DataFrame:
    """The table ``--exclude`` takes (key, duplicate_of, similarity, cluster), written whole (here
    or at a URL)."""
    table = pl.DataFrame({"key": [keys[i] for i in found["index"]], "duplicate_of": [of_keys[i] for i in found["of"]],
                          "similarity": found["similarity"], "cluster": found["cluster"]},
                         schema={"key": pl.String, "duplicate_of": pl.String, "similarity": pl.Float32,
                                 "cluster": pl.Int32})
    buffer = io.BytesIO()
    table.write_parquet(buffer)
    storage.write_whole(out, buffer.getvalue())
    return table


def _preferred_order(scores_dir: Path | str, keys: list[str], prefer: str) -> np.ndarray:
    """The rows of ``keys`` by ``prefer``'s value over the score stage's and image stage's columns
    (as ``--where`` reads them), highest first; nulls last; ties in the dataset's order."""
    from curate.subset import _is_stage, _stage_mapping, _stage_scores, _stage_table

    table = _stage_scores(scores_dir, "--prefer").drop("score_flags", strict=False)
    images = (stage_record(scores_dir) or {}).get("provenance", {}).get("images")
    if images and _is_stage(images):  # the image stage's columns: width, height, bytes, source...
        images = storage.as_location(images)
        mapping = _stage_mapping(images, "image_", {"flags", *table.columns})
        table = table.join(_stage_table(images, mapping), on="key", how="left")
    try:
        values = table.select("key", pl.sql_expr(prefer).cast(pl.Float64).alias("value"))
    except pl.exceptions.PolarsError as e:
        raise CurateError(f"--prefer {prefer!r}: cannot evaluate it on the columns {', '.join(table.columns)}: "
                          f"{e}") from None
    by_key = dict(zip(values["key"].to_list(), values["value"].fill_nan(None).to_list(), strict=True))
    rank = np.array([-np.inf if by_key.get(k) is None else by_key[k] for k in keys])
    return np.lexsort((np.arange(len(keys)), -rank))
