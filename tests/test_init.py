"""Starting a run from trained weights (train/init.py): another run's checkpoint at a new
resolution, its EMA, a `train export` folder, a bare diffusers transformer; what is refused before
any step; and a resumed run that no longer needs its source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from latent_data import make_latent_dataset
from test_train import losses, run_train, tiny_args

from train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from train.cli import main as train_main
from train.config import build_config
from train.metrics import read_metrics

# A learning rate so small that a step leaves every fp32 weight as it was (to 1e-20): the
# run's first checkpoint shows the weights it started from.
FROZEN = {"lr": 1e-30, "steps": 1}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_flux_vae, build_tiny_t5gemma

    root = tmp_path_factory.mktemp("models")
    return {"text": build_tiny_t5gemma(root / "t5gemma"), "flux": build_tiny_flux_vae(root / "flux")}


@pytest.fixture(scope="module")
def data(tmp_path_factory, models) -> dict[str, dict[str, Path]]:
    """The same tiny Flux latent space at 32 px (4x4 latents) and at 64 px (8x8)."""
    root = tmp_path_factory.mktemp("data")
    return {"32": make_latent_dataset(root / "32", shards=1, per_shard=8, sizes=[(4, 4)], vae_dir=models["flux"]),
            "64": make_latent_dataset(root / "64", shards=1, per_shard=8, sizes=[(8, 8)], vae_dir=models["flux"],
                                      seed=1)}


@pytest.fixture(scope="module")
def source(tmp_path_factory, models, data) -> Path:
    """A 32 px run of 6 steps that keeps an EMA (decay 0.5: far from its raw weights)."""
    run = tmp_path_factory.mktemp("source") / "s32"
    assert run_train(data["32"]["long"], run, models, steps=6, **{"ema.decay": 0.5}) == 0
    return run


def start_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(list_checkpoints(run)[0][1])["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-20, msg=k)


def test_a_run_starts_from_another_runs_weights_at_a_new_resolution(tmp_path, models, data, source, capsys):
    run = tmp_path / "s64"
    assert run_train(data["64"]["long"], run, models, "--init-from", str(source), **FROZEN) == 0
    err = capsys.readouterr().err
    saved = load_checkpoint(latest_checkpoint(source))
    assert_same_weights(start_weights(run), saved["model"])  # the raw weights, by default
    state = load_checkpoint(latest_checkpoint(run))
    assert state["init"] == {"kind": "checkpoint", "source": str(latest_checkpoint(source).absolute()), "step": 6,
                             "weights": "raw", "manifest_sha256": saved["manifest_sha256"]}
    assert state["config"]["init"]["source"] == str(source)
    assert state["step"] == 1 and state["schedule"]["last_epoch"] == 1  # a new run: its own step and warm-up
    assert "initialised from" in err and "resolution 32 px -> 64 px; flow.shift 1 (the source's 1, SD3 scales it with the side: x2)" in err
    assert "WARNING" not in err  # the same VAE

    # The same latents at a scale of their own (curate manifest --latent-scaling): noted.
    from curate.cli import main as curate_main

    rescaled = data["32"]["long"].with_name("rescaled.json")
    assert curate_main(["manifest", str(data["32"]["long"]), "--latent-scaling", "0.5", "--name", "rescaled"]) == 0
    assert run_train(rescaled, tmp_path / "rescaled", models, "--init-from", str(source), **FROZEN) == 0
    assert "WARNING: the source's inputs were (latent - 0.1159) * 0.3611, this run's are (latent - 0.1159) * 0.5" \
        in capsys.readouterr().err

    # Training on from there is learning, not a restart: its first loss is below a fresh run's.
    fresh, warm = tmp_path / "fresh", tmp_path / "warm"
    assert run_train(data["32"]["long"], fresh, models, steps=1) == 0
    assert run_train(data["32"]["long"], warm, models, "--init-from", str(source), steps=1) == 0
    assert losses(warm)[0][1] < losses(fresh)[0][1]


def test_the_ema_weights_of_a_checkpoint_and_of_an_export(tmp_path, models, data, source):
    saved = load_checkpoint(latest_checkpoint(source))
    ema = {**saved["model"], **saved["ema"]["weights"]}
    assert any(not torch.equal(ema[k], saved["model"][k]) for k in ema)
    run = tmp_path / "from-ema"
    assert run_train(data["64"]["long"], run, models, "--init-from", str(latest_checkpoint(source)),
                     **FROZEN, **{"init.weights": "ema"}) == 0
    assert_same_weights(start_weights(run), ema)

    # `train export` writes the EMA weights; a run started from the export starts from them.
    exported = tmp_path / "exported"
    assert train_main(["export", str(source), "--to", str(exported)]) == 0
    run = tmp_path / "from-export"
    assert run_train(data["64"]["long"], run, models, "--init-from", str(exported), **FROZEN) == 0
    assert_same_weights(start_weights(run), ema)
    record = load_checkpoint(latest_checkpoint(run))["init"]
    assert (record["kind"], record["subfolder"], record["step"], record["weights"], record["run"]) == (
        "diffusers", "transformer", 6, "ema", str(source.absolute()))


def test_a_bare_diffusers_transformer_folder(tmp_path, models, data, source):
    from diffusers import PRXTransformer2DModel

    saved = load_checkpoint(latest_checkpoint(source))
    transformer = PRXTransformer2DModel(**saved["denoiser"])
    transformer.load_state_dict(saved["model"])
    transformer.save_pretrained(tmp_path / "prx")  # config.json at the folder's root
    run = tmp_path / "run"
    assert run_train(data["32"]["long"], run, models, "--init-from", str(tmp_path / "prx"), **FROZEN) == 0
    assert_same_weights(start_weights(run), saved["model"])


def _refused(capsys, run: Path) -> str:
    assert not list_checkpoints(run) and not read_metrics(run)
    return capsys.readouterr().err


def test_what_cannot_start_from_the_source_is_refused_before_any_step(tmp_path, models, data, source, capsys):
    run = tmp_path / "run"
    manifest = data["32"]["long"]
    assert run_train(manifest, run, models, "--init-from", str(source), **{"model.depth": 3}) == 2
    err = _refused(capsys, run)
    assert "depth 2 (this run: 3)" in err and "model.depth=2" in err
    assert run_train(manifest, run, models, "--init-from", str(source), **{"model.axes_dim": "[4,12]"}) == 2
    assert "model.axes_dim=[8,8]" in _refused(capsys, run)

    assert run_train(manifest, run, models, "--init-from", str(source), "--ablation", "x-pred") == 2
    assert "predicts velocity, this run flow.prediction=x0" in _refused(capsys, run)

    other_text = tmp_path / "another-t5gemma"
    shutil.copytree(models["text"], other_text)
    assert run_train(manifest, run, models, "--init-from", str(source), text_encoder=str(other_text)) == 2
    assert f"set text_encoder={models['text']}" in _refused(capsys, run)

    no_ema = tmp_path / "no-ema"
    assert run_train(manifest, no_ema, models, steps=1) == 0
    capsys.readouterr()
    assert run_train(manifest, run, models, "--init-from", str(no_ema), **{"init.weights": "ema"}) == 2
    assert "no EMA weights" in _refused(capsys, run)

    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text("steps: 1\n")
    assert run_train(manifest, run, models, "--init-from", str(empty)) == 2
    assert "holds no checkpoint yet" in _refused(capsys, run)
    assert run_train(manifest, run, models, "--init-from", str(tmp_path / "runs" / "gone")) == 2
    assert "no such file or folder" in _refused(capsys, run)
    assert run_train(manifest, run, models, "--init-from", str(tmp_path)) == 2
    assert "neither a run" in _refused(capsys, run)


def test_a_resumed_run_continues_exactly_without_its_source(tmp_path, models, data, source):
    copy = tmp_path / "source-copy"
    shutil.copytree(source, copy)
    settings = {"steps": 6, "checkpoint_every": 2}
    clean = tmp_path / "clean"
    assert run_train(data["64"]["long"], clean, models, "--init-from", str(copy), **settings) == 0
    stopped = tmp_path / "stopped"
    assert run_train(data["64"]["long"], stopped, models, "--init-from", str(copy), **{**settings, "steps": 2}) == 0
    shutil.rmtree(copy)  # the checkpoint holds the weights now
    assert run_train(data["64"]["long"], stopped, models, "--init-from", str(copy), "--resume", "auto",
                     **settings) == 0
    assert losses(stopped) == losses(clean)
    assert load_checkpoint(latest_checkpoint(stopped))["init"] == load_checkpoint(latest_checkpoint(clean))["init"]


def test_init_config_keys():
    cfg = build_config("tiny", overrides=["init.weights=ema"], **{"init.source": "runs/base"})
    assert (cfg.init.source, cfg.init.weights) == ("runs/base", "ema")
    with pytest.raises(ValueError, match="init.weights must be raw or ema"):
        build_config("tiny", overrides=["init.weights=average"])
    with pytest.raises(ValueError, match="init.revision names a revision of init.source"):
        build_config("tiny", overrides=["init.revision=main"])


def test_a_hub_alias_loads_from_the_hub_cache_at_a_recorded_commit(tmp_path, models, data, source):
    """`--init-from prx-256` is Photoroom/prx-256-t2i's transformer/ (a tiny stand-in here, from a
    Hub cache laid out as huggingface_hub writes it, offline; in subprocesses, since
    huggingface_hub reads HF_HUB_OFFLINE and the cache folder at import)."""
    from diffusers import PRXTransformer2DModel

    saved = load_checkpoint(latest_checkpoint(source))
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--Photoroom--prx-256-t2i"
    transformer = PRXTransformer2DModel(**saved["denoiser"])
    transformer.load_state_dict(saved["model"])
    transformer.save_pretrained(repo / "snapshots" / sha / "transformer")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def train_from(alias: str, run: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "train", "--shards", str(data["32"]["long"]), "--out", str(run), "--preset",
               "tiny", "--init-from", alias, *tiny_args(models, **FROZEN)]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)

    proc = train_from("prx-256", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(start_weights(tmp_path / "run"), saved["model"])
    record = load_checkpoint(latest_checkpoint(tmp_path / "run"))["init"]
    assert (record["source"], record["subfolder"], record["revision"]) == ("Photoroom/prx-256-t2i", "transformer", sha)
    assert f"initialised from Photoroom/prx-256-t2i at {sha} (diffusers)" in proc.stderr

    proc = train_from("prx-512", tmp_path / "other")  # not in the cache: a clear error, offline
    assert proc.returncode == 2
    assert "train: error: init.source prx-512: cannot read a PRXTransformer2DModel config from " \
           "Photoroom/prx-512-t2i" in proc.stderr
