"""What pixel space's perceptual losses add to a training step, in FLOPs counted by torch.

Per training sample at PRX's speedrun geometry (512 px in pixel space, 32 px patches through a
256-wide bottleneck, 256 text tokens of T5Gemma's width 2304), forward plus backward:

- the denoiser, PRX-1.2B (train.model.train_flops_per_sample, as the trainer's MFU counts it);
- LPIPS (VGG16 at ``perceptual.lpips_scale`` 0.5: the target's forward without gradients, the
  estimate's forward and its backward to the image), on the share of samples below
  ``lpips_t_max`` 0.3 that the trainer's logit-normal draw gives (measured from 100,000 draws);
- P-DINO (DINOv2-B/14 with registers at 224 px, likewise) on every sample.

Counted on the meta device (no weights, no arithmetic: seconds on any machine), so the ratios
say what the losses cost wherever FLOPs decide a step's time; bench/gpu_train.py --latents pixels
--ablations lpips,pdino (bench/gpu.sh, GPU_PIXELS=1) times them on a GPU.

    python bench/perceptual.py [--side 512] [--patch 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from train import flow  # noqa: E402
from train.config import PerceptualConfig, build_config  # noqa: E402
from train.model import train_flops_per_sample  # noqa: E402
from train.perceptual import Lpips, vgg16_features  # noqa: E402


def backward_to_image_flops(network: torch.nn.Module, side: int, run) -> float:
    """A frozen network's forward on a target image (no gradients) and on an estimate, and the
    estimate's backward to the image, for one sample."""
    target = torch.randn(1, 3, side, side, device="meta")
    estimate = torch.randn(1, 3, side, side, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        run(network, estimate, target).sum().backward()
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--patch", type=int, default=32, help="the denoiser's patch size")
    parser.add_argument("--text-tokens", type=int, default=256)
    args = parser.parse_args()
    from diffusers import PRXTransformer2DModel
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    defaults = PerceptualConfig()
    cfg = build_config("prx-1.2b")
    with torch.device("meta"):
        denoiser = PRXTransformer2DModel(
            in_channels=3, patch_size=args.patch, context_in_dim=2304, hidden_size=cfg.model.hidden_size,
            mlp_ratio=cfg.model.mlp_ratio, num_heads=cfg.model.num_heads, depth=cfg.model.depth,
            axes_dim=cfg.model.axes_dim, bottleneck_size=256)
        lpips = Lpips(vgg16_features(), [torch.zeros(1, c, 1, 1) for c in (64, 128, 256, 512, 512)])
        dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            patch_size=14, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
            num_register_tokens=4)).eval().requires_grad_(False)
    step = train_flops_per_sample(denoiser, (3, args.side, args.side), args.text_tokens, 2304)
    lpips_side = int(args.side * defaults.lpips_scale)
    lpips_flops = backward_to_image_flops(lpips, lpips_side, lambda net, x, y: net(x, y))

    def dino_pair(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = net(pixel_values=y).last_hidden_state
        return torch.nn.functional.cosine_similarity(net(pixel_values=x).last_hidden_state, reference, dim=-1)

    dino_flops = backward_to_image_flops(dino, defaults.dino_size, dino_pair)
    t = flow.sample_timesteps(100_000, torch.Generator().manual_seed(0), mean=cfg.flow.logit_mean,
                              std=cfg.flow.logit_std, uniform_share=cfg.flow.uniform_share, shift=cfg.flow.shift)
    lpips_share = float((t < defaults.lpips_t_max).double().mean())
    dino_share = float((t < defaults.dino_t_max).double().mean())
    print(f"# bench/perceptual.py: FLOPs per training sample, counted (torch {torch.__version__}); "
          f"{args.side} px pixel space, {args.patch} px patches, bottleneck 256, {args.text_tokens} text tokens")
    print("| per sample | GFLOP | share of samples | GFLOP per sample of the step | / denoiser |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = [("PRX-1.2B forward + backward", step, 1.0),
            (f"LPIPS, VGG16 at {lpips_side} px (t < {defaults.lpips_t_max})", lpips_flops, lpips_share),
            (f"P-DINO, DINOv2-B/14-reg at {defaults.dino_size} px (t < {defaults.dino_t_max})", dino_flops,
             dino_share)]
    for name, flops, share in rows:
        print(f"| {name} | {flops / 1e9:.1f} | {share:.3f} | {flops * share / 1e9:.1f} | {flops * share / step:.3f} |")
    extra = lpips_flops * lpips_share + dino_flops * dino_share
    print(f"\nboth losses: {extra / step:.3f} of the denoiser's FLOPs per sample "
          f"(LPIPS on every sample instead: {(lpips_flops + dino_flops * dino_share) / step:.3f})")


if __name__ == "__main__":
    main()
