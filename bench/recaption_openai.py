"""The openai backend against a loopback server with a fixed per-request latency, measured in one run.

A served VLM answers each request after some latency L and batches concurrent requests
itself, so with C requests in flight the best a client can do is C/L requests/s. This
measures how close `OpenAICaptioner` gets to that: achieved requests/s over C/L (goal: at
least 0.8). What it costs on the client side is JPEG encoding, base64, JSON, HTTP and the
event loop; the server (tests/fake_openai_server.py, in its own process so it does not
share our GIL) only waits L and answers a fixed caption.

Each concurrency runs a warm-up batch of C requests (connections opened), then one timed
`generate` call of `--per-slot` x C requests.

    python bench/recaption_openai.py [--latency 0.2] [--concurrency 8,32,64] [--per-slot 10] [--side 512]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curate.captioners.base import CaptionRequest, Sampling  # noqa: E402
from curate.captioners.openai_backend import OpenAICaptioner  # noqa: E402


def make_images(n: int, side: int) -> list[Image.Image]:
    """Photo-like images (gradients, shapes, mild noise): JPEG encoding costs what it does on photos."""
    rng = np.random.default_rng(0)
    h, w = side * 3 // 4, side
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for _ in range(n):
        c0, c1 = rng.random(3) * 255, rng.random(3) * 255
        t = ((xx * rng.random() + yy * rng.random()) / (w + h))[..., None]
        arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, side // 4))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        images.append(img)
    return images


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fake_openai_server.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def encode_ms(images: list[Image.Image]) -> float:
    """Milliseconds to JPEG-encode (quality 95) one image on one thread, for context."""
    start = time.perf_counter()
    for img in images:
        img.save(io.BytesIO(), format="JPEG", quality=95)
    return 1000 * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2, help="server seconds per request (L)")
    parser.add_argument("--concurrency", default="8,32,64", help="comma-separated C values")
    parser.add_argument("--per-slot", type=int, default=10, help="timed requests = per-slot x C")
    parser.add_argument("--side", type=int, default=512, help="image width (height is 3/4 of it)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    images = make_images(32, args.side)
    proc, url = start_server(args.latency)
    rows = []
    try:
        for c in levels:
            n = args.per_slot * c
            requests = [CaptionRequest(f"k{i}/long", "long", images[i % len(images)], f"Describe image {i}.",
                                       Sampling(max_new_tokens=256)) for i in range(n)]
            with OpenAICaptioner("fake-vlm", url, api_key_env="KILN_BENCH_NO_KEY", concurrency=c,
                                 timeout=30.0) as cap:
                cap.generate(requests[:c])  # warm-up: connections opened, threads started
                start = time.perf_counter()
                gens = cap.generate(requests)
                seconds = time.perf_counter() - start
            errors = sum(g.error is not None for g in gens)
            achieved, ideal = n / seconds, c / args.latency
            rows.append((c, n, seconds, achieved, ideal, achieved / ideal, errors))
    finally:
        proc.kill()
        proc.wait()

    w, h = args.side, args.side * 3 // 4
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{date.today().isoformat()}.")
    print(f"Server latency L = {args.latency:g} s; images {w}x{h} JPEG q95 "
          f"({encode_ms(images[:8]):.1f} ms each to encode on one thread).\n")
    print("| concurrency C | requests | seconds | requests/s | C/L | ratio | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c, n, seconds, achieved, ideal, ratio, errors in rows:
        print(f"| {c} | {n} | {seconds:.2f} | {achieved:.1f} | {ideal:.0f} | {ratio:.2f} | {errors} |")


if __name__ == "__main__":
    main()
