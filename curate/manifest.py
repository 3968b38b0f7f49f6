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

import base64
import json
import math
import os
import posixpath
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from curate import storage

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
    dtype: Literal["bfloat16", "float16", "float32", "uint8"]  # uint8: pixel values (vae "pixels")
    scaling_factor: float = 1.0  # model input = (latent - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    normalization: LatentNormalization | None = None
    resolution: int = Field(gt=0)  # target pixel area is resolution**2
    buckets: list[tuple[int, int]] = Field(default_factory=list)  # (height, width) in pixels
    # The VAE config's own scaling and shift, when the two above were set otherwise (`curate
    # manifest --latent-scaling/--latent-shift`: the stored latents are raw, so any scale can be
    # chosen after encoding); absent when they are the VAE's.
    vae_scaling_factor: float | None = None
    vae_shift_factor: float | None = None

    @model_validator(mode="after")
    def _rescaled_whole(self) -> LatentSpec:
        if (self.vae_scaling_factor is None) != (self.vae_shift_factor is None):
            raise ValueError("vae_scaling_factor and vae_shift_factor come together")
        if self.vae_scaling_factor is not None and (self.normalization is not None or self.scaling_factor <= 0):
            raise ValueError("a scaling of its own needs a positive scaling_factor and no normalization")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_rescaling(self, handler: Any) -> Any:
        # Written only when set, so that every manifest of a VAE's own scaling stays as it was.
        data = handler(self)
        if isinstance(data, dict) and data.get("vae_scaling_factor") is None:
            data.pop("vae_scaling_factor", None)
            data.pop("vae_shift_factor", None)
        return data

    @property
    def vae_scaling(self) -> tuple[float, float]:
        """(scaling, shift) of the VAE's config, which the latents were encoded beside."""
        if self.vae_scaling_factor is None:
            return self.scaling_factor, self.shift_factor
        return self.vae_scaling_factor, float(self.vae_shift_factor)

    @field_validator("buckets")
    @classmethod
    def _bucket_sides(cls, buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for h, w in buckets:
            if h <= 0 or w <= 0:
                raise ValueError(f"bucket {h}x{w} must have positive sides")
        return buckets


class ShardSubset(_Strict):
    """The samples a manifest takes from a shard (``curate manifest --where ...``): bit ``i`` of
    ``mask`` is set when the shard's ``i``-th accepted sample, in tar order, is used. The bits are
    packed little-endian into bytes (``numpy.packbits(..., bitorder="little")``) and written in
    base64: 1,000 samples take 168 characters, so a manifest stays one small file at any scale,
    and merging, repeating and holding out shards carry a subset along with its shard."""

    of: int = Field(gt=0)  # the shard's accepted samples (its index's ok rows)
    mask: str

    @model_validator(mode="after")
    def _mask_fits(self) -> ShardSubset:
        self.used()
        return self

    def used(self) -> Any:
        """A bool array over the shard's accepted samples, True where used."""
        import numpy as np

        try:
            packed = np.frombuffer(base64.b64decode(self.mask, validate=True), dtype=np.uint8)
        except ValueError as e:
            raise ValueError(f"mask is not base64: {e}") from None
        if len(packed) != (self.of + 7) // 8:
            raise ValueError(f"mask holds {len(packed)} bytes, but {self.of} samples take {(self.of + 7) // 8}")
        bits = np.unpackbits(packed, bitorder="little").astype(bool)
        if bits[self.of:].any():
            raise ValueError("mask sets bits beyond its samples")
        return bits[: self.of]


def shard_subset(used: Any) -> ShardSubset | None:
    """The subset of a shard's accepted samples where the bool array ``used`` is True (None: all of them)."""
    import numpy as np

    used = np.asarray(used, dtype=bool)
    if used.all():
        return None
    return ShardSubset(of=len(used), mask=base64.b64encode(np.packbits(used, bitorder="little").tobytes()).decode())


class ShardEntry(_Strict):
    path: str  # relative to the manifest's folder, absolute, or a URL
    samples: int = Field(ge=0)  # the samples the manifest uses: all the shard's accepted ones, or its subset's
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    subset: ShardSubset | None = None  # None: every accepted sample of the shard

    @model_validator(mode="after")
    def _subset_count(self) -> ShardEntry:
        if self.subset is not None:
            used = int(self.subset.used().sum())
            if used != self.samples:
                raise ValueError(f"samples is {self.samples} but its subset uses {used} of {self.subset.of}")
        return self

    @model_serializer(mode="wrap")
    def _without_an_absent_subset(self, handler: Any) -> dict[str, Any]:
        # An entry without a subset is written as before subsets existed: a manifest rewritten by a
        # rerun keeps its bytes, so its sha256, which a run's checkpoints hold, still matches.
        data = handler(self)
        if self.subset is None:
            data.pop("subset", None)
        return data

    @property
    def accepted(self) -> int:
        """The shard's accepted samples (what its index lists as ok), used or not."""
        return self.subset.of if self.subset is not None else self.samples

    def positions(self) -> Any:
        """The tar-order positions (among the accepted samples) of the samples used, an int64 array."""
        import numpy as np

        if self.subset is None:
            return np.arange(self.samples, dtype=np.int64)
        return np.flatnonzero(self.subset.used()).astype(np.int64)


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
    dtype: Literal["bfloat16", "float16", "float32", "uint8"]  # uint8: pixel values (vae "pixels")
    cleaning: Literal["prx"] = "prx"  # PRXPipeline's TextPreprocessor().clean_text
    variants: list[str] = Field(min_length=1)  # caption variants the stage encoded
    shards: list[ShardEntry] = Field(min_length=1)  # parallel to the manifest's shards


def _check_caption_weights(captions: dict[str, float]) -> dict[str, float]:
    if not captions:
        raise ValueError("must select at least one caption variant, e.g. {\"long\": 1.0}")
    for name, weight in captions.items():
        if not name or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of {name!r} must be a positive number (got {weight})")
    if abs(sum(captions.values()) - 1.0) > 1e-6:
        raise ValueError(f"weights must sum to 1 (got {sum(captions.values())})")
    return captions


CaptionWeights = Annotated[dict[str, float], AfterValidator(_check_caption_weights)]


class ManifestPart(_Strict):
    """One dataset of a merged manifest (``curate manifest A.json B.json:3``): a run of consecutive
    entries of ``shards`` (and of ``text.shards``), with the caption selection and the provenance
    (image stage, captioner, VAE) of the manifest it came from. ``repeat`` > 1 lists the part's
    shards that many times in a row, so that an epoch reads each of its samples that often."""

    name: str = Field(min_length=1)
    shards: int = Field(gt=0)  # consecutive entries of the manifest's shards, repeats included
    samples: int = Field(ge=0)  # samples of those entries, repeats included: its share of an epoch
    repeat: int = Field(1, ge=1)
    captions: CaptionWeights  # selects the variant of this part's samples
    provenance: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    version: Literal[1] = MANIFEST_VERSION
    name: str = Field(min_length=1)
    shards: list[ShardEntry] = Field(min_length=1)
    samples: int = Field(ge=0)
    latent: LatentSpec
    # Caption variant -> probability of being chosen for a sample. With ``parts``, each part's own
    # selection applies to its samples, and this is their mean weighted by samples (what an epoch sees).
    captions: CaptionWeights
    text: TextSpec | None = None  # precomputed embeddings; None: the trainer encodes captions itself
    provenance: dict[str, Any] = Field(default_factory=dict)
    parts: list[ManifestPart] | None = None  # a merged manifest's datasets, in shard order

    @model_validator(mode="after")
    def _sample_count(self) -> Manifest:
        total = sum(s.samples for s in self.shards)
        if total != self.samples:
            raise ValueError(f"samples is {self.samples} but the shards hold {total}")
        if self.parts is not None:
            _check_parts(self.parts, self.shards)
        if self.text is not None:
            if len(self.text.shards) != len(self.shards):
                raise ValueError(f"text.shards lists {len(self.text.shards)} shards but shards lists "
                                 f"{len(self.shards)}: text shard i holds the embeddings of shard i")
            for i, (latent, text) in enumerate(zip(self.shards, self.text.shards, strict=True)):
                # A text shard holds every accepted sample of its latent shard, used or not.
                if latent.accepted != text.samples:
                    raise ValueError(f"text.shards.{i} holds {text.samples} samples but shards.{i} "
                                     f"holds {latent.accepted}")
        return self


def _check_parts(parts: list[ManifestPart], shards: list[ShardEntry]) -> None:
    if not parts:
        raise ValueError("parts, when given, lists at least one part")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"part names must differ (got {names})")
    if sum(p.shards for p in parts) != len(shards):
        raise ValueError(f"the parts hold {sum(p.shards for p in parts)} shards but shards lists {len(shards)}")
    start = 0
    for p in parts:
        entries = shards[start: start + p.shards]
        if sum(e.samples for e in entries) != p.samples:
            raise ValueError(f"part {p.name!r} says {p.samples} samples but its shards hold "
                             f"{sum(e.samples for e in entries)}")
        once, rest = divmod(p.shards, p.repeat)
        if rest or any((e.path, e.subset) != (entries[i % once].path, entries[i % once].subset)
                       for i, e in enumerate(entries)):
            raise ValueError(f"part {p.name!r} has repeat {p.repeat}, so its {p.shards} shards must be one list "
                             f"of shards given {p.repeat} times in a row")
        start += p.shards


def shard_parts(manifest: Manifest) -> list[int]:
    """The part of every entry of ``manifest.shards`` (all 0 for a manifest without parts)."""
    if manifest.parts is None:
        return [0] * len(manifest.shards)
    return [i for i, p in enumerate(manifest.parts) for _ in range(p.shards)]


def part_captions(manifest: Manifest) -> list[dict[str, float]]:
    """The caption selection of each part (the manifest's own one when it has no parts)."""
    return [dict(manifest.captions)] if manifest.parts is None else [dict(p.captions) for p in manifest.parts]


def part_share(part: ManifestPart, total: int) -> str:
    """``6 samples x 2, 50.0% of an epoch``: a part's samples, its repeat, and its share of an epoch
    of ``total`` samples."""
    repeat = f" x {part.repeat}" if part.repeat > 1 else ""
    return f"{part.samples // part.repeat} samples{repeat}, {100 * part.samples / max(total, 1):.1f}% of an epoch"


def part_provenance(manifest: Manifest) -> list[dict[str, Any]]:
    """The provenance of each part (the manifest's own one when it has no parts)."""
    return [manifest.provenance] if manifest.parts is None else [p.provenance for p in manifest.parts]


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
    """Read and validate ``path`` (a file, or a URL: ``curate.storage``); optionally check every
    shard exists (and its sha256)."""
    source = os.fspath(path)
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ManifestError(f"{source}: no such manifest") from None
    except OSError as e:
        raise ManifestError(f"{source}: cannot read it: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{source}: not valid JSON: {e}") from None
    manifest = parse_manifest(data, source)
    urls = shard_urls(manifest, path, allow_pipe=allow_pipe)
    text_urls = shard_urls(manifest, path, allow_pipe=allow_pipe, text=True) if manifest.text else None
    if check_files or check_checksums:
        verify_shards(manifest, urls, checksums=check_checksums, source=source)
        if text_urls is not None:
            verify_shards(manifest, text_urls, checksums=check_checksums, source=source, text=True)
    return manifest


def shard_urls(
    manifest: Manifest, manifest_path: str | os.PathLike, *, allow_pipe: bool = False, text: bool = False
) -> list[str]:
    """Shard locations as webdataset URLs: relative paths resolved against the manifest's folder
    (a URL's, for a manifest read from one). ``text``: the text shards' (``manifest.text.shards``)
    instead of the latent shards'."""
    base = storage.parent(manifest_path)
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
            urls.append(storage.join(base, shard.path))
    return urls


def image_stages(manifest: Manifest, override: str | os.PathLike | None = None, *,
                 option: str = "--images") -> list[Path | str]:
    """The image stage each part's latents were encoded from (``provenance.images.path``; one for a
    manifest without parts), or where it is now: ``override``, a folder, or for a merged manifest
    ``NAME=DIR[,NAME=DIR...]`` naming the parts whose stage moved. ``option`` is how the errors
    tell the user to give it. A stage at a URL is returned as that string (``curate.storage``)."""
    provenances = part_provenance(manifest)
    moved: dict[int, str] = {}
    if override is not None and manifest.parts is None:
        moved[0] = os.fspath(override)  # not Path: a URL's "//" would fold
    elif override is not None:
        names = [p.name for p in manifest.parts]
        for item in os.fspath(override).split(","):
            name, sep, folder = item.partition("=")
            if not sep or name not in names or not folder:
                raise ManifestError(f"{option} {override}: manifest {manifest.name!r} merges {len(names)} datasets, "
                                    f"each with its own image stage: name the parts that moved, as NAME=DIR "
                                    f"(parts: {', '.join(names)})")
            moved[names.index(name)] = folder
    paths = []
    for i, provenance in enumerate(provenances):
        recorded = (provenance.get("images") or {}).get("path")
        if i not in moved and not recorded:
            where = "provenance.images.path" if manifest.parts is None else f"parts.{i}.provenance.images.path"
            raise ManifestError(f"manifest {manifest.name!r} records no image stage ({where}): "
                                f"pass the images folder ({option} DATA/images)")
        paths.append(moved.get(i, recorded))
    # A URL stays a string (Path would fold its "//"); its shards are checked when they are read.
    paths = [str(p) if storage.is_remote(p) else Path(p) for p in paths]
    for path in paths:
        if isinstance(path, Path) and not path.is_dir():
            raise ManifestError(f"the image stage {path} does not exist: pass its new place with {option}")
    return paths


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, or of a URL's content (``curate.storage``)."""
    return storage.sha256(path)


def verify_shards(
    manifest: Manifest, urls: list[str], *, checksums: bool, source: str = "manifest", text: bool = False
) -> None:
    """Every shard exists and, if asked, matches its recorded sha256 (``text``: the text shards).
    Shards at URLs are asked for in parallel (``curate.storage.parallel_map``)."""
    entries, what = (manifest.text.shards, "text shard") if text and manifest.text else (manifest.shards, "shard")
    # A merged manifest lists a repeated dataset's shards several times: each file is checked once.
    first: dict[str, int] = {}
    for i, url in enumerate(urls):
        if not url.startswith("pipe:"):
            first.setdefault(url, i)

    def check(item: tuple[str, int]) -> str | None:
        url, i = item
        shard = entries[i]
        if not storage.is_file(url):
            return f"{source}: {what} {i} ({shard.path}) does not exist at {url}"
        if checksums and shard.sha256 is not None and storage.sha256(url) != shard.sha256:
            return (f"{source}: {what} {i} ({shard.path}) does not match its sha256: "
                    "the file changed after the manifest was written")
        return None

    try:
        for problem in storage.parallel_map(check, first.items(), any(map(storage.is_remote, first))):
            if problem:
                raise ManifestError(problem)
    except OSError as e:  # a remote shard that could not be asked for
        raise ManifestError(f"{source}: {e}") from None


def rebase_shard_path(path: str, old: str | os.PathLike, new: str | os.PathLike) -> str:
    """A shard path of a manifest in folder ``old``, for a manifest in folder ``new``: relative
    paths are rebased (:func:`shard_path_for`); absolute paths and URLs (``pipe:`` included) stay
    as they are."""
    if os.path.isabs(path) or "://" in path or path.startswith("pipe:"):
        return path
    return shard_path_for(storage.join(old, path) if storage.is_remote(old) else Path(old) / path, new)


def _bucket(url: str) -> str:
    """``scheme://host``: the part two URLs share for one to name the other by a relative path."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def shard_path_for(tar: str | os.PathLike, manifest_dir: str | os.PathLike) -> str:
    """How a manifest in ``manifest_dir`` names a shard's tar: relative to the manifest's folder
    (so that the folders move together), locally and within one bucket or host; a URL elsewhere as
    it is. A local shard cannot be named from a manifest at a URL (ManifestError)."""
    if storage.is_remote(tar):
        tar = os.fspath(tar)
        if storage.is_remote(manifest_dir) and _bucket(tar) == _bucket(os.fspath(manifest_dir)):
            inside = len(_bucket(tar))
            return posixpath.relpath(tar[inside:], os.fspath(manifest_dir).rstrip("/")[inside:] or "/")
        return tar
    if storage.is_remote(manifest_dir):
        raise ManifestError(f"{tar} is a local file, which a manifest at {manifest_dir} cannot name: write the "
                            "manifest to a local file, or its shards to a URL")
    return os.path.relpath(Path(tar).resolve(), Path(manifest_dir).resolve())


def rebase_entries(entries: list[ShardEntry], old: str | os.PathLike, new: str | os.PathLike) -> list[ShardEntry]:
    """:func:`rebase_shard_path` of every entry."""
    return [e.model_copy(update={"path": rebase_shard_path(e.path, old, new)}) for e in entries]


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> Path | str:
    """Write atomically (temporary name, then rename; at a URL, one PUT)."""
    return storage.write_text(path, manifest.model_dump_json(indent=2) + "\n")


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
    """The rows of the samples the manifest uses, from every latent shard's index: ``columns`` of
    them, ``shard`` (the entry's position in ``manifest.shards``) and ``ordinal`` (the sample's
    position among its shard's accepted samples, which is its place in the tar). A polars DataFrame
    in shard order, a repeated shard's rows once per listing; None when an index cannot be read
    (pipe: shards, or index files missing)."""
    import polars as pl

    from curate.shards import index_of, read_index

    urls = shard_urls(manifest, manifest_path)
    if any(url.startswith("pipe:") or not url.endswith(".tar") for url in urls):
        return None
    indexes = list(dict.fromkeys(map(index_of, urls)))
    remote = any(map(storage.is_remote, indexes))

    def rows_of(index: str) -> Any:
        if not storage.is_remote(index) and not os.path.isfile(index):
            return None
        try:
            table = read_index(index, columns=["status", *columns])
        except FileNotFoundError:  # at a URL
            return None
        return (table.filter(pl.col("status") == "ok").drop("status").with_row_index("ordinal")
                .with_columns(pl.col("ordinal").cast(pl.Int64)))

    read = dict(zip(indexes, storage.parallel_map(rows_of, indexes, remote), strict=True))  # URLs: many at a time
    if any(rows is None for rows in read.values()):
        return None
    frames = []
    for i, (entry, url) in enumerate(zip(manifest.shards, urls, strict=True)):
        rows = read[index_of(url)]
        if rows.height != entry.accepted:
            raise ManifestError(f"{manifest_path}: shard {i} ({entry.path}): its index lists {rows.height} accepted "
                                f"samples but the manifest says {entry.accepted}: the shard changed after the "
                                "manifest was written")
        if entry.subset is not None:
            rows = rows.filter(pl.Series(entry.subset.used()))
        frames.append(rows.with_columns(pl.lit(i, dtype=pl.Int64).alias("shard")))
    return pl.concat(frames).select([*columns, "shard", "ordinal"])


def caption_coverage(manifest: Manifest, rows: Any) -> dict[str, int | None] | None:
    """How many samples (of an epoch: repeated shards count once per listing) have each caption
    variant: curated ones from the latent shards' index ``rows`` (:func:`latent_index_rows` with
    ``key`` and ``captions``), ``orig`` (the original captions, written for every sample, empty when
    there was none) from the image stages' indexes (None when one cannot be found); None without
    ``rows``."""
    from curate.shards import read_index
    from curate.subset import stage_indexes

    if rows is None:
        return None
    counts: dict[str, int] = {}
    for variants in rows["captions"].to_list():
        for variant in variants or ():
            counts[variant] = counts.get(variant, 0) + 1
    try:
        stages = image_stages(manifest)
    except ManifestError:
        return {**counts, "orig": None}
    part_of = shard_parts(manifest)
    listings: list[dict[str, int]] = [{} for _ in stages]  # per part: key -> listings in an epoch
    for shard, key in zip(rows["shard"].to_list(), rows["key"].to_list(), strict=True):
        listed = listings[part_of[shard]]
        listed[key] = listed.get(key, 0) + 1
    with_orig = 0
    for stage, listed in zip(stages, listings, strict=True):
        try:
            indexes = stage_indexes(stage)
        except FileNotFoundError:  # a URL's folder that is not there (a local one: image_stages says so)
            return {**counts, "orig": None}
        # At a URL (an image stage read where it lies), many at a time.
        for df in storage.parallel_map(lambda index: read_index(index, ["key", "caption"]), indexes,
                                       storage.is_remote(stage)):
            for key, caption in zip(df["key"].to_list(), df["caption"].to_list(), strict=True):
                if key in listed and caption and caption.strip():
                    with_orig += listed.pop(key)
    return {**counts, "orig": with_orig}


def _with_part(manifest: Manifest, rows: Any) -> Any:
    """:func:`latent_index_rows` with a ``part`` column: the part of each row's shard."""
    import polars as pl

    return rows.with_columns(pl.Series("part", shard_parts(manifest)).gather(rows["shard"]).alias("part"))


def part_coverage(manifest: Manifest, rows: Any) -> list[dict[str, int | None] | None]:
    """:func:`caption_coverage` of each part's samples (one entry for a manifest without parts)."""
    import polars as pl

    if rows is None or manifest.parts is None:
        return [caption_coverage(manifest, rows)]
    rows = _with_part(manifest, rows)
    return [caption_coverage(manifest, rows.filter(pl.col("part") == i)) for i in range(len(manifest.parts))]


def _check_text_variants(manifest: Manifest, source: str | os.PathLike, weights: dict[str, float]) -> None:
    if manifest.text is not None:
        missing = [v for v in weights if v not in manifest.text.variants]
        if missing:
            raise ManifestError(f"{source}: its text shards hold embeddings of {', '.join(manifest.text.variants)}, "
                                f"not of {', '.join(missing)}")


def with_captions(manifest: Manifest, manifest_path: str | os.PathLike, weights: dict[str, float] | None, *,
                  name: str, out: str | os.PathLike) -> Manifest:
    """The same shards (and text shards) with another caption selection (for every part of a merged
    manifest; None keeps the manifest's), for a manifest written at ``out``: relative shard paths
    are rebased onto its folder, and the provenance names the source of the new selection."""
    source_dir, out_dir = storage.parent(manifest_path), storage.parent(out)
    text = (manifest.text.model_copy(update={"shards": rebase_entries(manifest.text.shards, source_dir, out_dir)})
            if manifest.text else None)
    moved = manifest.model_copy(update={"name": name, "shards": rebase_entries(manifest.shards, source_dir, out_dir),
                                        "text": text})
    if weights is None:
        return Manifest.model_validate(moved.model_dump())
    _check_text_variants(manifest, manifest_path, weights)
    parts = None if manifest.parts is None else [p.model_copy(update={"captions": weights}) for p in manifest.parts]
    provenance = {**manifest.provenance,
                  "captions_from": {"path": storage.resolved(manifest_path), "sha256": file_sha256(manifest_path),
                                    "captions": manifest.captions}}
    return Manifest.model_validate(moved.model_copy(update={"captions": weights, "parts": parts,
                                                            "provenance": provenance}).model_dump())


def hold_out(manifest: Manifest, manifest_path: str | os.PathLike, shards: int, *, name: str,
             out: str | os.PathLike, captions: dict[str, float] | None = None) -> tuple[Manifest, Manifest]:
    """(the manifest without ``shards`` of its shards, a manifest of those: ``NAME-heldout``), for
    manifests written at ``out`` and beside it: training data, and held-out samples for the
    validation loss (``train val.shards=``). The shards held out are drawn at random (seed 0), so
    that a source listed in some order (by date, by class) still gives a sample of the whole.
    ``captions``: another caption selection for both."""
    import numpy as np

    if captions is not None:
        _check_text_variants(manifest, manifest_path, captions)

    if manifest.parts is not None:
        raise ManifestError(f"{manifest_path} merges {len(manifest.parts)} datasets: hold shards out of each "
                            "dataset's manifest, then merge the rest")
    if not 0 < shards < len(manifest.shards):
        raise ManifestError(f"--hold-out {shards}: {manifest_path} has {len(manifest.shards)} shards; hold out at "
                            "least 1 and leave at least 1 to train on")
    chosen = set(np.random.default_rng(0).choice(len(manifest.shards), shards, replace=False).tolist())
    source = {"path": storage.resolved(manifest_path), "sha256": file_sha256(manifest_path)}
    source_dir, out_dir = storage.parent(manifest_path), storage.parent(out)

    def subset(held: bool, subset_name: str) -> Manifest:
        def pick(entries: list[ShardEntry]) -> list[ShardEntry]:
            return rebase_entries([e for i, e in enumerate(entries) if (i in chosen) == held], source_dir, out_dir)

        entries = pick(manifest.shards)
        text = manifest.text.model_copy(update={"shards": pick(manifest.text.shards)}) if manifest.text else None
        provenance = {**manifest.provenance, "held_out": {**source, "shards": shards, "this": "held out" if held
                                                          else "the rest"}}
        if captions is not None:  # as with_captions records another selection
            provenance["captions_from"] = {**source, "captions": manifest.captions}
        return Manifest(name=subset_name, shards=entries, samples=sum(e.samples for e in entries),
                        latent=manifest.latent, captions=captions or manifest.captions, text=text,
                        provenance=provenance)

    return subset(False, name), subset(True, f"{name}-heldout")


# --------------------------------------------------------------------------- merging datasets

# What may differ between the latents of merged manifests: the alias the user typed for the same
# VAE, and the bucket shapes (the merged manifest lists them all). Everything else decides how a
# latent becomes a model input, which one run cannot do two ways.
_MERGEABLE_LATENT = {"vae", "buckets"}
_MERGEABLE_TEXT = {"encoder", "variants", "shards"}


def parse_merge_source(text: str) -> tuple[str | None, str, int]:
    """``[NAME=]PATH[:REPEAT]`` as (name or None, path, repeat). A local PATH that exists as given
    is a path, ``=`` and all (a folder of partitions: ``date=2024/long.json``)."""
    source, colon, count = text.rpartition(":")
    if not colon or "/" in count:  # no repeat; or the colon of a URL's scheme or port
        source, count = text, "1"
    name, sep, path = source.partition("=")
    if not sep or not name or os.sep in name or "/" in name or (Path(source).is_file() and not Path(path).is_file()):
        name, path = None, source
    if not count.isdigit() or int(count) < 1 or not path:
        raise ManifestError(f"{text!r}: give a manifest as [NAME=]PATH[:REPEAT], REPEAT a whole number >= 1 "
                            "(e.g. curated=manifests/curated-long.json:3)")
    return name, path, int(count)


def _differences(ours: BaseModel, theirs: BaseModel, exclude: set[str]) -> list[str]:
    a, b = ours.model_dump(mode="json", exclude=exclude), theirs.model_dump(mode="json", exclude=exclude)

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 48 else text[:45] + "..."

    fields = [*a, *(f for f in b if f not in a)]  # a field written only when set may be in one alone
    return [f"{field} ({short(b.get(field))} against {short(a.get(field))})" for field in fields
            if a.get(field) != b.get(field)]


def with_latent_scaling(manifest: Manifest, scaling: float | None = None, shift: float | None = None) -> Manifest:
    """The same manifest with the denoiser's inputs ``(latent - shift) * scaling`` (either left out:
    as it was). The shards hold raw latents, so a scale measured on the data (``curate stats
    --latents``: the raw mean and 1/std) applies without encoding again; the VAE config's own
    values stay recorded, so its check and the export's decoding still hold."""
    spec = manifest.latent
    if spec.normalization is not None:
        raise ManifestError(f"{spec.vae}'s latents are {spec.normalization.kind}-normalised per channel after "
                            "patchifying (FLUX.2): a scaling and shift of their own do not apply")
    if spec.vae == "pixels":
        raise ManifestError("pixel space maps 0..255 to [-1, 1] (shift 127.5, scaling 1/127.5): no other scale")
    scaling = spec.scaling_factor if scaling is None else float(scaling)
    shift = spec.shift_factor if shift is None else float(shift)
    if not (math.isfinite(scaling) and scaling > 0 and math.isfinite(shift)):
        raise ManifestError(f"--latent-scaling must be positive and finite and --latent-shift finite, not "
                            f"{scaling} and {shift}")
    own = spec.vae_scaling
    recorded = (None, None) if (scaling, shift) == own else own
    latent = LatentSpec.model_validate({**spec.model_dump(), "scaling_factor": scaling, "shift_factor": shift,
                                        "vae_scaling_factor": recorded[0], "vae_shift_factor": recorded[1]})
    return manifest.model_copy(update={"latent": latent})


def mergeable_latents(ours: LatentSpec, theirs: LatentSpec) -> list[str]:
    """Where ``theirs`` differs from ``ours`` so that one run cannot train on both: every field but
    the VAE's alias and the buckets, as ``field (theirs against ours)``; empty when they mix."""
    return _differences(ours, theirs, _MERGEABLE_LATENT)


def merge_manifests(sources: list[tuple[str | None, str | os.PathLike, int]], *, name: str,
                    out: str | os.PathLike, captions: dict[str, float] | None = None) -> Manifest:
    """One manifest over several datasets, for a manifest written at ``out``: ``sources`` are
    (part name or None for the manifest's name, manifest path, repeat). Each source becomes a part
    (a merged source's parts stay parts, their repeats multiplied) with its own caption selection
    (``captions`` replaces every part's) and provenance; its shards are listed ``repeat`` times.
    The latent spec must agree but for the VAE's alias and the buckets, and so must the text
    section: one run trains in one latent space with one text encoder."""
    if not sources:
        raise ManifestError("give at least one manifest to merge")
    out_dir = storage.parent(out)
    first_path: Path | None = None
    first: Manifest | None = None
    shards: list[ShardEntry] = []
    text_shards: list[ShardEntry] = []
    text_variants: list[str] = []
    parts: list[ManifestPart] = []
    buckets: set[tuple[int, int]] = set()
    merged_from = []
    for label, path, repeat in sources:
        path = storage.as_location(path)  # a file, or a URL
        m = load_manifest(path, check_files=True)  # a manifest of shards that are not there is refused
        if first is None:
            first_path, first = path, m
        problems = mergeable_latents(first.latent, m.latent)
        if problems:
            raise ManifestError(f"{path}: its latents differ from those of {first_path} in "
                                f"{'; '.join(problems)}: one run trains in one latent space, so merge manifests "
                                "encoded with the same VAE, resolution, storage and dtype")
        if (m.text is None) != (first.text is None):
            has, lacks = (path, first_path) if m.text is not None else (first_path, path)
            raise ManifestError(f"{has} lists text shards (curate encode-text) but {lacks} does not: merge "
                                "manifests of the same kind")
        if m.text is not None:
            problems = _differences(first.text, m.text, _MERGEABLE_TEXT)
            if problems:
                raise ManifestError(f"{path}: its text embeddings differ from those of {first_path} in "
                                    f"{'; '.join(problems)}: one run has one text encoder")
            text_variants += [v for v in m.text.variants if v not in text_variants]
        source_dir = storage.parent(path)
        record = {"path": storage.resolved(path), "sha256": file_sha256(path), "name": m.name}
        merged_from.append({**record, "repeat": repeat})

        own = m.parts or [ManifestPart(name=m.name, shards=len(m.shards), samples=m.samples, captions=m.captions,
                                       provenance=m.provenance)]
        start = 0
        for part in own:
            once = part.shards // part.repeat
            listed = rebase_entries(m.shards[start: start + once], source_dir, out_dir)
            times = part.repeat * repeat
            selection = captions or part.captions
            if m.text is not None:
                _check_text_variants(m, path, selection)
                text_shards += rebase_entries(m.text.shards[start: start + once], source_dir, out_dir) * times
            start += part.shards
            shards += listed * times
            if m.parts is None:
                part_name = label or m.name
            else:
                part_name = f"{label}.{part.name}" if label else part.name
            parts.append(ManifestPart(
                name=part_name, shards=once * times,
                samples=sum(e.samples for e in listed) * times, repeat=times, captions=selection,
                provenance={"manifest": record, **part.provenance}))
        buckets.update(m.latent.buckets)
    names = [p.name for p in parts]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ManifestError(f"two parts would be named {', '.join(map(repr, twice))}: name them, as "
                            "NAME=PATH (e.g. cc12m=manifests/cc12m/long.json)")
    samples = sum(p.samples for p in parts)
    text = (first.text.model_copy(update={"variants": text_variants, "shards": text_shards})
            if first.text is not None else None)
    return Manifest(name=name, shards=shards, samples=samples,
                    latent=first.latent.model_copy(update={"buckets": sorted(buckets)}),
                    captions=_mean_selection(parts), text=text, provenance={"merged_from": merged_from},
                    parts=parts)


def _mean_selection(parts: list[ManifestPart]) -> dict[str, float]:
    """The caption selection an epoch sees: the parts' selections weighted by their samples."""
    if all(p.captions == parts[0].captions for p in parts):
        return dict(parts[0].captions)
    total = sum(p.samples for p in parts)
    mean: dict[str, float] = {}
    for p in parts:
        for variant, weight in p.captions.items():
            share = p.samples / total if total else 1 / len(parts)
            mean[variant] = mean.get(variant, 0.0) + weight * share
    return mean


def overlapping_samples(manifest: Manifest, rows: Any) -> int | None:
    """How many samples (keys: content hashes) are in more than one part, from the manifest's
    :func:`latent_index_rows` (with ``key``); None without them (indexes not readable here)."""
    import polars as pl

    if rows is None:
        return None
    return (_with_part(manifest, rows).group_by("key").agg(pl.col("part").n_unique())
            .filter(pl.col("part") > 1).height)
