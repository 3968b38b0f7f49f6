"""Activation checkpointing (`train activation_checkpointing=N`): what it saves in memory and
costs in time per training step, measured in one run.

The step is the trainer's: PRXTransformer2DModel called through train.routing.RoutedDenoiser
(the forward `train` runs when blocks are recomputed), the flow-matching loss, backward, AdamW.
Each setting (0 = every activation stored, 2 = every other block recomputed, 1 = every block)
runs in its own process, so that the process's peak resident memory is its own; the memory of a
step is that peak minus the resident memory before the first step (model, data and optimizer
built, AdamW's moments allocated). Settings run interleaved (0, 2, 1, 0, 2, 1...) ``--repeats``
times; the table gives the medians and every run.

The default model is mid-sized so that a CPU step takes about a second: 6 blocks of width 384 at
1,024 tokens a sample (a 512 px image of Flux latents, 2x2 patches), 2 samples a step; on a GPU
(``--device cuda``) bf16 autocast as `train`, and the peak is torch.cuda.max_memory_allocated.

    python bench/recompute.py [--repeats 3] [--steps 4] [--side 64] [--batch 2] [--depth 6] [--width 384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.recompute import recomputed  # noqa: E402

SETTINGS = (0, 2, 1)


def resident_mb() -> float:
    """The process's peak resident memory so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_setting(args: argparse.Namespace) -> dict[str, float]:
    """Train ``args.steps`` steps (after one untimed) with ``args.every``; seconds a step and step memory."""
    from diffusers import PRXTransformer2DModel

    from train import flow
    from train.routing import RoutedDenoiser

    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:  # built where it runs: PRX-1.2B's initialisation on a CPU would take a minute a process
        model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=64, hidden_size=args.width,
                                      mlp_ratio=3.5, num_heads=args.width // 64, depth=args.depth,
                                      axes_dim=[32, 32]).train()
    net = RoutedDenoiser(model, args.every)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15)
    for p in model.parameters():  # AdamW's moments now, so that they are not counted as the step's
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.batch, 16, args.side, args.side, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.rand(args.batch, generator=g).to(device)
    context = torch.randn(args.batch, 32, 64, generator=g).to(device)
    mask = torch.ones(args.batch, 32, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        x_t = flow.interpolate(x0, noise, t)
        with autocast:
            out = net(hidden_states=x_t, timestep=t, encoder_hidden_states=context, attention_mask=mask)[0]
        loss = (out.float() - flow.velocity_target(x0, noise)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = resident_mb()
    try:
        step()  # untimed: first allocations
        seconds = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loss = step()  # float() waits for the device
            seconds.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:  # a result too: this setting does not fit
        return {"oom": True}
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else resident_mb()
    return {"step_s": statistics.median(seconds), "memory_mb": peak - before, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run, after one untimed")
    parser.add_argument("--side", type=int, default=64, help="latent side (64: a 512 px image's Flux latent)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=384, help="hidden size, a multiple of 64 (heads of 64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--every", type=int, default=None, help=argparse.SUPPRESS)  # a child process's setting
    args = parser.parse_args()
    if args.every is not None:
        print(json.dumps(one_setting(args)))
        return

    started = time.perf_counter()
    tokens = (args.side // 2) ** 2
    print(f"# bench/recompute.py on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
          f"{args.device}, torch {torch.__version__}: PRXTransformer2DModel depth {args.depth}, width "
          f"{args.width}, {tokens} tokens x {args.batch} samples a step, AdamW; {args.steps} timed steps "
          f"a run, {args.repeats} runs a setting, interleaved")
    runs: dict[int, list[dict[str, float]]] = {every: [] for every in SETTINGS}
    child = [sys.executable, __file__, *sys.argv[1:]]
    for _ in range(args.repeats):
        for every in SETTINGS:
            done = subprocess.run([*child, "--every", str(every)], check=True, capture_output=True, text=True)
            runs[every].append(json.loads(done.stdout.strip().splitlines()[-1]))
    def median(every: int, key: str) -> float | None:
        done = [r[key] for r in runs[every] if "oom" not in r]
        return statistics.median(done) if done else None

    print("| activation_checkpointing | blocks recomputed | s/step (median) | runs | step memory MB (median) "
          "| runs | time / none | memory / none |")
    print("| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |")
    base_s, base_mb = median(0, "step_s"), median(0, "memory_mb")
    for every in SETTINGS:
        step_s, memory = median(every, "step_s"), median(every, "memory_mb")
        count = sum(recomputed(i, every) for i in range(args.depth))
        if step_s is None:
            print(f"| {every} | {count} of {args.depth} | out of memory | | | | | |")
            continue
        ratios = (f"{step_s / base_s:.2f}x | {memory / base_mb:.2f}x" if base_s is not None
                  else "- | - (none: out of memory)")
        print(f"| {every} | {count} of {args.depth} | {step_s:.3f} | "
              + ", ".join(f"{r['step_s']:.3f}" for r in runs[every] if "oom" not in r)
              + f" | {memory:.0f} | " + ", ".join(f"{r['memory_mb']:.0f}" for r in runs[every] if "oom" not in r)
              + f" | {ratios} |")
    losses = {every: runs[every][0]["loss"] for every in SETTINGS if "oom" not in runs[every][0]}
    same = len(set(losses.values())) == 1
    print(f"\nlast loss {' / '.join(f'{v:.6f}' for v in losses.values())} "
          f"({'identical' if same else 'NOT identical'}); total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
