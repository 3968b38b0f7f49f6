"""Images from a denoiser during training: noise -> Euler with CFG -> the manifest's VAE -> a grid.

The model is called exactly as ``PRXPipeline`` calls it (``hidden_states``, ``timestep`` = t in
[0, 1], ``encoder_hidden_states``, ``attention_mask``), with the prompts encoded as the pipeline
encodes them (:class:`curate.text.TextEncoder`) and the empty prompt as the unconditional branch,
so a grid shows what the exported pipeline will produce for the same noise. One difference is
the time grid: :func:`train.flow.euler_sample` steps uniformly from t = 1 to t = 0, while the
pipeline's ``FlowMatchEulerDiscreteScheduler`` takes ``steps`` points from 1 to ~0.001 and then a
last step to 0 (see ``tests/test_train_export.py``); both integrate the same ODE.

The noise comes from a CPU generator seeded per call, so a grid is the same at every step of a
run (only the model changes) and on every device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from curate import storage
from curate.manifest import LatentSpec
from curate.text import EncodedPrompts, TextEncoder
from curate.vae import decode_to_images, model_channels, model_downsample
from train.flow import euler_sample, velocity_from_output, with_guidance

if TYPE_CHECKING:
    from curate.vae import LoadedVae

__all__ = ["initial_noise", "make_grid", "sample_grid", "sample_latents", "save_png"]

# Images decoded per VAE call: a grid of 16 at 1024 px would otherwise need one huge activation.
_DECODE_CHUNK = 8


def initial_noise(spec: LatentSpec, n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """The starting noise of :func:`sample_latents`: [n, model channels, h, w] float32 on the CPU.

    Public so that the same noise can be handed to an exported pipeline (``latents=``).
    """
    down = model_downsample(spec)
    if height % down or width % down:
        raise ValueError(f"image size {height}x{width} is not divisible by {down}, the model-space "
                         f"downsampling of VAE {spec.vae!r}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, model_channels(spec), height // down, width // down)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def sample_latents(
    transformer: torch.nn.Module,
    text: TextEncoder | EncodedPrompts,
    prompts: Sequence[str],
    *,
    spec: LatentSpec,
    height: int,
    width: int,
    steps: int = 28,
    guidance: float = 4.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    prediction: str = "velocity",
    x0_t_min: float = 0.05,
    seed: int = 0,
    device: str | torch.device | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model-space latents [B, model channels, height/d, width/d] (float32) for ``prompts``.

    ``d`` is :func:`curate.vae.model_downsample` (8 for Flux, 16 for FLUX.2); the transformer
    patchifies internally. Guidance ``v_u + g (v_c - v_u)`` uses the empty prompt, as the
    pipeline does, at the times ``t`` within ``guidance_interval`` (all, by default);
    ``guidance`` 1 skips the unconditional pass. The transformer runs in eval mode
    (restored afterwards) under bf16 autocast on CUDA; ``device`` defaults to the transformer's.
    ``noise`` replaces :func:`initial_noise`'s draw from ``seed`` (e.g. one seed per image).
    ``prediction`` and ``x0_t_min`` say what the transformer outputs, as the run's ``flow`` config
    (:func:`train.flow.velocity_from_output`).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ValueError("no prompts to sample")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    config = transformer.config
    if config.in_channels != model_channels(spec):
        raise ValueError(f"the transformer takes {config.in_channels} channels, but VAE "
                         f"{spec.vae!r} latents have {model_channels(spec)} in model space")
    if config.context_in_dim != text.dim:
        raise ValueError(f"the transformer takes {config.context_in_dim}-d text context, but "
                         f"text encoder {text.name!r} gives {text.dim}-d embeddings")
    step = model_downsample(spec) * config.patch_size
    if height % step or width % step:
        raise ValueError(f"image size {height}x{width} is not divisible by {step} (VAE "
                         f"downsampling {model_downsample(spec)} x patch size {config.patch_size})")
    device = torch.device(device) if device is not None else _device_of(transformer)
    if noise is None:
        noise = initial_noise(spec, len(prompts), height, width, seed)
    expected = (len(prompts), model_channels(spec), height // model_downsample(spec),
                width // model_downsample(spec))
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise of shape {list(noise.shape)}; {len(prompts)} prompts at {height}x{width} "
                         f"need {list(expected)}")
    noise = noise.to(device)

    context, mask = (t.to(device) for t in text.encode(list(prompts)))
    as_velocity = partial(velocity_from_output, prediction=prediction, t_min=x0_t_min)
    velocity = partial(_velocity, transformer, context=context, mask=mask, as_velocity=as_velocity)
    if guidance != 1.0:
        empty, empty_mask = (t.to(device) for t in text.encode([""]))
        n = len(prompts)
        velocity = with_guidance(
            velocity,
            partial(_velocity, transformer, context=empty.expand(n, -1, -1),
                    mask=empty_mask.expand(n, -1), as_velocity=as_velocity),
            guidance,
            guidance_interval,
        )
    was_training = transformer.training
    transformer.eval()
    try:
        with torch.no_grad():
            return euler_sample(velocity, noise, steps, shift=shift)
    finally:
        transformer.train(was_training)


def _velocity(
    transformer: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor,
    mask: torch.Tensor, as_velocity: Callable[..., torch.Tensor],
) -> torch.Tensor:
    cuda = x.device.type == "cuda"
    dtype = next(transformer.parameters()).dtype  # a bf16-stored model takes bf16 inputs
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        out = transformer(hidden_states=x.to(dtype), timestep=t,
                          encoder_hidden_states=context.to(dtype), attention_mask=mask,
                          return_dict=False)[0]
    return as_velocity(out.float(), x, t)


def make_grid(images: torch.Tensor, columns: int) -> Image.Image:
    """Images [B, 3, H, W] in [0, 1] tiled row by row: ``columns * W`` by ``ceil(B / columns) * H``
    pixels, no gaps, cells past the last image black."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {list(images.shape)}")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    b, _, h, w = images.shape
    if b == 0:
        raise ValueError("no images to tile")
    rows = math.ceil(b / columns)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    canvas = torch.zeros(rows * h, columns * w, 3, dtype=torch.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = image.permute(1, 2, 0)
    return Image.fromarray(canvas.numpy())


def sample_grid(
    transformer: torch.nn.Module,
    text: TextEncoder | EncodedPrompts,
    prompts: Sequence[str],
    *,
    spec: LatentSpec,
    vae: LoadedVae | Any,
    height: int,
    width: int,
    steps: int = 28,
    guidance: float = 4.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    prediction: str = "velocity",
    x0_t_min: float = 0.05,
    seed: int = 0,
    columns: int | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Image.Image:
    """Sample ``prompts``, decode with the manifest's VAE, tile (``columns`` defaults to a square).

    ``vae``: a :class:`curate.vae.LoadedVae` or diffusers VAE matching ``spec`` (e.g.
    ``curate.vae.load_vae_for_spec(spec)``). With ``path`` the grid is also written as a PNG
    (atomically: a reader never sees half a file).
    """
    latents = sample_latents(transformer, text, prompts, spec=spec, height=height, width=width,
                             steps=steps, guidance=guidance, guidance_interval=guidance_interval, shift=shift,
                             prediction=prediction, x0_t_min=x0_t_min, seed=seed)
    images = torch.cat([decode_to_images(chunk, spec, vae).cpu()
                        for chunk in latents.split(_DECODE_CHUNK)])
    grid = make_grid(images, columns or math.ceil(math.sqrt(len(prompts))))
    if path is not None:
        save_png(grid, Path(path))
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG atomically (a reader never sees half a file), readable by all."""
    with storage.replacing(path) as tmp:
        image.save(tmp, format="PNG")
