"""The training loop: read it top to bottom.

One process per GPU (torchrun) or one process on a CPU. Every check that can fail runs before
the first step. Each optimizer step consumes ``global_batch`` samples as ``global_batch /
micro_batch`` slots, each slot one forward/backward pass; a rank owns ``accum`` consecutive
slots. Every random draw of a slot (caption dropout, timesteps, noise) comes from a generator
seeded by (seed, step, slot), and the loader derives the slot's batch from the step too, so
the run is the same on 1 or N ranks and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import math
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from curate import storage
from curate.manifest import (
    LatentSpec,
    Manifest,
    ManifestError,
    TextSpec,
    file_sha256,
    image_stages,
    load_manifest,
    part_share,
)
from curate.models import PIXELS, resolve_model
from curate.runner import resolve_device
from curate.subset import subset_summary
from curate.text import EncodedPrompts, TextEncoder
from curate.vae import from_model_output, model_downsample
from train import flow
from train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_format,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from train.config import (
    ConfigError,
    TrainConfig,
    aligned_in_route,
    differences,
    from_dict,
    repa_block,
    to_dict,
    to_yaml,
    validate,
)
from train.data import DataSettings, LatentLoader, StepBatch, check_data, fingerprint_diff
from train.data import fingerprint as data_fingerprint
from train.ema import EMA
from train.init import load_initial_weights
from train.launch import detect_launch
from train.metrics import MetricsLogger, read_metrics
from train.model import (
    build_denoiser,
    check_channels,
    check_token_grid,
    count_parameters,
    denoiser_config,
    peak_tflops,
    train_flops_per_sample,
)
from train.optim import build_optimizer
from train.perceptual import PerceptualLosses
from train.recompute import recomputed
from train.remote_run import RemoteRun
from train.repa import (
    DinoEncoder,
    WithRepa,
    alignment_loss,
    build_projector,
    repa_active,
    spatial_normalize,
)
from train.routing import RoutedDenoiser, draw_route, gather_tokens
from train.schedule import build_schedule, lr_factor, restore_schedule
from train.schedule import describe as describe_schedule
from train.sharding import (
    all_finite,
    full_tensors,
    gathered_optimizer_state,
    gradient_sync,
    shard,
    sharded_optimizer_state,
)
from train.validation import ValidationSet

DataSource = Callable[[int, int], Iterator[StepBatch]]  # (start step, rank) -> step batches


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss...)."""


@dataclass
class World:
    rank: int
    world_size: int
    device: torch.device  # this rank's GPU (cuda:LOCAL_RANK) or the CPU
    note: str | None = None  # what the launch is worth a warning about

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class RunResult:
    run_dir: Path  # for a run at a URL, its local copy
    steps: int  # optimizer steps completed, in total
    resumed_from: int | None
    last_loss: float | None
    notes: list[str] = field(default_factory=list)  # with check_only: what the checks found


def train(cfg: TrainConfig, *, resume: str = "never", data: DataSource | None = None,
          check_only: bool = False) -> RunResult:
    """Train as configured; ``resume`` is "never", "auto" (the latest checkpoint) or a path.

    ``data`` replaces the manifest's shard loader with any source of step batches (benchmarks
    feed tensors held in memory, or images encoded on the fly); it is given the start step and
    the rank and returns an iterator of :class:`~train.data.StepBatch`. ``check_only`` runs every
    check that comes before the first step, loads what the run would load, and returns without
    writing anything (``train --check``).
    """
    world = setup_world(cfg.device)
    try:
        return _train(cfg, world, resume, data, check_only)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, world: World, resume: str, data: DataSource | None, check_only: bool = False) -> RunResult:
    if not cfg.shards or not cfg.out:
        raise ConfigError("both --shards (a manifest) and --out (the run folder) are needed")
    validate(cfg)  # again: a program may change a config after build_config (the bf16 guard holds for it too)
    # A run at a URL (train/remote_run.py) is written in a local copy and pushed there.
    remote = RemoteRun(cfg.out, reader=check_only) if storage.is_remote(cfg.out) else None
    run_dir = remote.local if remote is not None else Path(cfg.out)

    # ---- everything that can fail, before any step ------------------------------------------
    manifest = load_manifest(cfg.shards, allow_pipe=cfg.data.allow_pipe)
    manifest_sha = file_sha256(cfg.shards)
    settings = data_settings(cfg, pin_memory=world.device.type == "cuda")
    accum = settings.accum(world.world_size)
    checkpoint = remote.prepare(resume) if remote is not None else _find_checkpoint(run_dir, resume)
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    first_step = int(state.get("step", 0)) if state is not None else 0
    resumed_from = remote.checkpoint_url(first_step) if remote is not None and state is not None else checkpoint
    # REPA's teacher sees each sample's image: in pixel space the sample itself, else its original,
    # read from the image stage beside the latents.
    pixel_space = manifest.latent.vae == PIXELS
    repa_now = repa_active(cfg, first_step)
    images = _repa_images(cfg, manifest) if repa_now and not pixel_space else None
    summary = check_data(manifest, cfg.shards, verify=cfg.data.verify if world.main else "none",
                         allow_pipe=cfg.data.allow_pipe, settings=settings, images=images)
    fingerprint = data_fingerprint(settings, manifest)
    # With precomputed embeddings (curate encode-text) the encoder still serves the empty prompt
    # (caption dropout) and the sample grids; it must be the one that made them, at their revision.
    stored = manifest.text
    hub_revision = stored.revision if stored and not resolve_model(cfg.text_encoder, "text").local else None
    text = TextEncoder.load(cfg.text_encoder, device=world.device, max_tokens=cfg.max_tokens,
                            revision=hub_revision)
    # The held-out loss's samples and their caption embeddings, while the encoder is at hand.
    validation = (ValidationSet.load(cfg, manifest, text.encode, rank=world.rank, world_size=world.world_size)
                  if cfg.val.shards else None)
    if stored is not None:
        _check_stored_text(stored, text, cfg)
        # What the run still needs of the encoder, then the encoder's memory back.
        text = EncodedPrompts(text, cfg.sample.prompts)
        empty_context, empty_mask = text.encode([""])
        if world.device.type == "cuda":
            torch.cuda.empty_cache()
    architecture = denoiser_config(cfg.model, manifest.latent, text.dim)
    check_token_grid(summary.buckets, manifest.latent, architecture["patch_size"])
    if validation is not None:
        check_token_grid(validation.sizes, manifest.latent, architecture["patch_size"], "the held-out manifest's")
    if cfg.sample_every:
        _check_sample_size(cfg, manifest.latent, architecture["patch_size"])
    if state is not None:
        _check_resume(state, cfg, manifest_sha, fingerprint, architecture, manifest, resumed_from)
    # A new run may start from trained weights (train/init.py); a resumed one has its own.
    initial = (load_initial_weights(cfg, architecture, manifest.latent, text.id)
               if state is None and cfg.init.source else None)
    init_record = state.get("init") if state is not None else initial.record if initial is not None else None
    # REPA's teacher and projector, while the alignment loss is on (train/repa.py).
    teacher = projector = None
    if repa_now:
        teacher = DinoEncoder(cfg.repa.encoder, device=world.device, revision=cfg.repa.revision or None)
        projector = build_projector(cfg.model.hidden_size, teacher.dim, cfg.repa.projector_dim,
                                    seed=cfg.seed, kind=cfg.repa.projector).to(world.device)
    # Perceptual losses (pixel space only): their networks, checked and loaded like the teacher.
    PerceptualLosses.check(cfg.perceptual, manifest.latent)
    perceptual = PerceptualLosses(cfg.perceptual, world.device) if PerceptualLosses.names(cfg.perceptual) else None
    # The sample grids' VAE, now rather than at the first grid, hours in.
    vae = _load_vae(manifest.latent, world.device) if cfg.sample_every and world.main else None
    if check_only:
        notes = [f"data: {summary.samples} samples in {summary.shards} shards",
                 *[f"a subset: {subset_summary(s)}" for s in manifest.provenance.get("subsets", [])], *summary.notes,
                 *([world.note] if world.note else []),
                 f"would resume from {resumed_from} at step {first_step}" if state is not None else "a new run",
                 *([f"initialised from {initial.describe()}", *initial.notes] if initial is not None else []),
                 *([f"perceptual losses: {perceptual.describe()}"] if perceptual is not None else []),
                 *([f"validation: {validation.samples} held-out samples of {validation.source}"]
                   if validation is not None else [])]
        return RunResult(run_dir, first_step, first_step if state is not None else None, None, notes)

    # ---- model, optimizer, schedule ---------------------------------------------------------------
    model = build_denoiser(architecture, seed=cfg.seed).to(world.device)
    if initial is not None:
        model.load_state_dict(initial.state)
        initial.state = {}  # the source's copy is not needed any more
    if cfg.weights_dtype == "bfloat16":
        model.to(torch.bfloat16)
    if state is not None:  # whole weights, before any sharding
        model.load_state_dict(state["model"])
        if projector is not None:
            projector.load_state_dict(state["repa"]["projector"])
    sharded = cfg.fsdp and world.world_size > 1
    flops_per_sample = None
    if world.device.type == "cuda":
        latent_shape = (architecture["in_channels"], *_grid(manifest.latent))
        # Sharded, on a copy without weights: the whole model's gradients may not fit one GPU (the
        # meta device counts attention within 1% of the GPU kernels' count).
        counted = build_denoiser(architecture, seed=cfg.seed, device="meta") if sharded else model
        flops_per_sample = train_flops_per_sample(counted, latent_shape, cfg.max_tokens, text.dim)
    peak = peak_tflops(world.device, cfg.log.peak_tflops)
    # FSDP (train/sharding.py) replaces the parameters by shards: the optimizer and EMA come after.
    units = shard(model, projector) if sharded else []
    optimizer = build_optimizer(model, cfg, fused=world.device.type == "cuda",
                                extra=_projector_params(cfg, projector))
    ema = EMA(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    schedule = build_schedule(optimizer, cfg.optim, cfg.steps)
    start_step, window = 0, _Window(world.device)
    if state is not None:
        saved_optimizer = _optimizer_state(state["optimizer"], cfg, projector)
        optimizer.load_state_dict(sharded_optimizer_state(saved_optimizer, optimizer) if sharded else saved_optimizer)
        restore_schedule(schedule, state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_step = int(state["step"])
        window = _Window(world.device, **state["window"])

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world.world_size > 1 and not sharded:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: one copy less
        return torch.compile(module) if cfg.compile else module

    # What a training step calls: the model, through our own forward (train/routing.py; equal to
    # the model's) when tokens are routed (TREAD), blocks recomputed or a block's tokens aligned
    # (REPA, whose projector sits beside it while REPA is on).
    routing = cfg.routing.ratio > 0
    own_forward = routing or cfg.activation_checkpointing > 0 or projector is not None
    net = RoutedDenoiser(model, cfg.activation_checkpointing) if own_forward else model
    aligned_block = repa_block(cfg)
    with_repa = (WithRepa(net, projector, aligned_block - 1, architecture["patch_size"])
                 if projector is not None else None)
    # With TREAD routing the aligned block, that block sees the kept tokens only: so must the teacher.
    gather_target = routing and aligned_in_route(cfg, aligned_block)
    ddp_model = wrap(with_repa or net)
    token_patch = architecture["patch_size"]

    # ---- the run folder ------------------------------------------------------------------------------
    logger = MetricsLogger(run_dir, enabled=world.main, start_step=start_step, total_steps=cfg.steps,
                           tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                           wandb_project=cfg.log.wandb_project, config=to_dict(cfg),
                           url=remote.url if remote is not None else None)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        ablations = f" + ablations {', '.join(cfg.ablations)}" if cfg.ablations else ""
        logger.note(f"config ({cfg.preset} preset{ablations}, resolved):\n{to_yaml(cfg)}")
        logger.note(
            f"data: {summary.samples} samples in {summary.shards} shards, latents "
            f"{manifest.latent.vae_class} {manifest.latent.vae} -> {architecture['in_channels']} "
            f"model channels; {world.world_size} rank(s) x {accum} micro-batch(es) of "
            f"{cfg.micro_batch}; denoiser {count_parameters(model) / 1e6:.2f}M parameters; "
            f"text encoder {text.name} ({text.dim}-d"
            f"{'; caption embeddings read from the text shards' if stored else ''})")
        for subset in manifest.provenance.get("subsets", []):  # curate manifest --where ...
            logger.note(f"data: a subset: {subset_summary(subset)}")
        for part in manifest.parts or ():  # a merged manifest's datasets
            logger.note(f"data: part {part.name}: {part_share(part, manifest.samples)}, captions "
                        + ", ".join(f"{v} {w:.3g}" for v, w in part.captions.items()))
        for note in summary.notes:
            logger.note(f"data: {note}")
        if world.note:
            logger.note(f"WARNING: {world.note}")
        for note in remote.notes if remote is not None else ():
            logger.note(f"WARNING: {note}")
        if cfg.optim.name == "muon":
            muon, other = (sum(p.numel() for p in g["params"]) for g in optimizer.param_groups[:2])
            split = (f"; each of {world.world_size} ranks orthogonalises its share of the "
                     f"{len(optimizer.param_groups[0]['params'])} matrices" if world.world_size > 1 else "")
            logger.note(f"optimizer: Muon for the blocks' weight matrices ({muon / 1e6:.2f}M parameters), "
                        f"AdamW for the rest ({other / 1e6:.2f}M){split}")
        if sharded:
            logger.note(f"FSDP: weights, gradients and optimizer state sharded over {world.world_size} ranks in "
                        f"{len(units)} units ({len(model.blocks)} blocks, the denoiser's other parts"
                        f"{', the REPA projector' if projector is not None else ''})")
        elif cfg.fsdp:
            logger.note("fsdp=true on one rank: nothing to shard, the run is unsharded")
        if cfg.activation_checkpointing:
            count = sum(recomputed(i, cfg.activation_checkpointing) for i in range(len(model.blocks)))
            logger.note(f"activation checkpointing: {count} of {len(model.blocks)} blocks recompute their "
                        "activations in the backward pass")
        if cfg.weights_dtype == "bfloat16":
            logger.note("WARNING: weights stored in bfloat16 (allow_bf16_weights=true): "
                        "expect worse FID than fp32 weights with bf16 autocast")
        logger.note(f"schedule: {describe_schedule(cfg.optim, cfg.lr, cfg.steps)}")
        if state is not None:
            logger.note(f"resumed from {resumed_from} at step {start_step}")
            listed = remote.listed if remote is not None else checkpoint_steps(run_dir)  # rank 0's, listed once
            later = [s for s in listed if s > start_step]
            if later:
                logger.note(f"WARNING: the checkpoints of steps {', '.join(map(str, later))} "
                            "come after the one resumed: they are deleted when this run writes its first "
                            "checkpoint (until then, --resume auto would take the latest of them)")
            saved = from_dict(state["config"])
            before = saved.lr * lr_factor(start_step, saved.optim, saved.steps)
            now = cfg.lr * lr_factor(start_step, cfg.optim, cfg.steps)
            if not math.isclose(before, now, rel_tol=1e-9):
                logger.note(f"schedule changed on resume: step {start_step + 1} updates at lr {now:g}, where "
                            f"the run's schedule gave {before:g}")
        if initial is not None:
            logger.note(f"initialised from {initial.describe()}; optimizer, schedule and step start afresh")
            for note in initial.notes:
                logger.note(f"init: {note}")
        if validation is not None:
            logger.note(f"validation: {validation.samples} held-out samples of {validation.source} at "
                        f"{cfg.val.timesteps} timesteps every {cfg.val.every} steps"
                        + (" (EMA weights)" if ema is not None else ""))
        if perceptual is not None:
            logger.note(f"perceptual losses on the clean-image estimate: {perceptual.describe()}")
        if teacher is not None:
            logger.note(f"REPA: block {aligned_block}'s tokens aligned with {teacher.id} ({teacher.dim}-d, "
                        f"{teacher.patch} px patches) of "
                        + ("the samples themselves (pixel space)" if images is None
                           else f"the originals in {', '.join(map(str, images))}") + f", weight {cfg.repa.weight}, "
                        + (f"until step {cfg.repa.stop_step}" if cfg.repa.stop_step else "the whole run")
                        + ("; a 3x3 convolution projects (iREPA)" if cfg.repa.projector == "conv" else "")
                        + (f"; the teacher's features spatially normalised, gamma {cfg.repa.spatial_gamma} (iREPA)"
                           if cfg.repa.spatial_norm else ""))
    if remote is not None:  # every rank: a store that refuses writes stops them all here, before step 1
        try:
            remote.start(note=logger.note)
        except BaseException:
            logger.close()
            raise
        logger.note(f"run folder: {remote.url}, written in {run_dir} and uploaded with each checkpoint")

    # ---- the loop ----------------------------------------------------------------------------------
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=world.device.type == "cuda")
    first_slot = world.rank * accum
    weights_dtype = _param_dtype(model)  # a bf16-stored model takes bf16 inputs
    last_loss = None
    # Rank 0's samples so far whose drawn caption variant was missing: those of the loaders before this
    # one (a resume's checkpoint, REPA's loader with images), plus the current loader's.
    fallbacks_before = int(state.get("caption_fallbacks", 0)) if state is not None else 0
    if data is None:
        loader = LatentLoader(manifest, cfg.shards, settings, rank=world.rank, world_size=world.world_size,
                              start_step=start_step, allow_pipe=cfg.data.allow_pipe, images=images)
        batches = iter(loader)
    else:
        loader, batches = None, data(start_step, world.rank)
    ddp_model.train()
    stop = StopRequest()  # SIGTERM / SIGUSR1 (Slurm's preemption warnings): checkpoint, then exit
    completed, failing = start_step, True
    try:
        for step in range(start_step, cfg.steps):
            if teacher is not None and not repa_active(cfg, step):
                # REPA's burn-in is over: teacher and projector go, and the denoiser trains alone.
                teacher = projector = None
                ddp_model = wrap(net)
                optimizer.param_groups[-1]["params"] = []  # the projector's group (see _projector_params)
                for p in with_repa.projector.parameters():
                    optimizer.state.pop(p, None)
                with_repa = None
                gc.collect()  # the old DDP wrapper's gradient hooks go with it, before the next backward
                if loader is not None and images is not None:  # the same batches, without reading the images
                    fallbacks_before += sum(loader.fallbacks.values())
                    loader.close()
                    loader = LatentLoader(manifest, cfg.shards, settings, rank=world.rank,
                                          world_size=world.world_size, start_step=step,
                                          allow_pipe=cfg.data.allow_pipe)
                    batches = iter(loader)
                logger.note(f"REPA ended at step {step} (repa.stop_step): the teacher is released")
            tick = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter() - tick
            if batch.step != step:
                raise TrainingError(f"the loader delivered step {batch.step} for step {step}")

            step_losses = torch.zeros(_window_size(cfg), dtype=torch.float64, device=world.device)
            for i, micro in enumerate(batch.micro):
                g = slot_generator(cfg.seed, step, first_slot + i)
                n = micro.latents.shape[0]
                dropped = torch.rand(n, generator=g) < cfg.caption_dropout
                captions = ["" if d else c for c, d in zip(micro.captions, dropped.tolist(), strict=True)]
                t = flow.sample_timesteps(n, g, mean=cfg.flow.logit_mean, std=cfg.flow.logit_std,
                                          uniform_share=cfg.flow.uniform_share, shift=cfg.flow.shift)
                noise = torch.randn(micro.latents.shape, generator=g)
                if cfg.flow.immiscible:  # on the host, before the copy: an assignment is solved on the CPU anyway
                    noise = flow.immiscible_noise(micro.latents, noise)

                route = None
                if routing:  # TREAD: which tokens the routed blocks see, drawn for this slot too
                    tokens = (micro.latents.shape[-2] // token_patch) * (micro.latents.shape[-1] // token_patch)
                    route = draw_route(cfg, n, tokens, g, world.device)
                x0 = micro.latents.to(world.device, non_blocking=True)
                t_host = t  # drawn on the host: which samples a perceptual loss applies to, known without a sync
                noise, t = _to_device(noise, world.device), _to_device(t, world.device)
                x_t = flow.interpolate(x0, noise, t)
                if micro.context is None:
                    context, mask = text.encode(captions, clean=not micro.cleaned)
                else:  # precomputed: dropped and missing captions become the empty prompt's embedding
                    empty = _to_device(dropped, world.device) | ~micro.context_mask.any(1).to(world.device)
                    context = torch.where(empty[:, None, None], empty_context,
                                          micro.context.to(world.device, non_blocking=True).float())
                    mask = torch.where(empty[:, None], empty_mask,
                                       micro.context_mask.to(world.device, non_blocking=True))
                if teacher is not None:
                    if pixel_space:  # the sample is the image: its pixel values, 0 to 255
                        seen = from_model_output(x0, manifest.latent)
                    elif micro.images is None:
                        raise TrainingError("REPA needs each micro-batch's images (the data source gave none)")
                    else:
                        seen = micro.images
                    target = teacher.features(seen, (x_t.shape[-2] // token_patch, x_t.shape[-1] // token_patch))
                    if cfg.repa.spatial_norm:  # iREPA: over the whole image's tokens, then any routing
                        target = spatial_normalize(target, cfg.repa.spatial_gamma)
                    if gather_target:
                        target = gather_tokens(target, route.keep)
                sync = i == len(batch.micro) - 1
                with (gradient_sync(units, sync) if sharded else
                      contextlib.nullcontext() if sync or world.world_size == 1 else ddp_model.no_sync()):
                    inputs = {"hidden_states": x_t.to(weights_dtype), "timestep": t,
                              "encoder_hidden_states": context.to(weights_dtype), "attention_mask": mask,
                              **({"route": route} if routing else {})}
                    with autocast:
                        if teacher is not None:
                            prediction, projected = ddp_model(**inputs)
                        else:
                            prediction = ddp_model(**inputs, return_dict=False)[0]
                    velocity = flow.velocity_from_output(prediction, x_t, t, cfg.flow.prediction,
                                                         t_min=cfg.flow.x0_t_min)
                    target_velocity = flow.velocity_target(x0, noise)
                    losses = flow.per_sample_loss(velocity, target_velocity)
                    loss = losses.mean()
                    if cfg.flow.contrastive > 0:  # ΔFM: away from another sample's flow (the logged loss is the plain one)
                        loss = loss - cfg.flow.contrastive * flow.negative_pair_loss(velocity, target_velocity).mean()
                    if teacher is not None:
                        aligned = alignment_loss(projected, target)
                        loss = loss + cfg.repa.weight * aligned.mean()
                    if perceptual is not None:  # on the clean image the output implies (pixel space)
                        with autocast:
                            terms = perceptual.terms(flow.clean_estimate(prediction, x_t, t, cfg.flow.prediction),
                                                     x0, t_host)
                        loss = loss + perceptual.weighted(terms)
                    (loss / accum).backward()
                # The auxiliary losses' [sum, count] follow the flow loss's, in _aux_metrics' order.
                aux = []
                if cfg.repa.weight > 0:  # zeros once REPA is over
                    aux.append(_sum_count(aligned) if teacher is not None
                               else torch.zeros(2, dtype=torch.float64, device=world.device))
                if perceptual is not None:
                    aux += [_sum_count(term.losses, term.applies) for term in terms]
                step_losses += torch.cat([flow.loss_sums(losses, t), *aux])

            trained = [*model.parameters(), *(projector.parameters() if projector is not None else ())]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trained, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
            if sharded:  # a DTensor over the shards
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step)

            if world.world_size > 1:  # on the device, so no host sync (and NCCL takes no CPU tensors)
                dist.all_reduce(step_losses)
            done = completed = step + 1
            window.add(step_losses, grad_norm.detach(), waited)
            logger.advance()

            if done % cfg.log.every == 0 or done == cfg.steps:
                metrics = window.metrics(cfg.global_batch, world, flops_per_sample, peak,
                                         _aux_metrics(cfg))  # syncs here
                last_loss = metrics["loss"]
                if not math.isfinite(last_loss):
                    raise TrainingError(f"the loss is {last_loss} in steps {done - window.steps + 1}-{done}: "
                                        "lower lr, check the data (curate stats), or resume from an "
                                        "earlier checkpoint")
                metrics["lr"] = cfg.lr * lr_factor(step, cfg.optim, cfg.steps)  # the LR this step used
                # Passes over the data so far (a merged manifest's epoch counts its repeats).
                metrics["epoch"] = done * cfg.global_batch / max(manifest.samples, 1)
                if loader is not None:  # rank 0's samples so far whose drawn caption variant was missing
                    metrics["caption_fallbacks"] = fallbacks_before + sum(loader.fallbacks.values())
                logger.log(done, metrics)
                window = _Window(world.device)
            housekeeping = time.perf_counter()
            if validation is not None and (done % cfg.val.every == 0 or done == cfg.steps):
                with ema.applied(model) if ema is not None else contextlib.nullcontext():
                    logger.log(done, validation.loss(model, device=world.device, weights_dtype=weights_dtype,
                                                     autocast=autocast, prediction=cfg.flow.prediction,
                                                     t_min=cfg.flow.x0_t_min, lockstep=sharded))
            # Sharded, every rank runs the sampler (its blocks gather their weights); the main one decodes.
            if cfg.sample_every and (done % cfg.sample_every == 0 or done == cfg.steps) and (world.main or sharded):
                with ema.applied(model) if ema is not None else contextlib.nullcontext():
                    path = _sample(model, text, manifest, vae if world.main else None, cfg, run_dir, done)
                if path is not None:
                    logger.add_image("samples", path, done)
                ddp_model.train()
            stopping = stop.agreed(world, done)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                # Never a checkpoint of broken weights: it would become the one --resume auto takes,
                # and push a good one out of keep_checkpoints. (One pass over the weights, each rank.)
                if not all_finite(list(model.parameters())):
                    last = latest_checkpoint(run_dir) if remote is None else remote.latest_url()
                    raise TrainingError(f"the weights are not finite after step {done}: no checkpoint written; lower "
                                        "lr or check the data (curate stats), then resume from "
                                        + (f"{last} (--resume {last})" if last else "the start (a new --out)"))
                # Sharded, every rank gathers the whole tensors (collectives), and the main one writes them.
                whole = full_tensors if sharded else dict
                weights = whole(model.state_dict())
                moments = gathered_optimizer_state(optimizer) if sharded else optimizer.state_dict()
                average = ema.state_dict() if ema is not None else None
                if average is not None:
                    average["weights"] = whole(average["weights"])
                aligner = {"projector": whole(projector.state_dict())} if projector is not None else None
                if world.main:
                    written = save_checkpoint(run_dir, done, {
                        "format": CHECKPOINT_FORMAT,
                        "step": done,
                        "model": weights,
                        "optimizer": moments,
                        "schedule": schedule.state_dict(),
                        "ema": average,
                        "repa": aligner,
                        "init": init_record,
                        "window": window.state(),
                        "config": to_dict(cfg),
                        "denoiser": architecture,
                        "latent_spec": manifest.latent.model_dump(mode="json"),
                        "manifest_sha256": manifest_sha,
                        "data_fingerprint": fingerprint,
                        "caption_fallbacks": fallbacks_before + (sum(loader.fallbacks.values())
                                                                 if loader is not None else 0),
                        "text_encoder": {"name": text.name, "id": text.id, "revision": text.revision,
                                         "max_tokens": cfg.max_tokens},
                        "world_size": world.world_size,
                        }, keep=cfg.keep_checkpoints if remote is None else None)
                    if remote is not None:  # uploaded while the next steps run
                        logger.flush(new_events_file=True)
                        remote.push(written, keep=cfg.keep_checkpoints, note=logger.note)
                if world.world_size > 1:
                    dist.barrier()  # nobody races ahead of a checkpoint that may be resumed from
            window.exclude(time.perf_counter() - housekeeping)  # samples and checkpoints are not steps
            if stopping:
                logger.note(f"stopped by {stop.signal_name} after step {done}; checkpoint written: "
                            "rerun with --resume auto to continue")
                break
        failing = False
    finally:
        if loader is not None:
            loader.close()
        try:
            if remote is not None and world.main:  # the uploads in flight, then the files changed since
                logger.flush()
                remote.close(note=logger.note, failing=failing)
        finally:
            stop.restore()  # after the uploads: a second SIGTERM during them is not fatal either
            logger.close()
    if last_loss is None and state is not None and world.main:
        # No loss logged since the resume (a finished run resumed): the last one logged before it,
        # read only then rather than at every resume.
        last_loss = next((r["loss"] for r in reversed(read_metrics(run_dir)) if "loss" in r and r["step"] <= start_step),
                         None)
    return RunResult(run_dir, completed, start_step if state is not None else None, last_loss)


# ---- pieces the loop uses -----------------------------------------------------------------------------


def _check_stored_text(stored: TextSpec, text: TextEncoder, cfg: TrainConfig) -> None:
    """The manifest's precomputed embeddings came from the text encoder this run loads (which
    encodes the empty prompt and the sample grids, and goes into the export), at its max_tokens."""
    if text.id != stored.encoder_id or (stored.revision and text.revision != stored.revision):
        raise ConfigError(f"the manifest's text embeddings were made by {stored.encoder_id}"
                          f"{f' at {stored.revision}' if stored.revision else ''}, but text_encoder="
                          f"{cfg.text_encoder} loads {text.id}{f' at {text.revision}' if text.revision else ''}: "
                          f"set text_encoder={stored.encoder}")
    if cfg.max_tokens != stored.max_tokens or text.dim != stored.dim:
        raise ConfigError(f"the manifest's text embeddings have max_tokens {stored.max_tokens} and "
                          f"{stored.dim}-d tokens, the run max_tokens {cfg.max_tokens} and {text.dim}-d: "
                          f"set max_tokens={stored.max_tokens}, or rerun curate encode-text with "
                          f"--max-tokens {cfg.max_tokens}")


def _repa_images(cfg: TrainConfig, manifest: Manifest) -> list[Path]:
    """The image stage REPA's teacher reads: ``repa.images``, or the manifest's provenance (one per
    part of a merged manifest)."""
    try:
        return image_stages(manifest, cfg.repa.images or None, option="repa.images=DIR")
    except ManifestError as e:
        raise ConfigError(f"REPA's teacher sees the original images: {e}") from None


def _projector_params(cfg: TrainConfig, projector: torch.nn.Module | None) -> list[torch.nn.Parameter] | None:
    """The optimizer's last group when REPA is configured: the projector's parameters while it
    trains, none once REPA is over (a run resumed after repa.stop_step builds no projector, and
    its optimizer state still has the group, emptied)."""
    if cfg.repa.weight <= 0:
        return None
    return list(projector.parameters()) if projector is not None else []


def _optimizer_state(saved: dict[str, Any], cfg: TrainConfig, projector: torch.nn.Module | None) -> dict[str, Any]:
    """A checkpoint's optimizer state for this run's optimizer: a run resumed exactly at
    repa.stop_step has no projector any more, so its group is emptied (see _projector_params)."""
    groups = saved["param_groups"]
    if cfg.repa.weight <= 0 or projector is not None or not groups[-1]["params"]:
        return saved
    dropped = set(groups[-1]["params"])
    return {"state": {k: v for k, v in saved["state"].items() if k not in dropped},
            "param_groups": [*groups[:-1], {**groups[-1], "params": []}]}


# A step's loss vector: [sum, count] of the flow loss, then [sum, count] per timestep bin.
_LOSS_ENTRIES = 2 + 2 * len(flow.TIMESTEP_BIN_NAMES)


def _window_size(cfg: TrainConfig) -> int:
    """Entries of a step's loss vector: [sum, count], [sum, count] per timestep bin, then each auxiliary loss's."""
    return _LOSS_ENTRIES + 2 * len(_aux_metrics(cfg))


def _aux_metrics(cfg: TrainConfig) -> list[str]:
    """The auxiliary losses a run logs, in the order their [sum, count] follow the flow loss's."""
    return (["repa_loss"] if cfg.repa.weight > 0 else []) + PerceptualLosses.names(cfg.perceptual)


def _sum_count(losses: torch.Tensor, applies: torch.Tensor | None = None) -> torch.Tensor:
    """[sum, count] of per-sample losses (of those that ``applies`` marks), float64, no host sync."""
    losses = losses.detach().double()
    if applies is None:
        applies = torch.ones_like(losses, dtype=torch.bool)
    return torch.stack([(losses * applies).sum(), applies.double().sum()])


def data_settings(cfg: TrainConfig, *, pin_memory: bool = False) -> DataSettings:
    """The loader settings of a run: everything that decides its batches comes from ``cfg``."""
    return DataSettings(seed=cfg.seed, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                        workers=cfg.data.workers, shuffle_buffer=cfg.data.shuffle_buffer,
                        sample_latents=cfg.data.sample_latents, prefetch=cfg.data.prefetch,
                        pin_memory=pin_memory, clean_captions=True)


def setup_world(device: str = "auto") -> World:
    """torchrun's or srun's processes (NCCL on GPUs, gloo on CPUs; train/launch.py), or one local process."""
    launch = detect_launch()
    launch.export(os.environ)  # srun's tasks get torchrun's variables: one convention from here on
    world_size, rank = launch.world_size, launch.rank
    # auto: cuda:LOCAL_RANK when CUDA is available; a bare "cuda" is this rank's GPU as well.
    dev = resolve_device(None if device == "auto" else device, option="device=")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast may use TF32
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, world_size, dev, launch.note)


class StopRequest:
    """Turns SIGTERM and SIGUSR1 into "checkpoint after this step, then exit" (Slurm sends them
    before it preempts or times out a job). Every rank must stop at the same step, so the ranks
    agree on it with one tiny all-reduce per step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    CHECK_EVERY = 10  # steps between agreements on several ranks (each one waits for the GPU)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, world: World, step: int) -> bool:
        if world.world_size == 1:
            return self.signal_name is not None
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor([self.signal_name is not None], dtype=torch.int32, device=world.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "another rank's signal"
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def slot_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The random stream of one slot of one step: the same wherever and whenever it runs."""
    digest = hashlib.blake2b(f"{seed}:{step}:{slot}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy from pageable memory would make the host wait for the GPU; from pinned it does not."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


class _Window:
    """Sums over the steps since the last metrics line, kept on the device until it is logged.

    The loss and gradient-norm sums are saved in checkpoints, so a resumed run logs the same
    averages; throughput is timed by this process only, from the window's start to the host sync
    in :meth:`metrics`, less the time spent on samples and checkpoints.
    """

    def __init__(self, device: torch.device, losses: list[float] | None = None, grad_norm: float = 0.0,
                 steps: int = 0):
        self.losses = (torch.tensor(losses, dtype=torch.float64, device=device)
                       if losses is not None else None)
        self.grad_norm: float | torch.Tensor = grad_norm
        self.steps = steps
        self.timed_steps, self.waited, self.excluded = 0, 0.0, 0.0
        self.started = time.perf_counter()

    def add(self, losses: torch.Tensor, grad_norm: torch.Tensor, waited: float) -> None:
        self.losses = losses.clone() if self.losses is None else self.losses + losses
        self.grad_norm = self.grad_norm + grad_norm.double()
        self.steps += 1
        self.timed_steps += 1
        self.waited += waited

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def state(self) -> dict[str, Any]:
        return {"losses": None if self.losses is None else self.losses.tolist(),
                "grad_norm": float(self.grad_norm), "steps": self.steps}

    def metrics(self, global_batch: int, world: World, flops_per_sample: float | None,
                peak: float | None, aux_names: list[str]) -> dict[str, Any]:
        sums = self.losses.tolist()  # waits for the GPU: the window's work is done after this
        seconds = time.perf_counter() - self.started - self.excluded
        out: dict[str, Any] = {"loss": sums[0] / sums[1]}
        for j, name in enumerate(flow.TIMESTEP_BIN_NAMES):
            total, count = sums[2 + 2 * j], sums[3 + 2 * j]
            out[name] = total / count if count else None
        for j, name in enumerate(aux_names):  # each [sum, count]; none counted: not logged
            total, count = sums[_LOSS_ENTRIES + 2 * j], sums[_LOSS_ENTRIES + 2 * j + 1]
            if count:
                out[name] = total / count
        out["grad_norm"] = float(self.grad_norm) / self.steps
        images_per_s = global_batch * self.timed_steps / seconds if seconds > 0 else None
        out["images_per_s"] = images_per_s
        out["data_wait_share"] = self.waited / seconds if seconds > 0 else None
        if world.device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(world.device) / 2**30
            if flops_per_sample and peak and images_per_s:
                out["mfu"] = flops_per_sample * images_per_s / world.world_size / (peak * 1e12)
        else:
            out["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _grid(spec: LatentSpec) -> tuple[int, int]:
    down = model_downsample(spec)
    return spec.resolution // down, spec.resolution // down


def _find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    if resume == "never":
        found = latest_checkpoint(run_dir)
        if found is not None:
            raise ConfigError(f"{run_dir} already holds checkpoints (latest {found.name}): pass "
                              "--resume auto to continue it, or choose another --out")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"--resume {resume}: no such checkpoint file")
    return path


def _check_resume(state: dict[str, Any], cfg: TrainConfig, manifest_sha: str, fingerprint: dict[str, Any],
                  architecture: dict[str, Any], manifest: Manifest, path: Path | str) -> None:
    """A resume must continue the same experiment: refuse anything else, naming the difference."""
    check_format(state, path, window_keys=set(inspect.signature(_Window).parameters) - {"device"})
    changed = differences(from_dict(state["config"]), cfg)
    if changed:
        raise ConfigError(f"cannot resume {path}: the config differs from the run's: "
                          + "; ".join(changed) + " (start a new run with another --out)")
    check_channels(state["denoiser"], manifest.latent, f"checkpoint {path}")
    if state["denoiser"] != architecture:
        raise ConfigError(f"cannot resume {path}: the denoiser would be built differently "
                          f"({state['denoiser']} vs {architecture})")
    if state["manifest_sha256"] != manifest_sha:
        raise ConfigError(f"cannot resume {path}: the manifest {cfg.shards} changed since the run "
                          "started (its sha256 differs)")
    changed = fingerprint_diff(state["data_fingerprint"], fingerprint)
    if changed:
        raise CheckpointError(f"cannot resume {path}: the data order would differ from the run's: "
                              + "; ".join(changed))


def _check_sample_size(cfg: TrainConfig, spec: LatentSpec, patch_size: int) -> None:
    """The sample grids' images are whole tokens: checked before any step, not at the first grid."""
    token = model_downsample(spec) * patch_size
    size = cfg.sample.size or spec.resolution
    if size % token:
        raise ConfigError(f"sample.size={size}: the sample grids' images must be whole tokens of {token} px "
                          f"(model-space downsampling {model_downsample(spec)} x patch size {patch_size}); "
                          f"choose a multiple of {token}")


def _load_vae(spec: LatentSpec, device: torch.device) -> Any:
    from curate.vae import load_vae_for_spec

    return load_vae_for_spec(spec, device=device)


def _sample(model: torch.nn.Module, text: TextEncoder | EncodedPrompts, manifest: Manifest, vae: Any, cfg: TrainConfig,
            run_dir: Path, step: int) -> Path | None:
    """The sample grid of ``step``, written; with no ``vae`` (a sharded run's other ranks) the
    denoising alone, whose weight gathers the main rank's needs, and None."""
    from train.sample import sample_grid, sample_latents

    size = cfg.sample.size or manifest.latent.resolution
    settings = {"spec": manifest.latent, "height": size, "width": size, "steps": cfg.sample.steps,
                "guidance": cfg.sample.guidance, "guidance_interval": tuple(cfg.sample.guidance_interval),
                "shift": cfg.flow.shift, "prediction": cfg.flow.prediction, "x0_t_min": cfg.flow.x0_t_min,
                "seed": cfg.sample.seed}
    if vae is None:
        sample_latents(model, text, cfg.sample.prompts, **settings)
        return None
    path = run_dir / "samples" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(model, text, cfg.sample.prompts, vae=vae, path=path, **settings)
    return path
