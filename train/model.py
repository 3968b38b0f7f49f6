"""The denoiser (diffusers' PRXTransformer2DModel) and what the trainer measures about it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch

from curate.manifest import LatentSpec
from curate.vae import model_channels, model_downsample
from train.config import ConfigError, ModelConfig

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU. Matched by
# substring of torch.cuda.get_device_name(); `log.peak_tflops` overrides.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A10G": 70.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "A6000": 155.0,
}

TOKEN_PIXELS = 16  # pixels per token side, as PRX: Flux latents (1/8) with 2x2 patches


def patch_size_for(cfg: ModelConfig, spec: LatentSpec) -> int:
    """The transformer's patch size: as set, or the one that gives 16-pixel tokens."""
    if cfg.patch_size:
        return cfg.patch_size
    down = model_downsample(spec)
    return max(1, TOKEN_PIXELS // down) if TOKEN_PIXELS % down == 0 else 1


def denoiser_config(cfg: ModelConfig, spec: LatentSpec, context_dim: int) -> dict[str, Any]:
    """The PRXTransformer2DModel constructor arguments for this model config and manifest."""
    config = {
        "in_channels": model_channels(spec),
        "patch_size": patch_size_for(cfg, spec),
        "context_in_dim": context_dim,
        "hidden_size": cfg.hidden_size,
        "mlp_ratio": cfg.mlp_ratio,
        "num_heads": cfg.num_heads,
        "depth": cfg.depth,
        "axes_dim": list(cfg.axes_dim),
        "theta": cfg.theta,
    }
    # Named only when set: the runs and checkpoints from before these existed record the same
    # config, and a diffusers without them (before 0.42) serves every other run.
    for key, value in (("bottleneck_size", cfg.bottleneck_size), ("resolution_embeds", cfg.resolution_embeds)):
        if value:
            _check_supported(key)
            config[key] = value
    return config


def _check_supported(argument: str) -> None:
    import inspect

    from diffusers import PRXTransformer2DModel

    if argument not in inspect.signature(PRXTransformer2DModel.__init__).parameters:
        import diffusers

        raise ConfigError(f"model.{argument} needs a PRXTransformer2DModel that has it; diffusers "
                          f"{diffusers.__version__}'s does not (pip install -U diffusers)")


def check_token_grid(buckets: Iterable[tuple[int, int]], spec: LatentSpec, patch_size: int,
                     what: str = "the manifest's") -> None:
    """Every bucket (pixels) holds a whole number of tokens, before any step rather than at the
    first batch of an odd bucket hours in."""
    token = model_downsample(spec) * patch_size
    odd = sorted({(h, w) for h, w in buckets if h % token or w % token})
    if odd:
        sizes = ", ".join(f"{h}x{w}" for h, w in odd)
        raise ConfigError(f"{what} images of {sizes} px are not whole tokens of {token} px "
                          f"(model-space downsampling {model_downsample(spec)} x patch size {patch_size}): "
                          f"encode them at a multiple of {token} (curate encode-latents --resolution, "
                          "--bucket-multiple) or set another model.patch_size")


def build_denoiser(config: dict[str, Any], *, seed: int, device: str | None = None) -> torch.nn.Module:
    """A freshly initialised denoiser; the seed alone decides its weights (every rank agrees).
    ``device="meta"`` builds it without weights (shapes only: counting FLOPs)."""
    from diffusers import PRXTransformer2DModel

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.device(device) if device else contextlib.nullcontext():
        torch.manual_seed(seed)
        return PRXTransformer2DModel(**config)


def check_channels(config: dict[str, Any], spec: LatentSpec, what: str) -> None:
    """Refuse latents the model was not built for (a Flux manifest into a FLUX.2 run...)."""
    expected = model_channels(spec)
    if config["in_channels"] != expected:
        raise ConfigError(
            f"{what} has in_channels={config['in_channels']}, but the manifest's latents give "
            f"{expected} model channels ({spec.vae_class} {spec.vae}, {spec.channels} stored "
            "channels): train on a manifest of the same VAE, or start a new run"
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_flops_per_sample(
    model: torch.nn.Module, latent_shape: tuple[int, int, int], text_tokens: int, context_dim: int
) -> float:
    """Forward plus backward FLOPs for one sample, counted by torch on one real step.

    Counting beats a formula here: PRX mixes attention over image and text tokens, and the
    count follows whatever the installed diffusers version does.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    c, h, w = latent_shape
    x = torch.randn(1, c, h, w, device=device)
    ctx = torch.randn(1, text_tokens, context_dim, device=device)
    mask = torch.ones(1, text_tokens, dtype=torch.bool, device=device)
    t = torch.full((1,), 0.5, device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, attention_mask=mask,
                    return_dict=False)[0]
        out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The GPU's dense bf16 peak, or None when unknown (then MFU is not reported)."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
