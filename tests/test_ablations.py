"""The PRX ablations one switch away: x-prediction, Muon, TREAD token routing, EMA (REPA has its
own file); their math, their config, and their runs (learning, exact resume, sample grids, export,
evaluation's choice of weights). Also activation checkpointing, which shares TREAD's forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from latent_data import make_latent_dataset
from test_train import losses, run_train, tiny_args

from train import flow
from train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from train.config import ABLATIONS, ConfigError, build_config
from train.ema import EMA, checkpoint_weights
from train.export import ExportError, export_run, generate
from train.metrics import read_metrics
from train.optim import MuonAdamW, build_optimizer, orthogonalize, split_for_muon
from train.routing import Route, draw_route, gather_tokens, routed_blocks, routed_forward
from train.trainer import train

# ---- x-prediction --------------------------------------------------------------------------------


def test_x0_prediction_of_the_true_sample_is_the_true_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.9, 1.0])
    x_t = flow.interpolate(x0, noise, t)
    velocity = flow.velocity_from_output(x0, x_t, t, "x0")
    torch.testing.assert_close(velocity, flow.velocity_target(x0, noise), rtol=1e-5, atol=1e-5)
    out = torch.randn(6, 4, 3, 3, generator=g)
    assert flow.velocity_from_output(out, x_t, t, "velocity") is out  # the baseline is untouched
    # Below t_min the division is clamped: (x_t - x0) / 0.05, not / t.
    small = torch.tensor([0.01] * 6)
    x_small = flow.interpolate(x0, noise, small)
    torch.testing.assert_close(flow.velocity_from_output(x0, x_small, small, "x0"),
                               (x_small - x0) / 0.05)
    with pytest.raises(ValueError, match="unknown prediction 'eps'"):
        flow.velocity_from_output(out, x_t, t, "eps")


def test_euler_sampling_of_an_x0_denoiser_lands_on_its_prediction():
    """A denoiser that always predicts the same x0 defines a straight flow to it; Euler steps
    that stay above t_min follow it exactly."""
    target = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    velocity = lambda x, t: flow.velocity_from_output(target, x, t, "x0")  # noqa: E731
    out = flow.euler_sample(velocity, noise, steps=10)  # grid 1.0, 0.9, ..., 0.1, 0.0
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


# ---- contrastive flow matching ---------------------------------------------------------------------


def test_contrastive_negative_pairs_are_the_next_samples_flow():
    g = torch.Generator().manual_seed(3)
    x0, noise, out = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    target = flow.velocity_target(x0, noise)
    negative = flow.negative_pair_loss(out, target)
    for i in range(4):  # sample i against sample i - 1's image and noise, never its own
        j = (i - 1) % 4
        assert negative[i] == pytest.approx(float((out[i] - (noise[j] - x0[j])).pow(2).mean()), rel=1e-6)
    # Even at the true flow the loss rises towards the negative: descent pushes the prediction away
    # from the other sample's flow, to the minimum (target - lambda * negative) / (1 - lambda).
    v = target.clone().requires_grad_(True)
    loss = flow.per_sample_loss(v, target).mean() - 0.05 * flow.negative_pair_loss(v, target).mean()
    loss.backward()
    towards_negative = target.roll(1, dims=0) - target
    assert float((v.grad * towards_negative).sum()) > 0
    best = ((target - 0.05 * target.roll(1, dims=0)) / 0.95).requires_grad_(True)
    (flow.per_sample_loss(best, target).mean() - 0.05 * flow.negative_pair_loss(best, target).mean()).backward()
    torch.testing.assert_close(best.grad, torch.zeros_like(best), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="micro_batch must be 2 or more"):
        build_config("tiny", ablations=["cfm"], overrides=["micro_batch=1", "global_batch=4"])


# ---- immiscible diffusion ---------------------------------------------------------------------------


def test_immiscible_noise_is_the_batchs_noise_in_the_closest_assignment():
    import itertools

    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(6, 3, 4, 4, generator=g) * 2, torch.randn(6, 3, 4, 4, generator=g)
    assigned = flow.immiscible_noise(x0, noise)

    def total(order) -> float:
        return float(sum((x0[i] - noise[j]).pow(2).sum() for i, j in enumerate(order)))

    best = min(itertools.permutations(range(6)), key=total)
    torch.testing.assert_close(assigned, noise[list(best)], rtol=0, atol=0)  # every noise once, least distance
    assert total(best) < total(range(6))
    with pytest.raises(ConfigError, match="micro_batch must be 2 or more"):
        build_config("tiny", ablations=["immiscible"], overrides=["micro_batch=1", "global_batch=4"])


# ---- Muon ------------------------------------------------------------------------------------------


def test_muon_and_adamw_halves_step_exactly_as_torch_muon_and_adamw():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(32, generator=g)
    ours_w, ours_b = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref_w, ref_b = w.clone().requires_grad_(), b.clone().requires_grad_()
    ours = MuonAdamW([{"params": [ours_w], "muon": True}, {"params": [ours_b], "muon": False}],
                     lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, momentum=0.95)
    # Moonshot's RMS matching is what lets Muon share AdamW's learning rate.
    muon = torch.optim.Muon([ref_w], lr=1e-3, weight_decay=0.01, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([ref_b], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for _ in range(5):
        gw, gb = torch.randn(48, 32, generator=g), torch.randn(32, generator=g)
        ours_w.grad, ref_w.grad, ours_b.grad, ref_b.grad = gw.clone(), gw.clone(), gb.clone(), gb.clone()
        ours.step()
        muon.step()
        adamw.step()
    assert not torch.equal(ours_w, w)
    torch.testing.assert_close(ours_w, ref_w, rtol=0, atol=0)
    torch.testing.assert_close(ours_b, ref_b, rtol=0, atol=0)


def test_muon_over_two_ranks_whole_or_split_by_rows_steps_as_one_process():
    """With DDP (whole matrices) and FSDP (rows split, unevenly, one rank holding none of a
    1-row matrix), each rank orthogonalises its share and the weights and momenta equal one
    process's exactly, across a checkpoint that gathers and splits the state again."""
    import socket

    import torch.multiprocessing as mp
    from muon_ranks import run_rank

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(port,), nprocs=2)


def test_muon_deals_the_matrices_out_by_cost():
    from train.optim import deal_out, newton_schulz_flops

    shapes = [(64, 64), (8, 8), (64, 256), (256, 64), (8, 8), (32, 32)]
    owners = deal_out(shapes, 2)
    # The two costliest apart, the next to the lower rank (a tie), then each to the less loaded.
    assert owners == [0, 1, 0, 1, 1, 1]
    assert newton_schulz_flops((48, 16)) == 5 * (4 * 16 * 16 * 48 + 2 * 16**3)


def test_orthogonalize_brings_singular_values_near_one():
    for shape in [(64, 128), (128, 64)]:
        update = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 100
        singular = torch.linalg.svdvals(orthogonalize(update).float())
        assert orthogonalize(update).shape == shape
        assert singular.min() > 0.6 and singular.max() < 1.25, singular  # Muon's quintic: ~[0.7, 1.2]


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=32, hidden_size=64,
                                  mlp_ratio=2.0, num_heads=4, depth=2, axes_dim=[8, 8])
    matrices, others = split_for_muon(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in matrices}
    assert "blocks.0.attention.img_qkv_proj.weight" in muon_names and "blocks.1.down_proj.weight" in muon_names
    assert all(n.startswith("blocks.") and n.endswith("weight") for n in muon_names)
    other_names = {names[id(p)] for p in others}
    assert {"img_in.weight", "txt_in.weight", "final_layer.linear.weight", "time_in.in_layer.weight",
            "blocks.0.attention.norm_q.weight", "blocks.0.modulation.lin.bias"} <= other_names
    assert len(matrices) + len(others) == len(list(model.parameters()))
    cfg = build_config("tiny", ablations=["muon"], shards="m.json", out="r")
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, MuonAdamW) and [g["muon"] for g in optimizer.param_groups] == [True, False]
    assert isinstance(build_optimizer(model, build_config("tiny", shards="m.json", out="r")), torch.optim.AdamW)


# ---- EMA ---------------------------------------------------------------------------------------------


def test_ema_warms_up_then_averages_and_is_applied_without_copies():
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.99)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.99
    expected = [s.clone() for s in start]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, step)
        d = ema.decay_at(step)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for mine, theirs in zip(ema.weights, expected, strict=True):
        torch.testing.assert_close(mine, theirs)
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.applied(model):
        for p, w in zip(model.parameters(), ema.weights, strict=True):
            assert p.data_ptr() == w.data_ptr()
    for p, w in zip(model.parameters(), trained, strict=True):  # restored
        assert torch.equal(p, w)
    assert torch.equal(ema.model_state(model)["weight"], ema.weights[0])
    other = EMA(torch.nn.Linear(3, 4), decay=0.5)
    with pytest.raises(ValueError):
        other.load_state_dict(ema.state_dict())


# ---- config --------------------------------------------------------------------------------------------


def test_ablations_are_named_overrides_recorded_in_the_config(tmp_path: Path):
    cfg = build_config("tiny", ablations=["x-pred", "muon", "ema"], overrides=["ema.decay=0.999"],
                       shards="m.json", out="r")
    assert cfg.flow.prediction == "x0" and cfg.optim.name == "muon" and cfg.ema.decay == 0.999
    assert cfg.ablations == ["x-pred", "muon", "ema"]
    assert set(ABLATIONS) == {"x-pred", "muon", "repa", "irepa", "tread", "cfm", "immiscible", "ema", "lpips",
                              "pdino"}
    with pytest.raises(ConfigError, match="unknown ablation .sprint."):
        build_config("tiny", ablations=["sprint"])
    with pytest.raises(ConfigError, match="chosen with --ablation"):
        build_config("tiny", overrides=["ablations=[muon]"])
    with pytest.raises(ConfigError, match="trained with --ablation muon, not x-pred"):
        build_config(ablations=["x-pred"], base=build_config("tiny", ablations=["muon"]))
    assert build_config(base=cfg).ablations == cfg.ablations  # a resume keeps them
    for bad, message in [("flow.prediction=eps", "velocity or x0"), ("optim.name=sgd", "adamw or muon"),
                         ("ema.decay=1", r"\[0, 1\)"), ("flow.x0_t_min=0", r"\(0, 1\)"),
                         ("flow.contrastive=-0.1", r"\[0, 1\)"), ("perceptual.lpips=-0.1", "0 .off. or more"),
                         ("perceptual.lpips_t_max=0", r"lpips_t_max must be in \(0, 1\]"),
                         ("perceptual.lpips_scale=2", r"lpips_scale must be in \(0, 1\]"),
                         ("perceptual.dino_size=0", "dino_size must be positive"),
                         ("model.bottleneck_size=-1", "cannot be negative")]:
        with pytest.raises(ConfigError, match=message):
            build_config("tiny", overrides=[bad])


# ---- runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_flux_vae, build_tiny_t5gemma

    root = tmp_path_factory.mktemp("models")
    return {"text": build_tiny_t5gemma(root / "t5gemma"), "flux": build_tiny_flux_vae(root / "flux")}


@pytest.mark.parametrize("ablation", ["x-pred", "muon", "cfm", "immiscible"])
def test_each_ablation_learns_a_few_samples(tmp_path: Path, models, ablation: str):
    few = make_latent_dataset(tmp_path / "few", shards=1, per_shard=4, stored="mean", vae_dir=models["flux"])
    cfg = build_config("tiny", ablations=[ablation],
                       overrides=tiny_args(models, steps=200, global_batch=4, micro_batch=4, caption_dropout=0.0,
                                           lr=3e-3, **{"log.every": 10}),
                       shards=str(few["long"]), out=str(tmp_path / "run"))
    train(cfg)
    metrics = read_metrics(tmp_path / "run")
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-3:]) / 3
    assert first / last > 3, (ablation, first, last)


def test_all_three_resume_exactly_and_export_and_sample_with_the_ema(tmp_path: Path, models):
    data = make_latent_dataset(tmp_path / "data", shards=2, per_shard=8, vae_dir=models["flux"])
    common = ("--ablation", "muon,ema")
    settings = {"steps": 16, "checkpoint_every": 8, "sample_every": 8, "caption_dropout": 0.2, "ema.decay": 0.9}
    assert run_train(data["long"], tmp_path / "clean", models, *common, **settings) == 0
    assert run_train(data["long"], tmp_path / "cut", models, *common, **{**settings, "steps": 8}) == 0
    assert run_train(data["long"], tmp_path / "cut", models, "--resume", "auto", steps=16) == 0
    assert losses(tmp_path / "cut") == losses(tmp_path / "clean")
    clean, cut = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in ("clean", "cut"))
    for name, weight in clean["ema"]["weights"].items():  # the average and Muon's momentum resumed
        assert torch.equal(weight, cut["ema"]["weights"][name]), name
    assert not torch.equal(clean["ema"]["weights"]["img_in.weight"], clean["model"]["img_in.weight"])

    # The EMA weights are what export writes by default; --weights raw the trained ones.
    from diffusers import PRXTransformer2DModel

    for weights, source in [(None, clean["ema"]["weights"]), ("raw", clean["model"])]:
        out = export_run(tmp_path / "clean", tmp_path / f"export-{weights}", weights=weights)
        exported = PRXTransformer2DModel.from_pretrained(out / "transformer")
        assert torch.equal(exported.state_dict()["img_in.weight"], source["img_in.weight"])
        assert json.loads((out / "kiln_export.json").read_text())["weights"] == (weights or "ema")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        checkpoint_weights({"model": {}, "ema": None}, "ema")


def test_x_prediction_samples_with_its_own_sampler_and_is_not_exported(tmp_path: Path, models):
    data = make_latent_dataset(tmp_path / "data", shards=1, per_shard=8, vae_dir=models["flux"])
    assert run_train(data["long"], tmp_path / "run", models, "--ablation", "x-pred", steps=4,
                     checkpoint_every=4, sample_every=4) == 0
    assert (tmp_path / "run" / "samples" / "step_00000004.png").is_file()
    with pytest.raises(ExportError, match="flow.prediction=x0"):
        export_run(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_pixel_space_learns_with_32_px_patches_and_a_bottleneck_and_exports_without_a_vae(tmp_path: Path, models):
    """A `curate encode-latents --vae pixels` manifest (3 channels at full resolution), trained as
    PRX's speedrun: x-prediction, 32 px patches projected through a bottleneck."""
    data = make_latent_dataset(tmp_path / "data", shards=1, per_shard=4, channels=3, sizes=[(64, 64)],
                               stored="mean", dtype="uint8", vae_dir="pixels")
    speedrun = {"model.patch_size": 32, "model.bottleneck_size": 16}
    cfg = build_config("tiny", ablations=["x-pred"], shards=str(data["long"]), out=str(tmp_path / "run"),
                       overrides=tiny_args(models, steps=150, global_batch=4, micro_batch=4, caption_dropout=0.0,
                                           lr=3e-3, sample_every=150, **{"log.every": 10}, **speedrun))
    train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["loss"] / (sum(m["loss"] for m in metrics[-3:]) / 3) > 3
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert {k: state["denoiser"][k] for k in ("in_channels", "patch_size", "bottleneck_size")} == {
        "in_channels": 3, "patch_size": 32, "bottleneck_size": 16}
    assert state["model"]["img_in.0.weight"].shape == (16, 3 * 32 * 32)
    assert (tmp_path / "run" / "samples" / "step_00000150.png").is_file()  # decoded through the spec

    # A velocity run exports with no VAE to save; the pipeline's output is the image. Its transformer
    # is conditioned on the resolution too, as PRX's pixel-space models (diffusers' resolution_embeds).
    assert run_train(data["long"], tmp_path / "velocity", models, steps=2, **speedrun,
                     **{"model.resolution_embeds": "true"}) == 0
    out = export_run(tmp_path / "velocity", tmp_path / "export")
    info = json.loads((out / "kiln_export.json").read_text())
    assert info["mode"] == "latents" and info["latent_spec"]["vae"] == "pixels" and not (out / "vae").exists()
    assert json.loads((out / "transformer" / "config.json").read_text())["resolution_embeds"] is True
    assert generate(out, ["a red square"], steps=2)[0].size == (64, 64)

    # Images that are not whole tokens are refused before any step.
    big = build_config("tiny", shards=str(data["long"]), out=str(tmp_path / "big"),
                       overrides=tiny_args(models, steps=1, **{"model.patch_size": 128}))
    with pytest.raises(ConfigError, match="64x64 px are not whole tokens of 128 px"):
        train(big)
    assert not (tmp_path / "big").exists()


# ---- TREAD token routing ---------------------------------------------------------------------------


def _tiny_prx(depth: int = 4, **pixel_space):
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=8, hidden_size=32, mlp_ratio=2.0,
                                  num_heads=2, depth=depth, axes_dim=[8, 8], **pixel_space).eval()
    # Random weights everywhere: PRX zero-initialises its modulation, so fresh blocks are identities.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _prx_inputs(seed: int = 0, n: int = 2, side: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(n, 16, side, side, generator=g), "timestep": torch.rand(n, generator=g),
            "encoder_hidden_states": torch.randn(n, 5, 8, generator=g),
            "attention_mask": torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:n]}


@pytest.mark.parametrize("options", [{}, {"bottleneck_size": 4, "resolution_embeds": True}], ids=["plain", "pixel-prx"])
def test_routed_forward_without_routing_is_the_models_forward(options):
    model = _tiny_prx(**options)
    inputs = _prx_inputs()
    with torch.no_grad():
        plain = model(**inputs, return_dict=False)[0]
        torch.testing.assert_close(routed_forward(model, **inputs), plain, rtol=0, atol=0)
        # Keeping every token routes nothing: gathering, the kept tokens' positions, scattering back.
        everything = Route(1, 3, torch.arange(16).expand(2, -1))
        torch.testing.assert_close(routed_forward(model, route=everything, **inputs), plain, rtol=1e-6, atol=1e-6)


def test_routed_tokens_skip_the_routed_blocks_and_rejoin_unchanged():
    model = _tiny_prx(depth=4)
    inputs = _prx_inputs()
    keep = torch.tensor([[0, 3, 5, 6, 9, 12, 14, 15], [1, 2, 4, 7, 8, 10, 11, 13]])
    seen: dict[int, torch.Tensor] = {}

    def remember(i):
        return lambda module, args, kwargs: seen.__setitem__(i, kwargs["hidden_states"])

    hooks = [block.register_forward_pre_hook(remember(i), with_kwargs=True) for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        routed_forward(model, route=Route(1, 3, keep), **inputs)
    for h in hooks:
        h.remove()
    assert [seen[i].shape[1] for i in range(4)] == [16, 8, 8, 16]  # blocks 1 and 2 see the kept 8 of 16
    dropped = torch.stack([torch.tensor(sorted(set(range(16)) - set(k.tolist()))) for k in keep])
    # What enters block 3 at the dropped tokens is what left block 0 there: blocks 1 and 2 skipped them.
    torch.testing.assert_close(gather_tokens(seen[3], dropped), gather_tokens(_block_input(model, inputs, 1), dropped))
    assert not torch.allclose(gather_tokens(seen[3], keep), gather_tokens(_block_input(model, inputs, 1), keep))


def _block_input(model, inputs, index: int) -> torch.Tensor:
    """The full token sequence entering block ``index`` in the plain forward."""
    seen = {}
    hook = model.blocks[index].register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("x", kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs, return_dict=False)
    hook.remove()
    return seen["x"]


def test_routes_keep_a_random_share_drawn_from_the_slots_generator():
    cfg = build_config("tiny", ablations=["tread"], overrides=["model.depth=4", "routing.start=1"])
    assert routed_blocks(cfg) == (1, 2)  # end 0: depth - 2
    a = draw_route(cfg, 3, 16, torch.Generator().manual_seed(5), torch.device("cpu"))
    b = draw_route(cfg, 3, 16, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(a.keep, b.keep) and a.keep.shape == (3, 8)
    assert all(torch.equal(k, k.unique()) for k in a.keep)  # ascending, no repeats
    assert not torch.equal(a.keep[0], a.keep[1])
    with pytest.raises(ConfigError, match="routing.start < routing.end"):
        build_config("tiny", ablations=["tread"])  # depth 2: nothing between block 2 and depth - 2


# ---- activation checkpointing --------------------------------------------------------------------


def _backward(every: int, route: Route | None = None) -> tuple[dict[str, torch.Tensor], list[int], int]:
    """A forward and backward pass through routed_forward with REPA's tokens taken after block 0: the
    gradients (the REPA projector's too), how often each block ran, and the bytes autograd saved
    outside the recomputed blocks."""
    from collections import Counter

    from train.repa import WithRepa, build_projector
    from train.routing import RoutedDenoiser

    model = _tiny_prx(depth=4).train()
    net = WithRepa(RoutedDenoiser(model, every), build_projector(32, 6, 16, seed=0), 0)
    runs = Counter()
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: runs.update([i]))  # a recomputation stops early
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, projected = net(route=route, **_prx_inputs(n=2, side=8))
    (out.square().mean() + projected.square().mean()).backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    return grads, [runs[i] for i in range(4)], sum(saved)


@pytest.mark.parametrize("routed", [False, True])
def test_recomputed_blocks_give_the_same_gradients_and_save_less(routed: bool):
    route = Route(1, 3, torch.tensor([[0, 3, 5, 6, 9, 12, 14, 15], [1, 2, 4, 7, 8, 10, 11, 13]])) if routed else None
    plain, runs, plain_bytes = _backward(0, route)
    assert runs == [1, 1, 1, 1]
    for every, recomputed in ((1, [2, 2, 2, 2]), (2, [2, 1, 2, 1])):
        grads, runs, saved_bytes = _backward(every, route)
        assert runs == recomputed  # blocks 0 (REPA's) and 2 run again in the backward pass
        for name, grad in plain.items():  # exactly: the same operations on the same inputs
            assert torch.equal(grads[name], grad), (every, name)
        # Saved: 7% (every block recomputed) and 53% (every other one) of the plain pass's tensors here.
        assert saved_bytes < plain_bytes * (0.15 if every == 1 else 0.6), (every, saved_bytes, plain_bytes)
    with torch.no_grad():  # sampling and validation: nothing to recompute, each block runs once
        assert torch.equal(routed_forward(_tiny_prx(), recompute_every=1, **_prx_inputs()),
                           routed_forward(_tiny_prx(), **_prx_inputs()))


def test_tread_learns_and_resumes_exactly(tmp_path: Path, models, capsys):
    few = make_latent_dataset(tmp_path / "few", shards=1, per_shard=4, stored="mean", vae_dir=models["flux"])
    shape = {"model.depth": 4, "routing.start": 1}
    cfg = build_config("tiny", ablations=["tread"],
                       overrides=tiny_args(models, steps=200, global_batch=4, micro_batch=4, caption_dropout=0.0,
                                           lr=3e-3, **{"log.every": 10}, **shape),
                       shards=str(few["long"]), out=str(tmp_path / "run"))
    train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["loss"] / (sum(m["loss"] for m in metrics[-3:]) / 3) > 3

    data = make_latent_dataset(tmp_path / "data", shards=2, per_shard=8, vae_dir=models["flux"])
    settings = {"steps": 8, "checkpoint_every": 4, "caption_dropout": 0.2, **shape}
    assert run_train(data["long"], tmp_path / "clean", models, "--ablation", "tread", **settings) == 0
    assert run_train(data["long"], tmp_path / "cut", models, "--ablation", "tread", **{**settings, "steps": 4}) == 0
    # Resumed with every block recomputed (allowed on resume): the same gradients, the same run.
    assert run_train(data["long"], tmp_path / "cut", models, "--resume", "auto", activation_checkpointing=1,
                     **settings) == 0
    assert "activation checkpointing: 4 of 4 blocks recompute" in capsys.readouterr().err
    assert losses(tmp_path / "cut") == losses(tmp_path / "clean")
