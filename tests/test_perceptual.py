"""Perceptual losses (train/perceptual.py): LPIPS equal to the lpips package's, P-DINO on a tiny
DINOv2 with registers, the noise gating, and pixel-space runs with both (PRX's speedrun)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from latent_data import make_latent_dataset
from test_train import losses, run_train

from curate.tiny import build_tiny_dinov2_with_registers, build_tiny_t5gemma
from train.config import ConfigError, PerceptualConfig, build_config
from train.metrics import read_metrics
from train.perceptual import VGG16_URL, Lpips, PerceptualLosses, dino_distance
from train.repa import DinoEncoder
from train.trainer import train


@pytest.fixture(scope="module")
def reference_lpips(tmp_path_factory):
    """The lpips package's LPIPS on a random VGG16, whose features are also put in a torch.hub
    cache as torchvision's ImageNet checkpoint: Lpips.load reads them through the users' path."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of lpips's pretrained=
        torch.manual_seed(0)
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    features = {f"features.{name}": p.detach().clone() for k in range(1, 6)
                for name, p in getattr(reference.net, f"slice{k}").named_parameters()}
    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(features, home / "hub" / "checkpoints" / os.path.basename(VGG16_URL))
    before = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    yield reference
    if before is None:
        del os.environ["TORCH_HOME"]
    else:
        os.environ["TORCH_HOME"] = before


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"text": build_tiny_t5gemma(root / "t5gemma"), "dino": build_tiny_dinov2_with_registers(root / "dino")}


def images(seed: int, n: int = 2, h: int = 32, w: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_equals_the_lpips_package_and_is_differentiable(reference_lpips):
    ours = Lpips.load()
    x, y = images(1), images(2)
    with torch.no_grad():
        expected = reference_lpips(x, y).view(-1)
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours(y, y), torch.zeros(2))
    x.requires_grad_(True)
    ours(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_p_dino_compares_patch_tokens_past_the_registers(models):
    encoder = DinoEncoder(str(models["dino"]), device=torch.device("cpu"), role="perceptual.dino_encoder")
    x, y = images(3), images(4)
    assert dino_distance(encoder, y, y, 28).abs().max() < 1e-6
    x.requires_grad_(True)
    distance = dino_distance(encoder, x, y, 28)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert x.grad.abs().sum() > 0
    # By hand: the 4 patch tokens of each 28 px image (after the class token and 4 registers).
    view = torch.nn.functional.interpolate((x.detach() + 1) / 2, size=(28, 28), mode="bilinear", align_corners=False)
    hidden = encoder.model(pixel_values=(view - encoder.mean) / encoder.std).last_hidden_state
    assert hidden.shape[1] == 1 + 4 + 4
    torch.testing.assert_close(encoder.patch_tokens(view), hidden[:, 5:])


def test_each_loss_applies_below_its_timestep_only(reference_lpips, models):
    cfg = PerceptualConfig(lpips=0.1, lpips_t_max=0.3, dino=0.01, dino_encoder=str(models["dino"]), dino_size=28)
    losses_ = PerceptualLosses(cfg, torch.device("cpu"))
    estimate, x0 = images(5).requires_grad_(True), images(6)
    t = torch.tensor([0.1, 0.5])
    lpips_term, dino_term = losses_.terms(estimate, x0, t)
    assert lpips_term.applies.tolist() == [True, False] and dino_term.applies.tolist() == [True, True]
    torch.testing.assert_close(lpips_term.mean(), lpips_term.losses[0])
    assert lpips_term.losses[1] == 0  # the noisy sample never reaches VGG
    half = [torch.nn.functional.interpolate(v[:1].detach(), scale_factor=0.5, mode="bilinear", align_corners=False)
            for v in (estimate, x0)]
    torch.testing.assert_close(lpips_term.losses[0], losses_.lpips(*half)[0])
    total = losses_.weighted([lpips_term, dino_term])
    torch.testing.assert_close(total, 0.1 * lpips_term.losses[0] + 0.01 * dino_term.losses.mean())
    lpips_term.mean().backward()
    assert estimate.grad[0].abs().sum() > 0 and not estimate.grad[1].any()  # the noisy sample: no gradient


def test_pixel_space_run_with_both_resumes_exactly_and_latents_are_refused(tmp_path: Path, reference_lpips, models):
    data = make_latent_dataset(tmp_path / "data", shards=1, per_shard=8, channels=3, sizes=[(32, 32)],
                               stored="mean", dtype="uint8", vae_dir="pixels")
    speedrun = ("--ablation", "x-pred,lpips,pdino")
    settings = {"perceptual.dino_encoder": models["dino"], "perceptual.dino_size": 28, "perceptual.lpips_t_max": 1.0,
                "checkpoint_every": 2}
    assert run_train(data["long"], tmp_path / "clean", models, *speedrun, steps=4, **settings) == 0
    assert run_train(data["long"], tmp_path / "cut", models, *speedrun, steps=2, **settings) == 0
    assert run_train(data["long"], tmp_path / "cut", models, "--resume", "auto", steps=4) == 0
    for name in ("loss", "lpips_loss", "pdino_loss"):
        assert losses(tmp_path / "cut", name) == losses(tmp_path / "clean", name), name
    metrics = read_metrics(tmp_path / "clean")
    assert len(metrics) == 4 and all(m["lpips_loss"] > 0 and m["pdino_loss"] > 0 for m in metrics)

    latents = make_latent_dataset(tmp_path / "latents", shards=1, per_shard=4)
    cfg = build_config("tiny", ablations=["lpips"], shards=str(latents["long"]), out=str(tmp_path / "refused"),
                       overrides=[f"text_encoder={models['text']}", "data.workers=0"])
    with pytest.raises(ConfigError, match="need a pixel-space manifest"):
        train(cfg)
    assert not (tmp_path / "refused").exists()
