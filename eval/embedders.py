"""CLIP and DINOv2 image embeddings for the MMD metrics (CMMD, DINO-MMD), through transformers.

CMMD (Jayasumana et al. 2024, "Rethinking FID") embeds images with CLIP ViT-L/14 at 336 px:
pixels in [0, 1] resized bicubically to the model's input size (no crop: the images here are
square), normalised with the image processor's mean and std, the projected ``image_embeds``
L2-normalised. DINO-MMD applies the same recipe to DINOv2's pooled output (the final layer's
class token). Both run in float32 with TF32 off, so the numbers do not depend on the GPU.

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

__all__ = ["ImageEmbedder", "EmbedderError"]

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
    """uint8 images [B, 3, H, W] -> L2-normalised embeddings (float64, on the CPU)."""

    def __init__(self, kind: Kind, name: str, *, device: str | torch.device = "cpu", revision: str | None = None):
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
        crop = getattr(processor, "crop_size", None) or processor.size
        self.size = int(crop.get("height") or crop["shortest_edge"])
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=self.device).view(shape)
        self._model: torch.nn.Module | None = None  # loaded at the first call: a stored result needs none
        # What decides the embeddings (an alias and its Hub id are the same model); a local
        # folder is named by its files' fingerprint too, since one rebuilt in place keeps its name.
        self.identity: dict[str, Any] = {"id": ref.id, "revision": revision, "class": self.cls.__name__,
                                         "input_size": self.size}
        if ref.local:
            self.identity["fingerprint"] = local_fingerprint(ref.id)
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
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        x = images.to(self.device).float() / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = self.model(pixel_values=x)
        embeddings = out.image_embeds if self.kind == "clip" else out.pooler_output
        embeddings = embeddings.double()
        return (embeddings / embeddings.norm(dim=-1, keepdim=True)).cpu()

