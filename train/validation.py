"""The validation loss: the flow-matching loss of held-out samples, at fixed timesteps, with fixed noise.

SD3 (Esser et al. 2024, section 5) found that this loss on held-out data tracks the evaluation
metrics closely, so an ablation can be ranked from its curve long before sampling thousands of
images for FID is worth it. The training loss cannot do that: every step draws new samples,
timesteps and noise, and its level moves with the timestep distribution (``flow.shift``).

So every evaluation measures the same samples (the first ``val.samples`` of the ``val.shards``
manifest, in shard order, each once), each at the same ``val.timesteps`` evenly spaced
``t = (k + 0.5) / K`` (never shifted: runs that shift differently still compare), each with the
same noise (seeded by the sample's key and ``k``). The latent is the stored mean, the caption
drawn once by the manifest's weights (seeded by the key) and never dropped, and there is no token
routing: two runs, or two steps of one run, differ by their weights alone. The weights measured
are those the sample grids and ``evaluate`` use: the EMA when the run keeps one.

Ranks split the samples and all-reduce the sums, so the figure does not depend on the world
size (up to the order of float64 additions). Each rank holds its share in host memory: latents,
noise and the caption embeddings, encoded once at the start (so a run on precomputed embeddings
can release its text encoder as before).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from curate.manifest import Manifest, ManifestError, load_manifest, mergeable_latents
from curate.vae import model_downsample
from train import flow
from train.config import ConfigError, TrainConfig
from train.data import first_samples

# The validation metrics, as the training loss's: the mean, then per timestep bin.
METRIC_NAMES = ("val_loss", *(f"val_{name}" for name in flow.TIMESTEP_BIN_NAMES))


def _noise_seed(key: str, k: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"validation\0{key}\0{k}".encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class _Batch:
    latents: torch.Tensor  # [B, C, h, w] float32 model inputs
    noise: torch.Tensor  # [K, B, C, h, w] float32
    context: torch.Tensor  # [B, max_tokens, dim] bfloat16
    mask: torch.Tensor  # [B, max_tokens] bool


class ValidationSet:
    """This rank's share of the held-out samples, ready to measure (see the module docstring)."""

    def __init__(self, batches: list[_Batch], samples: int, timesteps: int, source: str,
                 sizes: set[tuple[int, int]] | None = None, filler: _Batch | None = None):
        self.batches, self.samples, self.timesteps, self.source = batches, samples, timesteps, source
        self.sizes = sizes or set()  # every held-out image's (height, width) in pixels, on every rank alike
        self.filler = filler  # what lockstep runs again, uncounted

    @classmethod
    def load(cls, cfg: TrainConfig, training: Manifest,
             encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], *, rank: int = 0,
             world_size: int = 1) -> ValidationSet:
        """Read the first ``val.samples`` samples of ``val.shards`` (refused unless its latents are
        the training manifest's, buckets aside) and keep every ``world_size``-th from ``rank``,
        their captions through ``encode`` (the text encoder's ``encode``)."""
        path = cfg.val.shards
        try:
            manifest = load_manifest(path, check_files=True, allow_pipe=cfg.data.allow_pipe)
        except ManifestError as e:
            raise ConfigError(f"val.shards: {e}") from None
        problems = mergeable_latents(training.latent, manifest.latent)
        if problems:
            raise ConfigError(f"val.shards {path}: its latents differ from the training manifest's in "
                              f"{'; '.join(problems)}: a held-out loss needs the same latent space")
        chosen = first_samples(manifest, path, cfg.val.samples, seed=cfg.seed, allow_pipe=cfg.data.allow_pipe)
        mine = chosen[rank::world_size]
        by_shape: dict[tuple[int, ...], list] = {}
        for sample in mine:
            by_shape.setdefault(tuple(sample.latent.shape), []).append(sample)
        def batch(part: list) -> _Batch:
            noise = torch.stack([torch.stack([torch.randn(part[0].latent.shape, generator=torch.Generator().manual_seed(
                _noise_seed(s.key, k))) for s in part]) for k in range(cfg.val.timesteps)])
            context, mask = encode([s.caption for s in part])
            return _Batch(torch.stack([s.latent for s in part]), noise, context.to("cpu", torch.bfloat16), mask.cpu())

        batches = [batch(by_shape[shape][start: start + cfg.micro_batch]) for shape in sorted(by_shape)
                   for start in range(0, len(by_shape[shape]), cfg.micro_batch)]
        down = model_downsample(manifest.latent)  # the latents are model inputs (FLUX.2's at 1/16)
        # Of all ranks' samples: every rank then refuses the same set, none waits for another.
        sizes = {(s.latent.shape[-2] * down, s.latent.shape[-1] * down) for s in chosen}
        # A rank with no held-out sample of its own still takes part in a sharded model's forwards.
        filler = batches[0] if batches else batch(chosen[:1]) if chosen else None
        return cls(batches, len(chosen), cfg.val.timesteps, str(path), sizes, filler)

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, *, device: torch.device, weights_dtype: torch.dtype,
             autocast: torch.autocast, prediction: str = "velocity", t_min: float = 0.05,
             lockstep: bool = False) -> dict[str, float]:
        """The metrics of :data:`METRIC_NAMES` for ``model``, summed over every rank's share.

        ``lockstep`` (a sharded model, whose every forward gathers weights from all ranks): a rank
        with fewer batches than another runs its first one again, uncounted, until all have run
        as many."""
        training = model.training
        model.eval()
        sums = torch.zeros(2 + 2 * len(flow.TIMESTEP_BINS), dtype=torch.float64, device=device)
        batches = [(batch, True) for batch in self.batches]
        if lockstep and dist.is_available() and dist.is_initialized():
            most = torch.tensor([len(batches)], device=device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            batches += [(self.filler, False)] * (int(most) - len(batches))
        for batch, counted in batches:
            x0 = batch.latents.to(device)
            context = batch.context.to(device).to(weights_dtype)
            mask = batch.mask.to(device)
            for k in range(self.timesteps):
                t = torch.full((x0.shape[0],), (k + 0.5) / self.timesteps, device=device)
                noise = batch.noise[k].to(device)
                x_t = flow.interpolate(x0, noise, t)
                with autocast:
                    output = model(hidden_states=x_t.to(weights_dtype), timestep=t, encoder_hidden_states=context,
                                   attention_mask=mask, return_dict=False)[0]
                velocity = flow.velocity_from_output(output, x_t, t, prediction, t_min=t_min)
                if counted:
                    sums += flow.loss_sums(flow.per_sample_loss(velocity, flow.velocity_target(x0, noise)), t)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        model.train(training)
        values = sums.tolist()
        return {name: values[2 * i] / values[2 * i + 1] for i, name in enumerate(METRIC_NAMES) if values[2 * i + 1]}
