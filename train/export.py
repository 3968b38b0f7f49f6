"""Write a trained denoiser as a folder that diffusers' ``PRXPipeline.from_pretrained`` loads.

The folder is laid out like PRX's own Hub pipelines::

    model_index.json                    PRXPipeline, default_sample_size
    transformer/                        PRXTransformer2DModel (save_pretrained, fp32 as trained)
    scheduler/scheduler_config.json     FlowMatchEulerDiscreteScheduler(shift=...)
    text_encoder/                       T5GemmaEncoder weights + composite T5GemmaConfig
    tokenizer/                          model_max_length = max_tokens
    vae/                                the manifest's VAE (curate.vae.load_vae_for_spec); none in pixel space
    kiln_export.json                    source run and step, latent spec, mode, versions
    kiln_latents.json                   (latent mode only) how to turn outputs into images

The conventions match training: the pipeline calls the transformer with ``timestep / 1000`` =
sigma in [0, 1] with sigma = 1 noise, ``x_t = (1 - sigma) x0 + sigma eps``, Euler steps on the
predicted velocity, guidance against the empty prompt, prompts cleaned and padded as
:class:`curate.text.TextEncoder` does. (Its default time grid differs from
:func:`train.flow.euler_sample`'s; see ``train/sample.py``.)

Two modes, chosen from the latent spec:

- ``pixels`` (Flux ``AutoencoderKL`` and any VAE the pipeline decodes right): the pipeline makes
  noise with ``vae.config.latent_channels`` channels at ``H / vae_scale_factor`` and decodes
  ``latents / scaling_factor + shift_factor``: exactly our model space ``(z - shift) * scale``.
  ``pipe(prompt)`` gives images.
- ``latents`` (FLUX.2 ``AutoencoderKLFlux2``, and any VAE the pipeline would decode wrong): our
  model space is the VAE latent 2x2-patchified and normalised per channel with the VAE's
  batch-norm statistics (128 channels at 1/16); the pipeline knows only scalar scale and shift,
  32 channels at 1/8, and does not list this VAE class. Exporting it as the pipeline's VAE would
  load and then fail (or, worse, decode garbage), so it is exported with ``vae=None``: the
  pipeline loads, runs the same denoiser and returns model-space latents
  (``output_type="latent"``, ``use_resolution_binning=False``, and ``latents=`` noise of shape
  [B, 128, H/16, W/16], since without a VAE the pipeline would size its own noise at 1/8). The VAE
  is saved in ``vae/`` beside it (not registered with the pipeline) and :func:`load_exported`
  returns a ``decode`` that turns those latents into images through ``curate.vae``.
  Pixel space (``--vae pixels``) is exported so too, with no VAE to save: the denoiser's output
  is the image in [-1, 1], which ``decode`` maps to [0, 1].

diffusers 0.42's ``PRXPipeline`` fails under guidance when one call makes more than one image
(several prompts or ``num_images_per_prompt`` > 1: it passes 2 timesteps for 2B latents); call it
once per prompt.

A folder is written under a temporary name and renamed into place, so a reader never sees half
an export; an existing export at the destination is replaced, any other folder is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image

from curate import storage
from curate.manifest import LatentSpec
from curate.models import PIXELS
from curate.runner import CurateError
from curate.text import DEFAULT_MAX_TOKENS, TextEncoder, quiet_transformers
from curate.vae import (
    LoadedVae,
    decode_to_images,
    load_vae_for_spec,
    model_channels,
    model_downsample,
)
from train.sample import initial_noise

if TYPE_CHECKING:
    from diffusers import PRXPipeline, PRXTransformer2DModel

__all__ = [
    "EXPORT_INFO",
    "LATENTS_INFO",
    "ExportError",
    "export_pipeline",
    "export_run",
    "exported_vae",
    "generate",
    "load_exported",
    "pipeline_decode_problem",
]

EXPORT_INFO = "kiln_export.json"
LATENTS_INFO = "kiln_latents.json"
# The classes PRXPipeline declares for its VAE (it unscales with their config's scalars).
_PIPELINE_VAES = ("AutoencoderKL", "AutoencoderDC")


class ExportError(CurateError, ValueError):
    """A model, spec or destination that cannot be exported; the message says why."""


def pipeline_decode_problem(vae: LoadedVae, spec: LatentSpec) -> str | None:
    """Why ``PRXPipeline`` would not decode our model-space latents right with ``vae``, or None.

    Mirrors what the pipeline does: noise of ``vae.config.latent_channels`` channels at
    ``height // vae_scale_factor``, then ``vae.decode(latents / scaling_factor + shift_factor)``
    with the config's values (0.18215 and 0.0 when absent).
    """
    model = vae.model
    cls = type(model).__name__
    if spec.vae == PIXELS:
        return ("it works in pixel space: its output is the image itself, in [-1, 1], and PRXPipeline "
                "returns images only through a VAE")
    if spec.normalization is not None:
        return (f"its latents are {spec.normalization.patch_size}x{spec.normalization.patch_size}-"
                "patchified and batch-norm normalised per channel (FLUX.2); PRXPipeline unscales "
                "with one scaling_factor and shift_factor only")
    if cls not in _PIPELINE_VAES:
        return f"PRXPipeline decodes with {' or '.join(_PIPELINE_VAES)}, not {cls}"
    config = model.config
    scaling = getattr(config, "scaling_factor", 0.18215)
    shift = getattr(config, "shift_factor", 0.0)
    if scaling is None or shift is None:
        return f"its config's scaling_factor/shift_factor is null ({scaling}, {shift})"
    if (float(scaling), float(shift)) != (spec.scaling_factor, spec.shift_factor):
        return (f"PRXPipeline would unscale with scaling {scaling} and shift {shift}, but the "
                f"latents were scaled with {spec.scaling_factor} and {spec.shift_factor}")
    if hasattr(model, "spatial_compression_ratio"):
        down = model.spatial_compression_ratio
    else:
        down = 2 ** (len(config.block_out_channels) - 1)
    if down != spec.downsample or config.latent_channels != spec.channels:
        return (f"PRXPipeline would sample {config.latent_channels} channels at 1/{down}, "
                f"the model takes {spec.channels} at 1/{spec.downsample}")
    return None


def _carry_scaling(vae: LoadedVae, spec: LatentSpec) -> LatentSpec:
    """For a manifest that chose its own scaling and shift: the VAE saved with the export carries
    them in its config, which is what PRXPipeline unscales with (the shift only where the class
    has one: AutoencoderDC has none, and such an export returns latents). Returns the spec whose
    record of the VAE's config is the saved copy's."""
    import inspect

    update = {"scaling_factor": spec.scaling_factor}
    if "shift_factor" in inspect.signature(type(vae.model).__init__).parameters:
        update["shift_factor"] = spec.shift_factor
    vae.model.register_to_config(**update)
    return spec.model_copy(update={"vae_scaling_factor": spec.scaling_factor,
                                   "vae_shift_factor": update.get("shift_factor", spec.vae_scaling[1])})


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def export_pipeline(
    transformer: PRXTransformer2DModel,
    *,
    text_encoder: str,
    spec: LatentSpec,
    to: str | os.PathLike[str],
    shift: float = 1.0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    default_sample_size: int = 256,
    revision: str | None = None,
    run: str | os.PathLike[str] | None = None,
    step: int | None = None,
    weights: str = "raw",
) -> Path:
    """Write ``transformer`` with its text encoder, scheduler and VAE as a ``PRXPipeline`` folder.

    ``text_encoder``: alias, folder or Hub id (at ``revision``) as the run used it;
    ``max_tokens``: the run's text length (the tokenizer pads to it); ``shift``: the scheduler's
    shift (the run's ``flow.shift``); ``default_sample_size``: the pipeline's default image side
    (its aspect-ratio binning knows 256, 512 and 1024 only); ``run``, ``step`` and ``weights``
    ("ema" or "raw") are recorded in ``kiln_export.json``. Returns the folder. See the module docstring for the two modes.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXTransformer2DModel

    transformer = _unwrap(transformer)
    if not isinstance(transformer, PRXTransformer2DModel):
        raise ExportError(f"PRXPipeline needs a PRXTransformer2DModel, got {type(transformer).__name__}")
    if shift <= 0:
        raise ExportError(f"shift must be positive, got {shift}")
    config = transformer.config
    if config.in_channels != model_channels(spec):
        raise ExportError(f"the transformer takes {config.in_channels} channels, but VAE "
                          f"{spec.vae!r} latents have {model_channels(spec)} in model space")
    if default_sample_size % (model_downsample(spec) * config.patch_size):
        raise ExportError(f"default_sample_size {default_sample_size} is not divisible by "
                          f"{model_downsample(spec) * config.patch_size} (VAE downsampling x "
                          "patch size)")
    out = Path(to).expanduser().absolute()
    _check_destination(out)

    vae = load_vae_for_spec(spec, device="cpu")
    if spec.vae_scaling_factor is not None:
        spec = _carry_scaling(vae, spec)
    problem = pipeline_decode_problem(vae, spec)
    mode: Literal["pixels", "latents"] = "pixels" if problem is None else "latents"
    # Stored as the checkpoint stores it ("auto"): fp32 weights of a bf16 checkpoint only double the size.
    text = TextEncoder.load(text_encoder, device="cpu", dtype="auto", max_tokens=max_tokens,
                            revision=revision)
    if text.dim != config.context_in_dim:
        raise ExportError(f"the transformer takes {config.context_in_dim}-d text context, but "
                          f"text encoder {text_encoder!r} gives {text.dim}-d embeddings")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        transformer.save_pretrained(tmp / "transformer")
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift)).save_pretrained(
            tmp / "scheduler")
        _save_text_encoder(text, tmp / "text_encoder")
        text.tokenizer.model_max_length = max_tokens  # what PRXPipeline pads prompts to
        text.tokenizer.save_pretrained(tmp / "tokenizer")
        if spec.vae != PIXELS:
            vae.model.save_pretrained(tmp / "vae")
        _write_json(tmp / "model_index.json", _model_index(
            text, vae if mode == "pixels" else None, default_sample_size))
        spec_json = spec.model_dump(mode="json")
        if mode == "latents":
            _write_json(tmp / LATENTS_INFO, {
                "why": f"PRXPipeline cannot decode these latents itself: {problem}",
                "latent_spec": spec_json,
                "model_space": {"channels": model_channels(spec), "downsample": model_downsample(spec)},
                "usage": (
                    "pipe, decode = train.export.load_exported(DIR); "
                    "noise = train.sample.initial_noise(spec, n, H, W, seed); "
                    "x = pipe(prompts, latents=noise, output_type='latent', use_resolution_binning=False, "
                    "height=noise.shape[-2] * pipe.vae_scale_factor, "
                    "width=noise.shape[-1] * pipe.vae_scale_factor).images; "
                    "images = decode(x)  # [B, 3, H, W] in [0, 1]"),
            })
        _write_json(tmp / EXPORT_INFO, {
            "format": 1,
            "mode": mode,
            "run": None if run is None else storage.absolute(os.path.expanduser(run)),
            "step": step,
            "weights": weights,
            "latent_spec": spec_json,
            "text_encoder": {"name": text.name, "id": text.id, "revision": text.revision,
                             "max_tokens": max_tokens},
            "scheduler_shift": float(shift),
            "default_sample_size": default_sample_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {p: _version(p) for p in ("kiln", "torch", "diffusers", "transformers")},
        })
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_run(
    run: str | os.PathLike[str], to: str | os.PathLike[str], *, step: int | None = None,
    weights: str | None = None,
) -> Path:
    """Export a training run's checkpoint (``step``, default the latest) with :func:`export_pipeline`.

    Reads what the trainer's checkpoint records: the denoiser config and weights (``weights``:
    "ema" or "raw"; by default the EMA weights when the run kept them), the latent spec, the text
    encoder and its token length, and the run's ``flow.shift``. A run trained with
    ``flow.prediction=x0`` is refused: PRXPipeline takes every output for a velocity.
    """
    from diffusers import PRXTransformer2DModel

    from train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
    from train.ema import checkpoint_weights

    path = find_checkpoint(run, step)  # a run at a URL: fetched
    if path is None:
        which = "no checkpoint" if step is None else f"no checkpoint of step {step}"
        raise CheckpointError(f"{run} has {which}")
    state = load_checkpoint(path, mmap=True)  # the model alone is read
    try:
        prediction = state["config"]["flow"].get("prediction", "velocity")
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be exported: no flow config ({e!r})") from e
    if prediction != "velocity":
        raise ExportError(
            f"{run} was trained with flow.prediction={prediction}: its denoiser outputs the clean "
            "latent, and PRXPipeline would take that for a velocity. Sample it with evaluate, "
            "or train.sample.sample_latents(..., prediction='x0')")
    model_weights, used = checkpoint_weights(state, weights)
    try:
        transformer = PRXTransformer2DModel(**state["denoiser"])
        transformer.load_state_dict(model_weights)
        spec = LatentSpec.model_validate(state["latent_spec"])
        text = state["text_encoder"]
        shift = float(state["config"]["flow"]["shift"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be exported: {e}") from e
    return export_pipeline(
        transformer, text_encoder=text.get("id") or text["name"], spec=spec, to=to, shift=shift,
        max_tokens=int(text.get("max_tokens", DEFAULT_MAX_TOKENS)),
        default_sample_size=spec.resolution, revision=text.get("revision"), run=run,
        step=int(state.get("step", step or 0)), weights=used)


def load_exported(
    folder: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PRXPipeline, Callable[[torch.Tensor], torch.Tensor]]:
    """(pipeline, decode) for an exported folder; ``decode`` maps model-space latents to images.

    ``decode(x)`` gives [B, 3, H, W] in [0, 1] through ``curate.vae``, in either mode: in
    ``latents`` mode it is the only way to images (the pipeline returns latents); in ``pixels``
    mode it decodes ``output_type="latent"`` results exactly as the pipeline would.
    """
    from diffusers import PRXPipeline

    folder = Path(folder).absolute()
    try:
        info = json.loads((folder / EXPORT_INFO).read_text())
        spec = LatentSpec.model_validate(info["latent_spec"])
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{folder} is not a kiln export (no readable {EXPORT_INFO}): {e}") from e
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    with warnings.catch_warnings():
        # diffusers 0.42's PRXPipeline still derives from its own deprecated LoraLoaderMixin,
        # which warns on every construction: nothing a user of the export can act on.
        warnings.filterwarnings("ignore", message=".*LoraLoaderMixin is deprecated", category=FutureWarning)
        pipe = PRXPipeline.from_pretrained(folder, **kwargs)
    if device is not None:
        pipe.to(device)
    vae: Any = pipe.vae if info.get("mode") == "pixels" else exported_vae(folder, spec, device or "cpu")

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return decode_to_images(latents, spec, vae)

    return pipe, decode


def exported_vae(folder: str | os.PathLike[str], spec: LatentSpec, device: str | torch.device) -> LoadedVae:
    """An export's VAE: the copy in ``vae/``, checked against the spec's implied fields like any
    manifest VAE (pixel space has none to load)."""
    if spec.vae == PIXELS:
        return load_vae_for_spec(spec, device=device)
    copy = str(Path(folder).absolute() / "vae")
    return load_vae_for_spec(spec.model_copy(update={"vae": copy, "vae_id": copy, "vae_subfolder": None,
                                                     "revision": None}), device=device)


def generate(
    folder: str | os.PathLike[str],
    prompts: list[str],
    *,
    height: int | None = None,
    width: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[Image.Image]:
    """Images from an exported folder through ``PRXPipeline``, one call per prompt (see the module
    note on guidance with several images), in either mode: in ``latents`` mode the pipeline
    denoises and :func:`load_exported`'s ``decode`` makes the pixels."""
    if steps < 1 or (height is not None and height < 1) or (width is not None and width < 1):
        raise ExportError(f"generate: steps ({steps}) and the image size ({height}x{width}) must be positive")
    pipe, decode = load_exported(folder, device=device)
    info = json.loads((Path(folder) / EXPORT_INFO).read_text())
    spec = LatentSpec.model_validate(info["latent_spec"])
    height, width = height or spec.resolution, width or spec.resolution
    token = model_downsample(spec) * pipe.transformer.config.patch_size
    if height % token or width % token:
        raise ExportError(f"generate: the image size {height}x{width} is not a multiple of {token}, the pixels of "
                          "one of the denoiser's tokens")
    images = []
    for i, prompt in enumerate(prompts):
        noise = initial_noise(spec, 1, height, width, seed + i).to(pipe.device)
        # The sides as the pipeline reckons them from its VAE's factor (8 without a VAE, whatever the
        # latents' real one): it only checks them against the patch size, as the noise is given.
        sides = {"height": noise.shape[-2] * pipe.vae_scale_factor, "width": noise.shape[-1] * pipe.vae_scale_factor}
        out = pipe(prompt, **sides, num_inference_steps=steps, guidance_scale=guidance,
                   latents=noise, output_type="latent", use_resolution_binning=False).images
        pixels = decode(out)[0].permute(1, 2, 0).mul(255).round().to(torch.uint8).cpu().numpy()
        images.append(Image.fromarray(pixels))
    return images


# --------------------------------------------------------------------------- helpers


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
        raise ExportError(f"{out} is a non-empty folder that is not a kiln export; refusing to "
                          "replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing export there is swapped out, then deleted."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export should not be
    _check_destination(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:  # put the previous export back
            os.rename(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _save_text_encoder(text: TextEncoder, folder: Path) -> None:
    """Weights as ``T5GemmaEncoder`` saves them, with the composite config diffusers' PRX loader
    reads (``T5GemmaConfig.from_pretrained(folder).encoder``): saving only the encoder's own
    config would make that loader build T5Gemma-2B's default sizes instead."""
    from transformers import T5GemmaConfig

    model = text.model
    with quiet_transformers():
        model.save_pretrained(folder)
    module = model.config.to_dict()
    composite = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"],
                              is_encoder_decoder=False)
    composite.architectures = ["T5GemmaEncoder"]
    composite.dtype = model.dtype
    composite.save_pretrained(folder)


def _model_index(text: TextEncoder, vae: LoadedVae | None, default_sample_size: int) -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "PRXPipeline",
        "_diffusers_version": diffusers.__version__,
        "default_sample_size": default_sample_size,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        # transformers has no top-level T5GemmaEncoder: diffusers.pipelines.prx provides the
        # loader PRX's own pipelines name this way.
        "text_encoder": ["prx", "T5GemmaEncoder"],
        "tokenizer": ["transformers", type(text.tokenizer).__name__],
        "transformer": ["diffusers", "PRXTransformer2DModel"],
        "vae": ["diffusers", type(vae.model).__name__] if vae is not None else [None, None],
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
