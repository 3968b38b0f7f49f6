"""REPA (Yu et al. 2025, "Representation Alignment for Generation Is Easier Than You Think").

An auxiliary loss pulls the denoiser's hidden tokens after block ``repa.block`` towards a frozen
vision encoder's patch features of the clean image: a small MLP (the projector) maps each token
to the teacher's width, and the loss is one minus their cosine similarity, averaged over tokens::

    loss = flow loss + repa.weight * mean_tokens(1 - cos(projector(h_i), teacher_i))

The teacher sees each sample's image exactly as encode-latents cropped it for the VAE (the
loader reads the original from the image stage and crops it with the same function), resized
so that its patch grid is the denoiser's token grid: DINOv3's 16 px patches at the training
resolution need no resize; DINOv2's 14 px patches see the image at 14/16 of its size. PRX ran
REPA as a burn-in: ``repa.stop_step`` ends it, after which the teacher is released and a step
costs what a baseline step costs. The projector is trained with the denoiser, saved in
checkpoints, and not exported (the pipeline never runs it).

iREPA (Singh et al. 2025, "What matters for Representation Alignment: Global Information or
Spatial Structure?") found that the teacher's spatial structure, not its global semantics, is what
helps, and changes two things (``--ablation irepa``): the projector is one 3x3 convolution over
the token grid (``repa.projector=conv``), so each projected token sees its neighbours, and the
teacher's features are normalised over the image's tokens (``repa.spatial_norm``), which removes
most of what all patches share and leaves how they differ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from curate.models import resolve_model
from curate.runner import CurateError
from train.config import ConfigError, TrainConfig

# Prefix tokens a teacher may put before its patch tokens: the class token, and up to 4
# registers in DINOv3 and DINOv2-with-registers.
_MAX_PREFIX_TOKENS = 8


def repa_active(cfg: TrainConfig, step: int) -> bool:
    """Whether optimizer step ``step`` (counted from 0) trains with the alignment loss."""
    return cfg.repa.weight > 0 and (cfg.repa.stop_step == 0 or step < cfg.repa.stop_step)


class DinoEncoder:
    """A frozen DINO encoder (DINOv3, DINOv2, any transformers ViT of the family): REPA's teacher,
    which turns uint8 images into patch features on the denoiser's token grid, and P-DINO's
    network (train/perceptual.py), through which gradients reach the images."""

    def __init__(self, name: str, *, device: torch.device, revision: str | None = None, role: str = "repa.encoder"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        try:
            ref = resolve_model(name, "image", revision)
            config = AutoConfig.from_pretrained(ref.id, revision=revision)
            if not config.model_type.startswith("dino"):
                raise ConfigError(f"{role}={name} ({ref.id}) is a {config.model_type} model; it must be a DINO "
                                  "ViT (dinov3, dinov2, or a folder or Hub id of one)")
            processor = AutoImageProcessor.from_pretrained(ref.id, revision=revision)
            model = AutoModel.from_pretrained(ref.id, revision=revision, dtype=torch.float32)
        except (OSError, ValueError, CurateError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"cannot load {role}={name}: {e}") from None
        self.name, self.id, self.revision, self.role = name, ref.id, revision, role
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.patch = int(config.patch_size)
        self.dim = int(config.hidden_size)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=device).view(shape)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32, device=device).view(shape)

    @torch.no_grad()
    def features(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> patch features [B, gh * gw, dim] (float32, normalised by
        the teacher's final layer norm), row by row as the denoiser orders its tokens."""
        gh, gw = grid
        x = images.to(self.device, non_blocking=True).float() / 255.0
        size = (gh * self.patch, gw * self.patch)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return self.patch_tokens(x)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] with sides that are whole patches -> the final layer's
        patch tokens [B, H/p * W/p, dim] (float32); differentiable in ``images``."""
        gh, gw = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        x = (images.float() - self.mean) / self.std
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            hidden = self.model(pixel_values=x).last_hidden_state
        prefix = hidden.shape[1] - gh * gw
        if not 0 <= prefix <= _MAX_PREFIX_TOKENS:
            raise ConfigError(f"{self.role}={self.name} gave {hidden.shape[1]} tokens for a {gh}x{gw} patch "
                              "grid: not a ViT whose patch tokens can be compared")
        return hidden[:, prefix:].float()


def build_projector(hidden_size: int, teacher_dim: int, width: int, *, seed: int,
                    kind: str = "mlp") -> torch.nn.Module:
    """REPA's projector (``mlp``: Linear, SiLU, Linear, SiLU, Linear) or iREPA's (``conv``: one
    3x3 convolution over the token grid); the seed alone decides its weights."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed + 1)  # not the denoiser's stream
        if kind == "conv":
            return ConvProjector(hidden_size, teacher_dim)
        return torch.nn.Sequential(
            torch.nn.Linear(hidden_size, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, teacher_dim))


class ConvProjector(torch.nn.Module):
    """iREPA's projector: tokens [B, gh * gw, hidden] (row by row, as the denoiser orders them)
    laid out on their grid, a 3x3 convolution (zero padding keeps the grid), [B, gh * gw, dim]."""

    def __init__(self, hidden_size: int, teacher_dim: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(hidden_size, teacher_dim, kernel_size=3, padding=1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = tokens.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"{n} tokens are not a {grid[0]}x{grid[1]} grid")
        image = tokens.transpose(1, 2).reshape(b, c, *grid)
        return self.conv(image).flatten(2).transpose(1, 2)


def spatial_normalize(features: torch.Tensor, gamma: float) -> torch.Tensor:
    """iREPA's spatial normalisation of teacher features [B, N, D]: per sample and channel, minus
    ``gamma`` times the mean over the N tokens, over the (unbiased) standard deviation of the result."""
    centred = features - gamma * features.mean(dim=1, keepdim=True)
    return centred / (centred.std(dim=1, keepdim=True) + 1e-6)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: one minus the cosine similarity of projected tokens and teacher features,
    averaged over tokens ([B, N, D] each; float32)."""
    return 1.0 - F.cosine_similarity(projected.float(), target.float(), dim=-1).mean(1)


class WithRepa(torch.nn.Module):
    """The denoiser and the projector as one module, so that DDP reduces the projector's gradients
    with the denoiser's and torch.compile sees both. ``forward`` takes the denoiser's arguments and
    returns (its output, the projected tokens that left block ``block``, counted from 0).

    ``denoiser`` is the model called through train.routing.RoutedDenoiser, which returns that
    block's tokens itself: no forward hook, so nothing depends on hooks firing inside a
    recomputed (activation-checkpointed) or compiled block. ``patch`` (the denoiser's patch size)
    gives a convolutional projector the token grid.
    """

    def __init__(self, denoiser: torch.nn.Module, projector: torch.nn.Module, block: int, patch: int = 1):
        super().__init__()
        self.denoiser, self.projector, self.block, self.patch = denoiser, projector, block, patch

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out, hidden = self.denoiser(**kwargs, tokens_of=self.block, return_dict=False)
        if isinstance(self.projector, ConvProjector):
            height, width = kwargs["hidden_states"].shape[-2:]
            return out, self.projector(hidden, (height // self.patch, width // self.patch))
        return out, self.projector(hidden)
