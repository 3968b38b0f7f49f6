"""CLIP and DINOv2 image embeddings for the MMD metrics (CMMD, DINO-MMD), and CLIP's image-prompt
similarity for the CLIP score, through transformers.

CMMD (Jayasumana et al. 2024, "Rethinking FID") embeds images with CLIP ViT-L/14 at 336 px:
pixels in [0, 1] resized bicubically to the model's input size (no crop: the images here are
square), normalised with the image processor's mean and std, the projected ``image_embeds``
L2-normalised. DINO-MMD applies the same recipe to DINOv2's pooled output (the final layer's
class token). Both run in float32 with TF32 off, so the numbers do not depend on the GPU.

The CLIP score (Hessel et al. 2021, as torchmetrics' ``CLIPScore`` reports it) is 100 times the
cosine similarity of an image's and its prompt's CLIP embeddings, floored at 0, averaged: how well
the images follow their prompts, which FID and the MMDs do not see. Both towers of CLIP ViT-L/14
at 224 px (``clip-score``, as ``curate score`` uses), the images prepared as above, prompts cut at
77 tokens.

Models load by alias (``clip``, ``dinov2``: curate.models.IMAGE_ENCODERS), Hub id (at a
``revision``) or local folder, with their image processor's config read for size, mean and std.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

from curate.models import local_fingerprint, resolve_model
from curate.runner import CurateError
from curate.shards import stable_hash

__all__ = ["CaptionScorer", "ImageEmbedder", "EmbedderError"]

Kind = Literal["clip", "dino"]


_MODEL_TYPES = {"clip": "clip", "dino": "dino"}  # config.model_type prefixes: clip_vision_model, dinov2


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers 5 draws a bar per model load; its warnings (missing weights) stay."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


class EmbedderError(CurateError):
    """An image encoder that cannot be loaded or used for a metric."""


class ImageEmbedder:
    """uint8 images [B, 3, H, W] -> embeddings (float64, on the CPU), L2-normalised for the MMDs;
    ``normalized=False`` keeps them as the model gives them (FD-DINOv2's features)."""

    def __init__(self, kind: Kind, name: str, *, device: str | torch.device = "cpu", revision: str | None = None,
                 normalized: bool = True):
        from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModelWithProjection
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        if kind not in ("clip", "dino"):
            raise EmbedderError(f"unknown image encoder kind {kind!r}: clip or dino")
        try:
            ref = resolve_model(name, "image", revision)
        except CurateError as e:
            raise EmbedderError(f"{kind} model: {e}") from e
        self.kind, self.device, self.name, self.ref, self.revision = kind, torch.device(device), name, ref, revision
        try:
            config = AutoConfig.from_pretrained(ref.id, revision=revision)
            # A DINOv2 folder loaded as CLIP (or the reverse) would load with random weights.
            if not config.model_type.startswith(_MODEL_TYPES[kind]):
                raise EmbedderError(f"{name!r} ({ref.id}) is a {config.model_type} model, not a "
                                    f"{_MODEL_TYPES[kind]} model as {kind} needs")
            processor = AutoImageProcessor.from_pretrained(ref.id, revision=revision)
            self.cls = CLIPVisionModelWithProjection if kind == "clip" else MODEL_MAPPING[type(config)]
        except (OSError, ValueError, KeyError) as e:
            raise EmbedderError(f"cannot load the {kind} model {name!r} ({ref.id}): {e}") from None
        self.size, self.mean, self.std = _input_settings(processor, self.device)
        self._model: torch.nn.Module | None = None  # loaded at the first call: a stored result needs none
        # What decides the embeddings (an alias and its Hub id are the same model); a local
        # folder is named by its files' fingerprint too, since one rebuilt in place keeps its name.
        self.identity: dict[str, Any] = {"id": ref.id, "revision": revision, "class": self.cls.__name__,
                                         "input_size": self.size}
        if ref.local:
            self.identity["fingerprint"] = local_fingerprint(ref.id)
        self.normalized = normalized
        if not normalized:  # only then, so the MMDs' stored features keep their identity
            self.identity["normalized"] = False
        self.key = f"{kind}-{stable_hash(self.identity)[:8]}"

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            try:
                with _no_progress_bars():
                    model = self.cls.from_pretrained(self.ref.id, revision=self.revision, dtype=torch.float32)
            except (OSError, ValueError) as e:
                raise EmbedderError(f"cannot load the {self.kind} model {self.name!r} ({self.ref.id}): {e}") from None
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _model_input(images, self.size, self.mean, self.std)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = self.model(pixel_values=x)
        embeddings = out.image_embeds if self.kind == "clip" else out.pooler_output
        embeddings = embeddings.double()
        return (embeddings / embeddings.norm(dim=-1, keepdim=True) if self.normalized else embeddings).cpu()


class CaptionScorer:
    """uint8 images [B, 3, H, W] and their prompts -> the cosine similarity of each image's and its
    prompt's CLIP embeddings (float64 [B, 1], on the CPU); the CLIP score is 100 x their mean,
    each floored at 0."""

    needs_captions = True

    def __init__(self, name: str = "clip-score", *, device: str | torch.device = "cpu", revision: str | None = None):
        from curate.score import ClipScorer

        try:
            self.scorer = ClipScorer(name, revision=revision, device=str(device), bf16=False)
        except CurateError as e:
            raise EmbedderError(f"clip-score model: {e}") from e
        self.device = self.scorer.device
        self.size, self.mean, self.std = _input_settings(self.scorer.processor, self.device)
        self.identity: dict[str, Any] = {"id": self.scorer.id, "revision": revision, "class": "CLIPModel",
                                         "input_size": self.size, "max_tokens": self.scorer.max_tokens}
        if self.scorer.local:
            self.identity["fingerprint"] = local_fingerprint(self.scorer.id)
        self.key = f"clipscore-{stable_hash(self.identity)[:8]}"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        x = _model_input(images, self.size, self.mean, self.std)
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            embedded = self.scorer.images(x).double()
            texts, _ = self.scorer.texts(list(prompts))
        return (embedded * texts.double()).sum(dim=-1, keepdim=True).cpu()


def _input_settings(processor: Any, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """An image processor's input side, mean and std (shaped to broadcast over [B, 3, H, W])."""
    crop = getattr(processor, "crop_size", None) or processor.size
    shape = (1, 3, 1, 1)
    return (int(crop.get("height") or crop["shortest_edge"]),
            torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(shape),
            torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(shape))


def _model_input(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 square images as the model's normalised input: bicubic resize to its side (no crop)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
    x = images.to(mean.device).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x - mean) / std
