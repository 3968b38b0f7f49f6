"""The training configuration: typed dataclasses, presets, YAML files and ``key=value`` overrides.

Precedence, lowest first: the PRX baseline defaults below, the ``--preset``, the ``--config``
YAML file, then ``key=value`` pairs on the command line. The keys users type most are flat
(``steps``, ``lr``, ``global_batch``...); the rest are grouped and reached with dots
(``flow.shift=3``, ``optim.warmup_steps=500``). The resolved config is saved in the run folder
and a resumed run must match it (see :data:`MAY_CHANGE_ON_RESUME`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work is done."""


@dataclass
class ModelConfig:
    """diffusers' PRXTransformer2DModel; the defaults are PRX-1.2B."""

    hidden_size: int = 1792
    depth: int = 16
    num_heads: int = 28
    mlp_ratio: float = 3.5
    axes_dim: list[int] = field(default_factory=lambda: [32, 32])
    # Pixels per token side is 16 either way: 2 for Flux latents (1/8), 1 for FLUX.2's
    # already 2x2-patchified model space (1/16), 16 for pixels. 0 chooses from the manifest.
    patch_size: int = 0
    theta: int = 10000
    # A two-layer patch projection (patch -> bottleneck_size -> hidden; 0: one linear layer): for
    # pixel space, where a 32 px patch is 3,072 values (JiT; PRX's speedrun uses 256).
    bottleneck_size: int = 0
    # The image's token grid (h, w) embedded and added to the timestep's vector, so every block's
    # modulation knows the resolution: for runs over several resolutions or buckets (PRX's
    # resolution-aware "vec" conditioning, diffusers' resolution_embeds).
    resolution_embeds: bool = False


@dataclass
class OptimConfig:
    """AdamW as PRX: betas (0.9, 0.95), eps 1e-15, no weight decay, linear warm-up then constant.

    ``decay`` (linear, cosine or 1-sqrt) lowers the LR to ``min_lr_ratio * lr`` at the last step,
    over every step after the warm-up or, with ``decay_steps=N``, over the last N (train/schedule.py).

    ``name=muon`` (the PRX Muon ablation) updates the transformer blocks' weight matrices with
    Muon, at the same ``lr`` (scaled per matrix to AdamW's update size), and the rest with AdamW.
    """

    name: str = "adamw"  # adamw, or muon (see train/optim.py)
    muon_momentum: float = 0.95
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-15
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    decay: str = "none"  # none (constant after the warm-up, PRX), linear, cosine or 1-sqrt
    decay_steps: int = 0  # decay over the last N steps (warm-up, stable, decay); 0 = all after the warm-up
    min_lr_ratio: float = 0.0  # the LR the decay ends at, as a share of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off


@dataclass
class FlowConfig:
    """Rectified-flow timesteps: logit-normal(mean, std) with a share drawn uniformly."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    uniform_share: float = 0.1
    shift: float = 1.0  # SD3 resolution shift; > 1 spends more steps at high noise
    prediction: str = "velocity"  # what the denoiser outputs: velocity, or x0 (train/flow.py)
    x0_t_min: float = 0.05  # x0 prediction: t is clamped to this when turned into a velocity
    contrastive: float = 0.0  # contrastive flow matching's lambda (0.05): weight of the negative pairs' error; 0 = off
    immiscible: bool = False  # immiscible diffusion: each micro-batch's noise assigned to its latents by least distance


@dataclass
class EMAConfig:
    """An exponential moving average of the weights (train/ema.py); decay 0 turns it off, as PRX."""

    decay: float = 0.0  # e.g. 0.9999; warmed up as min(decay, (1 + step) / (10 + step))


@dataclass
class RepaConfig:
    """REPA, representation alignment with a frozen vision encoder (train/repa.py); weight 0 turns
    it off, as PRX's baseline. The teacher reads the original images of the manifest's image stage."""

    weight: float = 0.0  # of the alignment loss; REPA's and PRX's 0.5
    encoder: str = "dinov3"  # the teacher: alias (dinov3 = ViT-B/16, PRX's; dinov2-base = REPA's), Hub id or folder
    revision: str = ""  # of a Hub teacher; "" = its default branch
    block: int = 0  # align the output of this block (1-based); 0 = a quarter of model.depth
    stop_step: int = 0  # REPA ends at this step (PRX's burn-in, then off); 0 = the whole run
    projector_dim: int = 2048  # the projector MLP's width
    # iREPA (Singh et al. 2025): one 3x3 convolution over the token grid instead of the MLP ("conv"),
    # and the teacher's features normalised over the image's tokens (spatial_norm): per channel,
    # minus spatial_gamma times their mean, over their standard deviation (0.6: iREPA's code default).
    projector: str = "mlp"  # mlp (REPA's) or conv (iREPA's)
    spatial_norm: bool = False
    spatial_gamma: float = 0.6
    images: str = ""  # the image stage; "" = the one the manifest's provenance names (merged: NAME=DIR,...)


@dataclass
class PerceptualConfig:
    """Perceptual losses between the denoiser's clean-image estimate and the image, in pixel space
    (train/perceptual.py; PRX's speedrun, PixelGen); weight 0 turns each off, as PRX's baseline.
    Each applies to the samples whose t is below its ``t_max`` (t = 1 is pure noise)."""

    lpips: float = 0.0  # weight of LPIPS (VGG16, v0.1 weights); PRX's 0.1
    lpips_t_max: float = 0.3  # PRX's: the less noisy samples only
    lpips_scale: float = 0.5  # images scaled by this before LPIPS (PRX's half resolution)
    dino: float = 0.0  # weight of P-DINO (1 - cosine of a DINO ViT's patch tokens); PRX's 0.01
    dino_encoder: str = "dinov2-base-reg"  # PRX's DINOv2-B/14 with registers; alias, Hub id or folder
    dino_revision: str = ""  # of a Hub encoder; "" = its default branch
    dino_t_max: float = 1.0  # PRX's: every sample
    dino_size: int = 224  # both images resized to this square before the encoder


@dataclass
class RoutingConfig:
    """TREAD token routing (train/routing.py); ratio 0 turns it off, as PRX's baseline."""

    ratio: float = 0.0  # share of image tokens that skip the routed blocks in training; TREAD's 0.5
    start: int = 2  # the first routed block (0-based)
    end: int = 0  # the routed blocks end before this one; 0 = model.depth - 2


@dataclass
class InitConfig:
    """Start from trained weights instead of random ones (train/init.py): the next stage of a run
    (256 px, then 512), a fine-tune on a curated subset, or a released PRX transformer."""

    source: str = ""  # a run folder (its latest checkpoint), a checkpoint file, a diffusers folder or Hub id, or a DENOISERS alias; "" = random
    weights: str = "raw"  # of a run's checkpoint: raw (the trained weights) or ema (its average)
    revision: str = ""  # of a Hub source; "" = its default branch


@dataclass
class ValConfig:
    """A held-out loss (train/validation.py): the flow loss of the same samples at the same timesteps
    with the same noise at every evaluation, so runs and steps compare by their weights alone."""

    shards: str = ""  # a manifest of held-out samples, latents of the training manifest's spec; "" = off
    every: int = 1000  # steps between evaluations (and one at the end)
    samples: int = 512  # the manifest's first samples, in shard order
    timesteps: int = 8  # evenly spaced: t = (k + 0.5) / timesteps


@dataclass
class DataConfig:
    workers: int = 2  # DataLoader workers per rank (part of the data order: fixed for a run)
    shuffle_buffer: int = 1000  # samples per shuffled block, per stream
    prefetch: int = 4  # batches each worker keeps ready
    verify: str = "size"  # before training: "size" (tar sizes vs indexes), "checksums" (sha256), "none"
    sample_latents: bool = True  # draw mean + std * eps from stored distributions (else the mean)
    allow_pipe: bool = False  # manifests whose shard URLs run a shell


# The guidance interval that covers every sampling time: the default, which an evaluation does not
# record (so evaluations from before the interval existed keep their tags).
EVERY_STEP = (0.0, 1.0)


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: [
        "a photograph of a red fox sitting in fresh snow, soft morning light",
        "a bowl of ramen on a wooden table, steam rising, top-down view",
        "an old lighthouse on a rocky coast under a stormy sky",
        "a watercolor painting of a city street with people holding umbrellas",
        "a close-up portrait of an elderly man with a grey beard, studio lighting",
        "a cozy living room with a green sofa and plants by a large window",
        "a bright blue vintage car parked in front of a yellow wall",
        "a mountain lake at sunset with pine trees reflected in the water",
    ])
    steps: int = 28
    guidance: float = 4.0
    guidance_interval: list[float] = field(default_factory=lambda: list(EVERY_STEP))  # t range where guidance applies
    seed: int = 0
    size: int = 0  # pixels per side; 0 uses the manifest's resolution


@dataclass
class LogConfig:
    every: int = 10  # steps between metric lines
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "kiln"
    peak_tflops: float = 0.0  # the GPU's dense bf16 peak for MFU; 0 looks the GPU up in a table


@dataclass
class TrainConfig:
    shards: str = ""  # the manifest
    out: str = ""  # the run folder
    preset: str = "prx-1.2b"
    ablations: list[str] = field(default_factory=list)  # names from ABLATIONS, applied after the preset
    steps: int = 100_000
    global_batch: int = 256  # samples per optimizer step, over all ranks
    micro_batch: int = 32  # samples per forward pass; accumulation = global / (micro * world)
    lr: float = 1e-4
    seed: int = 0
    text_encoder: str = "t5gemma"  # alias, Hub id or local folder
    max_tokens: int = 256
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    sample_every: int = 5000  # 0 turns sampling off
    weights_dtype: str = "float32"
    allow_bf16_weights: bool = False
    compile: bool = False
    activation_checkpointing: int = 0  # recompute every Nth block's activations in the backward pass (1 = all)
    fsdp: bool = False  # shard weights, gradients and optimizer state over the ranks (train/sharding.py), not DDP
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    val: ValConfig = field(default_factory=ValConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Presets override the baseline; they are plain key=value dictionaries, like a YAML file.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the demo: about 0.2M parameters; runs on a CPU in seconds.
    "tiny": {
        "steps": 200, "global_batch": 8, "micro_batch": 4, "max_tokens": 64,
        "checkpoint_every": 100, "sample_every": 100,
        "model.hidden_size": 64, "model.depth": 2, "model.num_heads": 4,
        "model.mlp_ratio": 2.0, "model.axes_dim": [8, 8],
        "optim.warmup_steps": 10, "lr": 1e-3,
        "sample.steps": 8, "sample.prompts": SampleConfig().prompts[:4],
        "data.shuffle_buffer": 256, "log.every": 5,
        "repa.projector_dim": 256,  # REPA's 2048-wide projector would be 20 times this denoiser
    },
    # About 150M parameters: quick ablations on one GPU.
    "small": {
        "model.hidden_size": 768, "model.depth": 12, "model.num_heads": 12,
        "model.mlp_ratio": 3.5, "model.axes_dim": [32, 32],
        "compile": True,
    },
    # PRX-1.2B, the baseline of the ablations (the defaults above), compiled: on an H100 the
    # compiled step ran 1.95x faster than eager (MFU 35% against 18%; BENCHMARKS.md).
    "prx-1.2b": {"compile": True},
}

# The PRX ablations (and EMA) as named overrides of one baseline: `--ablation x-pred muon`.
# The data-side ones are manifests, not switches: short captions are `short.json` instead of
# `long.json`, the FLUX.2 autoencoder is a manifest of `curate encode-latents --vae flux2`.
ABLATIONS: dict[str, dict[str, Any]] = {
    "x-pred": {"flow.prediction": "x0"},  # PRX: FID 18.20 -> 16.80
    "muon": {"optim.name": "muon"},  # PRX: FID 18.20 -> 15.55
    "repa": {"repa.weight": 0.5},  # PRX: FID 18.20 -> 14.64 with DINOv3 (burn-in: repa.stop_step)
    # iREPA: REPA with a convolutional projector and the teacher's features spatially normalised
    "irepa": {"repa.weight": 0.5, "repa.projector": "conv", "repa.spatial_norm": True},
    "tread": {"routing.ratio": 0.5},  # PRX ablated TREAD and SPRINT (token routing); not in this table
    "cfm": {"flow.contrastive": 0.05},  # contrastive flow matching, another of PRX's training tricks
    "immiscible": {"flow.immiscible": True},  # immiscible diffusion: noise assigned to latents per batch
    "ema": {"ema.decay": 0.9999},  # not in PRX's table (its baseline has EMA off)
    # PRX's speedrun (pixel space, x-prediction): perceptual losses on the clean-image estimate
    "lpips": {"perceptual.lpips": 0.1},
    "pdino": {"perceptual.dino": 0.01},
}

# A resumed run may change these (how long to train and how it ends, how often to look); anything else would
# make it a different experiment, and resuming it is refused.
MAY_CHANGE_ON_RESUME = (
    "shards", "out", "steps", "checkpoint_every", "keep_checkpoints", "sample_every", "compile",
    "activation_checkpointing",  # the same gradients, in less memory
    "fsdp",  # the same steps, with the state split over the ranks (checkpoints are whole either way)
    "optim.decay", "optim.decay_steps", "optim.min_lr_ratio",  # a cool-down added to a run
    "device", "data.prefetch", "data.verify", "sample.", "log.", "repa.images", "val.",
)

BF16_WEIGHTS_REFUSAL = (
    "weights_dtype=bfloat16 stores the denoiser's weights in bf16, so small AdamW updates are "
    "rounded away; in the PRX ablations this silently cost almost 4 FID points (18.20 -> 21.87). "
    "Training uses fp32 weights with bf16 autocast on CUDA instead. If you really want bf16 "
    "weights, add allow_bf16_weights=true."
)


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    ablations: list[str] | None = None,
    base: TrainConfig | None = None,
    **fields: Any,
) -> TrainConfig:
    """Defaults, then the preset, then the ``ablations`` (names of :data:`ABLATIONS`), then a YAML
    file, then ``key=value`` overrides, then ``fields``.

    ``base`` (a resumed run's saved config) replaces defaults, preset and ablations: what the
    command line adds goes on top of it, and a preset or ablations named again must be the run's own.
    """
    file_data = _read_yaml(config_file) if config_file is not None else {}
    parsed = [_parse_override(item) for item in overrides or []]
    if base is not None:
        if preset is not None and preset != base.preset:
            raise ConfigError(f"the run was trained with --preset {base.preset}, not {preset}")
        if ablations and list(ablations) != base.ablations:
            raise ConfigError(f"the run was trained with --ablation {' '.join(base.ablations) or '(none)'}, "
                              f"not {' '.join(ablations)}")
        cfg = from_dict(to_dict(base))
    else:
        cfg = TrainConfig()
        preset = _named_preset(preset, file_data, str(config_file), parsed, fields.get("preset")) or cfg.preset
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        cfg.preset = preset
        apply_dict(cfg, PRESETS[preset], source=f"preset {preset}")
        for name in dict.fromkeys(ablations or []):
            if name not in ABLATIONS:
                raise ConfigError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
            apply_dict(cfg, ABLATIONS[name], source=f"ablation {name}")
            cfg.ablations.append(name)
    applied = list(cfg.ablations)
    if config_file is not None:
        apply_dict(cfg, file_data, source=str(config_file))
    for key, value in parsed:
        set_key(cfg, key, value, source="command line")
    for key, value in fields.items():
        if value is not None:
            set_key(cfg, key, value, source="command line")
    if cfg.ablations != applied:  # the key records what --ablation applied; setting it applies nothing
        raise ConfigError(f"ablations are chosen with --ablation NAME (which applies them), not set as a "
                          f"key: {cfg.ablations}")
    validate(cfg)
    return cfg


def _parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` as (key, the value read as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: its value is not YAML ({str(e).splitlines()[0]}); quote a "
                          "string that starts with [ { or :") from None
    return key.strip(), parsed


def _named_preset(flag: str | None, file_data: dict[str, Any], file_name: str, parsed: list[tuple[str, Any]],
                  field_value: Any) -> str | None:
    """The preset a new run applies: ``--preset``, or the ``preset`` key of the config file or the
    command line. The key is applied like the flag (a key that only renamed the run would train the
    baseline's model under another preset's name); naming two different presets is an error."""
    named = {"--preset": flag} if flag is not None else {}
    if file_data.get("preset") is not None:
        named[file_name] = file_data["preset"]
    for key, value in parsed:
        if key == "preset":
            named["the command line"] = value
    if field_value is not None:
        named["the command line"] = field_value
    if len({str(v) for v in named.values()}) > 1:
        raise ConfigError("two presets are named: " + ", ".join(f"{v} by {where}" for where, v in named.items()))
    return str(next(iter(named.values()))) if named else None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    from curate import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path).decode())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def apply_dict(cfg: TrainConfig, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Nested mappings (YAML) and dotted keys (presets) both work."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        target = _lookup(cfg, full, source, allow_group=True)
        if isinstance(value, dict) and _is_group(target):
            apply_dict(cfg, value, source, prefix=f"{full}.")
        else:
            set_key(cfg, full, value, source)


def _is_group(target: tuple[Any, str]) -> bool:
    owner, name = target
    return dataclasses.is_dataclass(getattr(owner, name))


def _lookup(cfg: TrainConfig, key: str, source: str, allow_group: bool = False) -> tuple[Any, str]:
    owner: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(owner)]
        if part not in names:
            known = _all_keys(TrainConfig())
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
        if depth < len(parts) - 1:
            owner = getattr(owner, part)
            if not dataclasses.is_dataclass(owner):
                raise ConfigError(f"{source}: {'.'.join(parts[:depth + 1])!r} has no sub-keys")
    if not allow_group and dataclasses.is_dataclass(getattr(owner, parts[-1])):
        raise ConfigError(f"{source}: {key!r} is a group of keys; set {key}.NAME=VALUE")
    return owner, parts[-1]


def set_key(cfg: TrainConfig, key: str, value: Any, source: str) -> None:
    owner, name = _lookup(cfg, key, source)
    hint = typing.get_type_hints(type(owner))[name]
    setattr(owner, name, _coerce(value, hint, f"{source}: {key}"))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and item is str:
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    return value


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def check_guidance_interval(interval: Sequence[float], name: str) -> tuple[float, float]:
    """``[low, high]`` with 0 <= low <= high <= 1, as a tuple; anything else is a ConfigError naming ``name``."""
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ConfigError(f"{name} must be two times 0 <= low <= high <= 1 (t = 1 is noise), got {list(interval)}")
    return float(interval[0]), float(interval[1])


def validate(cfg: TrainConfig) -> None:
    """Everything that can be checked without the data or the world size."""
    if cfg.weights_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"weights_dtype must be float32 or bfloat16, not {cfg.weights_dtype!r}")
    if cfg.weights_dtype == "bfloat16" and not cfg.allow_bf16_weights:
        raise ConfigError(BF16_WEIGHTS_REFUSAL)
    positive = {"steps": cfg.steps, "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch,
                "max_tokens": cfg.max_tokens, "checkpoint_every": cfg.checkpoint_every,
                "keep_checkpoints": cfg.keep_checkpoints, "data.shuffle_buffer": cfg.data.shuffle_buffer,
                "log.every": cfg.log.every, "sample.steps": cfg.sample.steps,
                "model.hidden_size": cfg.model.hidden_size, "model.depth": cfg.model.depth,
                "model.num_heads": cfg.model.num_heads, "model.mlp_ratio": cfg.model.mlp_ratio,
                "model.theta": cfg.model.theta}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.model.patch_size < 0 or cfg.model.bottleneck_size < 0:
        raise ConfigError("model.patch_size and model.bottleneck_size cannot be negative (0: chosen from the "
                          "manifest, and no bottleneck)")
    if cfg.global_batch % cfg.micro_batch:
        raise ConfigError(f"global_batch ({cfg.global_batch}) must be a multiple of micro_batch "
                          f"({cfg.micro_batch})")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ConfigError(f"caption_dropout must be in [0, 1), got {cfg.caption_dropout}")
    if not 0.0 <= cfg.flow.uniform_share <= 1.0:
        raise ConfigError(f"flow.uniform_share must be in [0, 1], got {cfg.flow.uniform_share}")
    if cfg.flow.shift <= 0 or cfg.flow.logit_std <= 0:
        raise ConfigError("flow.shift and flow.logit_std must be positive")
    if cfg.flow.prediction not in ("velocity", "x0"):
        raise ConfigError(f"flow.prediction must be velocity or x0, not {cfg.flow.prediction!r}")
    if not 0.0 < cfg.flow.x0_t_min < 1.0:
        raise ConfigError(f"flow.x0_t_min must be in (0, 1), got {cfg.flow.x0_t_min}")
    if not 0.0 <= cfg.flow.contrastive < 1.0:
        raise ConfigError(f"flow.contrastive must be in [0, 1) (0 turns it off), got {cfg.flow.contrastive}")
    if (cfg.flow.contrastive > 0 or cfg.flow.immiscible) and cfg.micro_batch < 2:
        raise ConfigError("flow.contrastive and flow.immiscible pair each sample with others of its micro-batch: "
                          "micro_batch must be 2 or more")
    if cfg.optim.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name must be adamw or muon, not {cfg.optim.name!r}")
    if not 0.0 <= cfg.optim.muon_momentum < 1.0:
        raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {cfg.optim.muon_momentum}")
    if cfg.optim.decay not in ("none", "linear", "cosine", "1-sqrt"):
        raise ConfigError(f"optim.decay must be none, linear, cosine or 1-sqrt, not {cfg.optim.decay!r}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.decay_steps < 0 or not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError("optim.warmup_steps and optim.decay_steps cannot be negative, and optim.min_lr_ratio "
                          f"must be in [0, 1] (got {cfg.optim.min_lr_ratio})")
    if cfg.optim.decay == "none" and (cfg.optim.decay_steps or cfg.optim.min_lr_ratio):
        raise ConfigError("optim.decay_steps and optim.min_lr_ratio shape a decay, but optim.decay is none: "
                          "name one (linear, cosine or 1-sqrt)")
    if cfg.optim.decay != "none" and cfg.optim.warmup_steps + cfg.optim.decay_steps > cfg.steps:
        raise ConfigError(f"optim.decay_steps ({cfg.optim.decay_steps}) and optim.warmup_steps "
                          f"({cfg.optim.warmup_steps}) overlap in a run of {cfg.steps} steps: the decay "
                          "starts after the warm-up ends")
    perceptual = cfg.perceptual
    if min(perceptual.lpips, perceptual.dino) < 0:
        raise ConfigError("perceptual.lpips and perceptual.dino are weights: 0 (off) or more")
    for key in ("lpips_t_max", "lpips_scale", "dino_t_max"):
        if not 0 < getattr(perceptual, key) <= 1:
            raise ConfigError(f"perceptual.{key} must be in (0, 1], not {getattr(perceptual, key)}")
    if perceptual.dino_size < 1:
        raise ConfigError(f"perceptual.dino_size must be positive, not {perceptual.dino_size}")
    if cfg.repa.weight < 0 or cfg.repa.stop_step < 0 or cfg.repa.block < 0 or cfg.repa.projector_dim < 1:
        raise ConfigError("repa.weight, repa.stop_step and repa.block cannot be negative, nor "
                          "repa.projector_dim below 1")
    if cfg.repa.block > cfg.model.depth:
        raise ConfigError(f"repa.block {cfg.repa.block} is past the last block (model.depth {cfg.model.depth})")
    if cfg.repa.projector not in ("mlp", "conv"):
        raise ConfigError(f"repa.projector must be mlp (REPA's) or conv (iREPA's), not {cfg.repa.projector!r}")
    if not 0.0 <= cfg.repa.spatial_gamma <= 1.0:
        raise ConfigError(f"repa.spatial_gamma must be in [0, 1], not {cfg.repa.spatial_gamma}")
    if not 0.0 <= cfg.routing.ratio < 1.0:
        raise ConfigError(f"routing.ratio must be in [0, 1) (0 turns routing off), got {cfg.routing.ratio}")
    start, end = routed_blocks(cfg)
    if cfg.routing.ratio > 0 and not 0 <= start < end <= cfg.model.depth:
        raise ConfigError(f"token routing needs 0 <= routing.start < routing.end <= model.depth; got start "
                          f"{cfg.routing.start}, end {end} (routing.end 0 means depth - 2), depth "
                          f"{cfg.model.depth}")
    aligned = repa_block(cfg)
    if cfg.repa.weight > 0 and cfg.repa.projector == "conv" and cfg.routing.ratio > 0 and aligned_in_route(cfg, aligned):
        raise ConfigError(f"repa.projector=conv convolves block {aligned}'s whole token grid, but TREAD routes "
                          f"part of its tokens past blocks {start + 1}-{end}: align a block outside them "
                          "(repa.block) or route others (routing.start, routing.end)")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1) (0 turns EMA off), got {cfg.ema.decay}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs two numbers, got {cfg.optim.betas}")
    if cfg.init.weights not in ("raw", "ema"):
        raise ConfigError(f"init.weights must be raw or ema, not {cfg.init.weights!r}")
    if cfg.init.revision and not cfg.init.source:
        raise ConfigError("init.revision names a revision of init.source, which is not set")
    if cfg.data.verify not in ("size", "checksums", "none"):
        raise ConfigError(f"data.verify must be size, checksums or none, not {cfg.data.verify!r}")
    if cfg.val.shards and min(cfg.val.every, cfg.val.samples, cfg.val.timesteps) < 1:
        raise ConfigError(f"val.every, val.samples and val.timesteps must be positive (got {cfg.val.every}, "
                          f"{cfg.val.samples}, {cfg.val.timesteps})")
    check_guidance_interval(cfg.sample.guidance_interval, "sample.guidance_interval")
    if cfg.sample.size < 0:
        raise ConfigError(f"sample.size cannot be negative (0: the manifest's resolution), got {cfg.sample.size}")
    if cfg.sample_every and not cfg.sample.prompts:
        raise ConfigError("sample.prompts is empty, but sample_every asks for sample grids: name prompts, or "
                          "turn the grids off with sample_every=0")
    if cfg.sample_every < 0 or cfg.data.workers < 0 or cfg.activation_checkpointing < 0:
        raise ConfigError("sample_every, data.workers and activation_checkpointing cannot be negative")
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(f"model.hidden_size ({cfg.model.hidden_size}) must be a multiple of "
                          f"model.num_heads ({cfg.model.num_heads})")
    head_dim = cfg.model.hidden_size // cfg.model.num_heads
    if cfg.model.bottleneck_size < 0 or cfg.model.patch_size < 0:
        raise ConfigError("model.bottleneck_size and model.patch_size cannot be negative")
    if sum(cfg.model.axes_dim) != head_dim:
        raise ConfigError(f"model.axes_dim {cfg.model.axes_dim} must sum to the head size "
                          f"hidden_size / num_heads = {head_dim}")


def routed_blocks(cfg: TrainConfig) -> tuple[int, int]:
    """(start, end) of TREAD's routed blocks: ``routing.start`` and ``routing.end`` (0: depth - 2)."""
    return cfg.routing.start, cfg.routing.end or cfg.model.depth - 2


def repa_block(cfg: TrainConfig) -> int:
    """The block (1-based) whose output REPA aligns: ``repa.block``, or a quarter of the depth
    (PRX-1.2B: block 4 of 16; REPA aligned block 8 of SiT-XL's 28)."""
    return cfg.repa.block or max(1, cfg.model.depth // 4)  # validate checks repa.block


def aligned_in_route(cfg: TrainConfig, block: int) -> bool:
    """Whether REPA's block (1-based) lies in the routed range, where it sees the kept tokens only."""
    start, end = routed_blocks(cfg)
    return start <= block - 1 < end


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any], source: str = "saved config") -> TrainConfig:
    cfg = TrainConfig()
    apply_dict(cfg, data, source=source)
    return cfg


def load_run_config(run_dir: str | Path) -> TrainConfig | None:
    """The resolved config a run folder (or a run at a URL) was started with (``RUN/config.yaml``), if any."""
    from curate import storage

    path = storage.join(run_dir, "config.yaml")
    return from_dict(_read_yaml(path), source=path) if storage.is_file(path) else None


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, width=100)


def differences(saved: TrainConfig, current: TrainConfig) -> list[str]:
    """Keys that differ between two configs and may not change on resume, as ``key: a -> b``."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(current))
    out = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE_ON_RESUME):
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config groups as dotted keys: {"flow": {"shift": 1}} -> {"flow.shift": 1}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
