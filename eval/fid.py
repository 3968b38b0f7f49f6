"""``evaluate fid RUN``: FID of a run's checkpoint against the real images of its training data.

    checkpoint -> n prompts of the evaluation set (eval.evalset) -> Euler sampling with guidance
    (train.sample, the run's sampler) -> the manifest's VAE -> Inception features  }  Fréchet
    the same n samples' original images, centre-cropped -> Inception features      }  distance

Everything that changes the number is part of the evaluation's tag and recorded in its result:
checkpoint step, sample count, seed, sampler steps, guidance, shift, caption choice, resolution,
the chosen keys and prompts, and the Inception file's digest. Results are
``RUN/eval/fid-stepNNNNNNNN-TAG.json``; a second call with the same settings returns the stored
result (``force`` recomputes).

Generation is cut into chunks of ``CHUNK`` images; each chunk's features are saved
(``RUN/eval/fid-stepNNNNNNNN-TAG/NNNNN.npy``, written atomically) as soon as it is done, so a
killed evaluation resumes where it stopped and gives the same result as one clean run. Under
torchrun or Slurm each worker takes every ``world_size``-th chunk; the worker that finds every
chunk done computes the reference statistics (cached in ``RUN/eval/reference-TAG.npz``) and
the result. The features stay: they are the evaluation's record (8 KiB per image).

FID from fewer than 2048 images is biased upwards and comparable only between evaluations with
the same ``samples``: the result says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from curate.manifest import LatentSpec, file_sha256, load_manifest
from curate.runner import CurateError, package_versions, resolve_device, resolve_share
from curate.shards import stable_hash
from eval.evalset import EvalSample, choose_samples, images_dir_of, real_images
from eval.inception import FEATURES, InceptionFeatures
from eval.stats import FeatureStats, frechet_distance, load_stats
from train.checkpoint import CheckpointError, checkpoint_path, latest_checkpoint, load_checkpoint

__all__ = ["CHUNK", "evaluate_fid", "result_files"]

CHUNK = 256  # images per saved feature file: what a killed evaluation can lose
RESULT_GLOB = "fid-step*.json"
FEW_SAMPLES = 2048  # below the feature dimension the covariance is singular and FID biased


def result_files(run: str | os.PathLike[str]) -> list[Path]:
    """The FID results stored in a run folder, by step then tag."""
    return sorted((Path(run) / "eval").glob(RESULT_GLOB))


def evaluate_fid(
    run: str | os.PathLike[str],
    *,
    step: int | None = None,
    manifest: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    samples: int = 10_000,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    variant: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
    inception: str | os.PathLike[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """FID of ``run``'s checkpoint at ``step`` (default: the latest); see the module note.

    ``manifest`` defaults to the one the run trained on, ``images`` to the image stage its
    provenance names; ``steps`` and ``guidance`` default to the run's ``sample`` settings.
    Returns the result, or None when other workers still have chunks to generate.
    """
    run = Path(run)
    share = resolve_share(rank, world_size)
    path = latest_checkpoint(run) if step is None else checkpoint_path(run, step)
    if path is None or not path.is_file():
        raise CheckpointError(f"{run} has {'no checkpoint' if step is None else f'no checkpoint of step {step}'}")
    state = load_checkpoint(path)
    try:
        cfg, step = state["config"], int(state["step"])
        spec = LatentSpec.model_validate(state["latent_spec"])
        steps = int(steps if steps is not None else cfg["sample"]["steps"])
        guidance = float(guidance if guidance is not None else cfg["sample"]["guidance"])
        shift = float(cfg["flow"]["shift"])
        manifest_path = Path(manifest if manifest is not None else cfg["shards"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} lacks what evaluation needs: {e!r}") from None
    if batch_size < 1 or steps < 1:
        raise CurateError(f"batch size and sampler steps must be at least 1 (got {batch_size}, {steps})")
    data = load_manifest(manifest_path, check_files=True)
    device = str(resolve_device(device))
    net = InceptionFeatures(inception, device=device)
    evalset = choose_samples(data, manifest_path, samples, seed=seed, variant=variant)
    settings = {
        "step": step, "samples": len(evalset), "seed": seed, "steps": steps, "guidance": guidance,
        "shift": shift, "captions": {variant: 1.0} if variant else dict(data.captions),
        "resolution": spec.resolution, "inception_sha1": net.sha1,
        "keys": stable_hash([s.key for s in evalset]), "prompts": stable_hash([s.caption for s in evalset]),
    }
    tag = stable_hash(settings)[:12]
    name = f"fid-step{step:08d}-{tag}"
    result_path = run / "eval" / f"{name}.json"
    if result_path.is_file() and not force:
        return json.loads(result_path.read_text())

    work = run / "eval" / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    chunks = math.ceil(len(evalset) / CHUNK)
    chunk_file = [work / f"{c:05d}.npy" for c in range(chunks)]
    mine = [c for c in range(share.rank, chunks, share.world_size) if force or not chunk_file[c].is_file()]
    started = time.perf_counter()
    if mine:
        generator = _Generator(state, spec, device, steps=steps, guidance=guidance, shift=shift,
                               seed=seed, batch_size=batch_size)
        del state  # the optimizer's moments are not needed
        bar = tqdm(total=len(mine) * CHUNK, unit="img", desc=f"generating ({name})", disable=not progress)
        for c in mine:
            part = evalset[c * CHUNK : (c + 1) * CHUNK]
            features = np.concatenate([net(images).numpy() for images in generator.images(part)])
            _save_npy(chunk_file[c], features.astype(np.float32))
            bar.update(len(part))
        bar.close()
    if not all(f.is_file() for f in chunk_file):
        return None  # another worker's chunks are not done; the last worker to finish writes the result

    generated = FeatureStats(FEATURES)
    for f in chunk_file:
        generated.add(np.load(f, allow_pickle=False))
    ref_mean, ref_cov, ref_path = _reference(run, data, images, evalset, spec.resolution, net, settings,
                                             batch_size=max(batch_size, 32), progress=progress)
    value = frechet_distance(generated.mean, generated.cov, ref_mean, ref_cov)
    empty = sum(1 for s in evalset if not s.caption)
    result = {
        "metric": "fid", "value": value, "step": step, "run": str(run.absolute()), "tag": tag,
        "checkpoint": str(path.absolute()), "settings": settings,
        "manifest": {"path": str(manifest_path.absolute()), "name": data.name,
                     "sha256": file_sha256(manifest_path)},
        "reference": str(ref_path.absolute()), "features": str(work.absolute()),
        "inception": str(net.path), "empty_prompts": empty,
        "note": (f"FID from {len(evalset)} images (fewer than {FEW_SAMPLES}) is biased upwards: compare "
                 "it only with evaluations of the same sample count") if len(evalset) < FEW_SAMPLES else None,
        "seconds_this_worker": round(time.perf_counter() - started, 1), "finished": time.time(),
        "versions": package_versions(("kiln", "torch", "diffusers", "transformers")),
    }
    _write_json(result_path, result)
    return result


class _Generator:
    """The checkpoint's denoiser, its text encoder and the manifest's VAE, turning evaluation
    samples into uint8 images [B, 3, H, W] exactly as ``train generate`` would (noise seed + i)."""

    def __init__(self, state: dict[str, Any], spec: LatentSpec, device: str, *, steps: int, guidance: float,
                 shift: float, seed: int, batch_size: int):
        from diffusers import PRXTransformer2DModel

        from curate.vae import load_vae_for_spec
        from train.text import TextEncoder

        try:
            self.transformer = PRXTransformer2DModel(**state["denoiser"])
            self.transformer.load_state_dict(state["model"])
            text = state["text_encoder"]
        except (KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's denoiser cannot be rebuilt: {e}") from None
        self.transformer.to(device).eval().requires_grad_(False)
        self.text = TextEncoder.load(text.get("id") or text["name"], device=device,
                                     revision=text.get("revision"), max_tokens=int(text["max_tokens"]))
        self.vae = load_vae_for_spec(spec, device=device)
        self.spec, self.steps, self.guidance, self.shift = spec, steps, guidance, shift
        self.seed, self.batch_size = seed, batch_size

    def images(self, part: list[EvalSample]):
        from curate.vae import decode_to_images
        from train.sample import initial_noise, sample_latents

        size = self.spec.resolution
        for start in range(0, len(part), self.batch_size):
            batch = part[start : start + self.batch_size]
            noise = torch.cat([initial_noise(self.spec, 1, size, size, self.seed + s.index) for s in batch])
            latents = sample_latents(self.transformer, self.text, [s.caption for s in batch], spec=self.spec,
                                     height=size, width=size, steps=self.steps, guidance=self.guidance,
                                     shift=self.shift, noise=noise)
            with torch.no_grad():
                pixels = decode_to_images(latents, self.spec, self.vae)
            yield pixels.mul(255).round().clamp(0, 255).to(torch.uint8)


def _reference(run: Path, data, images, evalset: list[EvalSample], resolution: int, net: InceptionFeatures,
               settings: dict[str, Any], *, batch_size: int, progress: bool) -> tuple[np.ndarray, np.ndarray, Path]:
    """The real images' feature mean and covariance, cached per (keys, resolution, network)."""
    tag = stable_hash({k: settings[k] for k in ("keys", "resolution", "inception_sha1")})[:12]
    path = run / "eval" / f"reference-{tag}.npz"
    if path.is_file():
        mean, cov, _, _ = load_stats(path)
        return mean, cov, path
    stats = FeatureStats(FEATURES)
    folder = images_dir_of(data, images)
    with tqdm(total=len(evalset), unit="img", desc="real images", disable=not progress) as bar:
        for batch in real_images(evalset, folder, resolution, batch_size=batch_size):
            stats.add(net(batch).numpy())
            bar.update(len(batch))
    stats.save(path, {"images": str(folder.absolute()), "samples": stats.n, "resolution": resolution,
                      "keys": settings["keys"], "inception_sha1": settings["inception_sha1"]})
    return stats.mean, stats.cov, path


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
