"""curate.vae: latent specs, model-space conversions and decoding, on tiny Flux and FLUX.2 VAEs.

The VAEs are built by curate.tiny and loaded by path through load_vae, the code path users
take with real weights. Reference results come from diffusers itself (direct encode/decode,
Flux2Pipeline's static patchify helpers and its batch-norm formula).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline

from curate.manifest import LatentNormalization, LatentSpec
from curate.models import VAES, VaeEntry
from curate.runner import CurateError
from curate.tiny import build_tiny_flux2_vae, build_tiny_flux_vae
from curate.vae import (
    LoadedVae,
    VaeError,
    decode_to_images,
    encode_batch,
    from_model_output,
    latent_spec_for,
    load_vae,
    load_vae_for_spec,
    model_channels,
    model_downsample,
    patchify,
    sample_latent,
    to_model_input,
    unpatchify,
)


@pytest.fixture(scope="session")
def vae_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaes")
    return {"flux": build_tiny_flux_vae(root / "flux"), "flux2": build_tiny_flux2_vae(root / "flux2")}


@pytest.fixture(scope="session")
def vaes(vae_dirs: dict[str, Path]) -> dict[str, LoadedVae]:
    return {kind: load_vae(str(path), device="cpu") for kind, path in vae_dirs.items()}


def spec_of(loaded: LoadedVae, stored: str = "dist", dtype: str = "bfloat16") -> LatentSpec:
    return latent_spec_for(loaded, stored=stored, dtype=dtype, resolution=64,
                           buckets=[(64, 64), (48, 80)])


def images(b: int = 2, h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    """Smooth-ish images in [-1, 1]: noise on a gradient, so the VAE sees some structure."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, w).expand(b, 3, h, w)
    return (ramp + 0.2 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)


# --------------------------------------------------------------------------- registry and specs


def test_registry() -> None:
    assert VAES["flux"] == VaeEntry("black-forest-labs/FLUX.1-schnell", "vae", "AutoencoderKL")
    assert VAES["flux2"] == VaeEntry("black-forest-labs/FLUX.2-klein-4B", "vae", "AutoencoderKLFlux2")
    assert VAES["repa-e-flux"] == VaeEntry("REPA-E/e2e-flux-vae", None, "AutoencoderKL")


def test_flux_spec(vaes: dict[str, LoadedVae], vae_dirs: dict[str, Path]) -> None:
    loaded = vaes["flux"]
    assert (loaded.cls, loaded.id, loaded.subfolder, loaded.revision) == (
        "AutoencoderKL", str(vae_dirs["flux"].resolve()), None, None)
    spec = spec_of(loaded)
    assert (spec.channels, spec.downsample, spec.normalization) == (16, 8, None)
    assert (spec.scaling_factor, spec.shift_factor) == (0.3611, 0.1159)
    assert (spec.vae, spec.vae_id, spec.vae_class) == (str(vae_dirs["flux"]), loaded.id, "AutoencoderKL")
    assert (spec.stored, spec.dtype, spec.resolution, spec.buckets) == ("dist", "bfloat16", 64, [(64, 64), (48, 80)])
    assert (model_channels(spec), model_downsample(spec)) == (16, 8)
    assert LatentSpec.model_validate_json(spec.model_dump_json()) == spec  # survives the manifest


def test_flux2_spec(vaes: dict[str, LoadedVae]) -> None:
    loaded = vaes["flux2"]
    spec = spec_of(loaded, stored="mean", dtype="float16")
    assert (loaded.cls, spec.channels, spec.downsample) == ("AutoencoderKLFlux2", 32, 8)
    assert (spec.scaling_factor, spec.shift_factor) == (1.0, 0.0)
    bn, norm = loaded.model.bn, spec.normalization
    assert norm is not None and (norm.kind, norm.patch_size, norm.eps) == ("batchnorm", 2, 1e-4)
    assert len(norm.mean) == len(norm.var) == 128
    assert norm.mean == bn.running_mean.tolist() and norm.var == bn.running_var.tolist()
    assert (model_channels(spec), model_downsample(spec)) == (128, 16)
    assert LatentSpec.model_validate_json(spec.model_dump_json()) == spec
    # 72 px is 9 latent cells: FLUX.2's 2x2 patchify cannot take it.
    with pytest.raises(ValueError, match="not divisible by 16"):
        latent_spec_for(loaded, stored="dist", dtype="bfloat16", resolution=64, buckets=[(72, 64)])


def test_half_precision_weights_keep_exact_stats(vae_dirs: dict[str, Path]) -> None:
    # The spec is read before the cast, so bf16 weights do not round the batch-norm statistics.
    loaded = load_vae(str(vae_dirs["flux2"]), device="cpu", dtype=torch.bfloat16)
    reference = load_vae(str(vae_dirs["flux2"]), device="cpu")
    assert loaded.model.dtype == torch.bfloat16 and loaded.model.bn.running_mean.dtype == torch.bfloat16
    assert loaded.normalization == reference.normalization
    spec = spec_of(loaded)
    mean, _ = encode_batch(loaded, images(b=1))
    assert mean.dtype == torch.float32  # float32 out, whatever the weights
    decoded = decode_to_images(to_model_input(mean, spec), spec, loaded.model)  # a bare model works
    assert decoded.dtype == torch.float32 and decoded.shape == (1, 3, 64, 96)


def test_pipeline_folder_finds_its_vae(vae_dirs: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(vae_dirs["flux2"], tmp_path / "pipe" / "vae")
    loaded = load_vae(str(tmp_path / "pipe"), device="cpu")
    assert (loaded.subfolder, loaded.cls, loaded.channels) == ("vae", "AutoencoderKLFlux2", 32)


_HUB_SCRIPT = """
import json, sys
from curate.models import VAES, VaeEntry
from curate.vae import latent_spec_for, load_vae, load_vae_for_spec
VAES["tiny-flux2"] = VaeEntry("kiln/tiny-flux2", "vae", "AutoencoderKLFlux2")
loaded = load_vae("tiny-flux2", device="cpu")
spec = latent_spec_for(loaded, stored="dist", dtype="bfloat16", resolution=64, buckets=[])
again = load_vae_for_spec(spec, device="cpu")
try:
    load_vae("kiln/tiny-flux2", device="cpu")  # a pipeline repository's root has no config.json
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"spec": spec.model_dump(), "again": again.revision, "error": error}))
"""


def test_hub_alias_pins_the_commit(vae_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An alias resolves to a Hub id + subfolder and the manifest records the commit it loaded.

    Offline, from a Hub cache laid out as huggingface_hub writes it (in a subprocess, since
    huggingface_hub reads HF_HUB_OFFLINE and the cache folder at import).
    """
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kiln--tiny-flux2"
    shutil.copytree(vae_dirs["flux2"], repo / "snapshots" / sha / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], capture_output=True, text=True,
                          env=env, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    spec = out["spec"]
    assert (spec["vae"], spec["vae_id"], spec["vae_subfolder"], spec["revision"]) == (
        "tiny-flux2", "kiln/tiny-flux2", "vae", sha)
    assert out["again"] == sha
    assert "pass subfolder='vae'" in out["error"]


def test_pixel_space_is_the_images_themselves() -> None:
    """``pixels``: no VAE; the stored "latent" is the pixel values, exact in every stored dtype,
    and the spec maps them to [-1, 1] and back."""
    loaded = load_vae("pixels", device="cpu")
    spec = spec_of(loaded, stored="mean", dtype="uint8")
    assert (spec.vae, spec.vae_class, spec.channels, spec.downsample) == ("pixels", "PixelSpace", 3, 1)
    assert (model_channels(spec), model_downsample(spec), spec.revision) == (3, 1, None)
    values = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    values[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    mean, std = encode_batch(loaded, values.float() / 127.5 - 1)  # curate.buckets.to_model_range
    assert torch.equal(mean, values.float()) and not std.any()
    for dtype in (torch.uint8, torch.bfloat16, torch.float16):
        assert torch.equal(mean.to(dtype).float(), mean)
    x = to_model_input(values, spec)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    torch.testing.assert_close(x, values.float() / 127.5 - 1)
    images = decode_to_images(x, spec, load_vae_for_spec(spec, device="cpu"))
    torch.testing.assert_close(images * 255, values.float(), rtol=0, atol=1e-4)
    for wrong in ({"revision": "main"}, {"vae_class": "AutoencoderKL"}, {"subfolder": "vae"}):
        with pytest.raises(VaeError, match="is no model"):
            load_vae("pixels", **wrong)


# --------------------------------------------------------------------------- model-space conversions


@pytest.mark.parametrize("kind", ["flux", "flux2"])
def test_round_trip(vaes: dict[str, LoadedVae], kind: str) -> None:
    spec = spec_of(vaes[kind])
    latent = torch.randn(2, spec.channels, 6, 10, generator=torch.Generator().manual_seed(1)) * 3
    x = to_model_input(latent, spec)
    step = model_downsample(spec) // spec.downsample
    assert x.dtype == torch.float32 and x.shape == (2, model_channels(spec), 6 // step, 10 // step)
    # Exact up to float32 rounding of one subtract/multiply pair (a few ulps).
    torch.testing.assert_close(from_model_output(x, spec), latent, rtol=1e-6, atol=1e-6)
    x64 = to_model_input(latent.double(), spec)
    torch.testing.assert_close(from_model_output(x64, spec), latent.double(), rtol=1e-12, atol=1e-12)
    assert torch.equal(unpatchify(patchify(latent, 2), 2), latent)  # pure data movement


def test_flux2_model_input_matches_flux2_pipeline(vaes: dict[str, LoadedVae]) -> None:
    loaded = vaes["flux2"]
    spec, vae = spec_of(loaded), loaded.model
    z = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(2))
    # Flux2Pipeline._encode_vae_image, after retrieve_latents:
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = (Flux2Pipeline._patchify_latents(z) - bn_mean) / bn_std
    ours = to_model_input(z, spec)
    assert torch.equal(ours, expected)
    # Flux2Pipeline.__call__'s decode path, before vae.decode:
    assert torch.equal(from_model_output(ours, spec),
                       Flux2Pipeline._unpatchify_latents(ours * bn_std + bn_mean))


def test_flux_model_output_matches_flux_pipeline(vaes: dict[str, LoadedVae]) -> None:
    spec, cfg = spec_of(vaes["flux"]), vaes["flux"].model.config
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    # FluxPipeline.__call__: latents / scaling_factor + shift_factor before vae.decode
    assert torch.equal(from_model_output(x, spec), x / cfg.scaling_factor + cfg.shift_factor)


# --------------------------------------------------------------------------- encode, sample, decode


@pytest.mark.parametrize("kind", ["flux", "flux2"])
def test_decode_through_spec_equals_direct(vaes: dict[str, LoadedVae], kind: str) -> None:
    loaded, pixels = vaes[kind], images()
    mean, std = encode_batch(loaded, pixels)
    with torch.no_grad():
        dist = loaded.model.encode(pixels).latent_dist
        direct = (loaded.model.decode(dist.mean).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(mean, dist.mean) and torch.equal(std, dist.std)  # raw, nothing baked in
    assert mean.shape == (2, loaded.channels, 8, 12)
    # What a trainer does: the spec travels through the manifest, the VAE is reloaded from it.
    spec = LatentSpec.model_validate_json(spec_of(loaded).model_dump_json())
    reloaded = load_vae_for_spec(spec, device="cpu")
    assert reloaded.name == spec.vae and reloaded.id == loaded.id
    decoded = decode_to_images(to_model_input(mean, spec), spec, reloaded)
    assert decoded.shape == pixels.shape and 0 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(decoded, direct, rtol=0, atol=1e-5)
    # A stochastic draw matches diffusers' own sampling given the same generator.
    drawn = sample_latent(mean, std, torch.Generator().manual_seed(4))
    assert torch.equal(drawn, dist.sample(generator=torch.Generator().manual_seed(4)))


def _group_norm_output_dtypes(model: torch.nn.Module, run) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("kind", ["flux", "flux2"])
def test_bf16_weights_encode_in_bf16_close_to_float32(vaes: dict[str, LoadedVae], vae_dirs: dict[str, Path],
                                                      kind: str) -> None:
    """--vae-dtype bfloat16: every op in bf16, the latents within bf16 rounding of float32's."""
    pixels = images(seed=7)
    want_mean, want_std = encode_batch(vaes[kind], pixels)
    loaded = load_vae(str(vae_dirs[kind]), device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    got: list[torch.Tensor] = []
    norms = _group_norm_output_dtypes(loaded.model, lambda: got.extend(encode_batch(loaded, pixels)))
    assert norms == {torch.bfloat16}
    mean, std = got
    assert mean.dtype == std.dtype == torch.float32  # what the stage stores from, as with float32
    assert float((mean - want_mean).norm() / want_mean.norm()) < 0.03
    assert float((std - want_std).norm() / want_std.norm()) < 0.03
    # Its spec is the float32 model's: the weights' dtype changes no latent-space constant.
    assert spec_of(loaded) == spec_of(vaes[kind])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_float32_weights_autocast_and_bf16_weights_do_not(vae_dirs: dict[str, Path]) -> None:
    pixels = images(seed=8).cuda()
    for dtype, norm_dtype in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        loaded = load_vae(str(vae_dirs["flux"]), device="cuda", dtype=dtype)
        assert _group_norm_output_dtypes(loaded.model, lambda v=loaded: encode_batch(v, pixels)) == {norm_dtype}


@pytest.mark.parametrize("kind", ["flux", "flux2"])
def test_bf16_storage(vaes: dict[str, LoadedVae], kind: str) -> None:
    loaded, pixels = vaes[kind], images(seed=5)
    spec = spec_of(loaded)
    mean, std = encode_batch(loaded, pixels)
    stored_mean, stored_std = mean.bfloat16(), std.bfloat16()
    x = to_model_input(stored_mean, spec)
    assert x.dtype == torch.float32
    # The round trip adds only float32 rounding (values near 0 may move by a float32 ulp of the
    # bn mean, so it is not bit-exact in bf16), far below bf16's own resolution.
    torch.testing.assert_close(from_model_output(x, spec), stored_mean.float(), rtol=1e-6, atol=1e-6)
    # bf16 storage costs at most bf16 rounding of the latent (relative 2**-8), seen in model space.
    torch.testing.assert_close(from_model_output(x, spec), mean, rtol=2**-8, atol=1e-6)
    drawn = sample_latent(stored_mean, stored_std, torch.Generator().manual_seed(6))
    assert drawn.dtype == torch.float32 and drawn.shape == mean.shape
    assert torch.equal(sample_latent(stored_mean, torch.zeros_like(stored_std)), stored_mean.float())


# --------------------------------------------------------------------------- errors


def test_errors_name_the_vae(vaes: dict[str, LoadedVae], vae_dirs: dict[str, Path], tmp_path: Path) -> None:
    flux, flux2 = str(vae_dirs["flux"]), str(vae_dirs["flux2"])
    with pytest.raises(VaeError, match=r"'nope' is not a known alias \(dc-ae, flux, flux2, pixels, repa-e-flux\)") as err:
        load_vae("nope")
    assert isinstance(err.value, ValueError) and isinstance(err.value, CurateError)
    for bad in ("NotAClass", "UNet2DModel", "os.path"):
        with pytest.raises(VaeError, match=f"{bad!r} is not a diffusers autoencoder class"):
            load_vae(flux, vae_class=bad, device="cpu")
    with pytest.raises(VaeError, match="is a AutoencoderKLFlux2, not a AutoencoderKL"):
        load_vae(flux2, vae_class="AutoencoderKL", device="cpu")
    with pytest.raises(VaeError, match="revision applies to Hub ids"):
        load_vae(flux, revision="main", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaeError, match="cannot read .*config.json"):
        load_vae(str(tmp_path / "empty"), device="cpu")
    # A manifest whose statistics do not match the weights is refused, not silently decoded.
    spec = spec_of(vaes["flux2"])
    norm = spec.normalization
    assert norm is not None
    other = LatentNormalization(mean=[m + 1 for m in norm.mean], var=norm.var, eps=norm.eps)
    with pytest.raises(VaeError, match="normalization differ"):
        load_vae_for_spec(spec.model_copy(update={"normalization": other}), device="cpu")
    with pytest.raises(ValueError, match=r"expected latents \[B, 32, h, w\]"):
        to_model_input(torch.zeros(1, 16, 4, 4), spec)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        to_model_input(torch.zeros(1, 32, 5, 4), spec)
