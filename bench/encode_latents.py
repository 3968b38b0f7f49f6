"""`curate encode-latents` against the bare VAE and against a naive loop, measured in one run.

Each run gives two rates: over the whole run, and steady (from its first output to its last,
without the fixed costs that a run of millions of images pays once: loading the VAE, starting
the workers, the first CUDA kernels, the final commit). The bare pass is timed warm.

1. Stage / bare: the whole stage (read shards, decode and resize in DataLoader workers,
   bucket batches, encode, serialise, commit) against the bare VAE forward pass on tensors
   already decoded, with the same model and batch size. Uses the full-size Flux VAE
   architecture, randomly initialised, so that compute dominates as it does in practice.
2. Stage / naive: against the loop people write first: for each image, open, transform,
   encode alone, `torch.save` one file. With the tiny VAE (per-image overheads dominate)
   and with the full-size one. Then both again with the full-size VAE's weights in bf16
   (``--vae-dtype bfloat16``; ``--vae-dtypes`` picks), against the bare pass with those
   weights (the naive loop stays float32).
3. The stage with its encoder replaced by zeros made on the device: the rate its pipeline
   (reading, decoding, batching, copies, serialising, writing) can feed, and the main
   process's CPU time per image, which on a GPU bounds the stage whatever the encoder.
4. On the CPU, a stand-in for a GPU: the encoder replaced by a wait of 5 ms per image that
   uses no CPU. Its stage / bare is against the 200 images/s such an encoder allows.

    python bench/encode_latents.py [--images 24] [--resolution 256] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import make_images  # noqa: E402

from curate.buckets import preprocess, to_model_range  # noqa: E402
from curate.encode_latents import EncodeLatentsStage  # noqa: E402
from curate.ingest import IngestStage  # noqa: E402
from curate.runner import run_stage  # noqa: E402
from curate.sources import FolderSource  # noqa: E402
from curate.tiny import build_tiny_flux_vae  # noqa: E402
from curate.vae import encode_batch, load_vae  # noqa: E402


def full_size_flux_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).save_pretrained(folder)
    return folder


@dataclasses.dataclass
class Timing:
    """A run's wall time, and its steady rate: images/s from its first output to its last, which
    leaves out the fixed costs (loading the VAE, starting the workers, the first CUDA kernels,
    the final commit) that a run of millions of images pays once. For the stage, also the main
    process's CPU time per image from its first shard on (all its threads: gathering, the
    encoder's launches or, on the CPU, its compute, serialising, writing, committing)."""

    seconds: float
    steady: float
    main_cpu_ms: float | None = None
    # Median time between two calls of the encoder within a shard, and across a shard's end
    # (the next shard's first call after the last one of the shard before): what a shard's
    # end costs an accelerator is the difference.
    gap_ms: tuple[float, float] | None = None


class _TimedStage(EncodeLatentsStage):
    """The stage, with a timestamp each time a batch of latents is done. With ``free_encoder``
    the VAE is replaced by zeros of the latents' shape, made on its device: what is left is
    what the stage's pipeline can feed an encoder (reading, decoding, copies, writing). With
    ``wait_per_image`` too, each batch also waits that many seconds per image without using
    the CPU: an emulated accelerator of known speed, whose rate the stage should reach."""

    marks: list[tuple[float, int]]
    calls: list[tuple[int, float]]  # (shard id, time) of each call of the encoder
    shard_id: int = -1
    cpu_start: float | None = None  # the process's CPU time when the first shard started
    free_encoder: bool = False
    wait_per_image: float = 0.0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((self.shard_id, time.perf_counter()))
        if not self.free_encoder:
            return super().encode(images)
        b, _, h, w = images.shape
        time.sleep(b * self.wait_per_image)  # as a synchronising GPU call would, it frees the GIL
        down = self.loaded.downsample
        zeros = torch.zeros(b, self.loaded.channels, h // down, w // down, device=images.device)
        return zeros, zeros

    def process(self, task, writer, progress) -> None:  # noqa: ANN001 (the runner's signature)
        def timed(count: int) -> None:
            self.marks.append((time.perf_counter(), count))
            progress(count)

        if self.cpu_start is None:
            self.cpu_start = time.process_time()
        self.shard_id = task.shard_id
        return super().process(task, writer, timed)


def stage_run(images: Path, vae: Path, out: Path, resolution: int, batch: int, device: str = "cpu",
              workers: int = 2, compile: bool = False, free_encoder: bool = False,
              wait_per_image: float = 0.0, vae_dtype: str = "float32") -> Timing:
    shutil.rmtree(out, ignore_errors=True)
    stage = _TimedStage(images, None, out, str(vae), resolution=resolution, batch_size=batch,
                        decode_workers=workers, allow_missing_captions=True,
                        manifest_dir=out / "manifests", device=device, compile=compile, vae_dtype=vae_dtype)
    stage.marks, stage.calls, stage.free_encoder, stage.wait_per_image = [], [], free_encoder, wait_per_image
    threads = torch.get_num_threads()
    if free_encoder and not device.startswith("cuda"):
        # Standing in for a GPU, whose stage runs no torch CPU kernel per batch (the zeros, the
        # latents' conversion and copies are the device's work): on the CPU those small kernels
        # would wake torch's OpenMP threads, which then spin on the cores the decoding workers
        # need (2 cores: 2.2 ms of the main process's CPU per image at 2 threads, 0.7 at 1).
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        run_stage(stage, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - stage.cpu_start
    if len(stage.marks) < 3:
        raise SystemExit(f"{len(stage.marks)} batches: too few for a steady rate; give more images")
    (first, _), (last, _) = stage.marks[0], stage.marks[-1]
    done = sum(count for _, count in stage.marks)
    within, across = [], []
    for (shard_a, a), (shard_b, b) in itertools.pairwise(stage.calls):
        (within if shard_a == shard_b else across).append(1000 * (b - a))
    gaps = (statistics.median(within), statistics.median(across)) if within and across else None
    return Timing(seconds, sum(count for _, count in stage.marks[1:]) / (last - first),
                  1000 * cpu_seconds / done, gaps)


def bare_run(src: Path, vae: Path, resolution: int, batch: int, device: str = "cpu",
             vae_dtype: str = "float32") -> tuple[float, dict]:
    """The VAE forward pass alone on pre-decoded tensors, as the stage runs it (encode_batch:
    on CUDA channels_last, and bf16 autocast for float32 weights); also the means of the first
    batch, by key."""
    loaded = load_vae(str(vae), device=device, dtype=getattr(torch, vae_dtype))
    pixels = [preprocess(p.read_bytes(), resolution=resolution)[0] for p in sorted(src.glob("*.jpg"))]
    batches = [to_model_range(torch.stack(pixels[i: i + batch])).to(device) for i in range(0, len(pixels), batch)]
    first = encode_batch(loaded, batches[0])[0].to("cpu", torch.bfloat16)  # also the warm-up
    _sync(device)
    start = time.perf_counter()
    for x in batches:
        mean, std = encode_batch(loaded, x)
        _ = mean.to("cpu", torch.bfloat16), std.to("cpu", torch.bfloat16)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, {p.stem: first[i] for i, p in enumerate(sorted(src.glob("*.jpg"))[:batch])}


def check_stage_output(out: Path, expected: dict[str, torch.Tensor]) -> float:
    """The stage's stored means against the bare pass's for the same images: the worst relative
    error (norm of the difference over norm of the bare mean). bf16 rounding and the batch
    composition gave 2% on an H100 (0% on the CPU); another image or unfinished data give about
    100%."""
    from safetensors.torch import load

    from curate.shards import committed_shards, iter_tar_samples

    stored = {}  # by the source file's stem: make_images captions img_00012.jpg "image number 12"
    for shard in committed_shards(out):
        for _, members in iter_tar_samples(shard.tar_path):
            number = int(members["orig.txt"].decode().rsplit(" ", 1)[-1])
            stored[f"img_{number:05d}"] = load(members["latent.safetensors"])["mean"]
    worst = 0.0
    for stem, want in expected.items():
        if stem not in stored:
            raise SystemExit(f"the stage wrote no latent for {stem}")
        diff = (stored[stem].float() - want.float()).norm() / want.float().norm()
        worst = max(worst, float(diff))
    print(f"# stage output against the bare encode, first {len(expected)} images: worst relative error "
          f"{worst:.2%}", flush=True)
    if worst > 0.1:
        raise SystemExit("the stage's latents differ from the bare encode of the same images")
    return worst


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive_run(src: Path, vae: Path, out: Path, resolution: int, device: str = "cpu") -> float:
    import torchvision.transforms.functional as F

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    from diffusers import AutoencoderKL

    start = time.perf_counter()
    model = AutoencoderKL.from_pretrained(vae).eval().to(device)
    paths = sorted(src.glob("*.jpg"))
    with torch.inference_mode():
        for i, path in enumerate(paths):
            if i == 1:
                first = time.perf_counter()
            img = Image.open(path).convert("RGB")
            img = F.center_crop(F.resize(img, resolution), resolution)
            x = (F.to_tensor(img)[None] * 2 - 1).to(device)
            dist = model.encode(x).latent_dist
            torch.save({"mean": dist.mean[0].to(torch.bfloat16), "std": dist.std[0].to(torch.bfloat16)},
                       out / f"{path.stem}.pt")
    end = time.perf_counter()
    return Timing(end - start, (len(paths) - 1) / (end - first))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="images for the full-size VAE runs")
    parser.add_argument("--tiny-images", type=int, default=400, help="images for the tiny VAE runs")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine (bench/gpu.sh)")
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the stage with --compile")
    parser.add_argument("--vae-dtypes", default="float32,bfloat16",
                        help="the full-size VAE's weights (--vae-dtype) to time, comma-separated")
    args = parser.parse_args()
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU ({len(os.sched_getaffinity(0))} cores, {platform.machine()})")
    print(f"# bench/encode_latents.py: {args.resolution} px, batch {args.batch_size}, {where}, "
          f"{args.decode_workers} decode workers, torch {torch.__version__}")
    print("| VAE | images | stage images/s: whole run, steady | bare VAE images/s | naive loop images/s: "
          "whole run, steady | stage / bare: steady (whole) | stage / naive: steady (whole) | "
          "stage's main process: CPU ms per image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)

    def row(label: str, n: int, stage: Timing, bare_rate: float | None, naive: Timing | None) -> None:
        # One row at a time: a run cut off by a time limit (bench/gpu.sh) keeps what it measured.
        versus_bare = f"{stage.steady / bare_rate:.2f} ({n / stage.seconds / bare_rate:.2f})" if bare_rate else "-"
        naive_rate = f"{n / naive.seconds:.2f}, {naive.steady:.2f}" if naive else "-"
        versus_naive = f"{stage.steady / naive.steady:.2f} ({naive.seconds / stage.seconds:.2f})" if naive else "-"
        print(f"| {label} | {n} | {n / stage.seconds:.2f}, {stage.steady:.2f} | "
              f"{f'{bare_rate:.2f}' if bare_rate else '-'} | {naive_rate} | {versus_bare} | {versus_naive} | "
              f"{stage.main_cpu_ms:.2f} |", flush=True)
        if stage.gap_ms:
            print(f"<!-- {label}: between encoder calls, median {stage.gap_ms[0]:.1f} ms within a shard, "
                  f"{stage.gap_ms[1]:.1f} ms across a shard's end -->", flush=True)

    if args.device.startswith("cuda"):
        # The CUDA context and cuDNN load once per process, seconds on a fresh one: before any
        # timed run, rather than inside whichever comes first.
        x = torch.zeros(1, 3, 8, 8, device=args.device)
        torch.nn.functional.conv2d(x, torch.zeros(4, 3, 3, 3, device=args.device))
        _sync(args.device)
    vae_dtypes = [d for d in args.vae_dtypes.split(",") if d != "float32"]  # float32: the first row, always
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = full_size_flux_vae(tmp / "flux-full")
        tiny = build_tiny_flux_vae(tmp / "flux-tiny")
        bare_rate = None
        for label, vae, n in (("full-size Flux VAE", full, args.images), ("tiny Flux VAE", tiny, args.tiny_images)):
            src = tmp / f"src-{n}"
            make_images(src, n, 640)
            images = tmp / f"images-{n}"
            run_stage(IngestStage(FolderSource(src), images, shard_size=max(8, n // 4)), images, progress=False)
            stage = stage_run(images, vae, tmp / "latents", args.resolution, args.batch_size, args.device,
                              args.decode_workers)
            naive = naive_run(src, vae, tmp / "naive", args.resolution, args.device)
            if vae == full:
                bare, expected = bare_run(src, vae, args.resolution, args.batch_size, args.device)
                bare_rate = n / bare
                check_stage_output(tmp / "latents", expected)
            row(label, n, stage, bare_rate if vae == full else None, naive)
            if args.compile and vae == full:
                compiled = stage_run(images, vae, tmp / "latents", args.resolution, args.batch_size,
                                     args.device, args.decode_workers, compile=True)
                row(f"{label}, --compile", n, compiled, bare_rate, naive)
            for vae_dtype in vae_dtypes if vae == full else ():
                # Other weights, against the bare pass with the same weights; the naive loop
                # stays float32, as people write it.
                other = stage_run(images, vae, tmp / "latents", args.resolution, args.batch_size, args.device,
                                  args.decode_workers, vae_dtype=vae_dtype)
                bare, expected = bare_run(src, vae, args.resolution, args.batch_size, args.device, vae_dtype)
                check_stage_output(tmp / "latents", expected)
                row(f"{label}, --vae-dtype {vae_dtype}", n, other, n / bare, naive)
        # What the pipeline feeds when the encoder costs nothing (the full-size VAE's latent
        # shape, the tiny runs' images): above the bare rate, the encoder is what limits the
        # stage; near the stage's own rate, the pipeline is.
        free = stage_run(images, full, tmp / "latents", args.resolution, args.batch_size, args.device,
                         args.decode_workers, free_encoder=True)
        row("the stage, encoder replaced by zeros", n, free, bare_rate, None)
        if not args.device.startswith("cuda"):
            # A GPU's stage / bare, emulated on the CPU: an encoder that takes 5 ms per image and
            # no CPU. The stage should reach its 200 images/s; what it loses is the time its main
            # process spends on other things while no batch is being encoded.
            emulated = stage_run(images, full, tmp / "latents", args.resolution, args.batch_size, args.device,
                                 args.decode_workers, free_encoder=True, wait_per_image=0.005)
            row("the stage, encoder replaced by a 5 ms/image wait", n, emulated, 200.0, None)


if __name__ == "__main__":
    main()
