"""Starting a run from trained weights (``init.source``, ``train --init-from``) instead of random ones.

Text-to-image models are trained in stages: PRX, like SD3 and PixArt, pre-trains at 256 px and
continues at 512 and then 1024 px on latents encoded at those resolutions, and ends with a
fine-tune on a curated subset. Each stage is a new run, with its own manifest, optimizer,
warm-up and step count, whose denoiser starts where the previous stage's ended::

    train --shards manifests/flux-512-long.json --out runs/s512 --init-from runs/s256

Only the denoiser's weights are taken. The optimizer's moments, the LR schedule (its warm-up
included), the EMA (which starts from the loaded weights) and REPA's projector start afresh,
and the step count starts at 0. The token grid may change: PRX's rotary positions follow it. The
architecture, the latent channels, the text encoder and what the output means (velocity or x0)
may not, and every difference is named before any step.

Sources: a run folder (its latest checkpoint), a checkpoint file, a ``train export`` folder or
any folder or Hub repository holding a ``PRXTransformer2DModel`` (``transformer/`` of a pipeline,
or the model at its root), or an alias of ``curate.models.DENOISERS`` (Photoroom's releases).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curate import storage
from curate.manifest import LatentSpec
from curate.models import resolve_model
from curate.runner import CurateError
from train.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
)
from train.config import ConfigError, TrainConfig
from train.ema import checkpoint_weights
from train.export import EXPORT_INFO


@dataclass
class InitialWeights:
    """The denoiser's starting state dict, and what the run records of where it came from."""

    state: dict[str, torch.Tensor]
    record: dict[str, Any]  # saved in every checkpoint of the run as "init"
    notes: list[str] = field(default_factory=list)  # for the run's log: what changes from the source

    def describe(self) -> str:
        r = self.record
        where = f"{r['source']}" + (f" at {r['revision']}" if r.get("revision") else "")
        step = f", step {r['step']}" if r.get("step") is not None else ""
        weights = f", {r['weights']} weights" if r.get("weights") else ""
        return f"{where} ({r['kind']}{step}{weights})"


def load_initial_weights(cfg: TrainConfig, architecture: dict[str, Any], spec: LatentSpec,
                         text_id: str) -> InitialWeights:
    """The weights ``cfg.init.source`` gives a denoiser built with ``architecture`` (this run's
    constructor arguments), checked against the run: architecture, text encoder (``text_id``),
    prediction; the latent space's VAE and resolution may change, with a note."""
    source = cfg.init.source
    if storage.is_remote(source):  # a run at a URL (train --out s3://...), or one of its checkpoints
        return _from_checkpoint(_fetch_remote(source), cfg, architecture, spec, text_id, source=source)
    path = Path(source).expanduser()
    if path.is_file():
        return _from_checkpoint(path, cfg, architecture, spec, text_id)
    if path.is_dir():
        if (path / CHECKPOINT_DIR).is_dir() or (path / "config.yaml").is_file():  # a run folder
            latest = latest_checkpoint(path)
            if latest is None:
                raise ConfigError(f"init.source {source}: the run holds no checkpoint yet")
            return _from_checkpoint(latest, cfg, architecture, spec, text_id)
        for subfolder in ("transformer", ""):
            if (path / subfolder / "config.json").is_file():
                return _from_diffusers(str(path.absolute()), subfolder, cfg, architecture, spec, text_id)
        raise ConfigError(f"init.source {source}: the folder is neither a run (checkpoints/), nor a "
                          "diffusers pipeline (transformer/config.json), nor a model (config.json)")
    try:
        ref = resolve_model(source, "denoiser", cfg.init.revision or None)
    except CurateError as e:
        raise ConfigError(f"init.source {source}: no such file or folder, and {e}") from None
    return _from_diffusers(ref.id, None, cfg, architecture, spec, text_id)


def _fetch_remote(source: str) -> Path:
    """The local copy of a URL run's latest checkpoint, or of the checkpoint a URL names."""
    from train.remote_run import RemoteRun, split_checkpoint_url

    run, step = split_checkpoint_url(source) or (source, None)
    path = RemoteRun(run, reader=True).fetch_on_each_machine(step)
    if path is None:
        raise ConfigError(f"init.source {source}: neither a run at a URL holding checkpoints, nor one of its "
                          "checkpoints (RUN/checkpoints/step_N.pt)")
    return path


def _from_checkpoint(path: Path, cfg: TrainConfig, architecture: dict[str, Any], spec: LatentSpec,
                     text_id: str, source: str | None = None) -> InitialWeights:
    if cfg.init.revision:
        raise ConfigError(f"init.revision applies to Hub sources, not to the checkpoint {path}")
    state = load_checkpoint(path, mmap=True)  # the model alone is read, not the optimizer's moments
    try:
        denoiser, saved_config = state["denoiser"], state["config"]
    except (KeyError, TypeError):
        raise CheckpointError(f"init.source {path} is not a checkpoint of `train` (no denoiser or config)") from None
    where = f"init.source {path}"
    _check_architecture(denoiser, architecture, where)
    prediction = saved_config.get("flow", {}).get("prediction", "velocity")
    _check_prediction(prediction, cfg, where)
    notes = _check_text_and_latents(state.get("text_encoder"), state.get("latent_spec"), cfg, spec, text_id, where,
                                    source_shift=saved_config.get("flow", {}).get("shift"))
    weights, used = checkpoint_weights(state, cfg.init.weights)
    record = {"kind": "checkpoint", "source": source or str(path.absolute()), "step": int(state.get("step", 0)),
              "weights": used, "manifest_sha256": state.get("manifest_sha256")}
    return InitialWeights(dict(weights), record, notes)


def _from_diffusers(location: str, subfolder: str | None, cfg: TrainConfig, architecture: dict[str, Any],
                    spec: LatentSpec, text_id: str) -> InitialWeights:
    """A PRXTransformer2DModel in diffusers' layout; on the Hub, ``transformer/`` of a pipeline
    repository (Photoroom's releases) or the model at the root."""
    from diffusers import PRXTransformer2DModel

    local = os.path.isdir(location)
    if cfg.init.weights != "raw":
        raise ConfigError(f"init.weights={cfg.init.weights} chooses among a run checkpoint's weights; "
                          f"{location} holds one set (leave init.weights at raw)")
    revision = cfg.init.revision or None
    if local and revision:
        raise ConfigError(f"init.revision applies to Hub sources, not to the folder {location}")
    where = f"init.source {cfg.init.source}"
    tried = [subfolder] if subfolder is not None else ["transformer", ""]
    config, commit, errors = None, None, []
    for sub in tried:
        try:
            config, commit = PRXTransformer2DModel.load_config(location, subfolder=sub or None, revision=revision,
                                                               return_commit_hash=True)
            subfolder = sub
            break
        except (OSError, ValueError) as e:
            errors.append(f"{sub or '(root)'}: {e}")
    if config is None:
        raise ConfigError(f"{where}: cannot read a PRXTransformer2DModel config from {location} "
                          f"({'; '.join(errors)})")
    if config.get("_class_name") not in (None, "PRXTransformer2DModel"):
        raise ConfigError(f"{where}: {location} holds a {config['_class_name']}, not a PRXTransformer2DModel")
    _check_architecture(config, architecture, where)
    info = _export_info(location, subfolder) if local else None
    notes = []
    if info is not None:  # a kiln export knows its run's text encoder and latents: check them as a checkpoint's
        notes = _check_text_and_latents(info.get("text_encoder"), info.get("latent_spec"), cfg, spec, text_id, where,
                                        source_shift=info.get("scheduler_shift"))
    _check_prediction("velocity", cfg, where)  # PRXPipeline's models predict velocities (export refuses x0 runs)
    try:
        # At the commit the config came from: a branch that moves in between cannot mix two models.
        model = PRXTransformer2DModel.from_pretrained(location, subfolder=subfolder or None,
                                                      revision=commit or revision, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{where}: cannot load the transformer's weights from {location}: {e}") from None
    record = {"kind": "diffusers", "source": location, "subfolder": subfolder or None, "revision": commit or revision,
              "step": info.get("step") if info else None, "weights": info.get("weights") if info else None}
    if info is not None:
        record["run"] = info.get("run")
    return InitialWeights(model.state_dict(), record, notes)


def _export_info(location: str, subfolder: str | None) -> dict[str, Any] | None:
    """``kiln_export.json`` of a ``train export`` folder (the pipeline folder holding the model)."""
    folder = Path(location)
    candidate = folder / EXPORT_INFO if subfolder else folder.parent / EXPORT_INFO
    try:
        return json.loads(candidate.read_text())
    except (OSError, ValueError):
        return None


# What a user sets to build the run's denoiser like the source's.
_SETTING = {"in_channels": "latents of a VAE with as many channels", "context_in_dim": "the source's text encoder",
            "patch_size": "model.patch_size={}", "hidden_size": "model.hidden_size={}", "depth": "model.depth={}",
            "num_heads": "model.num_heads={}", "mlp_ratio": "model.mlp_ratio={}", "axes_dim": "model.axes_dim={}",
            "theta": "model.theta={}", "bottleneck_size": "model.bottleneck_size={}",
            "resolution_embeds": "model.resolution_embeds={}"}


def _check_architecture(source: dict[str, Any], architecture: dict[str, Any], where: str) -> None:
    """The source's PRXTransformer2DModel arguments equal the run's (constructor defaults filled
    in for what either leaves out), or every difference is named with the setting that fixes it."""
    from diffusers import PRXTransformer2DModel

    params = inspect.signature(PRXTransformer2DModel.__init__).parameters
    defaults = {name: p.default for name, p in params.items() if name != "self"}
    theirs, ours = defaults | {k: v for k, v in source.items() if k in defaults}, defaults | architecture
    differing = [k for k in defaults if _plain(theirs[k]) != _plain(ours[k])]
    if not differing:
        return
    found = ", ".join(f"{k} {_plain(theirs[k])} (this run: {_plain(ours[k])})" for k in differing)
    fixes = [_SETTING[k].format(json.dumps(_plain(theirs[k])).replace(" ", "")) if k in _SETTING
             else f"{k} {_plain(theirs[k])}, which the trainer does not build" for k in differing]
    raise ConfigError(f"{where} is another architecture: {found}; to start from it, use {'; '.join(fixes)}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_prediction(prediction: str, cfg: TrainConfig, where: str) -> None:
    if prediction != cfg.flow.prediction:
        raise ConfigError(f"{where} predicts {prediction}, this run flow.prediction={cfg.flow.prediction}: "
                          "its weights would mean something else here")


def _check_text_and_latents(text: dict[str, Any] | None, latent: dict[str, Any] | None, cfg: TrainConfig,
                            spec: LatentSpec, text_id: str, where: str, *, source_shift: float | None) -> list[str]:
    """The same text encoder (another one of the same width would feed the model other
    features); the same VAE is not required but noted, and so is a change of resolution."""
    if text and text.get("id") and text["id"] != text_id:
        raise ConfigError(f"{where} was trained with the text encoder {text['id']}, this run loads "
                          f"{text_id} (text_encoder={cfg.text_encoder}): set text_encoder={text['id']}")
    notes = []
    if latent:
        before = LatentSpec.model_validate(latent)
        if (before.vae_id, before.revision) != (spec.vae_id, spec.revision):
            notes.append(f"WARNING: the source was trained on latents of {before.vae_id}, this run's come "
                         f"from {spec.vae_id}: the model starts in another latent space")
        elif (before.scaling_factor, before.shift_factor) != (spec.scaling_factor, spec.shift_factor):
            notes.append(f"WARNING: the source's inputs were (latent - {before.shift_factor:g}) * "
                         f"{before.scaling_factor:g}, this run's are (latent - {spec.shift_factor:g}) * "
                         f"{spec.scaling_factor:g} (curate manifest --latent-scaling): the model starts at "
                         "another input scale")
        if before.resolution != spec.resolution:
            # More pixels keep more signal at the same noise level; SD3 scales its shift by
            # sqrt(pixels), that is by the side's ratio.
            shift = f"the source's {source_shift:g}, " if source_shift is not None else ""
            notes.append(f"resolution {before.resolution} px -> {spec.resolution} px; flow.shift {cfg.flow.shift:g} "
                         f"({shift}SD3 scales it with the side: x{spec.resolution / before.resolution:g})")
    return notes
