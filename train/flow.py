"""Rectified flow, the whole objective and sampler in one place (check it by eye).

Convention (PRX, SD3, diffusers' FlowMatchEulerDiscreteScheduler): ``t = 0`` is data,
``t = 1`` is noise, ``x_t = (1 - t) x0 + t eps``; the denoiser predicts the velocity
``dx_t/dt = eps - x0`` and is called with ``t`` in [0, 1] (PRXPipeline passes
``timestep / 1000``). Sampling integrates from t = 1 down to t = 0 with Euler steps.

The PRX x-prediction ablation (Li & He 2025, "Back to Basics: Let Denoising Generative Models
Denoise") keeps all of this and changes only what the output means: the denoiser predicts the
clean sample ``x0``, which :func:`velocity_from_output` turns into the velocity that the loss
and the sampler use.

Contrastive flow matching (ΔFM, Stoica et al. 2025) also keeps all of this and subtracts from
the loss ``flow.contrastive`` (their λ, 0.05) times the error against another sample's velocity
(:func:`negative_pair_loss`), so that flows of different prompts stay apart. Immiscible
diffusion (Li et al. 2024) keeps the loss and changes which noise each latent of a batch is paired
with (:func:`immiscible_noise`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Loss is reported per timestep bin: low noise [0, 0.3), middle [0.3, 0.6), high noise [0.6, 1].
TIMESTEP_BINS = (0.0, 0.3, 0.6)
TIMESTEP_BIN_NAMES = ("loss_t0.0-0.3", "loss_t0.3-0.6", "loss_t0.6-1.0")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: ``s t / (1 + (s - 1) t)``; s > 1 moves mass towards noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    generator: torch.Generator,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    uniform_share: float = 0.1,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logit-normal(mean, std) timesteps, a ``uniform_share`` of them uniform instead.

    The uniform part keeps the ends of [0, 1] trained (logit-normal alone almost never draws
    t near 0 or 1). Drawn on the CPU generator so the draw is the same on every device.
    """
    logit_normal = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    uniform = torch.rand(n, generator=generator)
    pick_uniform = torch.rand(n, generator=generator) < uniform_share
    t = torch.where(pick_uniform, uniform, logit_normal)
    return shift_timesteps(t, shift).to(device)


def immiscible_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Immiscible diffusion: the batch's noise samples reassigned to its latents so that the total
    squared distance between the pairs is least (a linear assignment, scipy's Jonker-Volgenant).

    Every noise sample is still used once, so the noise of the batch is as Gaussian as before;
    each latent just gets a nearby one, which makes the paths of a batch cross less.
    """
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).pow(2)
    _, assigned = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(assigned, device=noise.device)]


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``, ``t`` of shape [B] broadcast over the rest."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


PREDICTIONS = ("velocity", "x0")


def velocity_from_output(
    output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "velocity",
    *, t_min: float = 0.05,
) -> torch.Tensor:
    """The velocity that a denoiser output stands for.

    ``velocity``: the output itself. ``x0``: the output is the clean sample; with
    ``x_t = (1 - t) x0 + t eps`` the velocity ``eps - x0`` is ``(x_t - x0) / t``. ``t`` is
    clamped to ``t_min`` below, where dividing by it would blow up the error of the prediction
    (Li & He clip at 0.05).
    """
    if prediction == "velocity":
        return output
    if prediction != "x0":
        raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
    t = t.view(-1, *([1] * (x_t.ndim - 1))).clamp(min=t_min)
    return (x_t.float() - output.float()) / t


def clean_estimate(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "velocity") -> torch.Tensor:
    """The clean sample ``x0`` a denoiser output stands for: the output itself for ``x0``; for a
    velocity ``v = eps - x0``, ``x_t - t v`` (exact at every t, no division)."""
    if prediction == "x0":
        return output
    if prediction != "velocity":
        raise ValueError(f"unknown prediction {prediction!r}; choose from {', '.join(PREDICTIONS)}")
    return x_t.float() - t.view(-1, *([1] * (x_t.ndim - 1))) * output.float()


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, in float32 whatever the autocast dtype."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def negative_pair_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ΔFM's negative term per sample: the error against the target of the next sample in the
    batch (its own image and noise; rolling by one pairs every sample with another one)."""
    return per_sample_loss(velocity, target.roll(1, dims=0))


def loss_sums(losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[sum, count, then sum and count per timestep bin] of the per-sample losses, float64 on their
    device (no host sync): what the training loss and the validation loss are logged from."""
    return torch.cat([torch.stack([losses.detach().double().sum(),
                                   torch.tensor(float(losses.numel()), device=losses.device,
                                                dtype=torch.float64)]),
                      loss_sums_by_bin(losses.detach(), t).double()])


def loss_sums_by_bin(losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[sum, count] of the per-sample losses in each timestep bin, flattened (for logging).

    Stays on the losses' device: reading it on the host would wait for the GPU every step.
    """
    edges = torch.tensor([*TIMESTEP_BINS[1:], 1.01], device=t.device)
    bins = torch.bucketize(t, edges, right=True)
    one_hot = torch.nn.functional.one_hot(bins, len(TIMESTEP_BIN_NAMES)).to(losses.dtype)  # [B, bins]
    return torch.stack([losses @ one_hot, one_hot.sum(0)], dim=1).flatten()


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(
    velocity: VelocityFn, noise: torch.Tensor, steps: int, *, shift: float = 1.0
) -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 with ``steps`` Euler steps.

    The time grid is uniform in t before the shift and ends exactly at t = 0.
    """
    grid = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1), shift)
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)
        x = x + (float(t_next) - float(t)) * velocity(x, t_batch).to(x.dtype)
    return x


def with_guidance(
    velocity_cond: VelocityFn, velocity_uncond: VelocityFn, scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> VelocityFn:
    """Classifier-free guidance: ``v_u + scale (v_c - v_u)``; scale 1 is the conditional model.

    Only at times ``interval[0] <= t <= interval[1]`` (guidance interval, Kynkäänniemi et al.
    2024: guidance at high noise narrows the images' variety, near the end it does little); at
    other times the conditional velocity alone, without the unconditional pass.
    """
    low, high = interval[0] - 1e-6, interval[1] + 1e-6  # t arrives in float32: 0.6 is 0.6000000238

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c = velocity_cond(x, t)
        if scale == 1.0 or not low <= float(t.flatten()[0]) <= high:
            return v_c
        v_u = velocity_uncond(x, t)
        return v_u + scale * (v_c - v_u)

    return guided
