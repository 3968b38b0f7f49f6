"""`curate stats DATA/STAGE`: what a stage produced and what it rejected, and why."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from curate import storage
from curate.images import REASONS
from curate.runner import STAGE_FILE, CurateError, stage_record
from curate.shards import add_counts, committed_shards


def stage_stats(stage_dir: str | os.PathLike) -> dict[str, Any]:
    """_stage.json when the stage is complete; otherwise totals over the shards committed so far.
    The stage may lie at a URL (its shards' metadata fetched many at a time)."""
    stage_dir = storage.as_location(stage_dir)
    remote = storage.is_remote(stage_dir)
    if not remote and not Path(stage_dir).is_dir():
        raise CurateError(f"{stage_dir}: not a stage folder (of shards) nor a manifest (.json)"
                          if Path(stage_dir).exists() else f"{stage_dir}: no such stage folder or manifest")
    shards = committed_shards(stage_dir)
    stats = stage_record(stage_dir)
    if stats is not None:
        stats["committed_shards"] = len(shards)
        # `curate dedup`'s tables beside a score stage's shards: images to leave out, per threshold.
        names = storage.list_names(stage_dir)
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

    return pq.ParquetFile(storage.parquet_source(path)).metadata.num_rows  # the footer's row count


def rounded(value: float) -> float:
    """Four decimals, or four significant digits below 0.1: a KID of a good model (0.00124 and
    0.00116 are not both 0.0012), a VQAScore of an untrained one."""
    return round(value, 4) if abs(value) >= 0.1 else float(f"{value:.4g}")


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


# How far the denoiser's inputs may stray from mean 0 and standard deviation 1 before a note says so.
UNIT_SCALE_TOLERANCE = 0.3


def latent_stats(manifest_path: str | os.PathLike, samples: int, seed: int = 0) -> dict[str, Any]:
    """`curate stats MANIFEST --latents N`: what the denoiser is fed. ``samples`` of the manifest's
    samples, spread evenly over it (its subsets applied), each latent drawn as training draws it
    (``mean + std * eps``, seeded; the mean when only it is stored) and put in model space by the
    manifest's spec: their mean and standard deviation overall and per channel. Without a batch-norm
    normalisation (FLUX.2's) also the raw latents' mean and standard deviation, which as
    ``shift_factor`` and ``1 / scaling_factor`` would give the denoiser mean 0 and std 1: a VAE whose
    config sets no scaling (or another dataset's) shows here, before a run trains on badly scaled
    inputs."""
    import torch
    from safetensors.torch import load as load_safetensors

    from curate.manifest import ManifestError, latent_index_rows, load_manifest, shard_urls
    from curate.shards import samples_at
    from curate.vae import PIXELS, sample_latent, to_model_input

    if samples < 1:
        raise CurateError(f"--latents must be positive, not {samples}")
    try:
        manifest = load_manifest(manifest_path)
        rows = latent_index_rows(manifest, manifest_path, ["tar_offset", "tar_length"])
    except ManifestError as e:
        raise CurateError(str(e)) from None
    if rows is None:
        raise CurateError(f"{manifest_path}: its shards' indexes cannot be read (pipe: shards, or index files "
                          "missing): no latents to measure")
    n = min(samples, rows.height)
    chosen = rows[sorted({i * rows.height // n for i in range(n)})]  # evenly spread, in shard order
    spec, urls = manifest.latent, shard_urls(manifest, manifest_path)
    generator = torch.Generator().manual_seed(seed)
    sums = {"raw": None, "model": None}  # per channel: [count, sum, sum of squares], float64

    def add(name: str, x: torch.Tensor) -> None:
        x = x.double()
        counted = torch.stack([torch.full((x.shape[1],), x[0, 0].numel(), dtype=torch.float64),
                               x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))])
        sums[name] = counted if sums[name] is None else sums[name] + counted

    drawn = 0
    for shard, group in chosen.group_by("shard", maintain_order=True):
        spans = list(zip(group["tar_offset"].to_list(), group["tar_length"].to_list(), strict=True))
        for _, members in samples_at(urls[shard[0]], spans, wanted=lambda _, ext: ext == "latent.safetensors"):
            stored = load_safetensors(members["latent.safetensors"])
            mean = stored["mean"][None]
            latent = (sample_latent(mean, stored["std"][None], generator) if "std" in stored
                      else mean.to(torch.float32))
            add("raw", latent)
            add("model", to_model_input(latent, spec))
            drawn += 1

    def summary(counted: torch.Tensor) -> dict[str, Any]:
        count, total, squares = counted
        channel_mean = total / count
        channel_std = (squares / count - channel_mean.square()).clamp_min(0).sqrt()
        mean = float(total.sum() / count.sum())
        return {"channels": len(count), "mean": rounded(mean),
                "std": rounded(float((squares.sum() / count.sum() - mean**2) ** 0.5)),
                "channel_mean": [rounded(float(channel_mean.min())), rounded(float(channel_mean.max()))],
                "channel_std": [rounded(float(channel_std.min())), rounded(float(channel_std.max()))]}

    out: dict[str, Any] = {"samples": drawn, "of": rows.height, "seed": seed,
                           "drawn": "mean + std * eps" if spec.stored == "dist" else "mean",
                           "model": summary(sums["model"]),
                           "spec": {"shift_factor": spec.shift_factor, "scaling_factor": spec.scaling_factor,
                                    "normalization": None if spec.normalization is None
                                    else spec.normalization.kind}}
    if spec.normalization is None and spec.vae != PIXELS:
        raw = summary(sums["raw"])
        out["raw"] = raw
        out["unit_scale"] = {"shift_factor": raw["mean"], "scaling_factor": rounded(1 / raw["std"])
                             if raw["std"] else None}
    return out


def format_latent_stats(stats: dict[str, Any], manifest: str) -> list[str]:
    model = stats["model"]
    lines = [f"  model in  {stats['samples']} of {stats['of']} samples ({stats['drawn']}, seed {stats['seed']}): "
             f"mean {_fmt(model['mean'])}, std {_fmt(model['std'])}; per channel mean "
             f"{_fmt(model['channel_mean'][0])} to {_fmt(model['channel_mean'][1])}, std "
             f"{_fmt(model['channel_std'][0])} to {_fmt(model['channel_std'][1])}"]
    off = abs(model["mean"]) > UNIT_SCALE_TOLERANCE or abs(model["std"] - 1) > UNIT_SCALE_TOLERANCE
    if off:
        spec = stats["spec"]
        lines.append(f"  note      the denoiser's inputs are not near mean 0, std 1 (the spec's shift_factor "
                     f"{_fmt(spec['shift_factor'])}, scaling_factor {_fmt(spec['scaling_factor'])}"
                     + (f", {spec['normalization']} normalisation" if spec["normalization"] else "") + ")")
        unit = stats.get("unit_scale")
        if unit and unit["scaling_factor"]:
            lines.append(f"            these latents' own (their mean and 1/std): shift {unit['shift_factor']}, scaling "
                         f"{unit['scaling_factor']}; for unit-scale inputs without encoding again: curate manifest "
                         f"{manifest} --latent-shift {unit['shift_factor']} --latent-scaling {unit['scaling_factor']} "
                         "--name NAME")
        elif spec["normalization"]:
            lines.append(f"            the {spec['normalization']} normalisation's statistics are the VAE's own (its running "
                         "mean and variance): these images are far from what they were measured on, or the VAE's "
                         "were never trained")
    return lines


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
    if stats.get("latents"):
        lines += format_latent_stats(stats["latents"], stats["manifest"])
    return "\n".join(lines)
