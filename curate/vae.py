"""The one place that knows how latents are made and how they are used.

Stored latents are the VAE's raw output (``latent_dist.mean`` and ``.std`` at its native grid:
16 x H/8 x W/8 for Flux, 32 x H/8 x W/8 for FLUX.2). What turns them into denoiser inputs is
recorded in the manifest's :class:`~curate.manifest.LatentSpec`, never baked into the shards,
so one set of shards serves any convention and a trainer decodes with exactly the right VAE:

- Flux (``AutoencoderKL``): ``x = (latent - shift_factor) * scaling_factor`` (16 ch at 1/8);
- FLUX.2 (``AutoencoderKLFlux2``): 2x2 patchify, then ``(x - bn_mean) / sqrt(bn_var + eps)``
  with the VAE's batch-norm running statistics, as diffusers' ``Flux2Pipeline`` does
  (128 ch at 1/16); its scaling and shift are 1 and 0;
- DC-AE (``AutoencoderDC``, ``--vae dc-ae``): ``x = latent * scaling_factor`` (32 ch at 1/32);
  its encoder is deterministic (no distribution), so its latent is stored as the mean alone;
- any other diffusers VAE: its config's scaling and shift;
- ``pixels`` (no VAE, :class:`PixelSpace`): the image itself, its pixel values 0 to 255 at full
  resolution (3 ch at 1/1), which ``x = (p - 127.5) / 127.5`` maps to [-1, 1]: the pixel-space
  training of PRX's speedrun and JiT (Li & He 2025), through the same spec as any VAE.

Loading goes through diffusers ``from_pretrained`` for registry aliases (``curate.models.VAES``),
Hub ids and local folders alike; tests load tiny models from ``curate.tiny`` by path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from curate.manifest import LatentNormalization, LatentSpec
from curate.models import PIXELS, VAES
from curate.runner import CurateError, resolve_device

if TYPE_CHECKING:
    from diffusers import ModelMixin

__all__ = [
    "DETERMINISTIC_CLASSES",
    "PIXELS",
    "LoadedVae",
    "PixelSpace",
    "VaeError",
    "decode_to_images",
    "encode_batch",
    "from_model_output",
    "latent_spec_for",
    "load_vae",
    "load_vae_for_spec",
    "model_channels",
    "model_downsample",
    "patchify",
    "sample_latent",
    "to_model_input",
    "unpatchify",
    "vae_class_of",
]


class VaeError(CurateError, ValueError):
    """A VAE that cannot be found, loaded or used; the message names it."""


@dataclass(frozen=True, eq=False)
class LoadedVae:
    """A diffusers VAE plus where it came from and the latent-spec fields its config implies."""

    model: ModelMixin
    name: str  # as the user named it: alias, Hub id or folder
    id: str  # resolved Hub id or absolute folder
    subfolder: str | None
    cls: str  # diffusers class name
    revision: str | None  # the Hub commit actually loaded when known, else what was asked for
    channels: int  # latent channels as stored (what vae.encode gives)
    downsample: int  # pixels per latent cell on each side
    scaling_factor: float
    shift_factor: float
    normalization: LatentNormalization | None


# --------------------------------------------------------------------------- pixel space

class PixelSpace(torch.nn.Module):
    """No autoencoder: an image's "latent" is its pixel values 0 to 255 (the VAE range [-1, 1]
    scaled back), at full resolution. Integers to 255 are exact in uint8, bf16 and fp16, so the
    stored form loses nothing; the latent spec's shift 127.5 and scaling 1/127.5 give the
    denoiser [-1, 1], and decoding gives the pixels back. It has the two calls of a diffusers
    VAE that :func:`encode_batch` and :func:`decode_to_images` use, and no weights."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def encode(self, x: torch.Tensor) -> Any:
        """[-1, 1] images -> their pixel values, rounded: a decoded JPEG's are integers already,
        and a float32 round trip through [-1, 1] may land a hair below one."""
        from types import SimpleNamespace

        return SimpleNamespace(latent=((x.float() + 1) * 127.5).round().clamp(0, 255))

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Any:
        """Pixel values -> [-1, 1] images, the range a VAE decodes to."""
        from types import SimpleNamespace

        images = z.float() / 127.5 - 1
        return (images,) if not return_dict else SimpleNamespace(sample=images)


def _pixel_space(revision: str | None, vae_class: str | None, subfolder: str | None,
                 device: str | torch.device | None) -> LoadedVae:
    if revision is not None or subfolder is not None or vae_class not in (None, PixelSpace.__name__):
        raise VaeError(f"VAE {PIXELS!r} is no model (the images themselves): a revision, subfolder or "
                       "class does not apply")
    return LoadedVae(model=PixelSpace().to(resolve_device(device)), name=PIXELS, id=PIXELS, subfolder=None,
                     cls=PixelSpace.__name__, revision=None, channels=3, downsample=1,
                     scaling_factor=1 / 127.5, shift_factor=127.5, normalization=None)


# --------------------------------------------------------------------------- loading

# Autoencoders whose encoder gives one latent, not a distribution (``encode(x).latent``): there is
# no std to store, and a std of zeros would double the shards for nothing.
DETERMINISTIC_CLASSES = ("AutoencoderDC", "PixelSpace")


def vae_class_of(name: str, *, revision: str | None = None, vae_class: str | None = None,
                 subfolder: str | None = None) -> str:
    """The diffusers class ``name`` loads as, known before its weights are: the one given, the
    alias's, else its config's ``_class_name`` (a local file, or the Hub's config alone)."""
    if name == PIXELS:
        return PixelSpace.__name__
    vae_id, subfolder, cls_hint, local = _resolve(name, subfolder, vae_class)
    if cls_hint:
        return cls_hint
    config, _, _ = _read_config(name, vae_id, subfolder, revision, local)
    if not config.get("_class_name"):
        raise VaeError(f"VAE {name!r}: its config names no class; pass vae_class (--vae-class)")
    return str(config["_class_name"])



def load_vae(
    name: str,
    *,
    revision: str | None = None,
    vae_class: str | None = None,
    subfolder: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedVae:
    """Load an alias (``flux``, ``flux2``, ``repa-e-flux``, ``dc-ae``, ``pixels``), a Hub id or a local folder.

    The class comes from ``vae_class``, else the alias, else the config's ``_class_name``.
    ``device`` defaults to ``cuda:LOCAL_RANK`` when CUDA is available (``default_device``);
    weights stay float32 unless ``dtype`` is given. On CUDA, float32 weights encode and decode
    under bf16 autocast (GroupNorm in float32); bf16 weights run every op in bf16.
    """
    if name == PIXELS:
        return _pixel_space(revision, vae_class, subfolder, device)
    vae_id, subfolder, cls_hint, local = _resolve(name, subfolder, vae_class)
    if local and revision is not None:
        raise VaeError(f"VAE {name!r}: --revision applies to Hub ids, not to a local folder")
    config, subfolder, commit = _read_config(name, vae_id, subfolder, revision, local)
    cls = cls_hint or config.get("_class_name")
    if not cls:
        raise VaeError(f"VAE {name!r}: its config names no class; pass vae_class (--vae-class)")
    klass = _vae_class(name, cls)
    if config.get("_class_name") not in (None, cls):
        # Loading weights into the wrong class silently drops layers (FLUX.2's batch norm).
        raise VaeError(f"VAE {name!r} is a {config['_class_name']}, not a {cls}; "
                       f"pass vae_class={config['_class_name']!r} or leave it out")
    revision = commit or revision
    try:
        model = klass.from_pretrained(vae_id, subfolder=subfolder, revision=revision,
                                      torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise VaeError(f"VAE {name!r}: could not load {cls} from {vae_id}: {e}") from e
    model.eval().requires_grad_(False)
    implied = _implied_spec(name, model)  # read while float32, so the bn stats are exact
    device = resolve_device(device)
    model.to(device=device)
    if dtype is not None:
        # Module.to, not ModelMixin.to: diffusers warns on every cast of a loaded model, even when
        # the class keeps no module in float32 (no VAE does).
        torch.nn.Module.to(model, dtype=dtype)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return LoadedVae(model=model, name=name, id=vae_id, subfolder=subfolder, cls=cls,
                     revision=revision, **implied)


def load_vae_for_spec(
    spec: LatentSpec, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> LoadedVae:
    """The manifest's VAE, at its recorded revision; refuses one whose config no longer matches
    (the config's own scaling and shift, for a spec that chose others)."""
    loaded = load_vae(spec.vae_id, revision=spec.revision, vae_class=spec.vae_class,
                      subfolder=spec.vae_subfolder, device=device, dtype=dtype)
    recorded = {f: getattr(spec, f) for f in _IMPLIED_FIELDS}
    recorded["scaling_factor"], recorded["shift_factor"] = spec.vae_scaling
    found = {f: getattr(loaded, f) for f in _IMPLIED_FIELDS}
    wrong = [f for f in _IMPLIED_FIELDS if recorded[f] != found[f]]
    if wrong:
        raise VaeError(f"VAE {spec.vae!r} ({spec.vae_id}, revision {spec.revision}) does not match "
                       f"the manifest's latent spec: {', '.join(wrong)} differ; the latents were "
                       "made with other weights")
    return dataclasses.replace(loaded, name=spec.vae)


_IMPLIED_FIELDS = ("channels", "downsample", "scaling_factor", "shift_factor", "normalization")


def _resolve(
    name: str, subfolder: str | None, vae_class: str | None
) -> tuple[str, str | None, str | None, bool]:
    """(id, subfolder, class or None, is a local folder) for an alias, a folder or a Hub id."""
    if name in VAES:
        entry = VAES[name]
        return entry.id, subfolder if subfolder is not None else entry.subfolder, vae_class or entry.cls, False
    if os.path.isdir(name):
        return os.path.abspath(name), subfolder, vae_class, True
    if name.count("/") == 1 and not name.startswith((".", "/")) and all(name.split("/")):
        return name, subfolder, vae_class, False
    raise VaeError(f"VAE {name!r} is not a known alias ({', '.join(sorted([*VAES, PIXELS]))}), "
                   "an existing folder, or a Hub id like org/name")


def _read_config(
    name: str, vae_id: str, subfolder: str | None, revision: str | None, local: bool
) -> tuple[dict[str, Any], str | None, str | None]:
    """(config, subfolder, Hub commit). A local pipeline folder's ``vae/`` is found on its own."""
    if local:
        root = Path(vae_id)
        if subfolder is None and not (root / "config.json").exists() and (root / "vae" / "config.json").exists():
            subfolder = "vae"
        path = root / (subfolder or "") / "config.json"
        try:
            return json.loads(path.read_text()), subfolder, None
        except (OSError, ValueError) as e:
            raise VaeError(f"VAE {name!r}: cannot read {path}: {e}") from e
    from diffusers.configuration_utils import ConfigMixin

    class _AnyConfig(ConfigMixin):
        config_name = "config.json"

    try:
        config, commit = _AnyConfig.load_config(vae_id, subfolder=subfolder, revision=revision,
                                                return_commit_hash=True)
    except (OSError, ValueError) as e:
        hint = "" if subfolder else " (for a pipeline repository, pass subfolder='vae')"
        raise VaeError(f"VAE {name!r}: cannot read the config of {vae_id}{hint}: {e}") from e
    return dict(config), subfolder, commit


def _vae_class(name: str, cls: str) -> type[ModelMixin]:
    import diffusers

    klass = getattr(diffusers, cls, None) if cls.isidentifier() else None
    if not (isinstance(klass, type) and issubclass(klass, diffusers.ModelMixin)
            and callable(getattr(klass, "encode", None)) and callable(getattr(klass, "decode", None))):
        known = ", ".join(n for n in dir(diffusers) if n.startswith("Autoencoder"))
        raise VaeError(f"VAE {name!r}: {cls!r} is not a diffusers autoencoder class "
                       f"(diffusers {diffusers.__version__} has {known})")
    return klass


def _implied_spec(name: str, model: ModelMixin) -> dict[str, Any]:
    """channels, downsample, scaling/shift and FLUX.2's batch-norm normalisation from the model."""
    cfg = model.config
    blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
    channels = cfg.get("latent_channels")
    if not blocks or not channels:
        raise VaeError(f"VAE {name!r}: its config has no latent_channels/block_out_channels")
    normalization = None
    bn = getattr(model, "bn", None)
    if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
        patch = cfg.get("patch_size", 2)
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        if ph != pw or bn.num_features != channels * ph * pw:
            raise VaeError(f"VAE {name!r}: batch norm over {bn.num_features} channels does not fit "
                           f"{channels} latent channels with patch size {patch}")
        normalization = LatentNormalization(
            kind="batchnorm", patch_size=ph, mean=bn.running_mean.float().tolist(),
            var=bn.running_var.float().tolist(), eps=float(cfg.get("batch_norm_eps", bn.eps)))
    scaling, shift = cfg.get("scaling_factor"), cfg.get("shift_factor")
    return {"channels": int(channels), "downsample": 2 ** (len(blocks) - 1),
            "scaling_factor": 1.0 if scaling is None else float(scaling),
            "shift_factor": 0.0 if shift is None else float(shift), "normalization": normalization}


def latent_spec_for(
    loaded: LoadedVae,
    *,
    stored: Literal["dist", "mean"],
    dtype: str,
    resolution: int,
    buckets: list[tuple[int, int]],
) -> LatentSpec:
    """The manifest's latent spec for latents made by ``loaded`` (normalisation recorded, not applied)."""
    spec = LatentSpec(
        vae=loaded.name, vae_id=loaded.id, vae_subfolder=loaded.subfolder, vae_class=loaded.cls,
        revision=loaded.revision, channels=loaded.channels, downsample=loaded.downsample,
        stored=stored, dtype=dtype, scaling_factor=loaded.scaling_factor,
        shift_factor=loaded.shift_factor, normalization=loaded.normalization,
        resolution=resolution, buckets=[tuple(b) for b in buckets])
    # FLUX.2's patchify needs even latent sides: every image size must divide by 16 there.
    step = model_downsample(spec)
    for h, w in spec.buckets or [(resolution, resolution)]:
        if h % step or w % step:
            raise ValueError(f"image size {h}x{w} is not divisible by {step}, the model-space "
                             f"downsampling of VAE {loaded.name!r}")
    return spec


# --------------------------------------------------------------------------- encoding and decoding


def encode_batch(loaded: LoadedVae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the latent distribution for ``pixels`` [B,3,H,W] in [-1, 1], float32.

    Raw VAE output (no scaling, no normalisation), on the VAE's device. A deterministic
    autoencoder (no ``latent_dist``) gives its latent and a zero std.
    """
    model = loaded.model
    x = pixels.to(device=model.device, dtype=model.dtype, non_blocking=True)
    if model.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(model):
        out = model.encode(x)
        dist = getattr(out, "latent_dist", None)
        mean = out.latent if dist is None else dist.mean
        std = torch.zeros_like(mean) if dist is None else dist.std
        return mean.float().contiguous(), std.float().contiguous()


def decode_to_images(
    x_model_space: torch.Tensor, spec: LatentSpec, vae: LoadedVae | ModelMixin
) -> torch.Tensor:
    """Denoiser-space latents -> images [B,3,H,W] in [0, 1], float32, on the VAE's device."""
    model = vae.model if isinstance(vae, LoadedVae) else vae
    z = from_model_output(x_model_space, spec).to(device=model.device, dtype=model.dtype)
    if model.device.type == "cuda":
        z = z.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(model):
        images = model.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _autocast(model: ModelMixin) -> torch.autocast:
    # float32 weights run under bf16 autocast on a GPU: convolutions and attention in bf16, but
    # autocast runs GroupNorm (and the std's exp) in float32, so every norm and the SiLU after it
    # read and write float32 activations. Weights loaded in bf16 (load_vae's dtype) run every op
    # in bf16, as diffusers' Flux pipelines run their VAE: autocast would cast each GroupNorm's
    # input back to float32, so it is off for them.
    enabled = model.device.type == "cuda" and model.dtype == torch.float32
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


# --------------------------------------------------------------------------- pure tensor functions


def sample_latent(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw ``mean + std * eps`` (float32 at least), as ``latent_dist.sample()`` does."""
    dtype = _compute_dtype(mean)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=dtype)
    return mean.to(dtype) + std.to(dtype) * eps


def to_model_input(latent: torch.Tensor, spec: LatentSpec) -> torch.Tensor:
    """Stored latent [B,C,h,w] -> denoiser input: ``(latent - shift) * scale``, then, for
    FLUX.2, patchify and batch-norm normalise. Computed in float32 (float64 stays float64)."""
    if latent.ndim != 4 or latent.shape[1] != spec.channels:
        raise ValueError(f"expected latents [B, {spec.channels}, h, w], got {list(latent.shape)}")
    x = (latent.to(_compute_dtype(latent)) - spec.shift_factor) * spec.scaling_factor
    norm = spec.normalization
    if norm is None:
        return x
    mean, std = _bn_stats(norm, x.device, x.dtype)
    return (patchify(x, norm.patch_size) - mean) / std  # subtract, then divide: as Flux2Pipeline


def from_model_output(x: torch.Tensor, spec: LatentSpec) -> torch.Tensor:
    """The inverse of :func:`to_model_input`: denoiser space -> raw VAE latent [B,C,h,w]."""
    if x.ndim != 4 or x.shape[1] != model_channels(spec):
        raise ValueError(f"expected model-space latents [B, {model_channels(spec)}, h, w], "
                         f"got {list(x.shape)}")
    x = x.to(_compute_dtype(x))
    norm = spec.normalization
    if norm is not None:
        mean, std = _bn_stats(norm, x.device, x.dtype)
        x = unpatchify(x * std + mean, norm.patch_size)
    return x / spec.scaling_factor + spec.shift_factor


def model_channels(spec: LatentSpec) -> int:
    """Channels the denoiser sees (16 for Flux, 128 for FLUX.2)."""
    p = spec.normalization.patch_size if spec.normalization else 1
    return spec.channels * p * p


def model_downsample(spec: LatentSpec) -> int:
    """Pixels per denoiser-input cell on each side (8 for Flux, 16 for FLUX.2)."""
    return spec.downsample * (spec.normalization.patch_size if spec.normalization else 1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,H,W] -> [B,C*p*p,H/p,W/p], channel order c-major (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"latent sides {h}x{w} are not divisible by the patch size {p}")
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The exact inverse of :func:`patchify` (Flux2Pipeline._unpatchify_latents)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (p * p), h * p, w * p)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # bf16/fp16 storage is for disk; normalising in half precision would add avoidable error.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bn_stats(
    norm: LatentNormalization, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bn_tensors(tuple(norm.mean), tuple(norm.var), norm.eps, device, dtype)


@functools.lru_cache(maxsize=16)
def _bn_tensors(
    mean: tuple[float, ...], var: tuple[float, ...], eps: float, device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached: a trainer calls this every step and should not copy 2 x 128 floats to the GPU each
    # time. Built outside inference mode so they can take part in autograd later; like the
    # pipeline, sqrt(var + eps) is taken in float32 before casting.
    with torch.inference_mode(False):
        m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.sqrt(torch.tensor(var, dtype=torch.float32) + eps).view(1, -1, 1, 1)
        return m.to(device, dtype), s.to(device, dtype)
