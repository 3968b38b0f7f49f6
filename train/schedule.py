"""The learning-rate schedule: linear warm-up, then constant (PRX's baseline) or a decay.

    factor(s) = (s + 1) / warmup                     s < warmup
              = 1                                    s < decay_start
              = floor + (1 - floor) * shape(p)       p = (s - decay_start) / (steps - decay_start)

for the update of optimizer step ``s`` (from 0), with ``floor = optim.min_lr_ratio`` and
``shape`` one of ``linear`` (1 - p), ``cosine`` ((1 + cos(pi p)) / 2) or ``1-sqrt`` (1 - sqrt(p)).
``optim.decay_steps=0`` decays over every step after the warm-up (the usual cosine schedule);
``N`` keeps the LR constant and decays over the last N steps only: warm-up, stable, decay
("WSD"; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training beyond Fixed Training
Durations", found that a constant LR with a short cool-down matches cosine, and 1-sqrt beats
linear). Because
only the last steps decay, a run extended before its decay began (``steps=`` on resume) goes on
exactly as if it had been planned that long.

The factor is a pure function of the step and the config, so a resumed run recomputes it, and a
changed ``steps`` moves the decay with it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from train.config import OptimConfig

DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


def decay_start(optim: OptimConfig, steps: int) -> int:
    """The first step whose LR decays (``steps`` when nothing decays)."""
    if optim.decay == "none":
        return steps
    return steps - optim.decay_steps if optim.decay_steps > 0 else optim.warmup_steps


def lr_factor(step: int, optim: OptimConfig, steps: int) -> float:
    """The multiple of ``lr`` that optimizer step ``step`` (counted from 0) of a ``steps``-step run uses."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    start = decay_start(optim, steps)
    if optim.decay == "none" or step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(steps - start, 1))  # the step after the last: the floor
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * DECAY_SHAPES[optim.decay](progress)


def build_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                   steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule over every parameter group. The factor is a closure, not an object, so the
    checkpoint stores only the step count and a resumed run's config decides the rest."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, steps))


def restore_schedule(schedule: torch.optim.lr_scheduler.LambdaLR, saved: dict[str, Any]) -> None:
    """Continue a checkpoint's schedule: its step count, and this run's LR for the next update.

    The optimizer's restored state holds the LR that the checkpointed run's schedule set for that
    update, and loading a schedule does not touch it; where the decay keys changed on resume (a
    cool-down added late) the next update would run at the old LR, one step before the new factor
    took over."""
    schedule.load_state_dict(saved)
    for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas,
                                   strict=True):
        group["lr"] = base * factor(schedule.last_epoch)


def describe(optim: OptimConfig, lr: float, steps: int) -> str:
    """The schedule in one line, for the run's log."""
    text = f"lr {lr:g}, warm-up {optim.warmup_steps} steps, then "
    if optim.decay == "none":
        return text + "constant"
    start = decay_start(optim, steps)
    stable = f"constant until step {start}, then " if start > optim.warmup_steps else ""
    return text + f"{stable}{optim.decay} decay to {optim.min_lr_ratio * lr:g} at step {steps}"
