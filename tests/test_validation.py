"""The validation loss (train/validation.py): the same held-out samples, timesteps and noise at every
evaluation, split over ranks without changing the figure, logged by a run and resumed exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from latent_data import make_latent_dataset, sample_key
from safetensors.torch import load as load_safetensors

from curate.cli import main as curate_main
from curate.manifest import load_manifest
from curate.shards import iter_tar_samples
from curate.vae import to_model_input
from eval.compare import compare_runs
from train.cli import main as train_main
from train.config import ConfigError, build_config
from train.metrics import read_metrics
from train.trainer import train
from train.validation import METRIC_NAMES, ValidationSet, _noise_seed

MAX_TOKENS, DIM = 8, 4


class ZeroVelocity(torch.nn.Module):
    """Predicts a zero velocity, so the loss is the mean of (noise - x0)^2: checkable by hand."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, attention_mask, return_dict=False):
        assert encoder_hidden_states.shape[1:] == (MAX_TOKENS, DIM) and attention_mask.dtype == torch.bool
        return (torch.zeros_like(hidden_states),)


def fake_encode(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(len(captions), MAX_TOKENS, DIM), torch.ones(len(captions), MAX_TOKENS, dtype=torch.bool)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two shards of 5 held-out samples in two latent shapes."""
    return make_latent_dataset(tmp_path_factory.mktemp("heldout"), shards=2, per_shard=5, sizes=[(4, 4), (2, 6)],
                               seed=9)


def config(data: dict[str, Path], **overrides) -> object:
    settings = {"val.shards": str(data["long"]), "val.samples": 7, "val.timesteps": 3, "micro_batch": 2,
                "global_batch": 4, **overrides}
    return build_config("tiny", overrides=[f"{k}={v}" for k, v in settings.items()])


def measure(vset: ValidationSet) -> dict[str, float]:
    cpu = torch.autocast("cpu", enabled=False)
    return vset.loss(ZeroVelocity(), device=torch.device("cpu"), weights_dtype=torch.float32, autocast=cpu)


def test_the_set_is_the_first_samples_with_their_stored_means_and_keyed_noise(data):
    cfg = config(data)
    manifest = load_manifest(data["long"])
    vset = ValidationSet.load(cfg, manifest, fake_encode)
    assert vset.samples == 7 and sum(b.latents.shape[0] for b in vset.batches) == 7
    stored = {}
    for tar in sorted((data["latents"]).glob("*.tar")):
        for key, members in iter_tar_samples(tar):
            stored[key] = load_safetensors(members["latent.safetensors"])["mean"]
    first = [sample_key(9, i) for i in range(7)]
    found = []
    for batch in vset.batches:
        assert batch.noise.shape[:2] == (3, batch.latents.shape[0])
        for i, latent in enumerate(batch.latents):
            key = next(k for k in first if torch.equal(to_model_input(stored[k].float()[None], manifest.latent)[0],
                                                      latent))
            found.append(key)
            for k in range(3):
                expected = torch.randn(latent.shape, generator=torch.Generator().manual_seed(_noise_seed(key, k)))
                assert torch.equal(batch.noise[k, i], expected)
    assert sorted(found) == sorted(first)


def test_the_loss_is_the_mean_flow_error_over_samples_and_timesteps(data):
    vset = ValidationSet.load(config(data), load_manifest(data["long"]), fake_encode)
    errors = [((b.noise[k] - b.latents) ** 2).flatten(1).mean(1) for b in vset.batches for k in range(3)]
    measured = measure(vset)
    assert set(measured) == set(METRIC_NAMES)  # t = 1/6, 1/2, 5/6: one timestep in each bin
    assert measured["val_loss"] == pytest.approx(torch.cat(errors).double().mean().item(), rel=1e-6)
    middle = torch.cat([((b.noise[1] - b.latents) ** 2).flatten(1).mean(1) for b in vset.batches])  # t = 1/2
    assert measured["val_loss_t0.3-0.6"] == pytest.approx(middle.double().mean().item(), rel=1e-6)
    assert measure(vset) == measured  # the same figure at every evaluation


def test_ranks_split_the_samples_and_their_sums_make_the_one_rank_figure(data):
    manifest = load_manifest(data["long"])
    whole = measure(ValidationSet.load(config(data), manifest, fake_encode))
    total = 0.0
    for rank in range(3):
        share = ValidationSet.load(config(data, micro_batch=1, global_batch=3), manifest, fake_encode,
                                   rank=rank, world_size=3)
        total += measure(share)["val_loss"] * sum(b.latents.shape[0] for b in share.batches)
    assert total / 7 == pytest.approx(whole["val_loss"], rel=1e-6)


def test_a_held_out_set_of_another_latent_space_or_missing_is_refused(data, tmp_path: Path):
    wide = make_latent_dataset(tmp_path / "wide", shards=1, per_shard=2, channels=32, seed=3)
    with pytest.raises(ConfigError, match=r"val.shards .* differ .* in channels \(32 against 16\)"):
        ValidationSet.load(config(data, **{"val.shards": str(wide["long"])}), load_manifest(data["long"]),
                           fake_encode)
    with pytest.raises(ConfigError, match="val.shards: .*no such manifest"):
        ValidationSet.load(config(data, **{"val.shards": str(tmp_path / "none.json")}),
                           load_manifest(data["long"]), fake_encode)
    with pytest.raises(ConfigError, match="val.every, val.samples and val.timesteps must be positive"):
        config(data, **{"val.timesteps": 0})


def test_a_held_out_set_whose_images_are_not_whole_tokens_is_refused_before_any_step(data, models, tmp_path: Path):
    odd = make_latent_dataset(tmp_path / "odd", shards=1, per_shard=2, sizes=[(2, 6), (3, 5)], seed=4)
    cfg = build_config("tiny", shards=str(data["long"]), out=str(tmp_path / "run"),
                       overrides=[f"text_encoder={models['text']}", "data.workers=0", f"val.shards={odd['long']}"])
    with pytest.raises(ConfigError, match="the held-out manifest's images of 24x40 px are not whole tokens of 16 px"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # FLUX.2's model inputs are 1/16 of the image (the stored latents 1/8): the sizes are the images'.
    from curate.tiny import build_tiny_flux2_vae

    flux2 = make_latent_dataset(tmp_path / "flux2", shards=1, per_shard=4, channels=32, sizes=[(4, 4), (2, 6)],
                                vae_dir=build_tiny_flux2_vae(tmp_path / "vae"))
    for rank in (0, 1):  # every rank checks every held-out size, though it holds only its share
        share = ValidationSet.load(config(flux2), load_manifest(flux2["long"]), fake_encode, rank=rank, world_size=2)
        assert share.sizes == {(32, 32), (16, 48)}
        assert {tuple(b.latents.shape[-2:]) for b in share.batches} == {[(2, 2), (1, 3)][rank]}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_flux_vae, build_tiny_t5gemma

    root = tmp_path_factory.mktemp("models")
    return {"text": build_tiny_t5gemma(root / "t5gemma"), "flux": build_tiny_flux_vae(root / "flux")}


def _train(models, train: Path, heldout: Path, out: Path, *extra: str, **overrides) -> int:
    settings = {"text_encoder": str(models["text"]), "sample_every": 0, "data.workers": 0, "log.every": 1,
                "log.tensorboard": "false", "val.shards": str(heldout), "val.every": 2, "val.samples": 6,
                "checkpoint_every": 2, **overrides}
    return train_main(["--shards", str(train), "--out", str(out), "--preset", "tiny", *extra,
                       *[f"{k}={v}" for k, v in settings.items()]])


def test_hold_out_splits_off_random_shards_as_a_held_out_manifest(tmp_path: Path, capsys):
    data = make_latent_dataset(tmp_path / "d", shards=5, per_shard=3, seed=4)
    out = tmp_path / "m" / "train.json"
    assert curate_main(["manifest", str(data["long"]), "--hold-out", "2", "--captions", "long=1,short=1",
                        "--name", "train", "--out", str(out)]) == 0
    assert "6 held-out samples in 2 shards" in capsys.readouterr().out
    kept, held = load_manifest(out, check_files=True), load_manifest(out.parent / "train-heldout.json",
                                                                      check_files=True)
    source = load_manifest(data["long"])
    assert (kept.samples, held.samples, kept.name, held.name) == (9, 6, "train", "train-heldout")
    assert kept.captions == held.captions == {"long": 0.5, "short": 0.5}
    resolved = {str((out.parent / e.path).resolve()) for e in kept.shards + held.shards}
    assert resolved == {str((data["long"].parent / e.path).resolve()) for e in source.shards}
    assert held.provenance["held_out"]["this"] == "held out" and kept.provenance["held_out"]["shards"] == 2
    assert kept.provenance["captions_from"]["captions"] == held.provenance["captions_from"]["captions"] == {"long": 1.0}
    # The same shards every time (seed 0), not simply the last ones.
    assert curate_main(["manifest", str(data["long"]), "--hold-out", "2", "--name", "again",
                        "--out", str(tmp_path / "m" / "again.json")]) == 0
    assert load_manifest(tmp_path / "m" / "again-heldout.json").shards == held.shards
    for bad in ("0", "5"):
        assert curate_main(["manifest", str(data["long"]), "--hold-out", bad, "--name", "x"]) == 2
        assert "hold out at least 1 and leave at least 1" in capsys.readouterr().err


def test_a_run_logs_its_validation_loss_and_a_resume_measures_the_same(models, tmp_path: Path):
    data = make_latent_dataset(tmp_path / "train", shards=3, per_shard=6, vae_dir=models["flux"], seed=1)
    assert curate_main(["manifest", str(data["long"]), "--hold-out", "1", "--name", "train"]) == 0
    train_manifest, heldout = data["long"].parent / "train.json", data["long"].parent / "train-heldout.json"
    clean = tmp_path / "clean"
    assert _train(models, train_manifest, heldout, clean, steps=5) == 0
    logged = [m for m in read_metrics(clean) if "val_loss" in m]
    assert [m["step"] for m in logged] == [2, 4, 5]  # every 2 steps, and at the end
    assert all(math.isfinite(m["val_loss"]) and "loss" not in m for m in logged)
    assert logged[0]["val_loss"] != logged[1]["val_loss"]  # the weights changed, nothing else
    cut = tmp_path / "cut"
    assert _train(models, train_manifest, heldout, cut, steps=2) == 0
    assert _train(models, train_manifest, heldout, cut, "--resume", "auto", steps=5) == 0
    assert [m for m in read_metrics(cut) if "val_loss" in m] == logged
    # evaluate compare shows each run's latest held-out loss, and says when runs measured different sets.
    header, rows, notes = compare_runs([clean, cut])
    column = header.index("val loss")
    assert [r[column] for r in rows] == [round(logged[-1]["val_loss"], 4)] * 2 and not notes
    config = (cut / "config.yaml").read_text()
    (cut / "config.yaml").write_text(config.replace("samples: 6", "samples: 5"))
    assert any("different held-out sets" in n for n in compare_runs([clean, cut])[2])
    # train --check loads the held-out set too, and says so.
    result = train(build_config("tiny", overrides=[f"{k}={v}" for k, v in {
        "shards": train_manifest, "out": tmp_path / "checked", "text_encoder": models["text"],
        "val.shards": heldout, "data.workers": 0}.items()]), check_only=True)
    assert "validation: 6 held-out samples of" in " ".join(result.notes)
    assert not (tmp_path / "checked").exists()
