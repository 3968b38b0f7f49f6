"""FSDP: the denoiser's weights, gradients and optimizer state split over the ranks (``fsdp=true``).

DDP keeps a whole copy per GPU: fp32 weights, their gradients and AdamW's two moments, 16 bytes a
parameter (19 GB for PRX-1.2B, 112 GB for a 7B model), before any activation. With torch's FSDP2
(``fully_shard``) each rank holds 1/N of each, gathers a unit's weights just before the unit runs
and frees them after, and reduce-scatters its gradients.

The units: each transformer block, and each other part of the denoiser that holds weights (the
patch and text projections, the timestep MLP, the final layer...), and REPA's projector. The
training forward (train/routing.py) calls those parts directly rather than through the model's own
forward, so each must gather its own weights. Numerics are DDP's: fp32 weights gathered as they
are, bf16 autocast on top.

Checkpoints hold the full tensors in DDP's format (gathered on every rank, written by the main
one), so a run may switch between DDP and FSDP or change its rank count on resume, and export,
evaluate and ``--init-from`` read them as ever. Whatever runs the denoiser runs on every rank: the
sample grids (the main rank decodes and writes them) and the validation loss.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_finite", "full_tensors", "gathered_optimizer_state", "gradient_sync", "shard", "shard_like",
           "sharded_optimizer_state"]


def shard(model: torch.nn.Module, *others: torch.nn.Module | None) -> list[torch.nn.Module]:
    """Shard ``model`` (each block, then each other child that holds weights) and ``others``, in
    place; the units, whose gradient synchronisation :func:`gradient_sync` turns off and on.

    Parameters are replaced by sharded ones: build the optimizer and the EMA afterwards."""
    from torch.distributed.fsdp import fully_shard

    # A PRX block returns the image part of the joint image-and-text sequence, a view, which FSDP2
    # warns about every run: an in-place op on it would skip a gather. Nothing edits a unit's output
    # in place here (train/routing.py's forward included), so the warning says nothing to act on.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    if any(True for _ in model.parameters(recurse=False)):
        raise ValueError(f"{type(model).__name__} holds weights of its own, outside its parts: not shardable here")
    # Each unit is its own root (nothing above them is sharded), and FSDP keeps a root's weights
    # gathered after its forward unless told otherwise: then the weights outside the step (the EMA
    # swapped in for the validation loss and the grids, the checkpoints) would be whole in some
    # units and sharded in others. Every unit frees its gathered weights after its forward.
    parts = [*model.blocks, *(child for name, child in model.named_children()
                              if name != "blocks" and any(True for _ in child.parameters())), *others]
    return [fully_shard(part, reshard_after_forward=True) for part in parts if part is not None]


@contextlib.contextmanager
def gradient_sync(units: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Gradients reduce-scattered in this backward (the last micro-batch of a step) or kept local
    and accumulated (the others), as DDP's ``no_sync``."""
    if enabled or not units:
        yield
        return
    for unit in units:
        unit.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True)


def _full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict with every sharded tensor gathered whole (a collective: every rank calls it,
    in the same order), moved to the CPU."""
    return {k: (_full(v).cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors: what a DDP run's holds (collective)."""
    state = optimizer.state_dict()
    return {"state": {i: full_tensors(s) for i, s in state["state"].items()}, "param_groups": state["param_groups"]}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` split as ``like`` is (a DTensor), or ``full`` itself when ``like`` is a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A whole (DDP-format) optimizer state split as ``optimizer``'s sharded parameters are: each
    per-parameter tensor of the parameter's shape (AdamW's moments, Muon's momentum) is sharded,
    scalars (the step count) are kept."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, entry in state["state"].items():
        param = params[int(i)]
        out[i] = {k: shard_like(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                  for k, v in entry.items()}
    return {"state": out, "param_groups": state["param_groups"]}


def all_finite(params: list[torch.Tensor]) -> bool:
    """Whether every weight is finite, on every rank's shard (all ranks get the same answer)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    flag = torch.stack([p.detach().isfinite().all() for p in local]).all().to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)
