"""The trainer's parts that need no data: flow core, config, checkpoints, model sizing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from train import flow
from train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from train.config import (
    PRESETS,
    ConfigError,
    build_config,
    differences,
    from_dict,
    to_dict,
    to_yaml,
)

# ---- flow ------------------------------------------------------------------------------------------


def test_interpolation_ends_and_velocity_is_its_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(3)), eps)
    t, h = torch.tensor([0.2, 0.5, 0.9]), 1e-3
    numeric = (flow.interpolate(x0, eps, t + h) - flow.interpolate(x0, eps, t)) / h
    torch.testing.assert_close(numeric, flow.velocity_target(x0, eps), atol=1e-3, rtol=1e-3)


def test_timesteps_are_logit_normal_with_a_uniform_share():
    n = 200_000
    t = flow.sample_timesteps(n, torch.Generator().manual_seed(0), uniform_share=0.0)
    logits = torch.logit(t.double())
    assert abs(float(logits.mean())) < 0.02 and abs(float(logits.std()) - 1.0) < 0.02
    u = flow.sample_timesteps(n, torch.Generator().manual_seed(0), uniform_share=1.0)
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    # A 10% uniform share puts about 10% * 0.1 of the mass below 0.1, where logit-normal has ~1.4%.
    mixed = flow.sample_timesteps(n, torch.Generator().manual_seed(1), uniform_share=0.1)
    low_pure = float((t < 0.02).double().mean())
    low_mixed = float((mixed < 0.02).double().mean())
    assert low_mixed == pytest.approx(0.9 * low_pure + 0.1 * 0.02, abs=0.002)
    again = flow.sample_timesteps(n, torch.Generator().manual_seed(1), uniform_share=0.1)
    assert torch.equal(mixed, again)
    assert float(mixed.min()) >= 0.0 and float(mixed.max()) <= 1.0


def test_shift_keeps_ends_and_moves_mass_to_noise():
    t = torch.linspace(0, 1, 11)
    shifted = flow.shift_timesteps(t, 3.0)
    assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0
    assert float(flow.shift_timesteps(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    assert torch.all(shifted[1:-1] > t[1:-1]) and torch.all(torch.diff(shifted) > 0)
    assert torch.equal(flow.shift_timesteps(t, 1.0), t)


def test_euler_sampler_follows_a_straight_flow_exactly():
    """For one data point the true velocity field moves noise on a straight line to x0, so any
    number of Euler steps lands on x0: a sign or direction error anywhere would not."""
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)

    def true_velocity(x, t):
        t = t.view(-1, 1, 1, 1)
        eps = (x - (1 - t) * x0) / t
        return eps - x0

    for steps, shift in ((1, 1.0), (4, 1.0), (7, 3.0)):
        torch.testing.assert_close(flow.euler_sample(true_velocity, noise, steps, shift=shift), x0)


def test_guidance_combines_conditional_and_unconditional():
    cond = lambda x, t: torch.full_like(x, 2.0)  # noqa: E731
    uncond = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731
    x, t = torch.zeros(1, 1, 2, 2), torch.ones(1)
    assert torch.equal(flow.with_guidance(cond, uncond, 1.0)(x, t), cond(x, t))
    assert torch.allclose(flow.with_guidance(cond, uncond, 4.0)(x, t), torch.full_like(x, 0.5 + 4 * 1.5))


def test_guidance_interval_guides_only_within_it_and_skips_the_unconditional_pass_elsewhere():
    calls = []

    def uncond(x, t):
        calls.append(float(t[0]))
        return torch.full_like(x, 0.5)

    guided = flow.with_guidance(lambda x, t: torch.full_like(x, 2.0), uncond, 4.0, interval=(0.2, 0.6))
    x = torch.zeros(2, 1, 2, 2)
    outputs = {t: float(guided(x, torch.full((2,), t))[0, 0, 0, 0]) for t in (1.0, 0.6, 0.4, 0.2, 0.1)}
    assert outputs == {1.0: 2.0, 0.6: 6.5, 0.4: 6.5, 0.2: 6.5, 0.1: 2.0}  # the ends belong to the interval
    assert calls == pytest.approx([0.6, 0.4, 0.2])
    # Through the sampler: an interval covering every time equals plain guidance, exactly.
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    everywhere = flow.with_guidance(lambda x, t: x * t[:, None, None, None], lambda x, t: -x, 3.0, interval=(0.0, 1.0))
    plain = flow.with_guidance(lambda x, t: x * t[:, None, None, None], lambda x, t: -x, 3.0)
    assert torch.equal(flow.euler_sample(everywhere, noise, 5), flow.euler_sample(plain, noise, 5))


def test_loss_bins():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    t = torch.tensor([0.0, 0.29, 0.3, 0.6, 1.0])
    sums = flow.loss_sums_by_bin(losses, t)
    assert sums.tolist() == [3.0, 2.0, 3.0, 1.0, 9.0, 2.0]  # [sum, count] per bin


# ---- config ----------------------------------------------------------------------------------------


def test_precedence_defaults_preset_yaml_overrides(tmp_path: Path):
    base = build_config()
    assert (base.global_batch, base.lr, base.optim.betas, base.optim.eps) == (256, 1e-4, [0.9, 0.95], 1e-15)
    assert (base.optim.weight_decay, base.optim.warmup_steps, base.caption_dropout, base.steps) == (
        0.0, 1000, 0.1, 100_000)
    assert (base.model.hidden_size, base.model.depth, base.model.num_heads, base.model.mlp_ratio,
            base.model.axes_dim) == (1792, 16, 28, 3.5, [32, 32])
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 5.0e-4\nflow:\n  shift: 2.0\nmodel.depth: 3\nsteps: 50\n")
    cfg = build_config("tiny", yaml_file, ["steps=70", "optim.betas=[0.9, 0.99]", "sample_every=0"])
    assert cfg.model.hidden_size == PRESETS["tiny"]["model.hidden_size"]  # from the preset
    assert (cfg.lr, cfg.flow.shift, cfg.model.depth) == (5e-4, 2.0, 3)  # from the YAML
    assert (cfg.steps, cfg.optim.betas, cfg.sample_every) == (70, [0.9, 0.99], 0)  # command line wins
    assert from_dict(to_dict(cfg)) == cfg
    assert "lr: 0.0005" in to_yaml(cfg)


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown config key 'stepz'; did you mean steps"),
    ("flow.shfit=2", "did you mean flow.shift"),
    ("steps=ten", "steps: expected a number"),
    ("steps=2.5", "steps: expected an integer"),
    ("compile=maybe", "expected true or false"),
    ("model=3", "is a group of keys"),
    ("global_batch=10", "multiple of micro_batch"),
    ("model.axes_dim=[8, 4]", "must sum to the head size"),
    ("data.verify=fast", "data.verify must be"),
    ("caption_dropout=1.5", "caption_dropout must be in [0, 1)"),
    ("lr", "is not key=value"),
    ("steps=[1", "its value is not YAML"),
    ("model.depth=0", "model.depth must be positive"),
    ("model.patch_size=-2", "model.patch_size and model.bottleneck_size cannot be negative"),
    ("optim.decay=exp", "optim.decay must be none, linear, cosine or 1-sqrt"),
    ("sample.guidance_interval=[0.8, 0.2]", "sample.guidance_interval must be two times 0 <= low <= high <= 1"),
    ("optim.decay_steps=5", "optim.decay is none"),
    ("optim.min_lr_ratio=0.1", "optim.decay is none"),
    ("sample.prompts=[]", "sample.prompts is empty"),  # the tiny preset samples every 100 steps
    ("sample.size=-16", "sample.size cannot be negative"),
])
def test_bad_overrides_are_named(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        build_config("tiny", overrides=[override])
    assert message in str(err.value)


def test_bad_yaml_and_unknown_preset(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config("tiny", bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config("tiny", tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config("huge")


def test_a_preset_named_by_key_is_applied_not_only_recorded(tmp_path: Path):
    """`preset: tiny` in a config file, or preset=tiny on the command line, chooses the preset as
    --preset does; it used to rename the run alone, which trained the PRX-1.2B baseline as "tiny"."""
    tiny = build_config("tiny")
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: tiny\nsteps: 50\n")
    from_file = build_config(config_file=yaml_file)
    assert (from_file.preset, from_file.model.hidden_size, from_file.steps) == ("tiny", tiny.model.hidden_size, 50)
    assert build_config(overrides=["preset=tiny"]) == tiny
    assert build_config("tiny", yaml_file).model.hidden_size == tiny.model.hidden_size  # the same preset twice
    with pytest.raises(ConfigError, match="two presets are named: small by --preset, tiny by "):
        build_config("small", yaml_file)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        build_config(overrides=["preset=huge"])


def test_bf16_weights_are_refused_with_the_reason_unless_overridden():
    with pytest.raises(ConfigError) as err:
        build_config("tiny", overrides=["weights_dtype=bfloat16"])
    assert "FID" in str(err.value) and "allow_bf16_weights=true" in str(err.value)
    cfg = build_config("tiny", overrides=["weights_dtype=bfloat16", "allow_bf16_weights=true"])
    assert cfg.weights_dtype == "bfloat16"


def test_resume_differences_ignore_only_what_may_change():
    a = build_config("tiny")
    b = build_config("tiny", overrides=["steps=999", "sample_every=7", "log.every=3", "sample.steps=2",
                                        "optim.decay=cosine", "optim.decay_steps=100"])  # a cool-down
    assert differences(a, b) == []
    c = build_config("tiny", overrides=["lr=0.5", "flow.shift=2"])
    assert differences(a, c) == ["flow.shift: 1.0 -> 2.0", "lr: 0.001 -> 0.5"]


# ---- LR schedule ----------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_holds_or_decays_to_its_floor():
    from train.schedule import build_schedule, describe, lr_factor

    def factors(steps: int, **optim) -> list[float]:
        cfg = build_config("tiny", overrides=[f"steps={steps}", *(f"optim.{k}={v}" for k, v in optim.items())])
        return [lr_factor(s, cfg.optim, cfg.steps) for s in range(steps)]

    assert factors(6, warmup_steps=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]  # PRX: warm-up, then constant
    assert factors(3, warmup_steps=0) == [1.0, 1.0, 1.0]
    # Linear over all 4 steps after a 2-step warm-up, down to a floor of 0.2 (reached after the last step).
    assert factors(6, warmup_steps=2, decay="linear", min_lr_ratio=0.2) == pytest.approx(
        [0.5, 1.0, 1.0, 0.8, 0.6, 0.4])
    cosine = factors(12, warmup_steps=2, decay="cosine")
    assert cosine[2] == 1.0 and cosine[7] == pytest.approx(0.5) and 0 < cosine[-1] < 0.03
    assert all(a > b for a, b in zip(cosine[2:-1], cosine[3:], strict=True))
    # Warm-up, stable, decay: the last 4 of 10 steps, as 1 - sqrt(progress).
    wsd = factors(10, warmup_steps=2, decay="1-sqrt", decay_steps=4)
    assert wsd[:6] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert wsd[6:] == pytest.approx([1.0 - math.sqrt(p) for p in (0.0, 0.25, 0.5, 0.75)])

    cfg = build_config("tiny", overrides=["steps=10", "optim.warmup_steps=2", "optim.decay=1-sqrt",
                                          "optim.decay_steps=4", "optim.min_lr_ratio=0.1"])
    assert describe(cfg.optim, cfg.lr, cfg.steps) == (
        "lr 0.001, warm-up 2 steps, then constant until step 6, then 1-sqrt decay to 0.0001 at step 10")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule, used = build_schedule(optimizer, cfg.optim, cfg.steps), []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert used == pytest.approx([cfg.lr * f for f in factors(10, warmup_steps=2, decay="1-sqrt", decay_steps=4,
                                                              min_lr_ratio=0.1)])
    with pytest.raises(ConfigError, match="overlap in a run of 10 steps"):
        build_config("tiny", overrides=["steps=10", "optim.warmup_steps=4", "optim.decay=linear",
                                        "optim.decay_steps=7"])


def test_preset_sizes():
    from curate.manifest import LatentNormalization, LatentSpec
    from train.model import build_denoiser, count_parameters, denoiser_config, patch_size_for

    flux = LatentSpec(vae="flux", vae_id="x", vae_class="AutoencoderKL", channels=16, downsample=8,
                      stored="dist", dtype="bfloat16", resolution=256)
    sizes = {}
    for preset in ("tiny", "small", "prx-1.2b"):
        cfg = build_config(preset)
        with torch.device("meta"):
            model = build_denoiser(denoiser_config(cfg.model, flux, 2304 if preset != "tiny" else 32), seed=0)
        sizes[preset] = count_parameters(model)
    assert sizes["tiny"] < 1_000_000
    assert 120e6 < sizes["small"] < 180e6
    assert 1.1e9 < sizes["prx-1.2b"] < 1.3e9
    flux2 = flux.model_copy(update={"channels": 32, "normalization": LatentNormalization(
        mean=[0.0] * 128, var=[1.0] * 128)})
    assert patch_size_for(build_config("tiny").model, flux) == 2  # 8 px latents, 2x2 patches
    assert patch_size_for(build_config("tiny").model, flux2) == 1  # already 16 px per cell


# ---- checkpoints ----------------------------------------------------------------------------------


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path):
    state = {"step": 1, "model": {"w": torch.arange(4.0)}, "nested": [1, 2.5, "x", (3, 4)]}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {**state, "step": step}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    # A save killed mid-write leaves only a hidden temporary file: never listed, cleaned later.
    stale = tmp_path / "checkpoints" / ".step_00000040.pt.tmp-999"
    stale.write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000030.pt"
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded["step"] == 30 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    save_checkpoint(tmp_path, 50, state, keep=2)
    assert not stale.exists()


class _NotData:
    pass


def test_checkpoints_load_as_data_only(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _NotData()}, path)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)
    truncated = tmp_path / "cut.pt"
    good = save_checkpoint(tmp_path, 1, {"step": 1, "w": torch.zeros(1000)}, keep=1)
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError):
        load_checkpoint(truncated)


def test_slot_generators_are_independent_of_order():
    from train.trainer import slot_generator

    a = torch.rand(4, generator=slot_generator(0, 5, 1))
    torch.rand(4, generator=slot_generator(0, 5, 0))
    assert torch.equal(a, torch.rand(4, generator=slot_generator(0, 5, 1)))
    assert not torch.equal(a, torch.rand(4, generator=slot_generator(0, 6, 1)))
    assert not math.isclose(float(a[0]), float(torch.rand(1, generator=slot_generator(1, 5, 1))))


def test_print_config_shows_every_key_resolved(capsys):
    from train.cli import main

    assert main(["--preset", "tiny", "--print-config", "lr=2e-4", "flow.shift=3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0002" in out and "shift: 3.0" in out and "hidden_size: 64" in out
    assert main(["--preset", "tiny", "lr=2e-4", "--print-config", "flow.shift=3"]) == 0  # options between overrides
    assert "lr: 0.0002" in (out := capsys.readouterr().out) and "shift: 3.0" in out
    assert main(["--print-config", "lr=-1"]) == 2
    assert "lr must be positive" in capsys.readouterr().err
