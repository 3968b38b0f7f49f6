"""One registry of model aliases: short names users type, mapped to Hub ids.

Any Hub id (``org/name``) or local folder works too; an alias is only a convenience. The
registry records what each alias is, so that logs and outputs name the real model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.runner import CurateError


@dataclass(frozen=True)
class ModelRef:
    name: str  # what the user typed
    id: str  # Hub id or absolute local folder
    local: bool  # a folder on disk (no download, no revision)


VLMS = {
    "qwen2-vl": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3-vl": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
}


@dataclass(frozen=True)
class VaeEntry:
    """A VAE alias: where its weights live and which diffusers class loads them."""

    id: str  # Hub id
    subfolder: str | None  # "vae" inside a pipeline repository, None for a VAE-only repository
    cls: str  # diffusers class name


# FLUX.1-schnell and FLUX.2-klein-4B are not gated; every FLUX.2 model ships the same VAE.
VAES = {
    "flux": VaeEntry(id="black-forest-labs/FLUX.1-schnell", subfolder="vae", cls="AutoencoderKL"),
    "flux2": VaeEntry(
        id="black-forest-labs/FLUX.2-klein-4B", subfolder="vae", cls="AutoencoderKLFlux2"
    ),
    "repa-e-flux": VaeEntry(id="REPA-E/e2e-flux-vae", subfolder=None, cls="AutoencoderKL"),
    # PRX's other latent space: DC-AE (Chen et al. 2025), 32 channels at 1/32, deterministic; the
    # checkpoint diffusers' PRX conversion saves beside the DC-AE releases' transformers.
    "dc-ae": VaeEntry(id="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", subfolder=None, cls="AutoencoderDC"),
}

# No VAE: the images themselves, pixel values at full resolution (curate.vae.PixelSpace).
PIXELS = "pixels"

# Text encoders for the denoiser: PRX conditions on the encoder half of T5Gemma 2B-2B (UL2), loaded
# without its decoder (curate/text.py); any T5Gemma checkpoint or PRX pipeline folder works too.
TEXT_ENCODERS = {
    "t5gemma": "google/t5gemma-2b-2b-ul2",
}

# Image encoders of the evaluation metrics: CMMD's CLIP (as its paper and reference code use it)
# and DINOv2 for DINO-MMD (ViT-L/14, the backbone of the FD-DINOv2 literature); and REPA's
# teachers: DINOv3 (PRX's; gated on the Hub: accept its license there first), DINOv2 (REPA's).
IMAGE_ENCODERS = {
    "clip": "openai/clip-vit-large-patch14-336",
    "clip-l-336": "openai/clip-vit-large-patch14-336",
    # curate score: CLIP ViT-L/14 at 224 px, both towers: DataComp's CLIP score, and the image
    # embedding LAION's aesthetic predictor was trained on.
    "clip-score": "openai/clip-vit-large-patch14",
    "dinov2": "facebook/dinov2-large",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-base-reg": "facebook/dinov2-with-registers-base",  # P-DINO's (PRX's perceptual loss)
    "dinov3": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3-base": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3-large": "facebook/dinov3-vitl16-pretrain-lvd1689m",
}

# Denoisers to start a run from (`train --init-from`): Photoroom's released PRX-1.2B transformers
# with T5Gemma, trained on Flux VAE latents (so they continue on `curate encode-latents --vae flux`
# manifests with the prx-1.2b preset) or, the dc-ae ones, on DC-AE latents (`--vae dc-ae`: 32 px
# tokens, patch size 1). The other releases work by Hub id.
DENOISERS = {
    "prx-256": "Photoroom/prx-256-t2i",
    "prx-512": "Photoroom/prx-512-t2i",
    "prx-512-sft": "Photoroom/prx-512-t2i-sft",
    "prx-1024-beta": "Photoroom/prx-1024-t2i-beta",
    "prx-512-dc-ae": "Photoroom/prx-512-t2i-dc-ae",
    "prx-512-dc-ae-sft": "Photoroom/prx-512-t2i-dc-ae-sft",
}

# Image classifiers for `curate score --classifier`: an alias names a model and the label whose
# probability becomes a column (Falconsai's ViT NSFW detector, labels normal/nsfw; a SigLIP2
# watermark detector, labels No Watermark/Watermark). Any AutoModelForImageClassification works by
# Hub id or folder as MODEL:LABEL.
CLASSIFIERS = {
    "nsfw": "Falconsai/nsfw_image_detection",
    "watermark": "prithivMLmods/Watermark-Detection-SigLIP2",
}
CLASSIFIER_LABELS = {"nsfw": "nsfw", "watermark": "watermark"}

REGISTRIES = {"vlm": VLMS, "text": TEXT_ENCODERS, "image": IMAGE_ENCODERS, "denoiser": DENOISERS,
              "classifier": CLASSIFIERS}


def resolve_model(name: str, kind: str, revision: str | None = None) -> ModelRef:
    """An alias, a local folder or a Hub id; anything else is a clear error listing the aliases.
    ``revision``: the Hub revision the caller will load, refused for a local folder."""
    aliases = REGISTRIES[kind]
    if name in aliases:
        return ModelRef(name, aliases[name], local=False)
    if os.path.isdir(name):
        if revision is not None:
            raise CurateError(f"{name!r}: a revision applies to Hub ids, not to a local folder")
        return ModelRef(name, os.path.abspath(name), local=True)
    if name.count("/") == 1 and not name.startswith((".", "/")) and all(name.split("/")):
        return ModelRef(name, name, local=False)
    raise CurateError(f"{name!r} is not a known {kind} alias ({', '.join(sorted(aliases))}), "
                      "a local folder, or a Hub id like org/name")


def local_fingerprint(path: str) -> str | None:
    """For a local model folder: a hash of its files' names, sizes and mtimes, else None.

    Stage configs hold the model's name; a folder rebuilt or retrained in place keeps its
    name, so its fingerprint goes into the config too and the stage's outputs are redone.
    """
    import hashlib

    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


_SNAPSHOT = re.compile(r"snapshots/([0-9a-f]{40})/")  # a Hub cache path's commit


def resolved_commit(model: str, revision: str | None, config: Any = None) -> str | None:
    """The commit the weights came from, where it can be known; else the revision as given.

    Older transformers kept it on the config (``_commit_hash``); 5.24 does not, so we ask
    the Hub cache which snapshot the config file was read from (no network).
    """
    commit = getattr(config, "_commit_hash", None)
    if isinstance(commit, str) and commit:
        return commit
    if Path(model).expanduser().is_dir():
        return revision  # a local folder has no commit
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # a cache we cannot read only costs the provenance detail
        return revision
    match = _SNAPSHOT.search(Path(path).as_posix()) if isinstance(path, str) else None
    return match.group(1) if match else revision
