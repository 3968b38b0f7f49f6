"""Muon over 2 gloo ranks against one process (tests/test_ablations.py starts it, with
torch.multiprocessing): light on imports, as each rank is a fresh interpreter.

Each rank first steps plain copies on its own (no process group: the one-process reference), then
joins the group and steps the same matrices twice more: whole on every rank (DDP), and split by rows
as FSDP's DTensors are, through a checkpoint round trip (gathered whole, split again). Both must
equal the reference exactly, with each rank having orthogonalised only its share of the matrices.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from train import optim
from train.optim import MuonAdamW

# Rows that 2 ranks split unevenly (5, 7) or leave one rank without (1), wide and tall matrices.
SHAPES = [(16, 12), (5, 8), (7, 3), (1, 4), (12, 16), (9, 9)]
STEPS = 4
SETTINGS = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "momentum": 0.9}


def _start() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=g) for shape in [*SHAPES, (6,)]]
    grads = [[torch.randn(w.shape, generator=g) for w in weights] for _ in range(STEPS)]
    return weights, grads


def _optimizer(params: list[torch.Tensor]) -> MuonAdamW:
    return MuonAdamW([{"params": params[:-1], "muon": True}, {"params": params[-1:], "muon": False}], **SETTINGS)


def _count_orthogonalize(counter: list[int]) -> None:
    plain = optim.orthogonalize

    def counted(update: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        return plain(update)

    optim.orthogonalize = counted


def run_rank(rank: int, port: int) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

    from train.sharding import gathered_optimizer_state, sharded_optimizer_state

    torch.set_num_threads(1)
    weights, grads = _start()
    reference = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = _optimizer(reference)
    for step in grads:
        for p, g in zip(reference, step, strict=True):
            p.grad = g.clone()
        opt.step()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    counter = [0]
    _count_orthogonalize(counter)
    mesh = init_device_mesh("cpu", (2,))

    whole = [torch.nn.Parameter(w.clone()) for w in weights]  # DDP: every rank holds all of each
    sharded = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in weights]
    ddp_opt, fsdp_opt = _optimizer(whole), _optimizer(sharded)
    for i, step in enumerate(grads):
        if i == 2:  # a checkpoint: the state gathered whole (as a DDP run's), then split again
            saved = gathered_optimizer_state(fsdp_opt)
            assert all(not isinstance(v, DTensor) for s in saved["state"].values() for v in s.values())
            fsdp_opt = _optimizer(sharded)
            fsdp_opt.load_state_dict(sharded_optimizer_state(saved, fsdp_opt))
        for p, q, g in zip(whole, sharded, step, strict=True):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        ddp_opt.step()
        fsdp_opt.step()

    for ref, p, q in zip(reference, whole, sharded, strict=True):
        assert torch.equal(p, ref), (rank, p.shape, (p - ref).abs().max())
        assert torch.equal(q.full_tensor(), ref), (q.full_tensor() - ref).abs().max()
    momenta = gathered_optimizer_state(fsdp_opt)["state"]
    for i, p in enumerate(reference[:-1]):
        assert torch.equal(momenta[i]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    # Each rank ran Newton-Schulz on its share only, twice a step (DDP, FSDP).
    shares = [None, None]
    dist.all_gather_object(shares, counter[0])
    assert sum(shares) == 2 * STEPS * len(SHAPES) and min(shares) > 0, shares
    # Without a barrier, a rank that left all_gather_object first tore its gloo connections down
    # while the other still used them: about 1 run in 20 on 2 cores ended in SIGABRT ("terminate
    # called without an active exception"); with it, none in 110.
    dist.barrier()
    dist.destroy_process_group()
