"""Activation checkpointing (``activation_checkpointing=N``): every Nth transformer block keeps
only its inputs in the forward pass and runs again in the backward pass to rebuild the
activations its gradients need.

The activations a block stores for the backward pass grow with tokens x micro-batch (a 1024 px
image is 4,096 tokens): recomputing them costs part of another forward of those blocks and frees
that memory for a larger micro-batch or image. The gradients are the same, bit for bit: the block
runs the same operations on the same inputs again (PyTorch's non-reentrant checkpoint, which
torch.compile traces). A recomputation stops as soon as it has what the backward pass needs, so a
block's forward hooks may not run again: nothing in training relies on them. MFU still counts the model's FLOPs, not the recomputed ones. Cost and memory: BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def recomputed(index: int, every: int) -> bool:
    """Whether block ``index`` (from 0) recomputes its activations with ``activation_checkpointing=every``
    (0: none)."""
    return every > 0 and index % every == 0


def run_block(block: torch.nn.Module, index: int, every: int, **inputs: Any) -> torch.Tensor:
    """``block(**inputs)``, with its activations recomputed in the backward pass when gradients are
    taken and :func:`recomputed` says so."""
    if recomputed(index, every) and torch.is_grad_enabled():
        return checkpoint(block, use_reentrant=False, **inputs)
    return block(**inputs)
