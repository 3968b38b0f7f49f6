"""`train` fed by its data path against the same step fed from memory, and precomputed latents
against encoding images with the VAE on the fly, measured in one run (CPU).

1. Data path: train() reading real latent shards (written by tests/latent_data.py the way
   `curate encode-latents` writes them: Flux-shaped 16 x 32 x 32 latents of 256 px images,
   stored as bf16 distributions, a fresh draw per sample) against train() fed, through its
   ``data=`` argument, the very same step batches collected beforehand from a LatentLoader
   into memory. Model, captions, text encoding, timesteps and noise are identical: only where
   the batches come from differs. Goal: ratio at least 0.95 (the data path never stalls).
2. Precomputed / on the fly: the same training step fed precomputed latents (in memory)
   against latents computed every step by the full-size Flux VAE architecture (randomly
   initialised: the FLOPs of the real encoder) from 256 px images held in memory as
   preprocessed tensors, then ``curate.vae.to_model_input`` with the latent spec of that
   VAE. Reading and decoding the images is left out, which flatters the on-the-fly side.
3. Ablations: the data-path step fed from memory with each `train --ablation` switched on
   (muon, ema, x-pred, tread, cfm, immiscible; ``--ablations`` picks some) against the same step
   without (the baseline): the cost per step of Muon's Newton-Schulz iterations, the EMA update,
   x-prediction's conversion, contrastive flow matching's second error and immiscible
   diffusion's assignment, and what TREAD's routing (half the tokens skip blocks 1 and 2 of 4)
   saves.
4. Validation: one pass of the validation loss (``val.shards``: ``--val-samples`` held-out
   samples x 8 timesteps, forward passes without gradients, train/validation.py) against the
   memory-fed training step of the same model: what an evaluation every ``val.every`` steps
   costs, and a validation forward's cost against a training sample's forward and backward.

Steps/s come from the trainer's own metrics windows (metrics.jsonl: each window's images/s
and data-wait share), the first window (warm-up: worker start, first allocations) left out.
The two sides of each comparison run interleaved (A, B, A, B...), --repeats times; the table
gives the median and every run, so a disturbance on the machine shows up. Shard and memory
runs must end on the same loss (same batches, same draws): a warning says when they do not.

    python bench/train.py [--quick] [--repeats 3] [--steps 30] [--workers 2] [--threads N]
                          [--comparisons data,vae,ablations,validation] [--ablations muon,ema,...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# The repository ahead of bench/: this file would otherwise shadow the train package.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
sys.path.append(str(Path(__file__).resolve().parent))

from latent_data import make_latent_dataset  # noqa: E402

from curate.buckets import preprocess, to_model_range  # noqa: E402
from curate.manifest import load_manifest  # noqa: E402
from curate.text import TextEncoder  # noqa: E402
from curate.tiny import build_tiny_t5gemma  # noqa: E402
from curate.vae import encode_batch, latent_spec_for, load_vae, sample_latent, to_model_input  # noqa: E402
from train.config import TrainConfig, ValConfig, build_config  # noqa: E402
from train.data import LatentLoader, MicroBatch, StepBatch  # noqa: E402
from train.metrics import read_metrics  # noqa: E402
from train.model import build_denoiser, denoiser_config  # noqa: E402
from train.trainer import data_settings, train  # noqa: E402
from train.validation import ValidationSet  # noqa: E402

DataSource = Callable[[int, int], Iterator[StepBatch]]

# The tiny preset widened so that a step is real CPU compute (5.0M parameters, 256 image tokens
# of 16 px plus 64 text tokens per sample) yet under a second at global batch 16 on 2 cores.
# name -> (train --ablation names, further keys). TREAD routes blocks 1 and 2 of this depth-4
# denoiser (its default, blocks 2 to depth - 2, would route none here).
ABLATION_RUNS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "baseline": ([], {}), "muon": (["muon"], {}), "ema": (["ema"], {}), "x-pred": (["x-pred"], {}),
    "tread": (["tread"], {"routing.start": 1, "routing.end": 3}),
    "cfm": (["cfm"], {}), "immiscible": (["immiscible"], {}),
}
MODEL = {"model.hidden_size": 256, "model.depth": 4, "model.num_heads": 4, "model.axes_dim": [32, 32]}


def config(manifest: Path, out: Path, text: Path, *, steps: int, global_batch: int, micro_batch: int,
           workers: int, every: int, ablations: list[str] | None = None,
           extra: dict[str, Any] | None = None) -> TrainConfig:
    # Shuffle blocks of 2 micro-batches: every stream reads its shards every other batch, so the
    # timed steps read as many samples as they consume (with the preset's 256-sample blocks all
    # reading would fall in the warm-up window of a 30-step run).
    settings = {**MODEL, "text_encoder": str(text), "steps": steps, "global_batch": global_batch,
                "micro_batch": micro_batch, "data.workers": workers, "log.every": every,
                "data.shuffle_buffer": 2 * micro_batch, "log.tensorboard": False,
                "sample_every": 0, "checkpoint_every": steps, **(extra or {})}
    return build_config("tiny", overrides=[f"{k}={v}" for k, v in settings.items()],
                        ablations=ablations, shards=str(manifest), out=str(out))


def run(cfg: TrainConfig, data: DataSource | None = None) -> dict[str, float]:
    """train() with its notes kept off the terminal; steps/s and data-wait share after warm-up."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            train(cfg, data=data)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    return rate(read_metrics(cfg.out), cfg.global_batch)


def rate(metrics: list[dict[str, Any]], global_batch: int) -> dict[str, float]:
    """Steps/s over every metrics window but the first, from the windows' images/s."""
    steps = seconds = waited = 0.0
    for prev, m in zip(metrics, metrics[1:], strict=False):
        n = m["step"] - prev["step"]
        s = global_batch * n / m["images_per_s"]
        steps, seconds, waited = steps + n, seconds + s, waited + s * m["data_wait_share"]
    if not steps:
        raise RuntimeError("no metrics window after the first: raise --steps")
    return {"steps_per_s": steps / seconds, "wait": waited / seconds, "steps": steps,
            "loss": metrics[-1]["loss"]}


def collect(cfg: TrainConfig) -> list[StepBatch]:
    """The step batches train() would read for ``cfg``, read once into memory."""
    settings = data_settings(cfg)  # exactly the settings train() reads with
    manifest = load_manifest(cfg.shards)
    batches = []
    with LatentLoader(manifest, cfg.shards, settings) as loader:
        for batch, _ in zip(loader, range(cfg.steps), strict=False):
            batches.append(StepBatch(batch.step, [dataclasses.replace(m, latents=m.latents.clone())
                                                  for m in batch.micro]))
    return batches


def from_memory(batches: list[StepBatch]) -> DataSource:
    return lambda start, rank: iter(batches[start:])


def on_the_fly(batches: list[StepBatch], images: torch.Tensor, vae_dir: Path, seed: int) -> DataSource:
    """The same step batches (captions, keys), their latents encoded from ``images`` each step."""
    loaded = load_vae(str(vae_dir), device="cpu")
    side = images.shape[-1]
    spec = latent_spec_for(loaded, stored="dist", dtype="bfloat16", resolution=side,
                           buckets=[(side, side)])

    def source(start: int, rank: int) -> Iterator[StepBatch]:
        g = torch.Generator().manual_seed(seed)
        cursor = 0
        for batch in batches[start:]:
            micro = []
            for m in batch.micro:
                n = m.latents.shape[0]
                idx = [(cursor + i) % len(images) for i in range(n)]
                cursor += n
                mean, std = encode_batch(loaded, images[idx])
                x = to_model_input(sample_latent(mean, std, g), spec).float().contiguous()
                if x.shape != m.latents.shape:
                    raise RuntimeError(f"on-the-fly latents {list(x.shape)} vs stored {list(m.latents.shape)}")
                micro.append(MicroBatch(x, m.captions, m.keys, m.variants, m.fallbacks))
            yield StepBatch(batch.step, micro)

    return source


def interleaved(runs: dict[str, Callable[[int], dict[str, float]]], repeats: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name].append(fn(r))
            print(f"  {name} #{r + 1}: {results[name][-1]['steps_per_s']:.3f} steps/s "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return results


def median(results: list[dict], key: str = "steps_per_s") -> float:
    return statistics.median(r[key] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, few steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="data-path steps per run (first window is warm-up)")
    parser.add_argument("--every", type=int, default=5, help="steps per metrics window")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the shard runs")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=3, help="timed steps of the VAE comparison")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads of the training process (default: one per core)")
    parser.add_argument("--comparisons", default="data,vae,ablations,validation",
                        help="which comparisons, comma-separated: data, vae, ablations, validation")
    parser.add_argument("--val-samples", type=int, default=64, help="held-out samples of the validation pass")
    parser.add_argument("--ablations", default=",".join(ABLATION_RUNS),
                        help="the ablations compared with the baseline (always run), comma-separated")
    args = parser.parse_args()
    chosen = ["baseline", *[a for a in args.ablations.split(",") if a and a != "baseline"]]
    if set(chosen) - set(ABLATION_RUNS):
        parser.error(f"--ablations takes {', '.join(ABLATION_RUNS)}, not {args.ablations!r}")
    wanted = set(args.comparisons.split(","))
    if not wanted or wanted - {"data", "vae", "ablations", "validation"}:
        parser.error(f"--comparisons takes data, vae, ablations and validation, not {args.comparisons!r}")
    if args.quick:
        args.repeats, args.steps, args.every, args.vae_steps = 1, 10, 5, 1
    torch.set_num_threads(args.threads)
    side, grid = 256, 32
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = build_tiny_t5gemma(tmp / "t5gemma")

        # 1. Real shards against the same step batches in memory.
        data = make_latent_dataset(tmp / "latents", shards=args.shards, per_shard=args.per_shard,
                                   channels=16, sizes=[(grid, grid)], stored="dist", dtype="bfloat16")
        base = dict(steps=args.steps, global_batch=16, micro_batch=8, workers=args.workers, every=args.every)
        batches = collect(config(data["mix"], tmp / "collect", text, **base))
        data_runs = ablation_runs = vae_runs = val_runs = None
        if "data" in wanted:
            data_runs = interleaved({
                "shards": lambda r: run(config(data["mix"], tmp / f"shards-{r}", text, **base)),
                "memory": lambda r: run(config(data["mix"], tmp / f"memory-{r}", text, **base),
                                        from_memory(batches)),
            }, args.repeats)

        # 3. Each ablation against the baseline, the same batches from memory.
        if "ablations" in wanted:
            ablation_runs = interleaved({
                name: lambda r, name=name, names=names, extra=extra: run(
                    config(data["mix"], tmp / f"{name}-{r}", text, **base, ablations=names, extra=extra),
                    from_memory(batches))
                for name, (names, extra) in ABLATION_RUNS.items() if name in chosen}, args.repeats)

        if "vae" in wanted:
            vae_runs = compare_vae(tmp, text, args, side, grid)

        if "validation" in wanted:
            val_runs = compare_validation(config(data["mix"], tmp / "val", text, **base), text, batches, args)

    report(args, side, grid, started, data_runs, vae_runs, ablation_runs, val_runs)


def compare_validation(cfg: TrainConfig, text: Path, batches: list[StepBatch],
                       args: argparse.Namespace) -> dict[str, list[float]]:
    """4. Seconds per validation pass and per training step (fed from memory), interleaved."""
    manifest = load_manifest(cfg.shards)
    encoder = TextEncoder.load(str(text), device="cpu", max_tokens=cfg.max_tokens)
    val_cfg = dataclasses.replace(cfg, val=ValConfig(shards=cfg.shards, samples=args.val_samples, timesteps=8))
    held_out = ValidationSet.load(val_cfg, manifest, encoder.encode)
    model = build_denoiser(denoiser_config(cfg.model, manifest.latent, encoder.dim), seed=0)
    off = torch.autocast("cpu", enabled=False)
    held_out.loss(model, device=torch.device("cpu"), weights_dtype=torch.float32, autocast=off)  # warm-up
    results: dict[str, list[float]] = {"pass": [], "step": []}
    for r in range(args.repeats):
        start = time.perf_counter()
        held_out.loss(model, device=torch.device("cpu"), weights_dtype=torch.float32, autocast=off)
        results["pass"].append(time.perf_counter() - start)
        steps = run(dataclasses.replace(cfg, out=str(Path(cfg.out) / f"steps-{r}")), from_memory(batches))
        results["step"].append(1 / steps["steps_per_s"])
        print(f"  validation #{r + 1}: {results['pass'][-1]:.2f} s a pass, {results['step'][-1]:.3f} s a step",
              file=sys.stderr, flush=True)
    results["forwards"] = [held_out.samples * held_out.timesteps]
    return results


def compare_vae(tmp: Path, text: Path, args: argparse.Namespace, side: int, grid: int) -> dict[str, list[dict]]:
    """2. Precomputed latents against the full-size Flux VAE encoding on the fly."""
    # Imported here, after the train package: bench/encode_latents.py puts bench/ first on the path.
    from encode_latents import full_size_flux_vae
    from ingest import make_images

    vae_dir = full_size_flux_vae(tmp / "flux-full")
    vae_data = make_latent_dataset(tmp / "vae-latents", shards=2, per_shard=8, channels=16,
                                   sizes=[(grid, grid)], stored="dist", dtype="bfloat16",
                                   vae_dir=vae_dir)
    small = dict(steps=1 + args.vae_steps, global_batch=4, micro_batch=4, workers=0, every=1)
    vae_batches = collect(config(vae_data["mix"], tmp / "vae-collect", text, **small))
    make_images(tmp / "images", 8, 320)
    images = torch.stack([to_model_range(preprocess(p.read_bytes(), resolution=side)[0])
                          for p in sorted((tmp / "images").glob("*.jpg"))])
    fly = on_the_fly(vae_batches, images, vae_dir, seed=0)
    return interleaved({
        "precomputed": lambda r: run(config(vae_data["mix"], tmp / f"pre-{r}", text, **small),
                                     from_memory(vae_batches)),
        "on the fly": lambda r: run(config(vae_data["mix"], tmp / f"fly-{r}", text, **small), fly),
    }, args.repeats)


def report(args: argparse.Namespace, side: int, grid: int, started: float, data_runs: dict | None,
           vae_runs: dict | None, ablation_runs: dict | None, val_runs: dict | None = None) -> None:
    cores = len(os.sched_getaffinity(0))
    n = args.repeats
    print(f"# bench/train.py: {side} px (16 x {grid} x {grid} Flux latents), denoiser "
          f"hidden {MODEL['model.hidden_size']} depth {MODEL['model.depth']}, CPU ({cores} cores, "
          f"{platform.machine()}), torch {torch.__version__}, {args.threads} threads, median of "
          f"{n}, {time.perf_counter() - started:.0f} s in all")
    print("| comparison | fed by | global / micro batch | timed steps | steps/s | each run | data wait | ratio |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")

    def row(comparison: str, label: str, results: list[dict], batch: str, ratio: str) -> None:
        each = ", ".join(f"{r['steps_per_s']:.3g}" for r in results)
        print(f"| {comparison} | {label} | {batch} | {int(results[0]['steps'])} | {median(results):.3g} | "
              f"{each} | {median(results, 'wait'):.1%} | {ratio} |")

    if data_runs:
        shards, memory = data_runs["shards"], data_runs["memory"]
        if any(a["loss"] != b["loss"] for a, b in zip(shards, memory, strict=True)):
            print("WARNING: the shard and memory runs ended on different losses: not the same batches")
        pairs = ", ".join(f"{a['steps_per_s'] / b['steps_per_s']:.3f}" for a, b in zip(shards, memory, strict=True))
        row("data path", f"real shards ({args.workers} workers)", shards, "16 / 8",
            f"**{median(shards) / median(memory):.3f}** (runs: {pairs})")
        row("data path", "same step batches in memory", memory, "16 / 8", "1")
    if vae_runs:
        pre, otf = vae_runs["precomputed"], vae_runs["on the fly"]
        row("VAE", "precomputed latents (in memory)", pre, "4 / 4", f"**{median(pre) / median(otf):.1f}x**")
        row("VAE", "full-size Flux VAE on the fly", otf, "4 / 4", "1")
    if val_runs:
        passes, steps, forwards = val_runs["pass"], val_runs["step"], val_runs["forwards"][0]
        per_pass, per_step = statistics.median(passes), statistics.median(steps)
        print(f"| validation | one pass: {forwards} forwards ({args.val_samples} samples x 8 t), no gradients | "
              f"{args.val_samples} / 8 | - | {per_pass:.3g} s a pass | "
              f"{', '.join(f'{x:.3g}' for x in passes)} | - | **{per_pass / per_step:.1f} steps** |")
        print(f"| validation | training step, from memory | 16 / 8 | - | {per_step:.3g} s a step | "
              f"{', '.join(f'{x:.3g}' for x in steps)} | - | 1 |")
        print(f"\nA validation forward costs **{(per_pass / forwards) / (per_step / 16):.2f}** of a training "
              "sample's forward and backward pass (a step: 16 samples).")
    if not ablation_runs:
        return
    baseline = ablation_runs["baseline"]
    for name in [n for n in ABLATION_RUNS if n in ablation_runs]:
        results = ablation_runs[name]
        names, extra = ABLATION_RUNS[name]
        keys = "".join(f" {k}={v}" for k, v in extra.items())
        label = "in memory, baseline" if name == "baseline" else f"in memory, --ablation {','.join(names)}{keys}"
        row("ablations", label, results, "16 / 8",
            "1" if name == "baseline" else f"**{median(results) / median(baseline):.3f}**")


if __name__ == "__main__":
    main()
