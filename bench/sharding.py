"""What FSDP (``fsdp=true``, train/sharding.py) saves per rank: the bytes of weights, gradients and
AdamW state that each rank holds after a training step, with DDP and with FSDP, on 2 gloo ranks.

Each mode runs in its own pair of processes (torchrun, started by this script): a
PRXTransformer2DModel of ``--width`` and ``--depth``, wrapped as the trainer wraps it (DDP, or
``train.sharding.shard``), one forward and backward of 2 samples of 16 x 32 x 32 latents with 64
text tokens, one AdamW step. The bytes are counted from the tensors each rank holds (a sharded
tensor's local part), so they do not depend on the machine; the peak resident memory of the step
(over the resident memory once the wrapped model exists) is measured too.

    python bench/sharding.py [--width 768] [--depth 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]


def local_bytes(tensors: list[torch.Tensor]) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from diffusers import PRXTransformer2DModel

    from train.sharding import shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    heads = args.width // 64
    model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=256, hidden_size=args.width,
                                  mlp_ratio=3.5, num_heads=heads, depth=args.depth, axes_dim=[32, 32])
    parameters = sum(p.numel() for p in model.parameters())
    if args.mode == "fsdp":
        shard(model)
        step_model = model
    else:
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = torch.Generator().manual_seed(rank)
    out = step_model(hidden_states=torch.randn(2, 16, 32, 32, generator=g), timestep=torch.rand(2, generator=g),
                     encoder_hidden_states=torch.randn(2, 64, 256, generator=g),
                     attention_mask=torch.ones(2, 64, dtype=torch.bool), return_dict=False)[0]
    out.pow(2).mean().backward()
    optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    row = {"rank": rank, "parameters": parameters, "weights": local_bytes(params),
           "grads": local_bytes([p.grad for p in params if p.grad is not None]), "optimizer": local_bytes(state),
           "step_rss": (peak - before) * 1024}
    send_rows(row, args.out)


def send_rows(row: dict, out: str) -> None:
    """Every rank's ``row``, gathered and written by rank 0 to ``out`` (what :func:`on_two_ranks`
    returns); ends the process group."""
    import torch.distributed as dist

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def on_two_ranks(script: str, modes: list[str], args: list[str]) -> dict[str, list[dict]]:
    """Per mode, ``script --mode MODE --out FILE ARGS`` run by torchrun on 2 gloo ranks of one
    thread each, and the rows its ranks sent (:func:`send_rows`)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            script, "--mode", mode, "--out", str(out), *args], check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
            results[mode] = json.loads(out.read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--mode", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        worker(args)
        return
    results = on_two_ranks(__file__, ["ddp", "fsdp"], ["--width", str(args.width), "--depth", str(args.depth)])
    parameters = results["ddp"][0]["parameters"]
    print(f"# bench/sharding.py: PRXTransformer2DModel width {args.width}, depth {args.depth} "
          f"({parameters / 1e6:.1f}M parameters), 2 gloo ranks, one step of AdamW; torch {torch.__version__}")
    print("| mode | rank | weights MB | gradients MB | AdamW state MB | total MB | bytes / parameter | step peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals = {}
    for mode, rows in results.items():
        for r in rows:
            total = r["weights"] + r["grads"] + r["optimizer"]
            totals.setdefault(mode, []).append(total)
            print(f"| {mode} | {r['rank']} | {r['weights'] / 1e6:.1f} | {r['grads'] / 1e6:.1f} | "
                  f"{r['optimizer'] / 1e6:.1f} | {total / 1e6:.1f} | {total / parameters:.2f} | "
                  f"{r['step_rss'] / 1e6:.0f} |")
    print(f"\nfsdp / ddp, weights + gradients + AdamW state per rank: "
          f"{max(totals['fsdp']) / max(totals['ddp']):.3f}")


if __name__ == "__main__":
    main()
