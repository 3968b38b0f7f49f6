"""TREAD token routing (Krause et al. 2025, "TREAD: Token Routing for Efficient Architecture-agnostic
Diffusion Training"): during training a random share of each image's tokens skips the middle
blocks and rejoins, unchanged, before the block after them; the blocks in between see fewer
tokens, so a step costs less, and the loss is still taken over every token.

    tokens -> blocks [0, start) on all -> blocks [start, end) on the kept ones -> rest on all

Which tokens are kept is drawn per sample from the slot's generator (so runs stay independent
of the world size and resume exactly), and the kept tokens keep their own rotary positions.
Sampling, export and evaluation run the plain model on every token: routing is training only.

:func:`routed_forward` is PRXTransformer2DModel's forward with the routing added; with no route
it equals the model's own forward exactly (tested), which guards against diffusers changing it.
Training also calls it, without a route, to recompute blocks in the backward pass
(``activation_checkpointing``, train/recompute.py) and to return the tokens of REPA's block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.config import (  # the range, checked by validate
    TrainConfig,
    routed_blocks,
)
from train.recompute import run_block


@dataclass(frozen=True)
class Route:
    start: int  # first routed block
    end: int  # routed blocks end before this one
    keep: torch.Tensor  # [B, K] indices of the tokens the routed blocks see, ascending


def draw_route(cfg: TrainConfig, n: int, tokens: int, generator: torch.Generator,
               device: torch.device) -> Route:
    """Keep ``round(tokens * (1 - routing.ratio))`` tokens of each of ``n`` samples, uniformly at random."""
    start, end = routed_blocks(cfg)
    kept = max(1, round(tokens * (1.0 - cfg.routing.ratio)))
    keep = torch.rand(n, tokens, generator=generator).argsort(dim=1)[:, :kept].sort(dim=1).values
    return Route(start, end, keep.to(device, non_blocking=True))


def gather_tokens(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Tokens ``keep`` [B, K] of ``x`` [B, N, D] -> [B, K, D]."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))


def routed_forward(model: torch.nn.Module, *, hidden_states: torch.Tensor, timestep: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   route: Route | None = None, recompute_every: int = 0,
                   tokens_of: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PRXTransformer2DModel's forward (its output tensor) with the tokens outside ``route.keep``
    skipping blocks ``[route.start, route.end)``, and every ``recompute_every``-th block's
    activations recomputed in the backward pass (train/recompute.py; 0: none). With
    ``tokens_of=k`` it returns (output, the tokens that left block k), REPA's: inside the routed
    blocks, the kept ones."""
    from diffusers.models.transformers.transformer_prx import get_image_ids, img2seq, seq2img

    txt = model.txt_in(encoder_hidden_states)
    img = model.img_in(img2seq(hidden_states, model.patch_size))
    bs, _, h, w = hidden_states.shape
    img_ids = get_image_ids(bs, h, w, patch_size=model.patch_size, device=hidden_states.device)
    pe = model.pe_embedder(img_ids)
    vec = model._compute_timestep_embedding(timestep, dtype=img.dtype)
    if getattr(model, "resolution_embedder", None) is not None:
        height = torch.full((bs,), h, device=hidden_states.device, dtype=torch.float32)
        width = torch.full((bs,), w, device=hidden_states.device, dtype=torch.float32)
        vec = vec + model.resolution_embedder(height, width, dtype=vec.dtype)
    everything = full_pe = kept = None
    for i, block in enumerate(model.blocks):
        if route is not None and i == route.start:
            everything, full_pe = img, pe
            img = gather_tokens(img, route.keep)
            pe = model.pe_embedder(gather_tokens(img_ids, route.keep))  # the kept tokens' own positions
        img = run_block(block, i, recompute_every, hidden_states=img, encoder_hidden_states=txt, temb=vec,
                        image_rotary_emb=pe, attention_mask=attention_mask)
        if i == tokens_of:
            kept = img
        if route is not None and i == route.end - 1:
            img = everything.scatter(1, route.keep[..., None].expand(-1, -1, img.shape[-1]), img)
            pe = full_pe
    out = seq2img(model.final_layer(img, vec), model.patch_size, hidden_states.shape)
    return out if tokens_of is None else (out, kept)


class RoutedDenoiser(torch.nn.Module):
    """The denoiser called through :func:`routed_forward`, as a module (for DDP and torch.compile);
    it returns a tuple like the model's ``return_dict=False``: (output,), or (output, tokens) with
    ``tokens_of``. Training calls it when tokens are routed, blocks recomputed
    (``recompute_every``) or a block's tokens aligned (REPA)."""

    def __init__(self, denoiser: torch.nn.Module, recompute_every: int = 0):
        super().__init__()
        self.denoiser, self.recompute_every = denoiser, recompute_every

    def forward(self, *, route: Route | None = None, tokens_of: int | None = None, return_dict: bool = False,
                **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = routed_forward(self.denoiser, route=route, recompute_every=self.recompute_every,
                             tokens_of=tokens_of, **inputs)
        return out if tokens_of is not None else (out,)
