"""The optimizer: AdamW (the PRX baseline), or Muon for the blocks' matrices plus AdamW for the rest.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) updates a weight
matrix with the orthogonalised momentum of its gradient: Newton-Schulz iterations push every
singular value of the update towards 1, so no direction of the matrix dominates the step. It is
meant for the hidden layers' matrices only; the input projections (image patches, text, time),
the output layer, biases and norm gains keep AdamW. Each Muon update is scaled by
``0.2 * sqrt(max(rows, cols))``, which gives it the root-mean-square size of an AdamW update, so
the run's ``lr`` (and weight decay) serve both halves, and a schedule scales both alike.

One optimizer holds both kinds of parameter groups, so the LR schedule, gradient clipping and the
checkpoint's ``optimizer`` state work as for AdamW.

Over several ranks the orthogonalisation, the costly part (20 to 30 FLOPs per parameter for each
row of the matrix's shorter side: for PRX-1.2B 47.9 TFLOP a step, 0.28 of the forward and backward
of 128 samples at 256 px, whatever the batch), is split: each matrix has an owner rank (the matrices dealt out by cost, the same on
every rank), which alone runs Newton-Schulz on it. With DDP every rank holds the whole reduced
momentum and the owner broadcasts its result; with FSDP (train/sharding.py) each rank holds a block
of rows of the momentum, the owner gathers the blocks, orthogonalises the whole matrix and scatters
the result's rows back. Either way each rank updates the weights it holds with exactly what one
process would compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as adamw_step

from train.config import TrainConfig

# Keller Jordan's quintic Newton-Schulz coefficients (also torch.optim.Muon's): they maximise
# the slope at zero, so 5 iterations bring singular values into about [0.7, 1.2], which trains
# as well as exact orthogonalisation.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, *, fused: bool = False,
                    extra: list[torch.nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s parameters (``optim.name``: adamw or muon).

    ``extra``, when given (REPA's projector; possibly empty), becomes the last parameter group,
    always updated with AdamW.
    """
    common = {"lr": cfg.lr, "betas": tuple(cfg.optim.betas), "eps": cfg.optim.eps,
              "weight_decay": cfg.optim.weight_decay}
    tail = [] if extra is None else [{"params": extra, "muon": False}]
    if cfg.optim.name == "adamw":
        groups = [{"params": list(model.parameters())}, *({"params": g["params"]} for g in tail)]
        return torch.optim.AdamW(groups, **common, fused=fused)  # fused: one kernel for all parameters (CUDA)
    matrices, others = split_for_muon(model)
    return MuonAdamW([{"params": matrices, "muon": True}, {"params": others, "muon": False}, *tail],
                     momentum=cfg.optim.muon_momentum, **common)


def split_for_muon(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the transformer blocks' weight matrices, every other parameter).

    PRXTransformer2DModel keeps its hidden layers in ``blocks``; ``img_in``, ``txt_in``,
    ``time_in`` and ``final_layer`` are its input and output layers, which Muon is not for.
    """
    matrices, others = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (matrices if p.ndim == 2 and name.startswith("blocks.") else others).append(p)
    if not matrices:
        raise ValueError("optim.name=muon found no weight matrices under 'blocks.' in the denoiser")
    return matrices, others


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz iterations towards ``U V^T`` of ``update = U S V^T``, in bf16 (as Muon does:
    the iteration tolerates it and runs at tensor-core speed)."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b g + c g^2) x
    return x.T if tall else x


def newton_schulz_flops(shape: tuple[int, ...] | torch.Size, steps: int = NS_STEPS) -> int:
    """The multiply-add FLOPs of :func:`orthogonalize` on a matrix of ``shape``: per step, two
    products with the Gram matrix of the shorter side ``m`` (``4 m^2 n``) and its square (``2 m^3``)."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


def deal_out(shapes: list[tuple[int, ...] | torch.Size], ranks: int) -> list[int]:
    """An owner rank per matrix: the costliest first, each to the least loaded rank (ties to the
    lowest rank), so every rank gets about the same Newton-Schulz work; the same on every rank."""
    load, owners = [0] * ranks, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-newton_schulz_flops(shapes[i]), i)):
        owners[i] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[i]] += newton_schulz_flops(shapes[i])
    return owners


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's part on this rank: the tensor itself, or a sharded DTensor's local rows (a view,
    so in-place changes reach the DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _row_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return False
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or t.device_mesh.size() != dist.get_world_size():
        raise ValueError(f"Muon takes whole matrices or ones split by rows over every rank (FSDP's), not "
                         f"placements {t.placements} over a {t.device_mesh.ndim}-d mesh of {t.device_mesh.size()} ranks")
    return True


def orthogonalize_shared(updates: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`orthogonalize` of each update, its part on this rank, the work split over the ranks.

    ``updates[i]`` is this rank's part of a matrix laid out as ``params[i]`` is: whole (one
    process, or DDP, where every rank holds the same values) or the local rows of a DTensor (FSDP).
    Every rank calls this with the same matrices in the same order (it runs collectives).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return [orthogonalize(u) for u in updates]
    rank = dist.get_rank()
    owners = deal_out([p.shape for p in params], world)
    results: list[torch.Tensor | None] = [None] * len(updates)
    sharded = [_row_sharded(p) for p in params]
    # FSDP: each owner gathers its matrices' row blocks (padded to a whole chunk: torch.chunk's
    # split, which DTensor's Shard(0) uses, leaves the last ranks fewer rows or none).
    gathered: dict[int, tuple[list[torch.Tensor] | None, torch.Tensor, Any]] = {}
    for i, (update, param) in enumerate(zip(updates, params, strict=True)):
        if sharded[i]:
            group = param.device_mesh.get_group()
            chunk = -(-param.shape[0] // world)
            block = update.new_zeros((chunk, param.shape[1]), dtype=torch.bfloat16)
            block[: update.shape[0]] = update
            blocks = [torch.empty_like(block) for _ in range(world)] if owners[i] == rank else None
            work = dist.gather(block, blocks, group=group, group_dst=owners[i], async_op=True)
            gathered[i] = (blocks, block, work)  # the block too: alive until it is sent
    pending = []
    for i, (update, param) in enumerate(zip(updates, params, strict=True)):
        mine = owners[i] == rank
        if not sharded[i]:  # DDP: the owner's result to every rank
            # contiguous: a tall matrix's result is a transpose, whose memory order the receiver would not know
            result = (orthogonalize(update).contiguous() if mine
                      else torch.empty(param.shape, dtype=torch.bfloat16, device=update.device))
            results[i] = result
            pending.append(dist.broadcast(result, group_src=owners[i], async_op=True))
            continue
        blocks, _, work = gathered[i]
        chunk = -(-param.shape[0] // world)
        pieces = None
        if mine:
            work.wait()
            whole = orthogonalize(torch.cat(blocks)[: param.shape[0]])
            padded = whole.new_zeros((chunk * world, whole.shape[1]))
            padded[: whole.shape[0]] = whole
            pieces = list(padded.split(chunk))
        received = update.new_empty((chunk, param.shape[1]), dtype=torch.bfloat16)
        results[i] = received[: update.shape[0]]
        pending.append(dist.scatter(received, pieces, group=param.device_mesh.get_group(),
                                    group_src=owners[i], async_op=True))
    for work in [*pending, *(w for _, _, w in gathered.values())]:
        work.wait()
    return results


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups with ``muon=True``, AdamW (as ``torch.optim.AdamW``) for the others.

    Muon's step, for a matrix ``W`` with gradient ``G``: momentum ``B = momentum * B + (1 -
    momentum) * G``, Nesterov look-ahead ``U = G + momentum * (B - G)``, then ``W -= lr * wd * W``
    and ``W -= lr * 0.2 * sqrt(max(rows, cols)) * orthogonalize(U)``.
    """

    def __init__(self, params: Iterable[dict[str, Any]], *, lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-15, weight_decay: float = 0.0, momentum: float = 0.95):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "momentum": momentum, "muon": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon updates weight matrices only (2-d parameters)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrices, updates = [], []
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw([p for p in group["params"] if p.grad is not None], group)
                continue
            for p in group["params"]:
                if p.grad is not None:
                    matrices.append((p, group))
                    updates.append(self._nesterov_momentum(p, group))
        orthogonal = orthogonalize_shared(updates, [p for p, _ in matrices])
        for (p, group), update in zip(matrices, orthogonal, strict=True):
            weights = _local(p)
            weights.mul_(1 - group["lr"] * group["weight_decay"])
            weights.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))
        return loss

    def _nesterov_momentum(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Muon's momentum step; the Nesterov look-ahead to orthogonalise (this rank's part)."""
        state, momentum = self.state[p], group["momentum"]
        if not state:  # p's layout: a DTensor with FSDP, so the checkpoint code gathers and splits it
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad, buffer = _local(p.grad), _local(state["momentum_buffer"])
        buffer.lerp_(grad, 1 - momentum)
        return grad.lerp(buffer, momentum)

    def _adamw(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        """torch's own AdamW step (its functional form: one multi-tensor kernel per operation on a
        GPU rather than one per parameter), on state kept as ``torch.optim.AdamW`` keeps it."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        adamw_step(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [], [s["step"] for s in states], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
