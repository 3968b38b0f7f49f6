"""Synthetic latent shards and manifests, written the way `curate encode-latents` writes them.

Tests of the trainer need latent datasets of a chosen geometry (shard count, samples per
shard, bucket shapes, missing captions, rejected rows) in milliseconds, without running a
VAE. ``make_latent_dataset`` writes them with the same ShardWriter, the same tar members
(``KEY.latent.safetensors``, ``KEY.VARIANT.txt``, ``KEY.orig.txt``, ``KEY.json``), the
same index columns and the same three manifests as the real stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save

from curate.encode_latents import EncodeLatentsStage
from curate.manifest import (
    LatentSpec,
    Manifest,
    ShardEntry,
    file_sha256,
    load_manifest,
    write_manifest,
)
from curate.shards import ShardWriter, committed_shards, stable_hash

STAGE = "encode-latents"


def sample_key(seed: int, index: int, rejected: bool = False) -> str:
    """A 128-bit hex key like the real ones (content hashes), unique per (seed, index)."""
    tag = f"kiln-test/{seed}/{'rejected' if rejected else 'ok'}/{index}".encode()
    return hashlib.blake2b(tag, digest_size=16).hexdigest()


def caption_text(variant: str, index: int) -> str:
    """The caption of ``variant`` for global sample ``index`` (what the tests expect to read)."""
    return f"{'original' if variant == 'orig' else variant} caption of sample {index}"


def make_latent_dataset(
    root: Path,
    *,
    shards: int = 3,
    per_shard: int = 8,
    channels: int = 16,
    sizes: list[tuple[int, int]] = [(4, 4)],  # noqa: B006 - read only; the signature others call
    variants: tuple[str, ...] = ("long", "short"),
    missing: dict[int, tuple[str, ...]] | None = None,
    stored: str = "dist",
    dtype: str = "bfloat16",
    vae_dir: Path | str | None = None,
    rejected_every: int = 0,
    seed: int = 0,
    caption: Callable[[str, int], str] = caption_text,
) -> dict[str, Path]:
    """Write ``shards`` latent shards and the manifests long.json, short.json, mix.json.

    - ``per_shard`` accepted samples per shard; global sample index ``i`` runs over accepted
      samples in shard order (shard ``i // per_shard``). With ``rejected_every`` = n > 0 a
      rejected row (reason ``unreadable``, nothing in the tar) follows every n-th accepted
      sample, so shards have more index rows than samples, as real ones do.
    - ``sizes``: latent (h, w) grids at the VAE's native resolution; sample ``i`` gets
      ``sizes[i % len(sizes)]``. The index's bucket_h/bucket_w are in pixels (side x downsample).
    - latents: mean ~ N(0, 1), std in [0.05, 0.1) (``stored="dist"``) or the mean only; with
      ``dtype="uint8"`` (pixel space: ``vae_dir="pixels"``, ``channels=3``) pixel values 0 to 255.
    - captions: ``caption(variant, i)`` (``caption_text`` by default) for each variant and ``orig``;
      ``missing[i]`` names variants (``orig`` included) left out for sample ``i``: an empty
      txt member and, for caption variants, absent from the json's and the index's ``captions``.
    - latent spec: from the tiny VAE in ``vae_dir`` (so that decoding through the manifest
      works; ``channels`` must match it), else a plain one (scaling 1, shift 0, downsample 8).

    Returns ``{"root": root, "latents": folder, VARIANT: manifest path, ..., "mix": path}``.
    """
    root = Path(root)
    missing = missing or {}
    out_dir = root / "latents"
    manifest_dir = root / "manifests"
    loaded = None
    if vae_dir is not None:
        from curate.vae import load_vae

        loaded = load_vae(str(vae_dir), device="cpu")
        if loaded.channels != channels:
            raise ValueError(f"the VAE in {vae_dir} has {loaded.channels} channels, not {channels}")
    downsample = loaded.downsample if loaded is not None else 8
    buckets = sorted({(h * downsample, w * downsample) for h, w in sizes})
    torch_dtype = getattr(torch, dtype)
    rng = np.random.default_rng(seed)

    for shard_id in range(shards):
        writer = ShardWriter(out_dir, shard_id, EncodeLatentsStage.index_schema)
        for pos in range(per_shard):
            i = shard_id * per_shard + pos
            key = sample_key(seed, i)
            h, w = sizes[i % len(sizes)]
            mean = torch.from_numpy(rng.standard_normal((channels, h, w), dtype=np.float32))
            if dtype == "uint8":
                mean = torch.from_numpy(rng.integers(0, 256, (channels, h, w), dtype=np.uint8))
            std = torch.from_numpy(0.05 + 0.05 * rng.random((channels, h, w), dtype=np.float32))
            tensors = {"mean": mean.to(torch_dtype).contiguous()}
            if stored == "dist":
                tensors["std"] = std.to(torch_dtype).contiguous()
            left_out = set(missing.get(i, ()))
            present = sorted(v for v in variants if v not in left_out)
            size = [w * downsample, h * downsample]
            record = {"orig_size": size, "resized_size": size, "crop_box": [0, 0, *size],
                      "target_size": [h * downsample, w * downsample]}
            meta = {"key": key, **record, "captions": present, "stored": stored, "dtype": dtype}
            members = {
                "latent.safetensors": save(tensors),
                **{f"{v}.txt": ("" if v in left_out else caption(v, i)).encode() for v in variants},
                "orig.txt": ("" if "orig" in left_out else caption("orig", i)).encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
            row = {"bucket_h": h * downsample, "bucket_w": w * downsample, "orig_w": size[0],
                   "orig_h": size[1], "captions": present}
            flags = [] if len(present) == len(variants) else ["some_captions_missing"]
            writer.add(key, members, row=row, flags=flags)
            if rejected_every and (pos + 1) % rejected_every == 0:
                writer.reject(sample_key(seed, i, rejected=True), "unreadable",
                              row={"orig_w": None, "orig_h": None, "captions": present},
                              detail="synthetic rejection")
        writer.commit(stage=STAGE, fingerprint=stable_hash(["test", seed, shard_id]),
                      config_hash=stable_hash(["test", channels, stored, dtype]))

    if loaded is not None:
        from curate.vae import latent_spec_for

        spec = latent_spec_for(loaded, stored=stored, dtype=dtype, resolution=buckets[0][0],
                               buckets=buckets)
    else:
        spec = LatentSpec(vae="test", vae_id="test", vae_class="AutoencoderKL", channels=channels,
                          downsample=downsample, stored=stored, dtype=dtype, scaling_factor=1.0,
                          shift_factor=0.0, resolution=buckets[0][0], buckets=buckets)

    # As EncodeLatentsStage.write_manifests: one manifest per variant plus an even mix, same
    # shards (relative to the manifest folder, empty shards left out), full latent spec.
    selections = {v: {v: 1.0} for v in variants}
    if len(variants) > 1:
        selections["mix"] = {v: round(1.0 / len(variants), 12) for v in variants}
        selections["mix"][variants[0]] += 1.0 - sum(selections["mix"].values())
    committed = committed_shards(out_dir)
    entries = [ShardEntry(path=os.path.relpath(s.tar_path.resolve(), manifest_dir.resolve()),
                          samples=s.meta.counts["ok"], sha256=file_sha256(s.tar_path))
               for s in committed if s.meta.counts["ok"] > 0]
    provenance = {"latents": {"path": str(out_dir.resolve()), "vae": spec.vae_id,
                              "vae_class": spec.vae_class, "revision": spec.revision},
                  "synthetic": {"seed": seed}}
    paths: dict[str, Path] = {"root": root, "latents": out_dir}
    for name, weights in selections.items():
        manifest = Manifest(name=name, shards=entries, samples=sum(e.samples for e in entries),
                            latent=spec, captions=weights, provenance=provenance)
        paths[name] = write_manifest(manifest, manifest_dir / f"{name}.json")
    # The stage file, with what curate encode-text reads of it: the caption variants and the
    # manifests written.
    stage = {"stage": STAGE, "complete": True, "config": {"variants": list(variants)},
             "summary": {"manifests": [str(paths[name]) for name in selections]}}
    (out_dir / "_stage.json").write_text(json.dumps(stage, indent=2))
    return paths


def add_text_shards(
    dataset: dict[str, Path],
    encoder: Path,
    *,
    dim: int,
    max_tokens: int,
    tokens: dict[str, int] | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> dict[str, Path]:
    """Synthetic text shards for a dataset of ``make_latent_dataset``, written as `curate
    encode-text` writes them (one per latent shard, same keys and order, ``KEY.text.safetensors``
    with a ``[tokens, dim]`` tensor per non-empty caption variant), and manifests ``NAME-text.json``
    beside the latent ones. The embeddings are random: for benchmarks of what reading them
    costs, at the size a real encoder's would have (``tokens``: per variant, default long 96,
    short 16, orig 24). ``encoder``: the folder the manifests name (the trainer checks it)."""
    from curate.encode_text import EncodeTextStage
    from curate.manifest import TextSpec, load_manifest
    from curate.shards import iter_tar_samples

    tokens = tokens or {"long": 96, "short": 16, "orig": 24}
    out_dir = Path(dataset["root"]) / "text"
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    latent_stage = json.loads((dataset["latents"] / "_stage.json").read_text())
    variants = [*latent_stage["config"]["variants"], "orig"]
    schema = {f"tokens_{v}": pl.Int32 for v in variants}
    for shard in committed_shards(dataset["latents"]):
        writer = ShardWriter(out_dir, shard.shard_id, schema)
        for key, members in iter_tar_samples(shard.tar_path, wanted=lambda k, ext: ext.endswith(".txt")):
            present = [ext[:-4] for ext, data in members.items() if data.strip()]
            rows = {v: torch.randn(min(tokens.get(v, 16), max_tokens), dim, generator=gen).to(torch_dtype)
                    for v in present}
            writer.add(key, {"text.safetensors": save(rows)},
                       row={f"tokens_{v}": t.shape[0] for v, t in rows.items()})
        writer.commit(stage=EncodeTextStage.name, fingerprint=stable_hash(["test-text", seed, shard.shard_id]),
                      config_hash=stable_hash(["test-text", dim, max_tokens, dtype]))
    by_id = {s.shard_id: s for s in committed_shards(out_dir)}
    latent_ids = {s.tar_path.resolve(): s.shard_id for s in committed_shards(dataset["latents"])}
    written = {}
    for name in [n for n in dataset if n not in ("root", "latents")]:
        latent = load_manifest(dataset[name])
        folder = dataset[name].parent
        entries = []
        for entry in latent.shards:
            text = by_id[latent_ids[(folder / entry.path).resolve()]]
            entries.append(ShardEntry(path=os.path.relpath(text.tar_path.resolve(), folder.resolve()),
                                      samples=entry.samples, sha256=text.meta.tar_sha256))
        spec = TextSpec(encoder=str(encoder), encoder_id=str(Path(encoder).resolve()), dim=dim,
                        max_tokens=max_tokens, dtype=dtype, variants=variants, shards=entries)
        manifest = latent.model_copy(update={"name": f"{name}-text", "text": spec})
        written[name] = write_manifest(Manifest.model_validate(manifest.model_dump()), folder / f"{name}-text.json")
    return written


def add_image_stage(dataset: dict[str, Path], *, seed: int = 0, quality: int = 90,
                    original: Callable[[int, int], tuple[int, int]] | None = None) -> Path:
    """An image stage for ``dataset`` (made by :func:`make_latent_dataset`), as `curate ingest`
    would have left it: ``root/images/NNNNNN.tar`` per latent shard, each accepted latent's key
    with a noise JPEG of exactly its bucket's size (so encode-latents' crop is the identity), in
    the same order; the manifests' provenance names it. What REPA's loader reads. ``original``:
    the JPEG's (height, width) for a bucket's (height, width) instead (an image encode-latents
    cropped)."""
    import io

    from PIL import Image

    from curate.ingest import IngestStage

    out_dir = Path(dataset["root"]) / "images"
    rng = np.random.default_rng(seed)
    for shard in committed_shards(dataset["latents"]):
        ok = pl.read_parquet(shard.index_path).filter(pl.col("status") == "ok")
        writer = ShardWriter(out_dir, shard.shard_id, IngestStage.index_schema)
        for key, bucket_h, bucket_w in zip(ok["key"], ok["bucket_h"], ok["bucket_w"], strict=True):
            h, w = original(bucket_h, bucket_w) if original is not None else (bucket_h, bucket_w)
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
            data = buffer.getvalue()
            writer.add(key, {"jpg": data, "json": json.dumps({"width": w, "height": h}).encode(), "txt": b""},
                       row={"source": f"synthetic/{key}.jpg", "width": w, "height": h, "format": "JPEG",
                            "mode": "RGB", "bytes": len(data), "caption": ""})
        writer.commit(stage="ingest", fingerprint=stable_hash(["test-images", seed, shard.shard_id]),
                      config_hash=stable_hash(["test-images", quality]))
    for name, path in dataset.items():
        if name in ("root", "latents") or not str(path).endswith(".json"):
            continue
        manifest = load_manifest(path)
        provenance = {**manifest.provenance, "images": {"path": str(out_dir.resolve())}}
        write_manifest(manifest.model_copy(update={"provenance": provenance}), path)
    return out_dir


def step_keys(manifest_path: Path, settings: Any, start: int, steps: int) -> list[list[str]]:
    """The keys of ``steps`` loader steps from step ``start`` (a ``train.data.DataSettings``): what a
    run resumed at ``start`` must read again."""
    from train.data import LatentLoader

    manifest = load_manifest(manifest_path)
    with LatentLoader(manifest, manifest_path, settings, start_step=start) as loader:
        return [[k for m in b.micro for k in m.keys] for b, _ in zip(loader, range(steps), strict=False)]
