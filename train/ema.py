"""An exponential moving average of the denoiser's weights (``ema.decay``; PRX's baseline has none).

After every optimizer step ``ema = decay_t * ema + (1 - decay_t) * weights`` with the warm-up
``decay_t = min(decay, (1 + step) / (10 + step))``: early steps move the average quickly, so it
is not stuck near the random initialisation. The average is kept in float32 whatever the weights'
dtype. Sample grids, ``train export`` and ``evaluate`` use it when the run keeps one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from train.checkpoint import CheckpointError
from train.sharding import shard_like


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.weights = [p.detach().float().clone() for p in model.parameters()]

    def decay_at(self, step: int) -> float:
        """The decay of the update that follows optimizer step ``step`` (counted from 0)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        params = [p.detach().float() for p in model.parameters()]  # no copy for fp32 weights
        torch._foreach_lerp_(self.weights, params, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "weights": dict(zip(self.names, self.weights, strict=True))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["weights"]
        shapes = [w.shape for w in saved.values()]
        if list(saved) != self.names or shapes != [w.shape for w in self.weights]:
            raise ValueError("the saved EMA weights belong to another model (their names or shapes differ)")
        for mine, theirs in zip(self.weights, saved.values(), strict=True):
            mine.copy_(shard_like(theirs, mine))  # whole tensors from a checkpoint; split when sharded

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged weights in place of the trained ones."""
        state = model.state_dict()
        for name, weight in zip(self.names, self.weights, strict=True):
            state[name] = weight.to(state[name].dtype)
        return state

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` with the averaged weights for the duration (no copy for fp32 weights)."""
        params = list(model.parameters())
        if any(type(p.data) is not torch.Tensor for p in params):
            # Sharded (FSDP's DTensors): FSDP owns each parameter's storage, so the values are
            # copied in and back rather than the storage swapped (a copy of this rank's shard).
            with torch.no_grad():
                trained = [p.detach().clone() for p in params]
                for p, weight in zip(params, self.weights, strict=True):
                    p.copy_(weight)
                try:
                    yield model
                finally:
                    for p, data in zip(params, trained, strict=True):
                        p.copy_(data)
            return
        trained = [p.data for p in params]
        try:
            for p, weight in zip(params, self.weights, strict=True):
                p.data = weight.to(p.dtype)
            yield model
        finally:
            for p, data in zip(params, trained, strict=True):
                p.data = data


def checkpoint_weights(state: dict[str, Any], weights: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(the denoiser's state dict, "ema" or "raw") from a trainer checkpoint.

    ``weights`` None takes the EMA weights when the run kept them; "ema" requires them.
    """
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights must be ema or raw, not {weights!r}")
    ema = state.get("ema")
    if weights == "ema" and ema is None:
        raise CheckpointError("the checkpoint has no EMA weights (its run had ema.decay=0): use the raw weights")
    if ema is None or weights == "raw":
        return state["model"], "raw"
    model = dict(state["model"])
    for name, weight in ema["weights"].items():
        model[name] = weight.to(model[name].dtype)
    return model, "ema"
