"""`curate encode-latents DATA/images --captions DATA/captions/NAME --out DATA/latents/flux2-256 --vae flux2`.

Encodes every captioned image once with a diffusers VAE and writes the training shards:
per sample ``KEY.latent.safetensors`` (the latent distribution's mean and std at the VAE's
native grid, or the mean only, in bf16 or fp16), one ``KEY.VARIANT.txt`` per caption
variant of the captions table plus ``KEY.orig.txt`` (the original caption; empty files
where a caption is missing, so every sample has the same fields), and ``KEY.json``
(bucket, crop box, original size, which captions are present). At the end it writes the
manifests that `train --shards manifests/long.json` reads: the same shards, one caption
selection each, with the full latent spec.

Decoding and resizing run in DataLoader workers ahead of the encoder; batches hold one
bucket shape; serialising the results overlaps with encoding the next batches, and writing
a shard and committing it with encoding the next shard.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from curate import storage
from curate.images import FILTERED_OUT
from curate.manifest import LatentSpec, Manifest, ShardEntry, shard_path_for, write_manifest
from curate.models import PIXELS
from curate.runner import (
    STAGE_FILE,
    CurateError,
    ShardTask,
    Stage,
    image_stage_tasks,
    read_image_captions,
    stage_of_kind,
    stage_record,
)
from curate.shards import ShardWriter, committed_shards
from curate.subset import SubsetRules, images_left_out

if TYPE_CHECKING:
    import torch

    from curate.vae import LoadedVae

log = logging.getLogger("curate")

DTYPES = ("bfloat16", "float16", "uint8")  # stored latents (uint8: pixel values, --vae pixels only)
VAE_DTYPES = ("float32", "bfloat16")  # the VAE's weights (float32: bf16 autocast on a GPU)

# Batches queued on the GPU beyond the one it encodes (their inputs and latents stay in memory).
BATCHES_IN_FLIGHT = 2


def _serialize(mean, std) -> bytes:
    from safetensors.torch import save

    tensors = {"mean": mean.contiguous()}
    if std is not None:
        tensors["std"] = std.contiguous()
    return save(tensors)


class EncodeLatentsStage(Stage):
    name = "encode-latents"
    version = 1
    packages = ("kiln", "torch", "diffusers", "safetensors", "pillow", "polars")
    index_schema = {
        "bucket_h": pl.Int32,
        "bucket_w": pl.Int32,
        "orig_w": pl.Int32,
        "orig_h": pl.Int32,
        "captions": pl.List(pl.Utf8),
    }

    def __init__(self, images_dir: str | Path, captions_dir: str | Path | None, out_dir: str | Path, vae: str, *,
                 revision: str | None = None, vae_class: str | None = None, resolution: int = 256,
                 buckets: bool = False, bucket_multiple: int = 16, store: str | None = None,
                 dtype: str | None = None,
                 vae_dtype: str = "float32", batch_size: int = 32, compile: bool = False,
                 decode_workers: int = 2, allow_missing_captions: bool = False, select: SubsetRules | None = None,
                 manifest_dir: str | Path = "manifests", name: str | None = None, device: str | None = None):
        from curate.vae import DETERMINISTIC_CLASSES, vae_class_of

        pixels = vae == PIXELS
        # Pixel space stores the images' own values and a deterministic encoder (DC-AE) one latent
        # per image: no distribution, so the mean is all there is; uint8 holds pixels exactly in
        # half bf16's bytes.
        deterministic = store != "mean" and vae_class_of(vae, revision=revision,
                                                         vae_class=vae_class) in DETERMINISTIC_CLASSES
        store = store or ("mean" if deterministic else "dist")
        dtype = dtype or ("uint8" if pixels else "bfloat16")
        if store not in ("dist", "mean"):
            raise CurateError(f"--store must be dist or mean, not {store!r}")
        if pixels and store == "dist":
            raise CurateError("--vae pixels stores the images themselves, which have no distribution: "
                              "--store mean (the default for pixels)")
        if deterministic and store == "dist":
            raise CurateError(f"VAE {vae!r} encodes each image to one latent, which has no distribution: "
                              "--store mean (the default for it)")
        if dtype not in DTYPES:
            raise CurateError(f"--dtype must be one of {DTYPES}, not {dtype!r}")
        if dtype == "uint8" and not pixels:
            raise CurateError(f"--dtype uint8 holds pixel values (--vae pixels), not the latents of {vae!r}")
        if vae_dtype not in VAE_DTYPES:
            raise CurateError(f"--vae-dtype must be one of {VAE_DTYPES}, not {vae_dtype!r}")
        if resolution % bucket_multiple:
            raise CurateError(f"--resolution {resolution} must be a multiple of {bucket_multiple}")
        # Either may be a folder or a URL (the latents then uploaded shard by shard).
        self.images_dir, self.out_dir = storage.as_location(images_dir), storage.as_location(out_dir)
        self.captions_dir = storage.as_location(captions_dir) if captions_dir else None
        self.vae_name, self.revision, self.vae_class = vae, revision, vae_class
        self.resolution, self.use_buckets, self.bucket_multiple = resolution, buckets, bucket_multiple
        self.store, self.dtype, self.batch_size, self.compile = store, dtype, batch_size, compile
        self.vae_dtype = vae_dtype
        self.decode_workers, self.allow_missing_captions = decode_workers, allow_missing_captions
        # The manifests may go to a URL too (any worker may be the one that writes them), if the
        # shards they name are there.
        self.manifest_dir, self.manifest_name, self.device = storage.as_location(manifest_dir), name, device
        if storage.is_remote(self.manifest_dir) and not storage.is_remote(self.out_dir):
            raise CurateError(f"--manifest-dir {manifest_dir} is a URL: its manifests can name shards at URLs only; "
                              "give --out a URL too, or a local --manifest-dir")
        self.variants = self._caption_variants()
        # Rules that leave images out before they are decoded (--where ...): a second stage at 512 px
        # encodes the images that have 512 px, not every image to subset the manifest after.
        self.select = select if select else None
        self.dropped: dict[str, str] = {}  # key -> the rule that leaves it out
        self.loaded = None
        self.loader = None

    # -- what decides the output -------------------------------------------------------------------------

    def _caption_variants(self) -> list[str]:
        if self.captions_dir is None:
            if not self.allow_missing_captions:
                raise CurateError("--captions is required (or --allow-missing-captions to train on original captions)")
            return []
        record = stage_of_kind(self.captions_dir, "recaption", "captions")
        if record is None:
            raise CurateError(f"{self.captions_dir}: not a complete caption stage (no {STAGE_FILE}); "
                              "run `curate recaption` to completion first")
        return list(record["config"]["prompts"])

    def bucket_table(self) -> list[tuple[int, int]]:
        from curate.buckets import make_buckets

        if not self.use_buckets:
            return [(self.resolution, self.resolution)]
        return make_buckets(self.resolution, self.bucket_multiple)

    def config(self) -> dict[str, Any]:
        from curate.models import local_fingerprint

        return {"vae": self.vae_name, "revision": self.revision, "vae_class": self.vae_class,
                "local_vae_files": None if self.vae_name == PIXELS else local_fingerprint(self.vae_name),
                "resolution": self.resolution, "buckets": self.bucket_table(), "store": self.store,
                "dtype": self.dtype, "vae_dtype": self.vae_dtype, "variants": self.variants,
                "draft_jpeg_decoding": True, "allow_missing_captions": self.allow_missing_captions,
                # Only when given, so that the stages encoded before --where existed keep their hash.
                **({"select": self.select.record()} if self.select else {})}

    def provenance(self) -> dict[str, Any]:
        out = {"images": storage.resolved(self.images_dir),
               "captions": storage.resolved(self.captions_dir) if self.captions_dir else None}
        if self.loaded is not None:
            out |= {"vae_id": self.loaded.id, "vae_class": self.loaded.cls, "vae_revision": self.loaded.revision,
                    "vae_dtype": self.vae_dtype}
        return out

    def plan(self) -> list[ShardTask]:
        return image_stage_tasks(self.images_dir, self.captions_dir)

    # -- doing it ----------------------------------------------------------------------------------------

    def prepare(self, todo: list[ShardTask]) -> None:
        import torch

        from curate.buckets import ShardImageLoader
        from curate.runner import resolve_device
        from curate.vae import load_vae

        if self.select:
            self.dropped = images_left_out(self.images_dir, self.select, self.name)
        def skipped(task: ShardTask) -> set[str]:
            captions = read_image_captions(task, self.variants)
            return {k for k in captions.keys
                    if k in captions.filtered or k in self.dropped or self._missing_caption(captions.accepted[k])}

        # At a URL the indexes of a worker's shards are fetched many at a time, not one after another.
        remote = storage.is_remote(self.images_dir) or storage.is_remote(self.captions_dir or "")
        skip = dict(zip([t.shard_id for t in todo], storage.parallel_map(skipped, todo, remote), strict=True))
        buckets = self.bucket_table() if self.use_buckets else None
        # The decoding workers start first: they fill their queues while the VAE loads (and the
        # workers fork from a process that holds no model yet).
        self.loader = ShardImageLoader([(t.shard_id, t.payload[1]) for t in todo], resolution=self.resolution,
                                       buckets=buckets, workers=self.decode_workers, skip_keys=skip)
        device = resolve_device(self.device)
        if device.type == "cuda":
            # The stage's events, streams and pinned copies then belong to this worker's GPU, not
            # to cuda:0 (every torchrun rank would otherwise also open a context there).
            torch.cuda.set_device(device)
        self.loaded = load_vae(self.vae_name, revision=self.revision, vae_class=self.vae_class, device=device,
                               dtype=getattr(torch, self.vae_dtype))
        self.latent_spec(self.loaded)  # sizes that are not whole latent cells: refused before any encode
        # No torch.set_num_threads here: on a CPU-only machine the encoder keeps one thread per
        # core although the decoding workers share those cores, since next to a VAE they are
        # idle most of the time (2 cores, 2 workers: the full-size encoder ran 1.7x and the tiny
        # one 1.3-1.6x as fast with 2 threads as with the 1 the workers left; BENCHMARKS.md).
        if self.compile and any(True for _ in self.loaded.model.parameters()):  # pixels: nothing to compile
            # Batches keep one size (padded, see process); a new bucket shape recompiles once with
            # symbolic sides (torch's automatic dynamic shapes), where static shapes would compile
            # each bucket (17 at 256 px) and stop compiling at dynamo's limit of 8.
            self.loaded.model.encoder = torch.compile(self.loaded.model.encoder)

    def _missing_caption(self, accepted: dict[str, str]) -> bool:
        return bool(self.variants) and not accepted and not self.allow_missing_captions

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of a uint8 batch on the VAE's device (bench/encode_latents.py replaces
        it with a free one to measure what the rest of the stage can feed)."""
        from curate.buckets import to_model_range
        from curate.vae import encode_batch

        return encode_batch(self.loaded, to_model_range(images))

    def __exit__(self, *exc: object) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def process(self, task: ShardTask, writer: ShardWriter, progress: Callable[[int], None]) -> None:
        import torch

        from curate.buckets import batch_by_bucket, gather_batch

        # Read again rather than kept from prepare(): a worker's pending shards can be many.
        captions = read_image_captions(task, self.variants)
        keys, originals, accepted, filtered = captions.keys, captions.originals, captions.accepted, captions.filtered
        results: dict[str, tuple[Future | None, dict]] = {}

        def decoded():
            """Images as they come from the loader; skipped and undecodable ones are set aside."""
            for key, tensor, record in self.loader.take(task.shard_id, len(keys)):
                if tensor is None:
                    results[key] = (None, record)
                    progress(1)
                else:
                    yield key, tensor, record

        device = self.loaded.model.device
        cuda = device.type == "cuda"
        dtype = getattr(torch, self.dtype)

        def launch(batch: list) -> tuple:
            """Start encoding ``batch``; on a GPU this returns before its latents exist."""
            # A shard's last batch of a bucket is padded when compiled: the encoder keeps one batch
            # size. On a GPU the batch is gathered straight into pinned memory, so that its copy
            # to the device does not wait for the encode in flight.
            rows = self.batch_size if self.compile else len(batch)
            images = gather_batch([t for _, t, _ in batch], rows, pin_memory=cuda)
            mean, std = self.encode(images.to(device, non_blocking=True))
            mean = mean[: len(batch)].to("cpu", dtype, non_blocking=True)
            std = std[: len(batch)].to("cpu", dtype, non_blocking=True) if self.store == "dist" else None
            landed = torch.cuda.Event() if cuda else None
            if landed is not None:
                landed.record(torch.cuda.current_stream(device))
            return batch, mean, std, landed

        with ThreadPoolExecutor(1) as serializer:  # safetensors writing overlaps the next batch's encode

            def finish(batch: list, mean: torch.Tensor, std: torch.Tensor | None, landed: Any) -> None:
                if landed is not None:
                    landed.synchronize()  # the copies to the host are done
                for i, (key, _, record) in enumerate(batch):
                    results[key] = (serializer.submit(_serialize, mean[i], None if std is None else std[i]), record)
                progress(len(batch))

            # While the GPU encodes, this process gathers the next batches from the decoding
            # workers and queues them; a batch's latents are read BATCHES_IN_FLIGHT batches later,
            # so that a slow chunk of images does not leave the GPU idle.
            in_flight: deque[tuple] = deque()
            for batch in batch_by_bucket(decoded(), self.batch_size):
                in_flight.append(launch(batch))
                if len(in_flight) > BATCHES_IN_FLIGHT:
                    finish(*in_flight.popleft())
            while in_flight:
                finish(*in_flight.popleft())

        def write() -> None:
            """The shard's samples, in the image index's order; deferred to the commit, which
            the runner does in the background while the next shard is encoded."""
            for key in keys:
                future, record = results[key]
                row = {"orig_w": (record.get("orig_size") or [None, None])[0],
                       "orig_h": (record.get("orig_size") or [None, None])[1],
                       "captions": sorted(accepted[key])}
                if future is None:
                    if not record.get("skipped"):
                        writer.reject(key, "unreadable", row=row, detail=record.get("error"))
                    elif key in self.dropped or key in filtered:
                        writer.reject(key, FILTERED_OUT, row=row, detail=self.dropped.get(key))
                    else:
                        writer.reject(key, "no_caption", row=row)
                    continue
                bucket_h, bucket_w = record["target_size"]
                row |= {"bucket_h": bucket_h, "bucket_w": bucket_w}
                meta = {"key": key, **record, "captions": sorted(accepted[key]),
                        "stored": self.store, "dtype": self.dtype}
                members = {"latent.safetensors": future.result(),
                           **{f"{v}.txt": (accepted[key].get(v) or "").encode() for v in self.variants},
                           "orig.txt": (originals[key] or "").encode(),
                           "json": json.dumps(meta, sort_keys=True).encode()}
                flags = [] if len(accepted[key]) == len(self.variants) else ["some_captions_missing"]
                writer.add(key, members, row=row, flags=flags)

        writer.defer(write)

    def finalize(self, out_dir: Path | str, tasks: list[ShardTask]) -> dict[str, Any]:
        written = self.write_manifests(out_dir)
        return {"manifests": [str(p) for p in written], "buckets": len(self.bucket_table())}

    # -- manifests ---------------------------------------------------------------------------------------

    def caption_selections(self) -> dict[str, dict[str, float]]:
        """long.json, short.json and mix.json when both exist; one per variant otherwise."""
        variants = self.variants or ["orig"]
        selections = {v: {v: 1.0} for v in variants}
        if len(variants) > 1:
            selections["mix"] = {v: round(1.0 / len(variants), 12) for v in variants}
            drift = 1.0 - sum(selections["mix"].values())
            selections["mix"][variants[0]] += drift
        return selections

    def latent_spec(self, loaded: LoadedVae) -> LatentSpec:
        """The manifests' latent spec; image sizes that are not whole cells of the denoiser's
        input (FLUX.2's 16 px after its 2x2 patches, DC-AE's 32 px) are refused with the fix."""
        from curate.vae import latent_spec_for

        try:
            return latent_spec_for(loaded, stored=self.store, dtype=self.dtype, resolution=self.resolution,
                                   buckets=self.bucket_table())
        except ValueError as e:
            if "not divisible" not in str(e):
                raise CurateError(f"{self.vae_name}: no latent spec for these latents: {e}") from e
            cell = loaded.downsample * (loaded.normalization.patch_size if loaded.normalization else 1)
            raise CurateError(f"{e}; pass a --resolution and a --bucket-multiple divisible by {cell}") from e

    def write_manifests(self, out_dir: Path | str) -> list[Path | str]:
        from curate.vae import load_vae

        loaded = self.loaded or load_vae(self.vae_name, revision=self.revision, vae_class=self.vae_class,
                                         device="cpu")
        spec = self.latent_spec(loaded)
        shards = committed_shards(out_dir)
        prefix = f"{self.manifest_name}-" if self.manifest_name else ""
        provenance = {"images": self._stage_summary(self.images_dir),
                      "captions": self._stage_summary(self.captions_dir) if self.captions_dir else None,
                      "latents": {"path": storage.resolved(out_dir), "vae": loaded.id, "vae_class": loaded.cls,
                                  "revision": loaded.revision, "vae_dtype": self.vae_dtype,
                                  **({"select": self.select.record()} if self.select else {})}}
        written = []
        for selection_name, weights in self.caption_selections().items():
            entries = [ShardEntry(path=shard_path_for(s.tar_path, self.manifest_dir),
                                  samples=s.meta.counts["ok"], sha256=s.meta.tar_sha256)
                       for s in shards if s.meta.counts["ok"] > 0]
            if not entries:
                raise CurateError(f"{out_dir}: no sample was encoded; no manifest to write")
            manifest = Manifest(name=f"{prefix}{selection_name}", shards=entries,
                                samples=sum(e.samples for e in entries), latent=spec, captions=weights,
                                provenance=provenance)
            written.append(write_manifest(manifest, storage.join(self.manifest_dir, f"{prefix}{selection_name}.json")))
        log.info("encode-latents: wrote %s", ", ".join(str(p) for p in written))
        return written

    @staticmethod
    def _stage_summary(stage_dir: Path | str) -> dict[str, Any]:
        stage = stage_record(stage_dir)
        if stage is None:
            raise CurateError(f"{stage_dir}: its {STAGE_FILE} is gone")
        return {"path": storage.resolved(stage_dir), "stage": stage["stage"], "config": stage["config"],
                "config_hash": stage["config_hash"], "totals": stage["totals"]}

