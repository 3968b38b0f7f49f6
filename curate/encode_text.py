"""`curate encode-text DATA/latents/flux2-256 --out DATA/text/t5gemma --text-encoder t5gemma`.

Encodes every caption of the training shards once with the frozen text encoder and writes
text shards beside them, then manifests that list both, so that training never runs the
text encoder. T5Gemma-2B's encoder costs about as much per prompt as three quarters of a
PRX-1.2B training step's compute (BENCHMARKS.md), so this is the largest speed-up left
once the latents are precomputed.

Text shard ``i`` keeps latent shard ``i``'s id, keys and order: per sample
``KEY.text.safetensors``, one ``[tokens, dim]`` tensor per non-empty caption variant (the
``KEY.VARIANT.txt`` members of the latent shard, ``orig`` included), the encoder's last
hidden state at the caption's valid tokens only. Captions are cleaned and tokenized exactly
as ``PRXPipeline`` does (:class:`curate.text.TextEncoder`), truncated at ``--max-tokens``.

Why only the valid tokens: PRX's denoiser reads text only as attention keys and values
under the mask, and gives text tokens no positions, so the padded rows never reach the
image; they are zeros when the trainer rebuilds ``[max_tokens, dim]``. Why batches padded to
their longest caption (sorted by length within a shard): with a right-padding tokenizer a
valid token's position, hence its embedding, does not depend on the padding after it, and a
20-token caption padded to 256 would cost 12 times its compute. A left-padding tokenizer
shifts positions with the padding, so those batches are padded to ``max_tokens`` as the
pipeline pads them.

Reading the captions from the latent tars and cleaning them (65-260 us per caption) run in
worker processes ahead of the encoder on a GPU (in this process on a CPU, where the encoder
takes every core); writing a shard overlaps encoding the next.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from curate import storage
from curate.manifest import (
    Manifest,
    ManifestError,
    ShardEntry,
    TextSpec,
    load_manifest,
    rebase_entries,
    shard_path_for,
    shard_urls,
    write_manifest,
)
from curate.procs import available_cores, die_with_parent
from curate.runner import STAGE_FILE, CurateError, ShardTask, Stage, stage_record
from curate.shards import (
    OK,
    ShardWriter,
    check_intact,
    committed_shards,
    iter_tar_samples,
    read_index,
    stable_hash,
)

if TYPE_CHECKING:
    import torch

    from curate.text import TextEncoder

log = logging.getLogger("curate")

DTYPES = ("bfloat16", "float16", "float32")  # stored embeddings


def _is_caption(key: str, ext: str) -> bool:
    return ext.endswith(".txt")


def read_captions(tar: str, keys: list[str]) -> list[dict[str, str]]:
    """The non-empty captions of each of ``keys`` in a latent shard, per variant, cleaned as
    ``PRXPipeline`` cleans prompts. Runs in the stage's worker processes. A tar at a URL is read
    forward once: its captions lie between the latents, which its ranged requests fetch anyway."""
    found = {}
    if storage.is_remote(tar):
        with storage.open_stream(tar) as stream:
            samples = [(key, {ext: data for ext, data in members.items() if _is_caption(key, ext)})
                       for key, members in iter_tar_samples(stream, what=tar)]
    else:
        samples = iter_tar_samples(tar, wanted=_is_caption)
    for key, members in samples:
        found[key] = {ext[: -len(".txt")]: data.decode("utf-8") for ext, data in members.items()}
    missing = [k for k in keys if k not in found]
    if missing:
        raise CurateError(f"{tar}: {len(missing)} samples of its index are not in the tar (first "
                          f"{missing[0]}): the shard changed after it was committed")
    from curate.text import clean_caption

    return [{v: clean_caption(t) for v, t in sorted(found[key].items()) if t.strip()} for key in keys]


def _init_worker() -> None:
    die_with_parent()


def _serialize(rows: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({v: t.contiguous() for v, t in rows.items()})


class EncodeTextStage(Stage):
    name = "encode-text"
    version = 1
    unit = "sample"
    packages = ("kiln", "torch", "transformers", "diffusers", "ftfy", "safetensors")

    def __init__(self, latents_dir: str | Path, out_dir: str | Path, text_encoder: str = "t5gemma", *,
                 revision: str | None = None, max_tokens: int | None = None, dtype: str = "bfloat16",
                 batch_size: int = 64, workers: int | None = None, manifests: list[str | Path] | None = None,
                 manifest_dir: str | Path | None = None, name: str | None = None, device: str | None = None):
        from curate.text import DEFAULT_MAX_TOKENS

        if dtype not in DTYPES:
            raise CurateError(f"--dtype must be one of {DTYPES}, not {dtype!r}")
        if batch_size < 1 or (workers is not None and workers < 0):
            raise CurateError("--batch-size must be positive and --workers at least 0")
        # The latent stage and its manifests may be URLs (read where they lie), and so may the text
        # shards (uploaded shard by shard) and the manifests that list them.
        self.latents_dir, self.out_dir = storage.as_location(latents_dir), storage.as_location(out_dir)
        self.encoder_name, self.revision = text_encoder, revision
        self.max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if self.max_tokens < 1:
            raise CurateError(f"--max-tokens must be positive, got {self.max_tokens}")
        self.dtype, self.batch_size, self.workers, self.device = dtype, batch_size, workers, device
        self.manifest_dir = storage.as_location(manifest_dir) if manifest_dir is not None else None
        self.manifest_name = name or posixpath.basename(os.fspath(self.out_dir).rstrip("/"))
        self.latent_stage = stage_record(self.latents_dir)
        if self.latent_stage is None:
            raise CurateError(f"{self.latents_dir}: not a complete encode-latents stage (no {STAGE_FILE}); "
                              "run `curate encode-latents` to completion first")
        if self.latent_stage.get("stage") != "encode-latents":
            raise CurateError(f"{self.latents_dir} holds a {self.latent_stage.get('stage')!r} stage, "
                              "not encode-latents")
        self.variants = [*self.latent_stage["config"]["variants"], "orig"]
        self.input_manifests = self._input_manifests(manifests)
        self.index_schema = {f"tokens_{v}": pl.Int32 for v in self.variants}
        self.encoder: TextEncoder | None = None
        self.pool = None
        self.pending: dict[int, Any] = {}
        self.queue: list[ShardTask] = []

    # -- what decides the output -------------------------------------------------------------------------

    def _input_manifests(self, given: list[str | Path] | None) -> list[Path | str]:
        """The manifests to extend with text shards: those given (files or URLs), else the ones
        encode-latents wrote."""
        if given:
            paths = [storage.as_location(p) for p in given]
        else:
            written = self.latent_stage.get("summary", {}).get("manifests", [])
            paths = [storage.as_location(p) for p in written]
            absent = [str(p) for p in paths if not storage.is_file(p)]
            if not paths or absent:
                raise CurateError(f"{self.latents_dir}: cannot find the manifests encode-latents wrote "
                                  f"({', '.join(absent) or 'none recorded'}, relative to the folder it ran "
                                  "in); name them with --manifests")
        for p in paths:
            if not storage.is_file(p):
                raise CurateError(f"{p}: no such manifest")
            target = self.target_dir(p)
            if storage.is_remote(target) and not (storage.is_remote(self.out_dir) and storage.is_remote(self.latents_dir)):
                raise CurateError(f"{p}: its manifest would be written at {target}, where it can name shards at URLs "
                                  "only: give --out a URL (with the latents at theirs), or a local --manifest-dir")
            parts = load_manifest(p).parts  # one that does not validate is named before any encoding
            if parts:
                raise CurateError(f"{p} merges {len(parts)} datasets: run encode-text on each dataset's "
                                  "latents, then merge the manifests it writes (curate manifest)")
        return paths

    def config(self) -> dict[str, Any]:
        from curate.models import local_fingerprint

        return {"text_encoder": self.encoder_name, "revision": self.revision,
                "local_encoder_files": local_fingerprint(self.encoder_name), "max_tokens": self.max_tokens,
                "dtype": self.dtype, "cleaning": "prx", "variants": self.variants}

    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"latents": storage.resolved(self.latents_dir)}
        if self.encoder is not None:
            out |= {"encoder_id": self.encoder.id, "encoder_revision": self.encoder.revision}
        return out

    def plan(self) -> list[ShardTask]:
        tasks = []
        shards = committed_shards(self.latents_dir)
        check_intact(shards, self.latents_dir)
        for shard in shards:
            tasks.append(ShardTask(shard.shard_id, stable_hash([shard.meta.fingerprint, shard.meta.tar_sha256]),
                                   shard.meta.counts["ok"], (str(shard.index_path), str(shard.tar_path))))
        if not tasks:
            raise CurateError(f"{self.latents_dir}: no latent shards")
        return tasks

    # -- doing it ----------------------------------------------------------------------------------------

    def _keys(self, task: ShardTask) -> list[str]:
        return read_index(task.payload[0], columns=["key", "status"]).filter(pl.col("status") == OK)["key"].to_list()

    def _submit(self, task: ShardTask) -> None:
        keys = self._keys(task)
        job = self.pool.apply_async(read_captions, (task.payload[1], keys)) if self.pool is not None else None
        self.pending[task.shard_id] = (keys, job)

    def _captions(self, task: ShardTask) -> tuple[list[str], list[dict[str, str]]]:
        """This shard's keys and cleaned captions; keeps ``workers`` more shards in preparation."""
        if task.shard_id not in self.pending:
            self._submit(task)
        while self.queue and len(self.pending) <= max(self.workers, 1):
            self._submit(self.queue.pop(0))
        keys, job = self.pending.pop(task.shard_id)
        return keys, job.get() if job is not None else read_captions(task.payload[1], keys)

    def prepare(self, todo: list[ShardTask]) -> None:
        from curate.runner import resolve_device
        from curate.text import TextEncoder

        device = resolve_device(self.device)
        if self.workers is None:
            # On a CPU the encoder uses every core and cleaning is a small share of its time, so a
            # worker only competes with it (bench/encode_text.py); on a GPU cleaning in this
            # process would be a large share of what it does between batches.
            from curate.runner import local_world_size

            self.workers = 0 if device.type == "cpu" else max(1, min(4, available_cores() // local_world_size()))
        if self.workers > 0:
            # spawn, not fork: this process holds polars' and torch's threads.
            self.pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_init_worker)
        self.queue = list(todo)
        for _ in range(min(len(self.queue), self.workers + 1)):
            self._submit(self.queue.pop(0))
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        self.encoder = TextEncoder.load(self.encoder_name, device=device, max_tokens=self.max_tokens,
                                        revision=self.revision)

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def encode(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Each caption's valid-token embeddings ``[n, dim]`` (bench/encode_text.py times this alone)."""
        return self.encoder.encode_ids(ids)

    def process(self, task: ShardTask, writer: ShardWriter, progress: Callable[[int], None]) -> None:
        import torch

        keys, captions = self._captions(task)
        items = [(i, v, text) for i, per_key in enumerate(captions) for v, text in per_key.items()]
        ids, truncated = self.encoder.tokenize_ids([text for _, _, text in items])
        # Longest first, so that each batch pads to little more than its own captions.
        order = sorted(range(len(items)), key=lambda j: -len(ids[j]))
        dtype = getattr(torch, self.dtype)
        rows: list[dict[str, torch.Tensor]] = [{} for _ in keys]
        done_per_key = [len(c) for c in captions]
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            embeddings = self.encode([ids[j] for j in batch])
            # One copy to the host per batch (on a GPU each copy waits for the encoder).
            host = torch.cat(embeddings).to("cpu", dtype).split([len(e) for e in embeddings])
            for j, emb in zip(batch, host, strict=True):
                i, variant, _ = items[j]
                rows[i][variant] = emb
                done_per_key[i] -= 1
                if done_per_key[i] == 0:
                    progress(1)
        progress(sum(1 for c in captions if not c))
        tokens: list[dict[str, int]] = [{} for _ in keys]
        cut = [False for _ in keys]
        for j, (i, variant, _) in enumerate(items):
            tokens[i][variant] = len(ids[j])
            cut[i] |= truncated[j]
        serializer = ThreadPoolExecutor(1)
        futures: list[Future] = [serializer.submit(_serialize, r) for r in rows]

        def write() -> None:
            """The shard's samples in the latent shard's order; deferred to the background commit."""
            try:
                for key, future, n, was_cut in zip(keys, futures, tokens, cut, strict=True):
                    flags = ["truncated"] if was_cut else []
                    if not n:
                        flags.append("no_caption")
                    writer.add(key, {"text.safetensors": future.result()},
                               row={f"tokens_{v}": t for v, t in n.items()}, flags=flags)
            finally:
                serializer.shutdown()

        writer.defer(write)

    def finalize(self, out_dir: Path | str, tasks: list[ShardTask]) -> dict[str, Any]:
        written = self.write_manifests(out_dir)
        return {"manifests": [str(p) for p in written]}

    # -- manifests ---------------------------------------------------------------------------------------

    def text_spec(self, out_dir: Path | str, manifest_dir: Path | str, latent: Manifest, latent_path: Path | str) -> TextSpec:
        """The text section of the manifest that extends ``latent`` (read from ``latent_path``, a
        file or a URL): its shards' text shards."""
        encoder_id, revision, dim = self._identity()
        by_tar = {storage.resolved(s.tar_path): s for s in committed_shards(self.latents_dir)}
        text = {s.shard_id: s for s in committed_shards(out_dir)}
        entries = []
        for i, (entry, url) in enumerate(zip(latent.shards, shard_urls(latent, latent_path), strict=True)):
            shard = by_tar.get(storage.resolved(url))
            if shard is None or (entry.sha256 is not None and shard.meta.tar_sha256 != entry.sha256):
                raise CurateError(f"{latent.name}: shard {i} ({entry.path}) is not a current shard of "
                                  f"{self.latents_dir}: the manifest and the latents differ; rerun "
                                  "encode-latents to rewrite its manifests, or name the right ones with --manifests")
            t = text[shard.shard_id]
            # Every accepted sample of the latent shard, also those a subset of it leaves out.
            if t.meta.counts["ok"] != entry.accepted:
                raise CurateError(f"{t.tar_path}: {t.meta.counts['ok']} samples, but the manifest's shard "
                                  f"{i} holds {entry.accepted}")
            entries.append(ShardEntry(path=shard_path_for(t.tar_path, manifest_dir),
                                      samples=entry.accepted, sha256=t.meta.tar_sha256))
        return TextSpec(encoder=self.encoder_name, encoder_id=encoder_id, revision=revision, dim=dim,
                        max_tokens=self.max_tokens, dtype=self.dtype, variants=self.variants, shards=entries)

    def _identity(self) -> tuple[str, str | None, int]:
        """(id, revision, dim) of the encoder; a worker that finds every shard committed has not
        loaded it, and reads them from its config rather than loading gigabytes of weights."""
        from curate.text import TextEncoder

        if self.encoder is None:
            described = TextEncoder.describe(self.encoder_name, self.revision)
            if described is not None:
                return described
            self.encoder = TextEncoder.load(self.encoder_name, device="cpu", max_tokens=self.max_tokens,
                                            revision=self.revision)
        return self.encoder.id, self.encoder.revision, self.encoder.dim

    def target_dir(self, manifest: Path | str) -> Path | str:
        """Where the manifest extending ``manifest`` goes: --manifest-dir, else beside it (a folder or a URL)."""
        if self.manifest_dir is not None:
            return self.manifest_dir
        return storage.parent(manifest) if storage.is_remote(manifest) else Path(manifest).parent

    def write_manifests(self, out_dir: Path | str) -> list[Path | str]:
        written = []
        for path in self.input_manifests:
            try:
                latent = load_manifest(path)
            except ManifestError as e:
                raise CurateError(str(e)) from e
            target_dir = self.target_dir(path)
            text = self.text_spec(out_dir, target_dir, latent, path)
            shards = rebase_entries(latent.shards, storage.parent(path), target_dir)
            name = f"{latent.name}-{self.manifest_name}"
            provenance = {**latent.provenance, "text": {"path": storage.resolved(out_dir), "encoder": text.encoder_id,
                                                        "revision": text.revision,
                                                        "stage_config": self.config()}}
            manifest = latent.model_copy(update={"name": name, "shards": shards, "text": text,
                                                 "provenance": provenance})
            written.append(write_manifest(Manifest.model_validate(manifest.model_dump()),
                                          storage.join(target_dir, f"{name}.json")))
        log.info("encode-text: wrote %s", ", ".join(str(p) for p in written))
        return written

