"""Sampling grids and the diffusers export: PRXPipeline loads the folder and samples as we do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.manifest import LatentSpec
from curate.text import TextEncoder
from curate.tiny import (
    build_tiny_dc_ae,
    build_tiny_flux2_vae,
    build_tiny_flux_vae,
    build_tiny_t5gemma,
)
from curate.vae import decode_to_images, latent_spec_for, load_vae, load_vae_for_spec
from train.export import (
    EXPORT_INFO,
    LATENTS_INFO,
    ExportError,
    export_pipeline,
    export_run,
    load_exported,
    pipeline_decode_problem,
)
from train.flow import shift_timesteps
from train.sample import initial_noise, make_grid, sample_grid, sample_latents

PROMPT = "a red cube"
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-models")
    return {"text": build_tiny_t5gemma(root / "t5gemma"), "flux": build_tiny_flux_vae(root / "flux"),
            "flux2": build_tiny_flux2_vae(root / "flux2"), "dc-ae": build_tiny_dc_ae(root / "dc-ae")}


@pytest.fixture(scope="module")
def text(models) -> TextEncoder:
    return TextEncoder.load(str(models["text"]))


def _spec(folder: Path, stored: str = "dist"):
    return latent_spec_for(load_vae(str(folder), device="cpu"), stored=stored, dtype="bfloat16",
                           resolution=SIZE, buckets=[])


@pytest.fixture(scope="module")
def kinds(models, text) -> dict[str, tuple]:
    """(spec, transformer) per VAE kind: Flux 16 ch with patch 2, FLUX.2 128 ch (already
    patchified in model space) with patch 1, DC-AE 32 ch at 1/32 with patch 1."""
    from diffusers import PRXTransformer2DModel

    out = {}
    for kind, channels, patch in (("flux", 16, 2), ("flux2", 128, 1), ("dc-ae", 32, 1)):
        torch.manual_seed(0)
        transformer = PRXTransformer2DModel(
            in_channels=channels, patch_size=patch, context_in_dim=text.dim, hidden_size=64,
            num_heads=4, depth=2, axes_dim=[8, 8], mlp_ratio=2)
        with torch.no_grad():  # adaLN modulation starts at zero: blocks would ignore the text
            for p in transformer.parameters():
                if not p.any():
                    p.normal_(0, 0.2)
        out[kind] = (_spec(models[kind], "mean" if kind == "dc-ae" else "dist"), transformer.eval())
    return out


def _pipeline_grid(steps: int) -> list[float]:
    """Our Euler grid (shift 1) as PRXPipeline `timesteps`: the scheduler then uses sigma = t/1000."""
    return [1000 * float(t) for t in torch.linspace(1, 0, steps + 1)[:-1]]


@pytest.mark.parametrize("kind", ["flux", "dc-ae"])
def test_a_flux_or_dc_ae_export_loads_in_prx_pipeline_and_matches_our_sampler(kinds, text, tmp_path: Path,
                                                                               kind: str):
    """PRXPipeline decodes both with the VAE's scale and shift: DC-AE's 32 px tokens included."""
    from diffusers import PRXPipeline

    spec, transformer = kinds[kind]
    vae_class = {"flux": "AutoencoderKL", "dc-ae": "AutoencoderDC"}[kind]
    out = export_pipeline(transformer, text_encoder=text.id, spec=spec, to=tmp_path / "export",
                          shift=1.0, max_tokens=text.max_tokens, run=tmp_path / "run", step=7)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["mode"] == "pixels" and info["step"] == 7 and info["latent_spec"]["vae_class"] == vae_class
    assert not (out / LATENTS_INFO).exists()
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0

    pipe = PRXPipeline.from_pretrained(out)
    assert type(pipe.vae).__name__ == vae_class and pipe.tokenizer.model_max_length == 256
    assert pipe.vae_scale_factor == spec.downsample
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE).images[0]
    assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE)

    # Same noise, prompt, guidance and time grid: the pipeline's latents and images are ours.
    steps, noise = 3, initial_noise(spec, 1, SIZE, SIZE, seed=5)
    ours = sample_latents(transformer, text, [PROMPT], spec=spec, height=SIZE, width=SIZE,
                          steps=steps, guidance=4.0, shift=1.0, seed=5)
    theirs = pipe(PROMPT, latents=noise.clone(), timesteps=_pipeline_grid(steps), guidance_scale=4.0,
                  output_type="latent", use_resolution_binning=False, height=SIZE, width=SIZE).images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    pixels = pipe(PROMPT, latents=noise.clone(), timesteps=_pipeline_grid(steps), guidance_scale=4.0,
                  output_type="pt", use_resolution_binning=False, height=SIZE, width=SIZE).images
    vae = load_vae_for_spec(spec, device="cpu")
    torch.testing.assert_close(pixels, decode_to_images(ours, spec, vae), rtol=1e-4, atol=1e-4)
    # The guidance mattered (otherwise the comparison above would not test the text path).
    plain = sample_latents(transformer, text, [PROMPT], spec=spec, height=SIZE, width=SIZE,
                           steps=steps, guidance=1.0, seed=5)
    assert (plain - ours).abs().max() > 1e-3

    _, decode = load_exported(out)
    torch.testing.assert_close(decode(theirs), pixels, rtol=1e-4, atol=1e-4)

    # Exporting again replaces the export in place.
    assert export_pipeline(transformer, text_encoder=text.id, spec=spec, to=out, shift=3.0) == out
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["flux", "dc-ae"])
def test_a_scale_of_the_manifests_own_is_exported_with_the_vae(kinds, text, tmp_path: Path, kind: str):
    """`curate manifest --latent-scaling/--latent-shift`: the export's VAE config carries the
    manifest's scale, so PRXPipeline decodes as we do (DC-AE's config has no shift: that export
    returns latents, which its decode turns into the same images)."""
    from diffusers import PRXPipeline

    spec, transformer = kinds[kind]
    rescaled = LatentSpec.model_validate({**spec.model_dump(), "scaling_factor": 0.5, "shift_factor": 0.2,
                                          "vae_scaling_factor": spec.scaling_factor,
                                          "vae_shift_factor": spec.shift_factor})
    vae = load_vae_for_spec(rescaled, device="cpu")  # checked against the VAE's own scale
    out = export_pipeline(transformer, text_encoder=text.id, spec=rescaled, to=tmp_path / "export")
    saved = json.loads((out / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == 0.5 and saved.get("shift_factor") == (0.2 if kind == "flux" else None)
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["mode"] == ("pixels" if kind == "flux" else "latents")
    steps, noise = 2, initial_noise(rescaled, 1, SIZE, SIZE, seed=3)
    ours = sample_latents(transformer, text, [PROMPT], spec=rescaled, height=SIZE, width=SIZE, steps=steps, seed=3)
    want = decode_to_images(ours, rescaled, vae)
    pipe, decode = load_exported(out)
    pipe.set_progress_bar_config(disable=True)
    if kind == "flux":
        pipe = PRXPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(PROMPT, latents=noise.clone(), timesteps=_pipeline_grid(steps), output_type="pt",
                      use_resolution_binning=False, height=SIZE, width=SIZE).images
        torch.testing.assert_close(images, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode(ours), want, rtol=1e-5, atol=1e-5)


def test_flux2_exports_latents_and_decodes_through_curate(kinds, text, tmp_path: Path):
    from diffusers import PRXPipeline

    spec, transformer = kinds["flux2"]
    vae = load_vae_for_spec(spec, device="cpu")
    assert "batch-norm" in pipeline_decode_problem(vae, spec)
    out = export_pipeline(transformer, text_encoder=str(text.id), spec=spec, to=tmp_path / "export")
    assert json.loads((out / "model_index.json").read_text())["vae"] == [None, None]
    assert json.loads((out / EXPORT_INFO).read_text())["mode"] == "latents"
    latents_info = json.loads((out / LATENTS_INFO).read_text())
    assert latents_info["model_space"] == {"channels": 128, "downsample": 16}
    assert latents_info["latent_spec"]["normalization"]["kind"] == "batchnorm"
    assert PRXPipeline.from_pretrained(out).vae is None

    pipe, decode = load_exported(out)
    pipe.set_progress_bar_config(disable=True)
    steps, noise = 2, initial_noise(spec, 1, SIZE, SIZE, seed=1)
    assert noise.shape == (1, 128, SIZE // 16, SIZE // 16)
    theirs = pipe(PROMPT, latents=noise.clone(), timesteps=_pipeline_grid(steps), output_type="latent",
                  use_resolution_binning=False, height=SIZE, width=SIZE).images
    ours = sample_latents(transformer, text, [PROMPT], spec=spec, height=SIZE, width=SIZE,
                          steps=steps, seed=1)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    images = decode(theirs)
    assert images.shape == (1, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, decode_to_images(ours, spec, vae), rtol=1e-4, atol=1e-4)


def test_scheduler_grid_differs_from_euler_sample_as_documented():
    """FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(N): N sigmas evenly spaced from 1 to
    shift(1/1000) *then* shifted again, plus a final 0; euler_sample: shift(linspace(1, 0, N+1))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift, steps in ((1.0, 2), (1.0, 28), (3.0, 28)):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(steps)
        lowest = shift_timesteps(torch.tensor(1 / 1000, dtype=torch.float64), shift)
        expected = shift_timesteps(torch.linspace(1, float(lowest), steps, dtype=torch.float64), shift)
        torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected, rtol=1e-6, atol=1e-6)
        assert scheduler.sigmas[-1] == 0
        # The model sees timestep / 1000 = sigma, as in training.
        torch.testing.assert_close(scheduler.timesteps / 1000, scheduler.sigmas[:-1])
        ours = shift_timesteps(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
        assert not torch.allclose(scheduler.sigmas.double(), ours, atol=1e-3)
    # With 2 steps the pipeline jumps from 1 to 0.001, then to 0; euler_sample goes 1, 0.5, 0.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(2)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([1.0, 0.001, 0.0]))


@pytest.mark.parametrize("kind", ["flux", "flux2"])
def test_sample_grid_writes_a_reproducible_png(kinds, text, tmp_path: Path, kind: str):
    spec, transformer = kinds[kind]
    vae = load_vae_for_spec(spec, device="cpu")
    transformer.train()
    kwargs = dict(spec=spec, vae=vae, height=SIZE, width=SIZE, steps=2, guidance=4.0, seed=3)
    grid = sample_grid(transformer, text, ["a cat", "a dog", ""], path=tmp_path / "g.png", **kwargs)
    assert transformer.training  # restored after sampling in eval mode
    transformer.eval()
    with Image.open(tmp_path / "g.png") as png:
        assert png.format == "PNG" and png.size == (2 * SIZE, 2 * SIZE) == grid.size
    again = sample_grid(transformer, text, ["a cat", "a dog", ""], **kwargs)
    assert again.tobytes() == grid.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]  # no temporary file left
    wide = sample_grid(transformer, text, ["a cat"], columns=1, **kwargs)
    assert wide.size == (SIZE, SIZE)


def test_make_grid_tiles_row_by_row():
    images = torch.stack([torch.full((3, 4, 6), v) for v in (1.0, 0.5, 0.0)])
    grid = np.asarray(make_grid(images, columns=2))
    assert grid.shape == (8, 12, 3)
    assert (grid[:4, :6] == 255).all() and (grid[:4, 6:] == 128).all() and (grid[4:] == 0).all()
    with pytest.raises(ValueError):
        make_grid(images[:, :1], columns=2)


def test_export_refuses_what_cannot_work(kinds, text, tmp_path: Path):
    from diffusers import PRXTransformer2DModel

    flux_spec, flux_model = kinds["flux"]
    flux2_spec, _ = kinds["flux2"]
    with pytest.raises(ExportError, match="16 channels.*128 in model space"):
        export_pipeline(flux_model, text_encoder=text.id, spec=flux2_spec, to=tmp_path / "a")
    wide = PRXTransformer2DModel(in_channels=16, context_in_dim=48, hidden_size=64, num_heads=4,
                                 depth=1, axes_dim=[8, 8], mlp_ratio=2)
    with pytest.raises(ExportError, match="48-d text context.*32-d"):
        export_pipeline(wide, text_encoder=text.id, spec=flux_spec, to=tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a kiln export"):
        export_pipeline(flux_model, text_encoder=text.id, spec=flux_spec, to=tmp_path / "c")
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="not divisible by 16"):
        sample_latents(flux_model, text, [PROMPT], spec=flux_spec, height=72, width=64, steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written


def test_export_run_reads_the_trainers_checkpoint(kinds, text, tmp_path: Path):
    from diffusers import PRXPipeline

    from train.checkpoint import CheckpointError, save_checkpoint

    spec, transformer = kinds["flux"]
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        export_run(run, tmp_path / "out")
    save_checkpoint(run, 12, {
        "step": 12,
        "model": transformer.state_dict(),
        "denoiser": dict(transformer.config),
        "latent_spec": spec.model_dump(mode="json"),
        "text_encoder": {"name": "tiny", "id": text.id, "max_tokens": 128},
        "config": {"flow": {"shift": 2.0}},
    }, keep=1)
    out = export_run(run, tmp_path / "out")
    info = json.loads((out / EXPORT_INFO).read_text())
    assert (info["step"], info["run"], info["text_encoder"]["max_tokens"]) == (12, str(run.absolute()), 128)
    pipe = PRXPipeline.from_pretrained(out)
    assert pipe.scheduler.config.shift == 2.0 and pipe.tokenizer.model_max_length == 128
    for name, value in transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], value), name
    with pytest.raises(CheckpointError, match="no checkpoint of step 3"):
        export_run(run, tmp_path / "out", step=3)
