"""VAE encode throughput on a GPU: images/s for the full-size Flux VAE, FLUX.2 AE and DC-AE
architectures (randomly initialised: no weights needed, same FLOPs) at 256 and 512 px, in
bf16 with channels_last, with the FLOPs per image (torch's FlopCounterMode) and the share
of the bf16 matmul peak measured on the same GPU in the same run.

    python bench/gpu_vae.py [--iters 20] [--compile]

Needs only torch and diffusers (the GPU machines carry a diffusers wheel: see bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def flux_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2()  # the defaults are FLUX.2's architecture


def dc_ae():
    from diffusers import AutoencoderDC

    # mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers's architecture (PRX's DC-AE releases).
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    multiscales = ((), (), (), (5,), (5,), (5,))
    return AutoencoderDC(
        encoder_block_types=blocks, decoder_block_types=blocks, encoder_qkv_multiscales=multiscales,
        decoder_qkv_multiscales=multiscales, downsample_block_type="Conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )


def latent(out):
    """The mean of a distribution, or a deterministic encoder's latent (DC-AE)."""
    dist = getattr(out, "latent_dist", None)
    return out.latent if dist is None else dist.mean


def bf16_peak(device: str) -> float:
    """Measured dense bf16 matmul FLOP/s: the ceiling used for the share."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 50
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


def encode_flops(vae, side: int) -> float:
    x = torch.randn(1, 3, side, side, device="meta")
    with FlopCounterMode(display=False) as counter:
        vae.to("meta").encode(x)
    return float(counter.get_total_flops())


def bench(make, side: int, batch: int, iters: int, device: str, compile: bool) -> float:
    vae = make().to(device, dtype=torch.bfloat16).to(memory_format=torch.channels_last).eval()
    encoder = torch.compile(vae.encode) if compile else vae.encode
    x = torch.randn(batch, 3, side, side, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            _ = latent(encoder(x))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            _ = latent(encoder(x))
        torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = "cuda"
    torch.backends.cudnn.benchmark = True
    peak = bf16_peak(device)
    print(f"# bench/gpu_vae.py on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s{', torch.compile' if args.compile else ''}")
    print("| VAE | px | batch | images/s | GFLOP/image | TFLOP/s | share of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, make in (("Flux VAE (16 ch)", flux_vae), ("FLUX.2 AE (32 ch)", flux2_vae), ("DC-AE (32 ch, 1/32)", dc_ae)):
        for side, batch in ((256, 64), (512, 16)):
            flops = encode_flops(make(), side)
            rate = bench(make, side, batch, args.iters, device, args.compile)
            achieved = rate * flops
            print(f"| {name} | {side} | {batch} | {rate:.0f} | {flops / 1e9:.0f} | {achieved / 1e12:.0f} | "
                  f"{achieved / peak:.0%} |", flush=True)


if __name__ == "__main__":
    main()
