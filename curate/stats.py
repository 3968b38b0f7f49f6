"""`curate stats DATA/STAGE`: what a stage produced and what it rejected, and why."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from curate import storage
from curate.images import REASONS
from curate.runner import STAGE_FILE, CurateError
from curate.shards import add_counts, committed_shards


def stage_stats(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """_stage.json when the stage is complete; otherwise totals over the shards committed so far.
    The stage may lie at a URL (its shards' metadata fetched many at a time)."""
    stage_dir = storage.as_location(stage_dir)
    remote = storage.is_remote(stage_dir)
    if not remote and not Path(stage_dir).is_dir():
        raise CurateError(f"{stage_dir}: no such folder")
    shards = committed_shards(stage_dir)
    try:
        stats = json.loads(storage.read_bytes(storage.join(stage_dir, STAGE_FILE)))
    except FileNotFoundError:
        stats = None
    if stats is not None:
        stats["committed_shards"] = len(shards)
        # `curate dedup`'s tables beside a score stage's shards: images to leave out, per threshold.
        names = storage.list_names(stage_dir) if remote else os.listdir(stage_dir)
        tables = sorted(n for n in names if n.startswith("duplicates-") and n.endswith(".parquet"))
        duplicates = {name: _rows(storage.join(stage_dir, name)) for name in tables}
        if duplicates:
            stats["duplicates"] = duplicates
        return stats
    if not shards:
        raise CurateError(f"{stage_dir}: no committed shards and no {STAGE_FILE}: not a stage output")
    totals: dict[str, Any] = {}
    for shard in shards:
        totals = add_counts(totals, shard.meta.counts)
    return {"stage": shards[0].meta.stage, "complete": False, "committed_shards": len(shards), "totals": totals}


def format_stats(stats: dict[str, Any], stage_dir: str | os.PathLike = "") -> str:
    totals = stats.get("totals", {})
    seen = totals.get("seen", 0) or 0
    lines = [f"{stage_dir}  stage: {stats.get('stage')}  "
             + ("complete" if stats.get("complete") else "INCOMPLETE (still running, or killed: rerun it)")]
    shards = stats.get("shards", stats.get("committed_shards"))
    lines.append(f"  shards    {shards}")

    def pct(n: int) -> str:
        return f"{100 * n / seen:5.1f}%" if seen else "   - "

    lines.append(f"  seen      {seen:>10,}")
    lines.append(f"  ok        {totals.get('ok', 0):>10,}  {pct(totals.get('ok', 0))}")
    lines.append(f"  rejected  {totals.get('rejected', 0):>10,}  {pct(totals.get('rejected', 0))}")
    for reason, n in sorted(totals.get("reasons", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"    {reason:<18}{n:>8,}  {pct(n)}  {REASONS.get(reason, '')}")
    if totals.get("flags"):
        lines.append("  flags (accepted, noted)")
        for flag, n in sorted(totals["flags"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {flag:<18}{n:>8,}  {pct(n)}")
    throughput = stats.get("throughput") or {}
    for name, value in throughput.items():
        if value is not None:
            lines.append(f"  {name.replace('_', ' ')}: {value:,}")
    summary = stats.get("summary") or {}
    for name, value in summary.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
            lines.append(f"  {name.replace('_', ' ')}: {inner}")
        else:
            lines.append(f"  {name.replace('_', ' ')}: {_fmt(value)}")
    for name, rows in (stats.get("duplicates") or {}).items():
        lines.append(f"  {name}: {rows:,} near-duplicate images to leave out (curate dedup; --exclude it)")
    return "\n".join(lines)


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    if storage.is_remote(path):  # the footer's row count, from the whole file (a table, not a shard)
        return pq.ParquetFile(io.BytesIO(storage.read_bytes(path))).metadata.num_rows
    return pq.ParquetFile(path).metadata.num_rows


def rounded(value: float) -> float:
    """Four decimals, or four significant digits below 0.001 (a VQAScore of an untrained model)."""
    return round(value, 4) if abs(value) >= 1e-3 else float(f"{value:.4g}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def manifest_stats(manifest_path: str | os.PathLike) -> dict[str, Any]:
    """`curate stats manifests/long.json`: what a training run would read: samples and shards, the
    latent spec, samples per bucket, the caption weights and how many samples have each variant,
    the text section and the provenance."""
    from curate.manifest import (
        ManifestError,
        caption_coverage,
        image_stages,
        latent_index_rows,
        load_manifest,
    )

    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as e:
        raise CurateError(str(e)) from None
    spec = manifest.latent
    # Piped (pipe:) or missing shards are not counted here (training's check names them).
    try:
        rows = latent_index_rows(manifest, manifest_path, ["key", "captions", "bucket_h", "bucket_w"])
    except ManifestError as e:
        raise CurateError(str(e)) from None
    buckets: dict[str, int] | None = None
    if rows is not None:
        buckets = {}
        for h, w in zip(rows["bucket_h"].to_list(), rows["bucket_w"].to_list(), strict=True):
            buckets[f"{h}x{w}"] = buckets.get(f"{h}x{w}", 0) + 1
    text = manifest.text
    parts = None
    if manifest.parts is not None:
        try:
            stages: list[str | None] = [str(p) for p in image_stages(manifest)]
        except ManifestError:
            stages = [(p.provenance.get("images") or {}).get("path") for p in manifest.parts]
        parts = [{"name": p.name, "samples": p.samples, "repeat": p.repeat, "shards": p.shards // p.repeat,
                  "captions": p.captions, "images": stage}
                 for p, stage in zip(manifest.parts, stages, strict=True)]
    return {
        "manifest": str(manifest_path), "name": manifest.name, "samples": manifest.samples,
        "shards": len(manifest.shards),
        "latent": {"vae": spec.vae, "vae_id": spec.vae_id, "vae_class": spec.vae_class, "revision": spec.revision,
                   "channels": spec.channels, "stored": spec.stored, "dtype": spec.dtype,
                   "resolution": spec.resolution},
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1])) if buckets is not None else None,
        "captions": manifest.captions,
        "caption_coverage": caption_coverage(manifest, rows),
        "text": None if text is None else {"encoder": text.encoder_id, "revision": text.revision, "dim": text.dim,
                                           "max_tokens": text.max_tokens, "dtype": text.dtype,
                                           "variants": text.variants},
        "provenance": {k: _where(v) for k, v in manifest.provenance.items() if k != "subsets"},
        "subsets": manifest.provenance.get("subsets", []),
        "parts": parts,
    }


def _where(record: Any) -> Any:
    """A provenance record's path (each one's, for a list of records such as ``merged_from``)."""
    if isinstance(record, list):
        return [_where(r) for r in record]
    return record.get("path") if isinstance(record, dict) else record


def format_manifest_stats(stats: dict[str, Any]) -> str:
    from curate.subset import subset_summary

    latent = stats["latent"]
    lines = [f"{stats['manifest']}  manifest: {stats['name']}  {stats['samples']} samples in {stats['shards']} shards",
             f"  latents   {latent['vae_class']} {latent['vae_id']}"
             + (f" @ {latent['revision']}" if latent["revision"] else "")
             + f", {latent['channels']} channels stored as {latent['stored']} {latent['dtype']}, "
               f"{latent['resolution']} px"]
    for part in stats.get("parts") or ():
        share = 100 * part["samples"] / stats["samples"] if stats["samples"] else 0.0
        times = f" x {part['repeat']}" if part["repeat"] > 1 else ""
        selection = ", ".join(f"{v} {w:.3g}" for v, w in part["captions"].items())
        lines.append(f"  part      {part['name']}: {part['samples'] // part['repeat']} samples in {part['shards']} "
                     f"shards{times}, {share:.1f}% of an epoch; captions {selection}; images {part['images']}")
    for subset in stats.get("subsets") or ():
        lines.append(f"  subset    {subset_summary(subset)}")
    if stats["buckets"] is not None:
        lines.append("  buckets   " + ", ".join(f"{b} ({n})" for b, n in stats["buckets"].items()))
    coverage = stats["caption_coverage"] or {}
    for variant, weight in stats["captions"].items():
        have = coverage.get(variant)
        counted = f"{have} of {stats['samples']} samples have it" if have is not None else "not counted"
        lines.append(f"  caption   {variant}: weight {weight:.4g}, {counted}")
    others = {v: n for v, n in coverage.items() if v not in stats["captions"] and n}
    if others:
        lines.append("  also      " + ", ".join(f"{v} ({n})" for v, n in others.items()))
    text = stats["text"]
    if text is not None:
        lines.append(f"  text      {text['encoder']}, {text['dim']}-d, max {text['max_tokens']} tokens, {text['dtype']}, "
                     f"variants {', '.join(text['variants'])}")
    for stage, path in stats["provenance"].items():
        lines.append(f"  from      {stage}: {', '.join(map(str, path)) if isinstance(path, list) else _fmt(path)}")
    return "\n".join(lines)
