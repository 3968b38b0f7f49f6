"""Manifests: the versioned JSON file a training run reads (``train --shards manifests/long.json``).

A manifest lists the training shards with their sample counts and checksums, the latent spec
(everything needed to turn stored latents into model inputs and model outputs back into
images with the same VAE), the caption selection and provenance. ``long.json``,
``short.json`` and ``mix.json`` point at the same shards and differ only in ``captions``.
A manifest written by ``curate encode-text`` also lists text shards (``text``): the captions'
text-encoder embeddings, so that training does not run the text encoder.

Loading validates every field and names the bad one in the error. Shard paths are relative
to the manifest's folder (or absolute). Shards are data, never code: ``pipe:`` URLs, which
run a shell command, are refused unless the caller allows them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the field or shard."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatentNormalization(_Strict):
    """FLUX.2-style normalisation applied after the VAE: patchify, then per-channel batch-norm stats."""

    kind: Literal["batchnorm"] = "batchnorm"
    patch_size: int = Field(2, ge=1)
    mean: list[float]
    var: list[float]
    eps: float = Field(1e-4, ge=0)

    @model_validator(mode="after")
    def _same_length(self) -> LatentNormalization:
        if len(self.mean) != len(self.var):
            raise ValueError(f"mean has {len(self.mean)} values but var has {len(self.var)}")
        if any(v < 0 for v in self.var):
            raise ValueError("var must not be negative")
        return self


class LatentSpec(_Strict):
    """How the stored latents were made and how to use them."""

    vae: str  # as the user named it: an alias (flux, flux2), a Hub id or a folder
    vae_id: str  # the resolved Hub id or absolute folder
    vae_subfolder: str | None = None  # e.g. "vae" inside a pipeline repository
    vae_class: str  # diffusers class: AutoencoderKL, AutoencoderKLFlux2, ...
    revision: str | None = None
    channels: int = Field(gt=0)  # latent channels as stored (16 for Flux, 32 for FLUX.2)
    downsample: int = Field(gt=0)  # pixels per latent cell on each side (8)
    stored: Literal["dist", "mean"]  # dist: mean and std, a fresh latent is sampled per epoch
    dtype: Literal["bfloat16", "float16", "float32"]
    scaling_factor: float = 1.0  # model input = (latent - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    normalization: LatentNormalization | None = None
    resolution: int = Field(gt=0)  # target pixel area is resolution**2
    buckets: list[tuple[int, int]] = Field(default_factory=list)  # (height, width) in pixels

    @field_validator("buckets")
    @classmethod
    def _bucket_sides(cls, buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for h, w in buckets:
            if h <= 0 or w <= 0:
                raise ValueError(f"bucket {h}x{w} must have positive sides")
        return buckets


class ShardEntry(_Strict):
    path: str  # relative to the manifest's folder, absolute, or a URL
    samples: int = Field(ge=0)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class TextSpec(_Strict):
    """Precomputed text-encoder embeddings (``curate encode-text``), one text shard per latent shard.

    Text shard ``i`` holds, for each sample of latent shard ``i`` and in the same order,
    ``KEY.text.safetensors``: one ``[tokens, dim]`` tensor per non-empty caption variant, the
    encoder's last hidden state at the caption's valid (unmasked) tokens, prompts cleaned and
    tokenized as ``PRXPipeline`` does (``cleaning: prx``), truncated at ``max_tokens``.
    """

    encoder: str  # as the user named it: an alias (t5gemma), a Hub id or a folder
    encoder_id: str  # the resolved Hub id or absolute folder
    revision: str | None = None  # the Hub commit loaded; None for a local folder
    dim: int = Field(gt=0)  # hidden size: the denoiser's context_in_dim
    max_tokens: int = Field(gt=0)  # the tokenizer's padded length at training and inference
    dtype: Literal["bfloat16", "float16", "float32"]
    cleaning: Literal["prx"] = "prx"  # PRXPipeline's TextPreprocessor().clean_text
    variants: list[str] = Field(min_length=1)  # caption variants the stage encoded
    shards: list[ShardEntry] = Field(min_length=1)  # parallel to the manifest's shards


class Manifest(_Strict):
    version: Literal[1] = MANIFEST_VERSION
    name: str = Field(min_length=1)
    shards: list[ShardEntry] = Field(min_length=1)
    samples: int = Field(ge=0)
    latent: LatentSpec
    captions: dict[str, float]  # caption variant -> probability of being chosen for a sample
    text: TextSpec | None = None  # precomputed embeddings; None: the trainer encodes captions itself
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("captions")
    @classmethod
    def _caption_weights(cls, captions: dict[str, float]) -> dict[str, float]:
        if not captions:
            raise ValueError("must select at least one caption variant, e.g. {\"long\": 1.0}")
        for name, weight in captions.items():
            if not name or not math.isfinite(weight) or weight <= 0:
                raise ValueError(f"weight of {name!r} must be a positive number (got {weight})")
        if abs(sum(captions.values()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1 (got {sum(captions.values())})")
        return captions

    @model_validator(mode="after")
    def _sample_count(self) -> Manifest:
        total = sum(s.samples for s in self.shards)
        if total != self.samples:
            raise ValueError(f"samples is {self.samples} but the shards hold {total}")
        if self.text is not None:
            if len(self.text.shards) != len(self.shards):
                raise ValueError(f"text.shards lists {len(self.text.shards)} shards but shards lists "
                                 f"{len(self.shards)}: text shard i holds the embeddings of shard i")
            for i, (latent, text) in enumerate(zip(self.shards, self.text.shards, strict=True)):
                if latent.samples != text.samples:
                    raise ValueError(f"text.shards.{i} holds {text.samples} samples but shards.{i} "
                                     f"holds {latent.samples}")
        return self


def _format_error(source: str, err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        problems.append(f"field '{loc}': {msg}")
    return f"{source}: invalid manifest: " + "; ".join(problems)


def parse_manifest(data: dict[str, Any], source: str = "manifest") -> Manifest:
    """Validate a manifest given as a dict; errors name the field."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: a manifest is a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if version is not None and version != MANIFEST_VERSION:
        raise ManifestError(f"{source}: field 'version': this toolkit reads version {MANIFEST_VERSION}, got {version!r}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_format_error(source, e)) from None


def load_manifest(
    path: str | os.PathLike,
    *,
    check_files: bool = False,
    check_checksums: bool = False,
    allow_pipe: bool = False,
) -> Manifest:
    """Read and validate ``path``; optionally check every shard exists (and its sha256)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    manifest = parse_manifest(data, str(path))
    urls = shard_urls(manifest, path, allow_pipe=allow_pipe)
    text_urls = shard_urls(manifest, path, allow_pipe=allow_pipe, text=True) if manifest.text else None
    if check_files or check_checksums:
        verify_shards(manifest, urls, checksums=check_checksums, source=str(path))
        if text_urls is not None:
            verify_shards(manifest, text_urls, checksums=check_checksums, source=str(path), text=True)
    return manifest


def shard_urls(
    manifest: Manifest, manifest_path: str | os.PathLike, *, allow_pipe: bool = False, text: bool = False
) -> list[str]:
    """Shard locations as webdataset URLs: relative paths resolved against the manifest's folder.
    ``text``: the text shards' (``manifest.text.shards``) instead of the latent shards'."""
    base = Path(manifest_path).resolve().parent
    entries, field = (manifest.text.shards, "text.shards") if text and manifest.text else (manifest.shards, "shards")
    if text and manifest.text is None:
        raise ManifestError(f"{manifest_path}: no text shards (field 'text' is absent)")
    urls = []
    for i, shard in enumerate(entries):
        if shard.path.startswith("pipe:") and not allow_pipe:
            raise ManifestError(
                f"{manifest_path}: field '{field}.{i}.path': {shard.path!r} runs a shell command; "
                "shards are data, not code (allow pipe: URLs explicitly if you trust this manifest)"
            )
        if "://" in shard.path or shard.path.startswith("pipe:") or os.path.isabs(shard.path):
            urls.append(shard.path)
        else:
            urls.append(str(base / shard.path))
    return urls


def image_stage(manifest: Manifest, override: str | os.PathLike | None = None, *, option: str = "--images") -> Path:
    """The image stage the manifest's latents were encoded from (``provenance.images.path``), or
    ``override`` (the stage moved); ``option`` is how the error tells the user to give it."""
    if override is not None:
        path = Path(override)
    else:
        recorded = (manifest.provenance.get("images") or {}).get("path")
        if not recorded:
            raise ManifestError(f"manifest {manifest.name!r} records no image stage (provenance.images.path): "
                                f"pass the images folder ({option} DATA/images)")
        path = Path(recorded)
    if not path.is_dir():
        raise ManifestError(f"the image stage {path} does not exist: pass its new place with {option}")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(
    manifest: Manifest, urls: list[str], *, checksums: bool, source: str = "manifest", text: bool = False
) -> None:
    """Every local shard exists and, if asked, matches its recorded sha256 (``text``: the text shards)."""
    entries, what = (manifest.text.shards, "text shard") if text and manifest.text else (manifest.shards, "shard")
    for i, (shard, url) in enumerate(zip(entries, urls, strict=True)):
        if "://" in url or url.startswith("pipe:"):
            continue  # remote shards are checked as they stream
        if not os.path.exists(url):
            raise ManifestError(f"{source}: {what} {i} ({shard.path}) does not exist at {url}")
        if checksums and shard.sha256 is not None and file_sha256(url) != shard.sha256:
            raise ManifestError(f"{source}: {what} {i} ({shard.path}) does not match its sha256: "
                                "the file changed after the manifest was written")


def rebase_shard_path(path: str, old: str | os.PathLike, new: str | os.PathLike) -> str:
    """A shard path of a manifest in folder ``old``, for a manifest in folder ``new``: relative
    paths are rebased; absolute paths and URLs (``pipe:`` included) stay as they are."""
    if os.path.isabs(path) or "://" in path or path.startswith("pipe:"):
        return path
    return os.path.relpath((Path(old) / path).resolve(), Path(new).resolve())


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
    return path


def parse_caption_weights(text: str) -> dict[str, float]:
    """``long=0.95,orig=0.05`` (or ``long=19,orig=1``) as weights that sum to 1."""
    weights: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not math.isfinite(weight) or weight <= 0 or name in weights:
            raise ManifestError(f"--captions {text!r}: give VARIANT=WEIGHT pairs, each variant once with a "
                                "positive weight, e.g. long=0.95,orig=0.05")
        weights[name] = weight
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def latent_index_rows(manifest: Manifest, manifest_path: str | os.PathLike, columns: list[str]) -> Any:
    """The accepted rows of every latent shard's index (``columns`` of them, a polars DataFrame),
    in shard order; None when an index cannot be read here (remote or missing shards)."""
    import polars as pl

    frames = []
    for url in shard_urls(manifest, manifest_path):
        index = Path(url).with_suffix(".parquet")
        if "://" in url or not index.is_file():
            return None
        frames.append(pl.read_parquet(index, columns=["status", *columns]).filter(pl.col("status") == "ok")
                      .drop("status"))
    return pl.concat(frames)


def caption_coverage(manifest: Manifest, rows: Any) -> dict[str, int | None] | None:
    """How many samples have each caption variant: curated ones from the latent shards' index
    ``rows`` (:func:`latent_index_rows` with ``key`` and ``captions``), ``orig`` (the original
    captions, written for every sample, empty when there was none) from the image stage's index
    (None when it cannot be found); None without ``rows``."""
    import polars as pl

    if rows is None:
        return None
    counts: dict[str, int] = {}
    keys = set(rows["key"].to_list())
    for variants in rows["captions"].to_list():
        for variant in variants or ():
            counts[variant] = counts.get(variant, 0) + 1
    try:
        images = image_stage(manifest)
    except ManifestError:
        return {**counts, "orig": None}
    with_orig = 0
    for index in sorted(images.glob("*.parquet")):
        df = pl.read_parquet(index, columns=["key", "caption"])
        with_orig += sum(1 for key, caption in zip(df["key"].to_list(), df["caption"].to_list(), strict=True)
                         if key in keys and caption and caption.strip())
    return {**counts, "orig": with_orig}


def with_captions(manifest: Manifest, manifest_path: str | os.PathLike, weights: dict[str, float], *,
                  name: str, out: str | os.PathLike) -> Manifest:
    """The same shards (and text shards) with another caption selection, for a manifest written at
    ``out``: relative shard paths are rebased onto its folder, and the provenance names the source."""
    if manifest.text is not None:
        missing = [v for v in weights if v not in manifest.text.variants]
        if missing:
            raise ManifestError(f"{manifest_path}: its text shards hold embeddings of {', '.join(manifest.text.variants)}, "
                                f"not of {', '.join(missing)}")
    source_dir, out_dir = Path(manifest_path).resolve().parent, Path(out).resolve().parent

    def rebased(entries: list[ShardEntry]) -> list[ShardEntry]:
        return [e.model_copy(update={"path": rebase_shard_path(e.path, source_dir, out_dir)}) for e in entries]

    text = manifest.text.model_copy(update={"shards": rebased(manifest.text.shards)}) if manifest.text else None
    provenance = {**manifest.provenance,
                  "captions_from": {"path": str(Path(manifest_path).resolve()), "sha256": file_sha256(manifest_path),
                                    "captions": manifest.captions}}
    return Manifest(name=name, shards=rebased(manifest.shards), samples=manifest.samples, latent=manifest.latent,
                    captions=weights, text=text, provenance=provenance)
