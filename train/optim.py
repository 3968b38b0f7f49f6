"""The optimizer: AdamW (the PRX baseline), or Muon for the blocks' matrices plus AdamW for the rest.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) updates a weight
matrix with the orthogonalised momentum of its gradient: Newton-Schulz iterations push every
singular value of the update towards 1, so no direction of the matrix dominates the step. It is
meant for the hidden layers' matrices only; the input projections (image patches, text, time),
the output layer, biases and norm gains keep AdamW. Each Muon update is scaled by
``0.2 * sqrt(max(rows, cols))``, which gives it the root-mean-square size of an AdamW update, so
the run's ``lr`` (and weight decay) serve both halves, and a schedule scales both alike.

One optimizer holds both kinds of parameter groups, so the LR schedule, gradient clipping and the
checkpoint's ``optimizer`` state work as for AdamW. Every rank sees the same all-reduced gradients
and computes the same update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state, momentum = p.grad, self.state[p], group["momentum"]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)
        update = orthogonalize(grad.lerp(buffer, momentum))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = p.grad, self.state[p]
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
