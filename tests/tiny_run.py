"""A real tiny pipeline in seconds: images -> ingest -> tiny Flux latents -> tiny training runs.

What `evaluate` needs to be tested and benchmarked end to end: an image stage, latent shards
whose manifest names it, and run folders with checkpoints, all made by the real stages.
"""

from __future__ import annotations

from pathlib import Path

from conftest import encode, noise_image

from curate.encode_latents import EncodeLatentsStage
from curate.ingest import IngestStage
from curate.runner import run_stage
from curate.sources import open_source
from curate.tiny import build_tiny_flux_vae, build_tiny_t5gemma
from train.cli import main as train_main


def make_tiny_runs(
    root: Path, *, images: int, sizes: list[tuple[int, int]], resolution: int, runs: dict[str, dict[str, str]],
    shard_size: int = 16, seed: int = 200, buckets: bool = False, vae: Path | None = None,
) -> dict[str, Path]:
    """``images`` noise JPEGs (sizes cycling through ``sizes``, original captions in three
    colours), ingested; encoded at ``resolution`` by a tiny Flux VAE with their original captions
    (manifest ``orig.json``; aspect-ratio buckets with ``buckets``); then one tiny-preset run per entry of ``runs`` (name -> config
    overrides). Image i is noise of seed ``seed + i``. ``vae``: an existing tiny VAE folder to encode
    with (another pipeline's, so that their manifests merge). Returns the paths: ``images``, ``manifest``
    and one per run."""
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(images):
        (src / f"img_{i}.jpg").write_bytes(encode(noise_image(seed + i, sizes[i % len(sizes)]), "JPEG", quality=90))
        (src / f"img_{i}.txt").write_text(f"{['a red', 'a green', 'a blue'][i % 3]} pattern number {i}")
    image_stage = root / "images"
    run_stage(IngestStage(open_source(str(src)), image_stage, shard_size=shard_size), image_stage, progress=False)
    vae, text = vae or build_tiny_flux_vae(root / "vae"), build_tiny_t5gemma(root / "t5gemma")
    latents, manifests = root / "latents", root / "manifests"
    run_stage(EncodeLatentsStage(image_stage, None, latents, str(vae), resolution=resolution, batch_size=8,
                                 buckets=buckets, decode_workers=0, allow_missing_captions=True, manifest_dir=manifests,
                                 device="cpu"), latents, progress=False)
    made = {"images": image_stage, "manifest": manifests / "orig.json"}
    for name, overrides in runs.items():
        made[name] = root / "runs" / name
        settings = {"text_encoder": str(text), "sample_every": "0", "data.workers": "0", "log.every": "1",
                    "log.tensorboard": "false", **overrides}
        code = train_main(["--shards", str(made["manifest"]), "--out", str(made[name]), "--preset", "tiny",
                           *[f"{k}={v}" for k, v in settings.items()]])
        if code != 0:
            raise RuntimeError(f"training the tiny run {name!r} failed with status {code}")
    return made
