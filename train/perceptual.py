"""Perceptual losses on the denoiser's estimate of the clean image, in pixel space.

PRX's speedrun and PixelGen (Ma et al. 2026) train in pixel space with x-prediction and add two
perceptual losses between the predicted clean image and the real one::

    loss = flow loss + perceptual.lpips * LPIPS(x0_hat, x0)                   (t < lpips_t_max)
                     + perceptual.dino  * mean_patches(1 - cos(D(x0_hat), D(x0)))  (t < dino_t_max)

- LPIPS (Zhang et al. 2018): VGG16's activations after five ReLUs, each unit-normalised over
  channels, their squared difference weighted per channel by the learned v0.1 weights (the
  ``lpips`` package's) and averaged over space, summed over the five. Local texture.
- P-DINO: a frozen DINO ViT's patch tokens of both images resized to ``dino_size``; one minus
  their cosine, averaged over patches. Global semantics.

Each applies to the samples whose t is below its threshold (PixelGen's noise gating: at high
noise the estimate is a blur, and pulling it towards one image's details costs diversity), and
is averaged over those. PRX's settings, the defaults here: LPIPS weight 0.1 below t = 0.3 at half
the resolution; P-DINO weight 0.01 at every t with DINOv2-B/14 with registers at 224 px. The
networks are frozen; gradients reach the estimate through them.

They compare images, so they need a pixel-space manifest (``curate encode-latents --vae pixels``):
in a latent space the VAE's decoder would run, with gradients, every step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from curate.manifest import LatentSpec
from curate.models import PIXELS
from train.config import ConfigError, PerceptualConfig
from train.repa import DinoEncoder

__all__ = ["VGG16_URL", "Lpips", "PerceptualLosses", "dino_distance", "vgg16_features"]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1
# LPIPS compares the outputs of relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: these indices in
# torchvision's vgg16().features.
_VGG_TAPS = (3, 8, 15, 22, 29)
# LPIPS's input layer: [-1, 1] images moved to roughly ImageNet's statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class Lpips(torch.nn.Module):
    """LPIPS with VGG16, v0.1: ``forward(x, y)`` gives one distance per sample for images in [-1, 1]."""

    def __init__(self, features: torch.nn.Sequential, weights: list[torch.Tensor]):
        super().__init__()
        self.features = features[: _VGG_TAPS[-1] + 1]
        for i, w in enumerate(weights):  # [1, C, 1, 1] each: a 1x1 convolution to one channel, no bias
            self.register_buffer(f"w{i}", w.detach().float().reshape(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @classmethod
    def load(cls, device: torch.device | str = "cpu") -> Lpips:
        """VGG16's ImageNet weights from torchvision's URL (through torch.hub's cache: downloaded once)
        and the channel weights shipped in the ``lpips`` package."""
        features = vgg16_features()
        # The package's weight file, found without importing the package (which builds its own
        # networks through torchvision's deprecated arguments).
        spec = importlib.util.find_spec("lpips")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("perceptual.lpips needs the lpips package (pip install lpips) for its weights")
        try:
            state = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", weights_only=True)
            features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()
                                      if k.startswith("features.")})
            lin = torch.load(Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth",
                             map_location="cpu", weights_only=True)
            weights = [lin[f"lin{i}.model.1.weight"] for i in range(len(_VGG_TAPS))]
        except (OSError, RuntimeError, KeyError) as e:
            raise ConfigError(f"cannot load LPIPS (VGG16 from {VGG16_URL} and the lpips package's "
                              f"weights): {e}") from None
        return cls(features, weights).to(device)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = self._activations(y)
        distance = torch.zeros(x.shape[0], device=x.device)
        for i, (a, b) in enumerate(zip(self._activations(x), targets, strict=True)):
            diff = (_unit(a.float()) - _unit(b.float())).pow(2)
            distance = distance + (diff * getattr(self, f"w{i}")).sum(1).mean((1, 2))
        return distance

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG_TAPS:
                taps.append(h)
        return taps


def vgg16_features() -> torch.nn.Sequential:
    """VGG16's convolutional part, laid out as torchvision's ``vgg16().features`` (so its checkpoint's
    ``features.*`` keys load), without building the classifier's 120M weights."""
    layers: list[torch.nn.Module] = []
    channels = 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [torch.nn.Conv2d(channels, width, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
            channels = width
    return torch.nn.Sequential(*layers)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Each position's activation vector scaled to unit length (LPIPS adds 1e-10 to the norm)."""
    return t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def dino_distance(encoder: DinoEncoder, x: torch.Tensor, y: torch.Tensor, size: int) -> torch.Tensor:
    """Per sample, one minus the cosine of ``encoder``'s patch tokens of ``x`` and ``y`` ([-1, 1]
    images, both resized to ``size`` x ``size``), averaged over patches; differentiable in ``x``."""

    def view(images: torch.Tensor) -> torch.Tensor:
        images = ((images.float() + 1) / 2).clamp(0, 1)
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    with torch.no_grad():
        reference = encoder.patch_tokens(view(y))
    return 1 - F.cosine_similarity(encoder.patch_tokens(view(x)), reference, dim=-1).mean(1)


class Term(NamedTuple):
    """One perceptual loss of a micro-batch: per-sample values and which samples it applies to."""

    name: str  # the metric: lpips_loss, pdino_loss
    losses: torch.Tensor  # [B], 0 where it does not apply
    applies: torch.Tensor  # [B] bool: t below the threshold

    def mean(self) -> torch.Tensor:
        """Over the samples it applies to (0 when none does, with the graph kept)."""
        return self.losses.sum() / self.applies.sum().clamp(min=1)


def _term(name: str, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], estimate: torch.Tensor,
          x0: torch.Tensor, applies: torch.Tensor) -> Term:
    """``distance`` of the samples ``applies`` marks, 0 for the others (which it never sees)."""
    losses = torch.zeros(estimate.shape[0], device=estimate.device)
    chosen = applies.nonzero().squeeze(1)
    if chosen.numel():
        chosen = chosen.to(estimate.device, non_blocking=True)
        losses = losses.index_put((chosen,), distance(estimate[chosen], x0[chosen]).float())
    return Term(name, losses, applies.to(estimate.device, non_blocking=True))


def _weights(cfg: PerceptualConfig) -> dict[str, float]:
    """Each loss's metric name and weight, in the order the trainer logs them."""
    return {"lpips_loss": cfg.lpips, "pdino_loss": cfg.dino}


class PerceptualLosses:
    """The perceptual losses a config switches on, their networks loaded once."""

    def __init__(self, cfg: PerceptualConfig, device: torch.device):
        self.cfg = cfg
        self.lpips = Lpips.load(device) if cfg.lpips > 0 else None
        self.dino = (DinoEncoder(cfg.dino_encoder, device=device, revision=cfg.dino_revision or None,
                                 role="perceptual.dino_encoder") if cfg.dino > 0 else None)
        if self.dino is not None and cfg.dino_size % self.dino.patch:
            raise ConfigError(f"perceptual.dino_size {cfg.dino_size} is not a multiple of "
                              f"{cfg.dino_encoder}'s {self.dino.patch} px patches")

    def describe(self) -> str:
        cfg, parts = self.cfg, []
        if self.lpips is not None:
            parts.append(f"LPIPS (VGG16) weight {cfg.lpips} for t < {cfg.lpips_t_max}, images scaled by {cfg.lpips_scale}")
        if self.dino is not None:
            parts.append(f"P-DINO ({self.dino.id}) weight {cfg.dino} for t < {cfg.dino_t_max}, at {cfg.dino_size} px")
        return "; ".join(parts)

    @staticmethod
    def names(cfg: PerceptualConfig) -> list[str]:
        """The metrics of the losses ``cfg`` switches on, in the order :meth:`terms` gives them."""
        return [name for name, weight in _weights(cfg).items() if weight > 0]

    @staticmethod
    def check(cfg: PerceptualConfig, spec: LatentSpec) -> None:
        """Refuse a manifest that is not in pixel space, before anything is loaded."""
        if (cfg.lpips > 0 or cfg.dino > 0) and spec.vae != PIXELS:
            raise ConfigError(f"perceptual.lpips and perceptual.dino compare images, but the manifest holds "
                              f"{spec.vae_class} {spec.vae} latents: they need a pixel-space manifest "
                              "(curate encode-latents --vae pixels); in a latent space the VAE's decoder "
                              "would run with gradients every step")

    def terms(self, estimate: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> list[Term]:
        """Each switched-on loss between the clean-image estimate and the images ([-1, 1]).

        A network sees only the samples its loss applies to (PRX's LPIPS: about a fifth of them,
        t < 0.3 under the logit-normal draw), the others' values are 0. Pass ``t`` on the host (the
        trainer draws it there) and choosing them costs no wait for the GPU."""
        cfg, out = self.cfg, []
        if self.lpips is not None:

            def lpips(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                if cfg.lpips_scale != 1:
                    x, y = (F.interpolate(v.float(), scale_factor=cfg.lpips_scale, mode="bilinear",
                                          align_corners=False) for v in (x, y))
                return self.lpips(x, y)

            out.append(_term("lpips_loss", lpips, estimate, x0, t < cfg.lpips_t_max))
        if self.dino is not None:
            dino = self.dino
            out.append(_term("pdino_loss", lambda x, y: dino_distance(dino, x, y, cfg.dino_size), estimate, x0,
                             t < cfg.dino_t_max))
        return out

    def weighted(self, terms: list[Term]) -> torch.Tensor:
        """What joins the training loss: each term's mean times its weight."""
        weights = _weights(self.cfg)
        return sum(weights[term.name] * term.mean() for term in terms)
