"""Muon over ranks (train/optim.py): each rank orthogonalises its share of the matrices, against
every rank orthogonalising all of them (what a DDP run did before the work was split).

Each mode runs in its own pair of gloo processes (torchrun, started by this script), one thread
each: a PRXTransformer2DModel of ``--width`` and ``--depth`` laid out as the trainer lays it out
(whole on each rank for DDP, ``train.sharding.shard`` for FSDP), random gradients, and Muon (AdamW
for the non-matrix parameters) as ``--ablation muon`` builds it; the time of ``optimizer.step()``,
the median of ``--steps`` after one warm-up step. The Newton-Schulz FLOPs each rank runs are
counted from the matrices it owns; the optimizer state each rank holds is counted from its tensors.

    python bench/muon.py [--width 768] [--depth 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from sharding import on_two_ranks, send_rows  # noqa: E402

MODES = {"ddp-every-rank-all": "DDP, every rank orthogonalises every matrix",
         "ddp": "DDP, each rank its share (broadcast)", "fsdp": "FSDP, each rank its share (gather, scatter)"}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from diffusers import PRXTransformer2DModel
    from torch.distributed.tensor import DTensor, distribute_tensor

    from train import optim
    from train.sharding import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=256, hidden_size=args.width,
                                  mlp_ratio=3.5, num_heads=args.width // 64, depth=args.depth, axes_dim=[32, 32])
    if args.mode == "fsdp":
        shard(model)
    if args.mode == "ddp-every-rank-all":
        optim.orthogonalize_shared = lambda updates, params: [optim.orthogonalize(u) for u in updates]
    matrices, others = optim.split_for_muon(model)
    optimizer = optim.MuonAdamW([{"params": matrices, "muon": True}, {"params": others, "muon": False}],
                                lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        grad = torch.randn(p.shape, generator=g)
        p.grad = distribute_tensor(grad, p.device_mesh, p.placements) if isinstance(p, DTensor) else grad
    times = []
    for _ in range(args.steps + 1):
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    owners = optim.deal_out([p.shape for p in matrices], world)
    mine = (args.mode == "ddp-every-rank-all") or None
    flops = sum(optim.newton_schulz_flops(p.shape) for p, o in zip(matrices, owners, strict=True)
                if mine or o == rank)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    state_bytes = sum((v.to_local() if isinstance(v, DTensor) else v).nbytes for v in state)
    row = {"rank": rank, "step_s": statistics.median(times[1:]), "ns_flops": flops, "state": state_bytes,
           "matrices": len(matrices), "muon_params": sum(p.numel() for p in matrices),
           "params": sum(p.numel() for p in model.parameters())}
    send_rows(row, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    results = on_two_ranks(__file__, list(MODES), ["--width", str(args.width), "--depth", str(args.depth),
                                                   "--steps", str(args.steps)])
    first = results["ddp"][0]
    print(f"# bench/muon.py: PRXTransformer2DModel width {args.width}, depth {args.depth} "
          f"({first['params'] / 1e6:.1f}M parameters, {first['matrices']} matrices for Muon, "
          f"{first['muon_params'] / 1e6:.1f}M), 2 gloo ranks of 1 thread, median of {args.steps} steps; "
          f"torch {torch.__version__}")
    print("| mode | rank | Newton-Schulz GFLOP | optimizer state MB | optimizer.step() s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    slowest = {}
    for mode, rows in results.items():
        for r in rows:
            print(f"| {MODES[mode]} | {r['rank']} | {r['ns_flops'] / 1e9:.1f} | {r['state'] / 1e6:.1f} | "
                  f"{r['step_s']:.3f} |")
        slowest[mode] = max(r["step_s"] for r in rows)
    every = slowest["ddp-every-rank-all"]
    print(f"\nstep time, every rank all / each its share (slowest rank): DDP {every / slowest['ddp']:.2f}x, "
          f"FSDP {every / slowest['fsdp']:.2f}x")
    loads = [r["ns_flops"] for r in results["ddp"]]
    print(f"Newton-Schulz FLOPs, busiest rank / an even split: {max(loads) / (sum(loads) / len(loads)):.3f}")


if __name__ == "__main__":
    main()
