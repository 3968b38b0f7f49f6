"""``evaluate run RUN``: FID, CMMD and DINO-MMD of a run's checkpoint against its training images,
and its CLIP score and VQAScore; ``evaluate pipeline PIPE``: the same of a PRXPipeline (an export,
Photoroom's releases), its parts run through the same sampler.

    checkpoint -> n prompts of the evaluation set (eval.evalset) -> Euler sampling with guidance
    (train.sample, the run's sampler) -> the manifest's VAE -> features of each metric's network
    the same n samples' original images, centre-cropped        -> the same networks' features
    fid: Fréchet distance of Inception features; kid: their unbiased polynomial-kernel MMD;
    cmmd, dino-mmd: MMD of CLIP / DINOv2 embeddings; fd-dinov2: Fréchet distance of DINOv2 features
    clip-score: 100 x CLIP's image-prompt cosine, floored at 0, averaged (also of the real images)
    vqa-score: a VLM's probability of "Yes" to "Does this figure show PROMPT?", averaged (also of the real images)

FID, CMMD and DINO-MMD are the three metrics of the PRX ablations (the default); the CLIP score
and VQAScore measure how well the images follow their prompts (VQAScore reads the whole prompt,
CLIP its first 77 tokens). The images are generated once for all of them.
Everything that changes the generated images is part of the evaluation's tag: checkpoint step,
sample count, seed, sampler steps, guidance, shift, caption choice, resolution, the chosen keys
and prompts, and the weights when they are the run's EMA. The result, ``RUN/eval/stepNNNNNNNN-TAG.json``, holds one entry per metric with the
identity of its network (file digest, or model id, revision and folder fingerprint), and
``RUN/eval/stepNNNNNNNN-TAG.png`` shows the first generated images above their real ones; a second
call returns what is stored and computes only metrics (or networks) it lacks; ``force``
generates the images again.

Generation is cut into chunks of ``CHUNK`` images; each chunk's features are saved per network
(``RUN/eval/stepNNNNNNNN-TAG/NNNNN.NETWORK.npy``, written atomically) as soon as they exist, so a
killed evaluation resumes where it stopped and gives the same result as one clean run. Under
torchrun or Slurm each worker takes every ``world_size``-th chunk; the worker that finds every
chunk done computes the real images' features (cached per network in
``RUN/eval/reference-TAG.NETWORK.npy``) and the result. The features stay: they are the
evaluation's record (8 KiB per image for Inception, 3 KiB for CLIP-L, 4 KiB for DINOv2-L).

FID from fewer than 2048 images is biased upwards and comparable only between evaluations with
the same sample count: the result says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from curate import storage
from curate.manifest import LatentSpec, ManifestError, file_sha256, load_manifest
from curate.runner import CurateError, package_versions, resolve_device, resolve_share
from curate.shards import stable_hash
from curate.text import DEFAULT_MAX_TOKENS
from eval.evalset import (
    EvalSample,
    choose_samples,
    images_dir_of,
    prompt_samples,
    real_batches,
    real_images,
)
from eval.stats import fid_from_features, kid, mmd
from train.checkpoint import (
    CheckpointError,
    drop_evaluations,
    evaluation_prefix,
    find_checkpoint,
    load_checkpoint,
)
from train.config import EVERY_STEP, check_guidance_interval
from train.ema import checkpoint_weights
from train.export import EXPORT_INFO, LATENTS_INFO, exported_vae
from train.remote_run import RemoteRun

__all__ = ["CHUNK", "DEFAULT_METRICS", "METRICS", "PROMPT_METRICS", "evaluate_pipeline", "evaluate_run",
           "result_files"]

CHUNK = 256  # images per saved feature file: what a killed evaluation can lose
PREVIEW = 8  # generated images shown above their real counterparts in RUN/eval/stepN-TAG.png
METRICS = {"fid": "inception", "kid": "inception", "cmmd": "clip", "dino-mmd": "dino",
           "fd-dinov2": "dino-features", "clip-score": "clip-text", "vqa-score": "vqa"}  # metric -> network
DEFAULT_METRICS = ("fid", "cmmd", "dino-mmd")
PROMPT_METRICS = ("clip-score", "vqa-score")  # the metrics of generated images and their prompts alone
FEW_SAMPLES = 2048  # below the Inception feature dimension the covariance is singular and FID biased
RESULT_GLOB = "step*-*.json"


def result_files(run: str | os.PathLike[str]) -> list[Path]:
    """The evaluation results stored in a run folder, by step then tag."""
    return sorted((Path(run) / "eval").glob(RESULT_GLOB))


def load_networks(metrics: list[str], device: str, *, inception: str | os.PathLike[str] | None = None,
                  clip: str | None = None, dino: str | None = None, clip_score: str | None = None,
                  vqa: str | None = None) -> dict[str, Any]:
    """The networks ``metrics`` need, by kind (``inception``, ``clip``, ``dino``, ``dino-features``,
    ``clip-text``, ``vqa``)."""
    from curate.vqa import VqaScorer
    from eval.embedders import CaptionScorer, ImageEmbedder
    from eval.inception import InceptionFeatures

    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise CurateError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(METRICS)}")
    kinds = {METRICS[m] for m in metrics}
    networks: dict[str, Any] = {}
    if "inception" in kinds:
        networks["inception"] = InceptionFeatures(inception, device=device)
    if "clip" in kinds:
        networks["clip"] = ImageEmbedder("clip", clip or "clip", device=device)
    if "dino" in kinds:
        networks["dino"] = ImageEmbedder("dino", dino or "dinov2", device=device)
    if "dino-features" in kinds:  # FD-DINOv2 takes the class token as it is, not normalised
        networks["dino-features"] = ImageEmbedder("dino", dino or "dinov2", device=device, normalized=False)
    if "clip-text" in kinds:
        networks["clip-text"] = CaptionScorer(clip_score or "clip-score", device=device)
    if "vqa" in kinds:
        networks["vqa"] = VqaScorer(vqa or "qwen2.5-vl", device=device)  # curate/vqa.py
    return networks


def evaluate_run(
    run: str | os.PathLike[str],
    *,
    metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS,
    step: int | None = None,
    manifest: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    samples: int = 10_000,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    variant: str | None = None,
    weights: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    inception: str | os.PathLike[str] | None = None,
    clip: str | None = None,
    dino: str | None = None,
    clip_score: str | None = None,
    vqa: str | None = None,
    prompts: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """``metrics`` of ``run``'s checkpoint at ``step`` (default: the latest); see the module note.

    ``manifest`` defaults to the one the run trained on, ``images`` to the image stage its
    provenance names; ``steps``, ``guidance`` and ``guidance_interval`` (the times t where guidance
    applies) default to the run's ``sample`` settings;
    ``inception``, ``clip``, ``dino``, ``clip_score`` and ``vqa`` choose the networks (file; alias, Hub
    id or folder);
    ``weights`` "ema" or "raw" (default: the EMA weights when the run kept them).
    ``prompts``: a prompt file (a benchmark's: one a line, or a JSON list) instead of the manifest's
    samples; then only the metrics that need no real images (PROMPT_METRICS) can be measured.
    Returns the result, or None when other workers still have chunks to generate.
    """
    share = resolve_share(rank, world_size)
    if guidance_interval is not None:  # the user's, named as theirs (the run's is checked below)
        check_guidance_interval(guidance_interval, "--guidance-interval")
    # A run at a URL (train --out s3://...) is evaluated in a local copy: its checkpoint and stored
    # evaluations fetched, the workers' chunks pooled at the URL, the new results uploaded.
    remote = RemoteRun(os.fspath(run), reader=True) if storage.is_remote(run) else None
    folder = remote.local if remote is not None else Path(storage.local_path(run))
    path = remote.fetch(step) if remote is not None else find_checkpoint(folder, step)
    if path is None:
        raise CheckpointError(f"{run} has {'no checkpoint' if step is None else f'no checkpoint of step {step}'}")
    state = load_checkpoint(path, mmap=True)  # the config, and the model only if images are generated
    try:
        cfg, step = state["config"], int(state["step"])
        spec = LatentSpec.model_validate(state["latent_spec"])
        steps = int(steps if steps is not None else cfg["sample"]["steps"])
        guidance = float(guidance if guidance is not None else cfg["sample"]["guidance"])
        interval = check_guidance_interval(
            guidance_interval if guidance_interval is not None else cfg["sample"].get("guidance_interval", EVERY_STEP),
            "the guidance interval")
        shift = float(cfg["flow"]["shift"])
        prediction = (cfg["flow"].get("prediction", "velocity"), float(cfg["flow"].get("x0_t_min", 0.05)))
        trained_on = str(manifest if manifest is not None else cfg["shards"])
        manifest_path: Path | str = trained_on if storage.is_remote(trained_on) else Path(trained_on)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} lacks what evaluation needs: {e!r}") from None
    model_weights, weights = checkpoint_weights(state, weights)
    data = None
    if prompts is None:
        try:
            data = load_manifest(manifest_path, check_files=True)
        except ManifestError as e:
            if manifest is not None or isinstance(manifest_path, str) or manifest_path.is_absolute():
                raise
            raise ManifestError(f"{e} (the run trained on {manifest_path}, relative to where it was started: "
                                "run from there, or pass the manifest with --manifest)") from None
    sampler = _Sampler(steps=steps, guidance=guidance, interval=interval, shift=shift, prediction=prediction)
    if remote is not None:
        _forget_another_checkpoints(remote, step)
        remote.pull(folders=("eval",))
    result = _evaluate(
        folder, step=step, resolution=spec.resolution, sampler=sampler,
        make_generator=lambda device: _Generator.from_checkpoint(state, model_weights, spec, device, sampler=sampler,
                                                                 seed=seed, batch_size=batch_size),
        # only when EMA, so the tags of runs without EMA stay what they were
        extra_settings={"weights": "ema"} if weights == "ema" else {},
        record={"run": storage.absolute(run),
                "checkpoint": remote.checkpoint_url(step) if remote is not None else str(path.absolute())},
        metrics=metrics, data=data, manifest=manifest, manifest_path=manifest_path, images=images, prompts=prompts,
        samples=samples, seed=seed, variant=variant, batch_size=batch_size, device=device,
        networks=dict(inception=inception, clip=clip, dino=dino, clip_score=clip_score, vqa=vqa),
        share=share, force=force, progress=progress, remote=remote)
    if remote is not None:  # this step's: the copy may hold others' that the URL no longer has
        remote.upload("eval", pattern=f"{evaluation_prefix(step)}*")
    return result


def _forget_another_checkpoints(remote: RemoteRun, step: int) -> None:
    """Drop the reader copy's evaluations of ``step`` (results, features) when they measured another
    checkpoint than the URL holds now (the run was deleted and trained again under its name, or the
    step written again after a resume from an older checkpoint, which deleted the URL's evaluations
    of it): kept, they would be returned as this one's numbers and uploaded into the run. The
    checkpoint's size and ETag (or modification time) as fetched are kept beside them."""
    version = remote.copy_version(step)  # as fetched just now: the store is not asked again
    if version is None:
        return
    marker = remote.local / "eval" / f".step{step:08d}.checkpoint"
    if marker.is_file() and marker.read_text() != version:
        drop_evaluations(remote.local, step)
    storage.write_text(marker, version)


def evaluate_pipeline(
    pipeline: str,
    out: str | os.PathLike[str],
    *,
    revision: str | None = None,
    manifest: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | None = None,
    resolution: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    guidance_interval: tuple[float, float] | None = None,
    shift: float | None = None,
    metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS,
    images: str | os.PathLike[str] | None = None,
    samples: int = 10_000,
    seed: int = 0,
    variant: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    inception: str | os.PathLike[str] | None = None,
    clip: str | None = None,
    dino: str | None = None,
    clip_score: str | None = None,
    vqa: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """``metrics`` of a ``PRXPipeline``: a ``train export`` folder, any PRXPipeline folder, or a Hub
    id or alias (Photoroom's releases: ``prx-256``...; at ``revision``), sampled as a run's
    checkpoint is (its denoiser, text encoder and VAE through evaluate's sampler), so that a
    released model measures against a run on the same samples. The samples and real images are
    ``manifest``'s (or ``prompts``, a prompt file); the result goes to ``out/eval`` (``evaluate
    compare`` lists ``out`` beside runs). An export knows its latent spec, token length and shift;
    for another pipeline they come from its VAE, tokenizer and scheduler configs. ``resolution``
    defaults to the export's, else the pipeline's ``default_sample_size``; ``shift`` to its
    scheduler's; ``steps`` and ``guidance`` to PRXPipeline's own defaults (28, 4.0)."""
    if manifest is not None and prompts is not None:
        raise CurateError("give --manifest (the samples and real images to measure against) or --prompts (a prompt "
                          "file), not both")
    if manifest is None and prompts is None:
        raise CurateError("a pipeline has no training data of its own: give --manifest (the samples and real images "
                          "to measure against) or --prompts (a prompt file), one of them")
    root, identity = _pipeline_folder(pipeline, revision)
    info = read_json(root / EXPORT_INFO)
    try:
        if info is not None:  # a kiln export: the run's latent spec, text length and shift
            spec: LatentSpec | None = LatentSpec.model_validate(info["latent_spec"])
            native, max_tokens = spec.resolution, int(info["text_encoder"]["max_tokens"])
            step, pipe_shift = int(info.get("step") or 0), float(info["scheduler_shift"])
        else:
            spec, step = None, 0  # from the VAE, when the images are generated
            # PRXPipeline's own default (512) when its folder sets none.
            native = int((read_json(root / "model_index.json") or {}).get("default_sample_size") or 512)
            tokenizer = read_json(root / "tokenizer" / "tokenizer_config.json") or {}
            max_tokens = int(tokenizer.get("model_max_length") or 0)
            max_tokens = max_tokens if 0 < max_tokens <= 4096 else DEFAULT_MAX_TOKENS  # "no limit" is 1e30
            pipe_shift = float((read_json(root / "scheduler" / "scheduler_config.json") or {}).get("shift") or 1.0)
    except (KeyError, TypeError, ValueError) as e:
        raise CurateError(f"{pipeline}: its configs lack what evaluation needs: {e!r}") from None
    size = resolution or native
    _check_size(pipeline, root, spec, size)
    _check_out(pipeline, Path(out), identity)
    interval = check_guidance_interval(guidance_interval or EVERY_STEP, "the guidance interval")
    sampler = _Sampler(steps=int(steps), guidance=float(guidance), interval=interval,
                       shift=float(shift if shift is not None else pipe_shift), prediction=("velocity", 0.05))
    manifest_path = None if manifest is None else storage.as_location(manifest)
    data = None if manifest_path is None else load_manifest(manifest_path, check_files=True)

    def make_generator(device: str) -> _Generator:
        from diffusers import PRXTransformer2DModel

        from curate.text import TextEncoder
        from curate.vae import latent_spec_for, load_vae, model_channels

        if spec is not None:
            vae = exported_vae(root, spec, device)
            used = spec.model_copy(update={"resolution": size})
        else:
            vae = load_vae(str(root), subfolder="vae", device=device)
            used = latent_spec_for(vae, stored="mean", dtype="float32", resolution=size, buckets=[])
        transformer = PRXTransformer2DModel.from_pretrained(root, subfolder="transformer")
        if transformer.config.in_channels != model_channels(used):
            raise CurateError(f"{pipeline}: its transformer takes {transformer.config.in_channels} channels, its VAE's "
                              f"latents have {model_channels(used)} in model space")
        text = TextEncoder.load(str(root), device=device, max_tokens=max_tokens)
        if text.dim != transformer.config.context_in_dim:
            raise CurateError(f"{pipeline}: its transformer takes {transformer.config.context_in_dim}-d text, its text "
                              f"encoder gives {text.dim}-d embeddings")
        return _Generator(transformer, text, vae, used, device, sampler=sampler, seed=seed, batch_size=batch_size)

    return _evaluate(
        Path(out), step=step, resolution=size, sampler=sampler, make_generator=make_generator,
        extra_settings={"pipeline": identity}, record={"pipeline": identity},
        metrics=metrics, data=data, manifest=manifest, manifest_path=manifest_path, images=images, prompts=prompts,
        samples=samples, seed=seed, variant=variant, batch_size=batch_size, device=device,
        networks=dict(inception=inception, clip=clip, dino=dino, clip_score=clip_score, vqa=vqa),
        share=resolve_share(rank, world_size), force=force, progress=progress)


def _check_size(pipeline: str, root: Path, spec: LatentSpec | None, size: int) -> None:
    """An image side that is whole tokens (VAE downsampling x patch size), refused before any model
    loads: the sampler would otherwise fail deep inside the transformer."""
    from curate.vae import model_downsample

    try:
        patch = int((read_json(root / "transformer" / "config.json") or {}).get("patch_size") or 1)
        if spec is not None:
            down = model_downsample(spec)
        else:
            vae = read_json(root / "vae" / "config.json") or {}
            blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0]
            down = 2 ** (len(blocks) - 1)
    except (TypeError, ValueError) as e:
        raise CurateError(f"{pipeline}: its configs lack what evaluation needs: {e!r}") from None
    if size < 1 or size % (down * patch):
        raise CurateError(f"{pipeline}: images of {size} px are not whole tokens of {down * patch} px (VAE "
                          f"downsampling {down} x patch size {patch}): pass --resolution a multiple of {down * patch}")


def _check_out(pipeline: str, out: Path, identity: dict[str, Any]) -> None:
    """One pipeline per OUT folder: `evaluate compare` names the folder after the pipeline its
    evaluations measured (a folder re-exported in place stays the same pipeline)."""
    named = identity.get("id") or identity.get("path")
    for path in result_files(out):
        record = (read_json(path) or {}).get("pipeline") or {}
        other = record.get("id") or record.get("path")
        if other and other != named:
            raise CurateError(f"{out} holds evaluations of {other}: give {pipeline} an --out of its own")


def _pipeline_fingerprint(root: Path) -> str:
    """A hash of the pipeline's own files (model_index.json, the export's records and the component
    folders the index names: names, sizes, mtimes), not of whatever else its folder holds, such as
    an evaluation's --out inside it, whose every write would change the tag."""
    from curate.models import local_fingerprint

    index = read_json(root / "model_index.json") or {}
    parts = sorted(k for k, v in index.items() if isinstance(v, list) and (root / k).is_dir()) or ["transformer"]
    files = [f for f in ("model_index.json", EXPORT_INFO, LATENTS_INFO) if (root / f).is_file()]
    return stable_hash({**{part: local_fingerprint(str(root / part)) for part in parts},
                        **{f: [(root / f).stat().st_size, (root / f).stat().st_mtime_ns] for f in files}})[:16]


def _pipeline_folder(pipeline: str, revision: str | None) -> tuple[Path, dict[str, Any]]:
    """(the pipeline's folder, what names it: a folder's path and fingerprint, a Hub id's commit)."""
    from curate.models import resolve_model

    ref = resolve_model(pipeline, "denoiser", revision)
    if ref.local:
        root = Path(ref.id)
        identity = {"path": str(root), "fingerprint": _pipeline_fingerprint(root)}
    else:
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(ref.id, revision=revision))
        except Exception as e:  # offline, gated, no such repository or revision
            raise CurateError(f"{pipeline}: cannot fetch pipeline {ref.id} from the Hub: {e}") from None
        identity = {"id": ref.id, "revision": revision, "commit": root.name}  # snapshots/COMMIT
    if not (root / "transformer" / "config.json").is_file():
        raise CurateError(f"{pipeline}: not a PRXPipeline folder (no transformer/config.json)")
    return root, identity


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file (a stored result, a pipeline's config) read; None when it is absent, a clear error
    when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CurateError(f"{path}: not readable JSON: {e}") from None


@dataclass(frozen=True)
class _Sampler:
    """How the images are sampled: what changes them, besides the weights and the prompts."""

    steps: int
    guidance: float
    interval: tuple[float, float]
    shift: float
    prediction: tuple[str, float]  # ("velocity" or "x0", x0_t_min)


def _evaluate(
    folder: Path, *, step: int, resolution: int, sampler: _Sampler, make_generator: Callable[[str], _Generator],
    extra_settings: dict[str, Any], record: dict[str, Any], metrics: list[str] | tuple[str, ...], data: Any,
    manifest: Any, manifest_path: Path | str | None, images: Any, prompts: Any, samples: int, seed: int,
    variant: str | None, batch_size: int, device: str | None, networks: dict[str, Any], share: Any, force: bool,
    progress: bool, remote: RemoteRun | None = None,
) -> dict[str, Any] | None:
    """The evaluation of one model (a run's checkpoint or a pipeline), stored under ``folder/eval``;
    with ``remote`` (a run at a URL, ``folder`` its local copy) the workers, on machines that share
    no folder, pool their chunks at the URL: each uploads its own as it saves them and fetches the
    others' first (chunks done elsewhere are not generated again) and last."""
    metrics = list(dict.fromkeys(metrics))
    steps, guidance, interval, shift = sampler.steps, sampler.guidance, sampler.interval, sampler.shift
    if batch_size < 1 or steps < 1:
        raise CurateError(f"batch size and sampler steps must be at least 1 (got {batch_size}, {steps})")
    if prompts is not None:
        if manifest is not None or images is not None or variant is not None:
            raise CurateError("--prompts replaces the manifest's samples: give no --manifest, --images or --captions")
        unpaired = [m for m in metrics if m in METRICS and m not in PROMPT_METRICS]  # unknown ones: below
        if unpaired:
            raise CurateError(f"{', '.join(unpaired)} compare with real images, which a prompt file does not have: "
                              f"with --prompts choose from {', '.join(PROMPT_METRICS)}")
    device = str(resolve_device(device))
    evalset = (prompt_samples(prompts, samples) if data is None
               else choose_samples(data, manifest_path, samples, seed=seed, variant=variant))
    networks = load_networks(metrics, device, **networks)
    for metric, why in (("fid", "a covariance"), ("fd-dinov2", "a covariance"), ("kid", "an unbiased estimate")):
        if metric in metrics and len(evalset) < 2:
            raise CurateError(f"{metric.upper()} needs at least 2 images ({why}); the evaluation set has {len(evalset)}")
    settings = {
        "step": step, "samples": len(evalset), "seed": seed, "steps": steps, "guidance": guidance,
        "shift": shift, "resolution": resolution, "prompts": stable_hash([s.caption for s in evalset]),
    }
    if data is not None:  # the real images' samples and how their prompts were chosen
        settings |= {"captions": {variant: 1.0} if variant else dict(data.captions),
                     "keys": stable_hash([s.key for s in evalset])}
    else:
        settings["prompt_set"] = Path(prompts).name
    settings |= extra_settings
    if interval != EVERY_STEP:  # guidance at every step is not recorded: the tags from before intervals stay
        settings["guidance_interval"] = list(interval)
    tag = stable_hash(settings)[:12]
    name = f"{evaluation_prefix(step)}{tag}"
    result_path = folder / "eval" / f"{name}.json"
    stored = json.loads(result_path.read_text()) if result_path.is_file() else None
    wanted = [m for m in metrics if force or stored is None or m not in stored["metrics"]
              or stored["metrics"][m]["network"] != networks[METRICS[m]].identity]
    if not wanted:
        return stored
    needed = {METRICS[m]: networks[METRICS[m]] for m in wanted}

    work = folder / "eval" / name
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / "settings.json", settings)  # what the features in this folder were made with
    chunks = math.ceil(len(evalset) / CHUNK)

    def chunk_file(c: int, net: Any) -> Path:
        return work / f"{c:05d}.{net.key}.npy"

    def missing(c: int) -> list[Any]:
        return [net for net in needed.values() if force or not chunk_file(c, net).is_file()]

    def others_chunks() -> None:
        if remote is not None:
            remote.pull(folders=(f"eval/{name}",), pattern="*.npy", only_missing=True)

    others_chunks()
    mine = [c for c in range(share.rank, chunks, share.world_size) if missing(c)]
    started = time.perf_counter()
    if mine:
        generator = make_generator(device)
        todo = sum(len(evalset[c * CHUNK : (c + 1) * CHUNK]) for c in mine)
        bar = tqdm(total=todo, unit="img", desc=f"generating ({name})", disable=not progress)
        for c in mine:
            part = evalset[c * CHUNK : (c + 1) * CHUNK]
            nets = missing(c)
            features: dict[str, list[np.ndarray]] = {net.key: [] for net in nets}
            first: list[torch.Tensor] = []
            done = 0
            for batch in generator.images(part):
                batch_prompts = [s.caption for s in part[done : done + len(batch)]]
                done += len(batch)
                for net in nets:
                    features[net.key].append(_features(net, batch, batch_prompts).numpy())
                if c == 0 and len(first) < PREVIEW:
                    first.extend(batch[: PREVIEW - len(first)])
                bar.update(len(batch))
            if c == 0:  # before the features: a kill between the two would leave a done chunk and no preview
                _preview(folder / "eval" / f"{name}.png", first, evalset, data, images, resolution)
            for net in nets:
                _save_npy(chunk_file(c, net), np.concatenate(features[net.key]).astype(np.float32))
            if remote is not None:  # before any check of the others': of two last workers, one sees both
                remote.upload(f"eval/{name}")
        bar.close()
    others_chunks()
    if not all(chunk_file(c, net).is_file() for c in range(chunks) for net in needed.values()):
        return None  # another worker's chunks are not done; the last worker to finish writes the result

    reference = {} if data is None else _reference_features(
        folder, data, images, evalset, resolution, needed, settings, batch_size=max(batch_size, 32),
        progress=progress)
    result = stored if stored is not None else {"metrics": {}}
    for metric in wanted:
        net = needed[METRICS[metric]]
        generated = [np.load(chunk_file(c, net), allow_pickle=False) for c in range(chunks)]
        real, real_file = reference.get(net.key, (None, None))
        result["metrics"][metric] = {**_value(metric, generated, real), "network": net.identity,
                                     **({"reference": str(real_file.absolute())} if real_file else {})}
    empty = sum(1 for s in evalset if not s.caption)
    result |= {
        "step": step, **record, "tag": tag,
        "settings": settings,
        **({"manifest": {"path": storage.absolute(manifest_path), "name": data.name,
                         "sha256": file_sha256(manifest_path)}} if data is not None
           else {"prompt_set": {"path": str(Path(prompts).absolute()), "sha256": file_sha256(Path(prompts))}}),
        "features": str(work.absolute()), "preview": str((folder / "eval" / f"{name}.png").absolute()),
        "empty_prompts": empty,
        "note": (f"FID from {len(evalset)} images (fewer than {FEW_SAMPLES}) is biased upwards: compare "
                 "it only with evaluations of the same sample count (KID, --metrics kid, is unbiased)")
        if len(evalset) < FEW_SAMPLES and "fid" in result["metrics"] else None,
        "seconds_this_worker": round(time.perf_counter() - started, 1), "finished": time.time(),
        "versions": package_versions(("kiln", "torch", "diffusers", "transformers")),
    }
    _write_json(result_path, result)
    return result


def _features(net: Any, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A network's features of a batch: the CLIP score's and VQAScore's networks read each image's prompt too."""
    return net(images, prompts) if getattr(net, "needs_captions", False) else net(images)


def _clip_score(cosines: np.ndarray) -> float:
    return float(100 * np.clip(cosines, 0, None).mean())


def _value(metric: str, generated: list[np.ndarray], real: np.ndarray | None) -> dict[str, float]:
    """A metric's entry: its value, and what reads it (KID's spread over subsets, the real images' CLIP score
    and VQAScore; a prompt file has no real images)."""
    features = np.concatenate(generated)
    if metric in PROMPT_METRICS:  # the real images' score with the same prompts: the ceiling to read it against
        score = _clip_score if metric == "clip-score" else lambda x: float(x.mean())
        return {"value": score(features), **({"real": score(real)} if real is not None else {})}
    if metric in ("fid", "fd-dinov2"):
        return {"value": fid_from_features(features, real)}
    if metric == "kid":
        mean, std = kid(features, real)
        return {"value": mean, "std": std}
    return {"value": mmd(features, real)}


class _Generator:
    """A denoiser, its text encoder and a VAE, turning evaluation samples into uint8 images
    [B, 3, H, W] exactly as ``train generate`` would (noise seed + i)."""

    def __init__(self, transformer: torch.nn.Module, text: Any, vae: Any, spec: LatentSpec, device: str, *,
                 sampler: _Sampler, seed: int, batch_size: int):
        self.transformer = transformer.to(device).eval().requires_grad_(False)
        self.text, self.vae, self.spec, self.sampler = text, vae, spec, sampler
        self.seed, self.batch_size = seed, batch_size

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], model_weights: dict[str, torch.Tensor], spec: LatentSpec,
                        device: str, *, sampler: _Sampler, seed: int, batch_size: int) -> _Generator:
        """The checkpoint's denoiser and text encoder, and the manifest's VAE."""
        from diffusers import PRXTransformer2DModel

        from curate.text import TextEncoder
        from curate.vae import load_vae_for_spec

        try:
            transformer = PRXTransformer2DModel(**state["denoiser"])
            transformer.load_state_dict(model_weights)
            text = state["text_encoder"]
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's denoiser cannot be rebuilt: {e}") from None
        encoder = TextEncoder.load(text.get("id") or text["name"], device=device, revision=text.get("revision"),
                                   max_tokens=int(text["max_tokens"]))
        return cls(transformer, encoder, load_vae_for_spec(spec, device=device), spec, device, sampler=sampler,
                   seed=seed, batch_size=batch_size)

    def images(self, part: list[EvalSample]):
        from curate.vae import decode_to_images
        from train.sample import initial_noise, sample_latents

        size, sampler = self.spec.resolution, self.sampler
        for start in range(0, len(part), self.batch_size):
            batch = part[start : start + self.batch_size]
            noise = torch.cat([initial_noise(self.spec, 1, size, size, self.seed + s.index) for s in batch])
            latents = sample_latents(self.transformer, self.text, [s.caption for s in batch], spec=self.spec,
                                     height=size, width=size, steps=sampler.steps, guidance=sampler.guidance,
                                     guidance_interval=sampler.interval, shift=sampler.shift,
                                     prediction=sampler.prediction[0], x0_t_min=sampler.prediction[1], noise=noise)
            with torch.no_grad():  # 8 images per VAE call, as sample grids: 16 at 1024 px would not fit
                pixels = torch.cat([decode_to_images(c, self.spec, self.vae) for c in latents.split(8)])
            yield pixels.mul(255).round().clamp(0, 255).to(torch.uint8)


def _preview(path: Path, generated: list[torch.Tensor], evalset: list[EvalSample], data, images,
             resolution: int) -> None:
    """The first generated images in a row, the same samples' real images in the row below (a prompt
    file has none)."""
    from train.sample import make_grid, save_png

    real = []
    if data is not None:
        folder = images_dir_of(data, images)
        real = [next(real_images([s], folder, resolution, batch_size=1))[0] for s in evalset[: len(generated)]]
    # The generated images are where the VAE decoded them (a GPU), the real ones on the CPU.
    grid = make_grid(torch.stack([image.cpu() for image in generated + real]).float() / 255, columns=len(generated))
    save_png(grid, path)


def _reference_features(run: Path, data, images, evalset: list[EvalSample], resolution: int,
                        networks: dict[str, Any], settings: dict[str, Any], *, batch_size: int,
                        progress: bool) -> dict[str, tuple[np.ndarray, Path]]:
    """The real images' features per network (key -> (features, file)), cached per (keys,
    resolution, network; and prompts for the CLIP score's and VQAScore's); one pass over the images computes every
    network's that is missing."""
    def tag(net: Any) -> str:
        wanted = ("keys", "resolution", "prompts") if getattr(net, "needs_captions", False) else ("keys", "resolution")
        return stable_hash({k: settings[k] for k in wanted})[:12]

    files = {net.key: run / "eval" / f"reference-{tag(net)}.{net.key}.npy" for net in networks.values()}
    todo = [net for net in networks.values() if not files[net.key].is_file()]
    if todo:
        features: dict[str, list[np.ndarray]] = {net.key: [] for net in todo}
        folder = images_dir_of(data, images)
        with tqdm(total=len(evalset), unit="img", desc="real images", disable=not progress) as bar:
            for chosen, batch in real_batches(evalset, folder, resolution, batch_size=batch_size):
                for net in todo:
                    features[net.key].append(_features(net, batch, [s.caption for s in chosen]).numpy())
                bar.update(len(batch))
        for net in todo:
            _save_npy(files[net.key], np.concatenate(features[net.key]).astype(np.float32))
    return {key: (np.load(path, allow_pickle=False), path) for key, path in files.items()}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with storage.replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    storage.write_text(path, json.dumps(data, indent=1) + "\n")
