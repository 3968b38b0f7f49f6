"""The trainer end to end on tiny components: learning, exact resume, DDP, errors before work,
sample grids and export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from file_server import serve
from latent_data import make_latent_dataset
from PIL import Image

from train.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, list_checkpoints, load_checkpoint
from train.cli import main as train_main
from train.config import build_config
from train.metrics import read_metrics
from train.trainer import train


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_flux2_vae, build_tiny_flux_vae, build_tiny_t5gemma

    root = tmp_path_factory.mktemp("models")
    return {"text": build_tiny_t5gemma(root / "t5gemma"), "flux": build_tiny_flux_vae(root / "flux"),
            "flux2": build_tiny_flux2_vae(root / "flux2")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, models) -> dict[str, Path]:
    """Three shards of 8 samples: 16-channel latents of the tiny Flux VAE, 32 px images."""
    return make_latent_dataset(tmp_path_factory.mktemp("latents"), shards=3, per_shard=8,
                               vae_dir=models["flux"], rejected_every=5)


def tiny_args(models, **overrides) -> list[str]:
    settings = {"text_encoder": str(models["text"]), "sample_every": 0, "data.workers": 0,
                "log.every": 1, "log.tensorboard": "false", **overrides}
    return [f"{k}={v}" for k, v in settings.items()]


def run_train(manifest: Path, out: Path, models, *extra: str, **overrides) -> int:
    return train_main(["--shards", str(manifest), "--out", str(out), "--preset", "tiny", *extra,
                       *tiny_args(models, **overrides)])


def losses(run: Path, name: str = "loss") -> list[tuple[int, float]]:
    return [(m["step"], m[name]) for m in read_metrics(run) if name in m]


def test_overfitting_a_few_samples_drives_the_loss_down(tmp_path: Path, models):
    few = make_latent_dataset(tmp_path / "few", shards=1, per_shard=4, stored="mean", vae_dir=models["flux"])
    cfg = build_config("tiny", overrides=tiny_args(models, steps=300, global_batch=4, micro_batch=4,
                                                    caption_dropout=0.0, lr=3e-3, **{"log.every": 10}),
                       shards=str(few["long"]), out=str(tmp_path / "run"))
    result = train(cfg)
    metrics = read_metrics(tmp_path / "run")
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-3:]) / 3
    assert result.steps == 300 and len(metrics) == 30
    assert first / last > 4, (first, last)
    for name in ("loss_t0.0-0.3", "loss_t0.3-0.6", "loss_t0.6-1.0"):  # learnt at every noise level
        assert metrics[-1][name] < metrics[0][name] / 3, name
    assert {"grad_norm", "lr", "images_per_s", "data_wait_share", "peak_memory_gb"} <= metrics[-1].keys()
    assert [m["epoch"] for m in metrics[:2]] == [10.0, 20.0] and metrics[-1]["epoch"] == 300.0  # 4 of 4 samples a step


def _cli_cmd(manifest: Path, out: Path, models, **overrides) -> list[str]:
    return [sys.executable, "-m", "train", "--shards", str(manifest), "--out", str(out), "--preset", "tiny",
            *tiny_args(models, **overrides)]


# The SIGKILL and the SIGTERM test both continue to one uninterrupted run (a subprocess like the
# interrupted ones: float sums depend on the thread count).
INTERRUPTED = {"steps": 60, "checkpoint_every": 25, "data.workers": 2, "caption_dropout": 0.2}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, models, dataset) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_cli_cmd(dataset["mix"], run, models, **INTERRUPTED), check=True, cwd=REPO, capture_output=True)
    assert len(losses(run)) == 60
    return run


def killed_at_a_checkpoint(cmd: list[str], checkpoints: Callable[[], list[int]],
                           env: dict[str, str] | None = None) -> list[int]:
    """Run ``cmd`` (an INTERRUPTED run) and SIGKILL it, DataLoader workers included, as soon as
    ``checkpoints()`` lists one: the steps listed then."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not checkpoints() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = checkpoints()
    assert at_kill and at_kill[-1] < INTERRUPTED["steps"], f"the run ended before it could be killed: {at_kill}"
    return at_kill


def test_sigkill_and_resume_continue_the_exact_loss_sequence(tmp_path: Path, models, dataset, uninterrupted):
    killed = tmp_path / "killed"
    killed_at_a_checkpoint(_cli_cmd(dataset["mix"], killed, models, **INTERRUPTED),
                           lambda: [s for s, _ in list_checkpoints(killed)])
    # Without --resume a run folder with checkpoints is refused; with it, the run continues.
    refused = subprocess.run(_cli_cmd(dataset["mix"], killed, models, **INTERRUPTED), cwd=REPO,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume auto" in refused.stderr
    subprocess.run([*_cli_cmd(dataset["mix"], killed, models, **INTERRUPTED), "--resume", "auto"],
                   check=True, cwd=REPO, capture_output=True)
    assert losses(killed) == losses(uninterrupted)  # exactly, every step
    a = load_checkpoint(latest_checkpoint(uninterrupted))["model"]
    b = load_checkpoint(latest_checkpoint(killed))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_the_current_step_and_resume_continues_exactly(tmp_path: Path, models, dataset,
                                                                           uninterrupted):
    """Slurm sends SIGTERM to the whole job before preempting it: the trainer finishes its step,
    writes a checkpoint there (not only at checkpoint_every) and exits cleanly."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(_cli_cmd(dataset["mix"], stopped, models, **INTERRUPTED), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(read_metrics(stopped)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # the process and its DataLoader workers, as Slurm does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    (step, _), = list_checkpoints(stopped)  # the SIGTERM's own, before the first checkpoint_every (25)
    assert 3 <= step < 25 and f"stopped by SIGTERM after step {step}" in err
    subprocess.run([*_cli_cmd(dataset["mix"], stopped, models, **INTERRUPTED), "--resume", "auto"],
                   check=True, cwd=REPO, capture_output=True)
    assert losses(stopped) == losses(uninterrupted)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, models, dataset) -> tuple[Path, dict[str, Any]]:
    """The one-process run that the several-rank runs (torchrun, srun) must equal, and its settings."""
    settings = {"steps": 6, "checkpoint_every": 3, "global_batch": 8, "micro_batch": 2,
                "data.workers": 1, "caption_dropout": 0.3, "val.shards": dataset["short"], "val.every": 3,
                "val.samples": 5}
    one = tmp_path_factory.mktemp("one-process") / "one"
    subprocess.run(_cli_cmd(dataset["long"], one, models, **settings), check=True, cwd=REPO, capture_output=True)
    return one, settings


def test_two_gloo_ranks_equal_one_process_and_resume_on_another_world_size(tmp_path: Path, models, dataset,
                                                                           one_process):
    """2 ranks x 1 micro-batch each == 1 rank x 2 accumulated; then the 2-rank run continues on
    1 rank and still matches (the data order and random draws do not depend on the world size),
    and so does the validation loss, whose samples the 2 ranks split."""
    from train.checkpoint import checkpoint_path

    one, settings = one_process
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*torchrun, *_cli_cmd(dataset["long"], two, models, **{**settings, "steps": 3})[1:]],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run([*_cli_cmd(dataset["long"], two, models, **settings), "--resume", "auto"], check=True,
                   cwd=REPO, capture_output=True)
    for step, world_size in ((3, 2), (6, 1)):
        a = load_checkpoint(checkpoint_path(one, step))
        b = load_checkpoint(checkpoint_path(two, step))
        assert (a["world_size"], b["world_size"]) == (1, world_size)
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6)
    assert len(losses(one)) == 6 and [s for s, _ in losses(one, "val_loss")] == [3, 6]
    for name in ("loss", "val_loss"):
        for (s1, l1), (s2, l2) in zip(losses(one, name), losses(two, name), strict=True):
            assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


def test_fsdp_over_two_ranks_equals_one_process_through_a_resume(tmp_path: Path, models, dataset, one_process):
    """fsdp=true: the weights, gradients, AdamW state and EMA split over 2 ranks (each accumulating
    2 micro-batches) train as one process does, with the held-out loss split unevenly; the
    checkpoints hold whole tensors, and a resume shards them again (the optimizer's moments and
    the EMA too) and samples a grid on both ranks."""
    from train.checkpoint import checkpoint_path

    _, settings = one_process
    settings = {**settings, "ema.decay": 0.9}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli_cmd(dataset["long"], one, models, **settings), check=True, cwd=REPO, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps, extra in ((3, {}), (6, {"sample_every": 6})):
        cmd = _cli_cmd(dataset["long"], two, models, **{**settings, "steps": steps, "fsdp": "true", **extra})[1:]
        done = subprocess.run([*torchrun, *cmd, *(["--resume", "auto"] if steps == 6 else [])], cwd=REPO,
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "FSDP: weights, gradients and optimizer state sharded over 2 ranks in 6 units" in done.stderr
    for step in (3, 6):
        a, b = load_checkpoint(checkpoint_path(one, step)), load_checkpoint(checkpoint_path(two, step))
        assert b["world_size"] == 2 and b["config"]["fsdp"] is True
        for key in a["model"]:  # whole tensors, as one process has them
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a["ema"]["weights"][key], b["ema"]["weights"][key], rtol=1e-4, atol=1e-6)
        for i, moments in a["optimizer"]["state"].items():
            torch.testing.assert_close(moments["exp_avg"], b["optimizer"]["state"][i]["exp_avg"], rtol=1e-3, atol=1e-7)
    for name in ("loss", "val_loss"):  # the validation loss measures the EMA weights
        for (s1, l1), (s2, l2) in zip(losses(one, name), losses(two, name), strict=True):
            assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)
    assert (two / "samples" / "step_00000006.png").is_file()


def test_srun_tasks_form_one_run_as_torchrun_ranks_do(tmp_path: Path, models, dataset, one_process):
    """`srun -n 2 python -m train ...`: two tasks with Slurm's step variables and none of
    torchrun's train one run together, the same as one process (train/launch.py): its first 3
    steps."""
    import socket

    one, settings = one_process
    settings = {**settings, "steps": 3}
    with socket.socket() as s:  # a free port for the rendezvous (the derived one is tested in test_launch)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR") and not k.startswith("SLURM_")}
    two = tmp_path / "two"
    tasks = [subprocess.Popen(_cli_cmd(dataset["long"], two, models, **settings), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, "OMP_NUM_THREADS": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
                                   "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_STEP_NUM_NODES": "1",
                                   "SLURM_STEP_NODELIST": "node01", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0",
                                   "MASTER_PORT": str(port)})
             for i in range(2)]
    outputs = [t.communicate(timeout=300)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 rank(s) x 2 micro-batch(es) of 2" in outputs[0]
    assert load_checkpoint(latest_checkpoint(two))["world_size"] == 2
    for name in ("loss", "val_loss"):
        for (s1, l1), (s2, l2) in zip(losses(one, name)[: len(losses(two, name))], losses(two, name), strict=True):
            assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)
    assert [s for s, _ in losses(two)] == [1, 2, 3]


def test_a_compiled_denoiser_trains_as_eager_and_its_checkpoints_resume_eager(tmp_path: Path, models, dataset):
    """compile=true (the GPU presets' setting) takes the same steps as eager, and its checkpoints
    hold the plain module's weights, so a resume may turn compiling off."""
    from torch._dynamo.utils import counters

    settings = {"steps": 3, "checkpoint_every": 3, "global_batch": 4, "micro_batch": 4}
    assert run_train(dataset["long"], tmp_path / "eager", models, **settings) == 0
    torch._dynamo.reset()
    counters.clear()
    assert run_train(dataset["long"], tmp_path / "compiled", models, compile="true", **settings) == 0
    # The denoiser's forward is captured whole: one graph, no graph break.
    assert (counters["stats"]["unique_graphs"], dict(counters["graph_break"])) == (1, {})
    eager, compiled = (load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("eager", "compiled"))
    assert compiled["model"].keys() == eager["model"].keys()
    for key in eager["model"]:
        torch.testing.assert_close(compiled["model"][key], eager["model"][key], rtol=1e-3, atol=1e-5)
    for (s1, l1), (s2, l2) in zip(losses(tmp_path / "eager"), losses(tmp_path / "compiled"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-3)
    assert run_train(dataset["long"], tmp_path / "compiled", models, "--resume", "auto",
                     **{**settings, "steps": 4, "compile": "false"}) == 0
    assert [s for s, _ in losses(tmp_path / "compiled")] == [1, 2, 3, 4]


def test_sample_grid_decodes_through_the_manifests_vae(tmp_path: Path, models, dataset, capsys):
    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, steps=4, sample_every=2, **{"log.tensorboard": "true"}) == 0
    grids = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in grids] == ["step_00000002.png", "step_00000004.png"]
    image = Image.open(grids[-1])
    assert image.size == (64, 64)  # 4 prompts in a 2 x 2 grid of 32 px images
    assert len(set(image.convert("L").getdata())) > 10  # decoded pictures, not a flat fill
    events = sorted((run / "tensorboard").iterdir())
    assert events
    # The run resumed once finished: nothing to do, the last loss logged, no new (empty) events file.
    capsys.readouterr()
    assert run_train(dataset["long"], run, models, "--resume", "auto", steps=4, sample_every=2,
                     **{"log.tensorboard": "true"}) == 0
    assert f"the run had finished: trained 4 steps; last loss {losses(run)[-1][1]};" in capsys.readouterr().out
    assert sorted((run / "tensorboard").iterdir()) == events


def test_export_loads_in_prx_pipeline_and_generates(tmp_path: Path, models, dataset):
    from diffusers import PRXPipeline

    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, steps=3) == 0
    out = tmp_path / "exported"
    assert train_main(["export", str(run), "--to", str(out)]) == 0
    pipe = PRXPipeline.from_pretrained(str(out))
    image = pipe("a red cube on a table", num_inference_steps=2, height=32, width=32, use_resolution_binning=False,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    png = tmp_path / "cube.png"
    assert train_main(["generate", str(out), "a red cube", "--out", str(png), "--steps", "2"]) == 0
    assert Image.open(png).size == (32, 32)
    for wrong in (["--size", "0"], ["--steps", "0"], ["--size", "40"], ["--device", "cuda:7"]):
        assert train_main(["generate", str(out), "a red cube", "--out", str(png), *wrong]) == 2
    for wrong in (tmp_path, tmp_path / "cube.txt"):  # not an image file name: refused before generating
        assert train_main(["generate", str(out), "a red cube", "--out", str(wrong)]) == 2


def test_flux2_runs_export_latents_and_generate_decodes_them(tmp_path: Path, models):
    """PRXPipeline cannot decode FLUX.2's normalised latents itself; `train generate` can."""
    data = make_latent_dataset(tmp_path / "d", shards=1, per_shard=4, channels=32, sizes=[(4, 4)],
                               vae_dir=models["flux2"])
    run = tmp_path / "run"
    assert run_train(data["long"], run, models, steps=2) == 0
    assert load_checkpoint(latest_checkpoint(run))["denoiser"]["in_channels"] == 128
    out = tmp_path / "exported"
    assert train_main(["export", str(run), "--to", str(out)]) == 0
    assert json.loads((out / "kiln_export.json").read_text())["mode"] == "latents"
    png = tmp_path / "img.png"
    assert train_main(["generate", str(out), "one", "two", "--out", str(png), "--steps", "2"]) == 0
    assert [Image.open(tmp_path / f"img-{i}.png").size for i in (0, 1)] == [(32, 32), (32, 32)]


# ---- errors before work -----------------------------------------------------------------------------


def _no_work_done(run: Path) -> bool:
    return not list_checkpoints(run) and not read_metrics(run)


def test_channels_of_another_vae_are_refused_on_resume(tmp_path: Path, models, dataset, capsys):
    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, steps=2) == 0
    flux2 = make_latent_dataset(tmp_path / "flux2", shards=1, per_shard=4, channels=32, vae_dir=models["flux2"])
    assert run_train(flux2["long"], run, models, "--resume", "auto", steps=4) == 2
    err = capsys.readouterr().err
    assert "in_channels=16" in err and "128 model channels" in err
    assert [s for s, _ in list_checkpoints(run)] == [2]


def test_a_run_from_before_the_ablations_resumes_exactly(tmp_path: Path, models, dataset):
    """Checkpoints and config.yaml written before the ablations, EMA and init existed (session 7)
    lack their keys; such a run resumes, with every new switch off, and continues exactly."""
    import yaml

    settings = {"steps": 4, "checkpoint_every": 2}
    clean, old = tmp_path / "clean", tmp_path / "old"
    assert run_train(dataset["long"], clean, models, **settings) == 0
    assert run_train(dataset["long"], old, models, **{**settings, "steps": 2}) == 0
    new_groups, new_keys = ("ablations", "ema", "repa", "routing", "init"), {
        "flow": ("prediction", "x0_t_min", "contrastive"),
        "optim": ("name", "muon_momentum", "decay", "decay_steps", "min_lr_ratio")}

    def as_before(config: dict) -> dict:
        config = {k: v for k, v in config.items() if k not in new_groups}
        for group, keys in new_keys.items():
            config[group] = {k: v for k, v in config[group].items() if k not in keys}
        return config

    path = latest_checkpoint(old)
    state = load_checkpoint(path)
    state = {k: v for k, v in state.items() if k not in ("ema", "repa", "init")}
    state["config"] = as_before(state["config"])
    torch.save(state, path)
    (old / "config.yaml").write_text(yaml.safe_dump(as_before(yaml.safe_load((old / "config.yaml").read_text()))))
    assert train_main(["--out", str(old), "--resume", "auto", "steps=4"]) == 0
    assert losses(old) == losses(clean)
    resumed = load_checkpoint(latest_checkpoint(old))
    assert resumed["ema"] is None and resumed["config"]["flow"]["prediction"] == "velocity"


def test_caption_fallbacks_count_on_through_a_resume(tmp_path: Path, models):
    """The logged caption_fallbacks (samples so far whose drawn variant was missing) reads like one
    run after a resume: it counts on from the checkpoint, not from zero."""
    lacking = make_latent_dataset(tmp_path / "lacking", shards=2, per_shard=4, vae_dir=models["flux"],
                                  missing={0: ("long",), 5: ("long",), 6: ("long", "short", "orig")})
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert run_train(lacking["long"], clean, models, steps=4, checkpoint_every=2) == 0
    assert run_train(lacking["long"], resumed, models, steps=2, checkpoint_every=2) == 0
    assert train_main(["--out", str(resumed), "--resume", "auto", "steps=4"]) == 0
    counted = losses(clean, "caption_fallbacks")
    assert [n for _, n in counted] == [3, 6, 9, 12]  # 3 of the 8 samples of every step
    assert losses(resumed, "caption_fallbacks") == counted


def test_a_cool_down_added_on_resume_trains_as_a_run_planned_with_it(tmp_path: Path, models, dataset, capsys,
                                                                    monkeypatch):
    """Warm-up, stable, decay: a constant run extended with a decay of its last steps continues
    exactly as a run that had the decay from the start; the logged LR is the one each step used."""
    from train.schedule import lr_factor

    cool_down = {"optim.decay": "1-sqrt", "optim.decay_steps": 3, "optim.min_lr_ratio": 0.1}
    planned, extended = tmp_path / "planned", tmp_path / "extended"
    assert run_train(dataset["long"], planned, models, steps=7, **{"optim.warmup_steps": 2}, **cool_down) == 0
    assert "then constant until step 4, then 1-sqrt decay to 0.0001 at step 7" in capsys.readouterr().err
    assert run_train(dataset["long"], extended, models, steps=4, **{"optim.warmup_steps": 2}) == 0
    assert train_main(["--out", str(extended), "--resume", "auto", "steps=7",
                       *(f"{k}={v}" for k, v in cool_down.items())]) == 0
    assert "schedule changed on resume" not in capsys.readouterr().err  # its decay starts after step 4
    assert losses(extended) == losses(planned)
    cfg = build_config("tiny", overrides=["steps=7", "optim.warmup_steps=2",
                                          *(f"{k}={v}" for k, v in cool_down.items())])
    assert [lr for _, lr in losses(planned, "lr")] == pytest.approx(
        [1e-3 * lr_factor(step, cfg.optim, 7) for step in range(7)])
    # A decay that should already have begun is allowed too, and the log says the LR jumps: from the
    # first update after the resume on, not one step late (the optimizer's state held the old LR).
    used, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    assert train_main(["--out", str(extended), "--resume", "auto", "steps=9", "optim.decay=linear",
                       "optim.decay_steps=6"]) == 0
    assert "schedule changed on resume: step 8 updates at lr 0.0004," in capsys.readouterr().err
    assert used == pytest.approx([1e-3 * (0.1 + 0.9 * 2 / 6), 1e-3 * (0.1 + 0.9 / 6)])  # min_lr_ratio 0.1 kept
    assert [lr for _, lr in losses(extended, "lr")][-2:] == pytest.approx(used)


def test_weights_gone_non_finite_are_never_checkpointed(tmp_path: Path, models, dataset, monkeypatch):
    """A step that turns the weights to NaN between log lines (here from step 3 on) is stopped at the
    next checkpoint, which is not written: the latest checkpoint stays the last good one."""
    from train import flow
    from train.trainer import TrainingError

    interpolate, calls = flow.interpolate, []

    def broken_from_step_3(x0, noise, t):  # 2 micro-batches a step
        calls.append(1)
        out = interpolate(x0, noise, t)
        return out * float("nan") if len(calls) > 4 else out

    monkeypatch.setattr(flow, "interpolate", broken_from_step_3)
    run = tmp_path / "run"
    cfg = build_config("tiny", overrides=tiny_args(models, steps=6, checkpoint_every=2, **{"log.every": 100}),
                       shards=str(dataset["long"]), out=str(run))
    with pytest.raises(TrainingError, match=r"not finite after step 4: no checkpoint written.*step_00000002\.pt"):
        train(cfg)
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert all(torch.isfinite(w).all() for w in load_checkpoint(latest_checkpoint(run))["model"].values())


def test_going_back_to_an_older_checkpoint_drops_the_later_ones_at_the_first_save(tmp_path: Path, models, dataset,
                                                                                  capsys):
    """--resume RUN/checkpoints/step_N.pt after a loss spike: the checkpoints after N are from the
    abandoned steps; they stay until the resumed run writes its first one (a failed attempt loses
    nothing), then go, so --resume auto never takes them up again."""
    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, steps=6, checkpoint_every=2) == 0
    for name in ("step00000002-a.json", "step00000004-a.json", "step00000004-a/00000.fid.npy"):  # evaluations
        (run / "eval" / name).parent.mkdir(parents=True, exist_ok=True)
        (run / "eval" / name).write_text("{}")
    capsys.readouterr()
    assert run_train(dataset["long"], run, models, "--resume", str(run / "checkpoints/step_00000002.pt"), steps=6,
                     checkpoint_every=3) == 0
    assert "the checkpoints of steps 4, 6 come after the one resumed" in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 6]
    # The abandoned step 4's evaluations went with its checkpoint; step 2's stay.
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step00000002-a.json"]
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_config_is_refused(tmp_path: Path, models, dataset, capsys):
    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, steps=2) == 0
    assert run_train(dataset["long"], run, models, "--resume", "auto", steps=4, lr=0.5) == 2
    assert "the config differs from the run's: lr: 0.001 -> 0.5" in capsys.readouterr().err
    assert run_train(dataset["long"], run, models, "--resume", "auto", steps=4) == 0  # steps may grow
    assert [s for s, _ in list_checkpoints(run)][-1] == 4
    # The run's saved config is the base of a resume: the folder and what changes are enough.
    assert train_main(["--out", str(run), "--resume", "auto", "steps=6"]) == 0
    assert [s for s, _ in list_checkpoints(run)][-1] == 6 and [m["step"] for m in read_metrics(run)] == [
        1, 2, 3, 4, 5, 6]
    assert train_main(["--out", str(run), "--resume", "auto", "--preset", "small", "steps=8"]) == 2
    assert "trained with --preset tiny, not small" in capsys.readouterr().err


def test_a_checkpoint_of_another_layout_is_refused_with_a_reason(tmp_path: Path, models, dataset, capsys):
    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, steps=2) == 0
    (_, path), = list_checkpoints(run)
    state = torch.load(path, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT
    # As the layout was before formats were recorded: the window also kept its seconds.
    old = {k: v for k, v in state.items() if k != "format"} | {"window": state["window"] | {"seconds": 1.0}}
    torch.save(old, path)
    assert run_train(dataset["long"], run, models, "--resume", "auto", steps=4) == 2
    assert "written by another version of kiln (checkpoint format unrecorded, this one reads 1)" in (
        capsys.readouterr().err)
    torch.save(state | {"format": CHECKPOINT_FORMAT + 1}, path)
    assert run_train(dataset["long"], run, models, "--resume", "auto", steps=4) == 2
    assert f"checkpoint format {CHECKPOINT_FORMAT + 1}" in capsys.readouterr().err
    torch.save({k: v for k, v in state.items() if k != "format"}, path)  # unrecorded, same layout
    assert run_train(dataset["long"], run, models, "--resume", "auto", steps=4) == 0
    assert [s for s, _ in list_checkpoints(run)][-1] == 4


def _edited(manifest: Path, tmp_path: Path, **changes) -> Path:
    data = json.loads(manifest.read_text())
    data.update(changes)
    out = manifest.parent / f"edited-{tmp_path.name}.json"
    out.write_text(json.dumps(data))
    return out


def test_unknown_caption_key_is_refused(tmp_path: Path, models, dataset, capsys):
    bad = _edited(dataset["long"], tmp_path, captions={"longest": 1.0})
    assert run_train(bad, tmp_path / "run", models, steps=2) == 2
    assert "longest" in capsys.readouterr().err
    assert _no_work_done(tmp_path / "run")


def test_train_refuses_bf16_weights_in_a_config_changed_after_build_config(tmp_path: Path, models, dataset):
    """The bf16-weights guard (PRX: 18.20 -> 21.87 FID) holds for train() itself, not only for the
    configs build_config checked: a program that sets weights_dtype afterwards is refused too."""
    from train.config import ConfigError

    cfg = build_config("tiny", overrides=tiny_args(models, steps=2), shards=str(dataset["long"]),
                       out=str(tmp_path / "run"))
    cfg.weights_dtype = "bfloat16"
    with pytest.raises(ConfigError, match="allow_bf16_weights=true"):
        train(cfg)
    assert _no_work_done(tmp_path / "run")


def test_a_sample_grid_size_that_is_not_whole_tokens_is_refused_before_any_step(tmp_path: Path, models, dataset,
                                                                                capsys):
    # 40 px is 2.5 tokens of 16 px (Flux's 1/8 x patch size 2): the first grid would fail, steps in.
    assert run_train(dataset["long"], tmp_path / "run", models, steps=2, sample_every=2, **{"sample.size": 40}) == 2
    assert "sample.size=40" in (err := capsys.readouterr().err) and "multiple of 16" in err, err
    assert _no_work_done(tmp_path / "run")


def test_missing_and_corrupt_shards_are_refused(tmp_path: Path, models, capsys):
    data = make_latent_dataset(tmp_path / "d", shards=2, per_shard=4, vae_dir=models["flux"])
    tars = sorted(data["latents"].glob("*.tar"))
    tars[1].write_bytes(tars[1].read_bytes()[:-1024])  # truncated
    assert run_train(data["long"], tmp_path / "run", models, steps=2) == 2
    assert "000001.tar" in (err := capsys.readouterr().err) and "truncated" in err, err
    tars[0].unlink()
    assert run_train(data["long"], tmp_path / "run", models, steps=2) == 2
    assert "000000.tar" in (err := capsys.readouterr().err) and "does not exist" in err, err
    assert _no_work_done(tmp_path / "run")


def test_a_run_from_a_manifest_at_a_url_trains_as_from_its_files(tmp_path: Path, models, dataset):
    # Training and held-out set over HTTP (curate.storage; tests/test_remote.py for the reading).
    held_out = {"val.every": 2, "val.samples": 5}
    with serve(dataset["root"]) as server:
        url = f"{server.url}/manifests/mix.json"
        assert run_train(url, tmp_path / "remote", models, steps=4, **{"val.shards": url}, **held_out) == 0
    assert run_train(dataset["mix"], tmp_path / "local", models, steps=4, **{"val.shards": dataset["mix"]},
                     **held_out) == 0
    for name in ("loss", "val_loss"):
        assert losses(tmp_path / "remote", name) == losses(tmp_path / "local", name)
    assert len(losses(tmp_path / "remote", "val_loss")) == 2


def test_bf16_weights_guard(tmp_path: Path, models, dataset, capsys):
    assert run_train(dataset["long"], tmp_path / "run", models, steps=2, weights_dtype="bfloat16") == 2
    assert "almost 4 FID points" in capsys.readouterr().err
    assert _no_work_done(tmp_path / "run")
    assert run_train(dataset["long"], tmp_path / "run", models, steps=2, weights_dtype="bfloat16",
                     allow_bf16_weights="true") == 0
    assert "weights stored in bfloat16" in capsys.readouterr().err
    weights = load_checkpoint(latest_checkpoint(tmp_path / "run"))["model"]
    assert all(w.dtype == torch.bfloat16 for w in weights.values() if w.is_floating_point())


def test_check_runs_every_preflight_and_writes_nothing(tmp_path: Path, models, dataset, capsys):
    run = tmp_path / "run"
    assert run_train(dataset["long"], run, models, "--check", sample_every=2) == 0
    out = capsys.readouterr().out
    assert out.startswith("train --check: every check before the first step passed")
    assert "data: 24 samples in 3 shards" in out and "a new run" in out
    assert not run.exists()
    # The sample grids' VAE is loaded before the first step: a VAE that moved fails there, in
    # --check and in training alike, not at the first grid.
    data = json.loads(dataset["long"].read_text())
    moved = _edited(dataset["long"], tmp_path, latent={**data["latent"], "vae": str(tmp_path / "gone"),
                                                       "vae_id": str(tmp_path / "gone")})
    assert run_train(moved, run, models, "--check", sample_every=2) == 2
    assert "gone" in capsys.readouterr().err
    assert run_train(moved, run, models, steps=4, sample_every=2) == 2
    assert _no_work_done(run)
    assert run_train(moved, run, models, steps=2, sample_every=0) == 0  # no grids, no VAE needed
    assert run_train(moved, run, models, "--check", "--resume", "auto", steps=4, sample_every=0) == 0
    assert "would resume from" in capsys.readouterr().out and list_checkpoints(run)[-1][0] == 2


def test_train_check_counts_a_subsets_samples_and_names_its_rules(tmp_path: Path, models, dataset, capsys):
    from curate.cli import main as curate_main

    subset = tmp_path / "half.json"
    assert curate_main(["manifest", str(dataset["long"]), "--fraction", "0.5", "--name", "half",
                        "--out", str(subset)]) == 0
    kept = json.loads(subset.read_text())["samples"]
    capsys.readouterr()
    assert run_train(subset, tmp_path / "run", models, "--check") == 0
    out = capsys.readouterr().out
    assert f"data: {kept} samples in" in out
    assert f"a subset: {kept} of 24 samples of long: --fraction 0.5 (seed 0)" in out
