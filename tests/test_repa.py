"""REPA: the teacher's patch features, the alignment loss, the images the loader pairs with each
latent, and runs that align, end at their stop step, resume exactly, compile and split over ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from tiny_run import make_tiny_runs

from curate.buckets import preprocess
from curate.cli import main as curate_main
from curate.manifest import image_stages, load_manifest, write_manifest
from train.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from train.cli import main as train_main
from train.config import ConfigError, build_config, repa_block
from train.data import DataError, DataSettings, LatentLoader, check_data
from train.metrics import read_metrics
from train.repa import (
    ConvProjector,
    DinoEncoder,
    WithRepa,
    alignment_loss,
    build_projector,
    spatial_normalize,
)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_dinov2, build_tiny_dinov3

    root = tmp_path_factory.mktemp("teachers")
    return {"dinov3": build_tiny_dinov3(root / "dinov3"), "dinov2": build_tiny_dinov2(root / "dinov2")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """12 noise images ingested (3 sizes), encoded at 32 px by a tiny Flux VAE: a manifest whose
    provenance names its image stage."""
    return make_tiny_runs(tmp_path_factory.mktemp("repa"), images=12, sizes=[(80, 64), (64, 80), (72, 72)],
                          resolution=32, shard_size=5, runs={})


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_teacher_features_are_its_patch_tokens_on_the_denoisers_grid(teachers):
    from transformers import AutoModel

    for name, patch, prefix in (("dinov3", 16, 5), ("dinov2", 14, 1)):  # DINOv3: class + 4 registers
        teacher = DinoEncoder(str(teachers[name]), device=torch.device("cpu"))
        assert (teacher.patch, teacher.dim) == (patch, 32)
        images = _images(2, 64)
        features = teacher.features(images, (4, 4))
        assert features.shape == (2, 16, 32) and features.dtype == torch.float32
        x = images.float() / 255
        if patch != 16:
            x = F.interpolate(x, size=(4 * patch, 4 * patch), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            direct = AutoModel.from_pretrained(teachers[name]).eval()(pixel_values=(x - mean) / std).last_hidden_state
        assert direct.shape[1] == prefix + 16
        torch.testing.assert_close(features, direct[:, prefix:])
        assert teacher.features(_images(1, 64, seed=1), (2, 8)).shape == (1, 16, 32)  # a wide bucket
    with pytest.raises(ConfigError, match="is a t5gemma model"):
        from curate.tiny import build_tiny_t5gemma

        DinoEncoder(str(build_tiny_t5gemma(teachers["dinov3"].parent / "t5")), device=torch.device("cpu"))


def test_alignment_loss_is_one_minus_the_mean_cosine():
    a = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(alignment_loss(a, 2.5 * a), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(alignment_loss(a, -a), torch.full((3,), 2.0))
    b = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    expected = 1 - (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean(1)
    torch.testing.assert_close(alignment_loss(a, b), expected)


def test_with_repa_gives_the_denoisers_output_and_its_blocks_tokens_projected():
    from diffusers import PRXTransformer2DModel

    from train.routing import RoutedDenoiser

    model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=8, hidden_size=32,
                                  mlp_ratio=2.0, num_heads=2, depth=3, axes_dim=[8, 8]).eval()
    projector = build_projector(32, 24, 64, seed=0)
    wrapped = WithRepa(RoutedDenoiser(model), projector, 1)
    inputs = {"hidden_states": torch.randn(2, 16, 8, 8), "timestep": torch.tensor([0.3, 0.7]),
              "encoder_hidden_states": torch.randn(2, 5, 8), "attention_mask": torch.ones(2, 5, dtype=torch.bool)}
    seen = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out, projected = wrapped(**inputs)
        plain = model(**inputs, return_dict=False)[0]
    handle.remove()
    torch.testing.assert_close(out, plain)
    assert projected.shape == (2, 16, 24)  # 4 x 4 tokens
    torch.testing.assert_close(projected, projector(seen[0]))
    cfg = build_config("tiny", shards="m", out="r")
    assert repa_block(cfg) == 1  # depth 2: a quarter, at least the first
    with pytest.raises(ConfigError, match="past the last block"):
        build_config("tiny", overrides=["repa.block=3"])


def test_irepas_projector_sees_each_tokens_3x3_neighbourhood_on_its_grid():
    """Tokens come row by row: on a 2 x 3 grid, token 2 (row 0, column 2) touches tokens 1, 2, 4
    and 5, not 0 or 3 (row 1's first, next to it in the sequence but not on the grid)."""
    from diffusers import PRXTransformer2DModel

    from train.routing import RoutedDenoiser

    projector = build_projector(8, 5, 64, seed=0, kind="conv")
    assert isinstance(projector, ConvProjector) and projector.conv.weight.shape == (5, 8, 3, 3)
    tokens = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))
    moved = tokens.clone()
    moved[:, 2] += 1.0
    with torch.no_grad():
        changed = (projector(moved, (2, 3)) - projector(tokens, (2, 3))).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, True, True, False, True, True]
    with pytest.raises(ValueError, match="6 tokens are not a 2x2 grid"):
        projector(tokens, (2, 2))
    # Through WithRepa: the grid is the latent's over the patch size (a wide 8 x 12 latent, patch 2).
    model = PRXTransformer2DModel(in_channels=16, patch_size=2, context_in_dim=8, hidden_size=32,
                                  mlp_ratio=2.0, num_heads=2, depth=3, axes_dim=[8, 8]).eval()
    conv = build_projector(32, 24, 64, seed=0, kind="conv")
    seen = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out))
    inputs = {"hidden_states": torch.randn(1, 16, 8, 12), "timestep": torch.tensor([0.3]),
              "encoder_hidden_states": torch.randn(1, 5, 8), "attention_mask": torch.ones(1, 5, dtype=torch.bool)}
    with torch.no_grad():
        _, projected = WithRepa(RoutedDenoiser(model), conv, 1, patch=2)(**inputs)
    handle.remove()
    grid = seen[0].transpose(1, 2).reshape(1, 32, 4, 6)
    torch.testing.assert_close(projected, conv.conv(grid).flatten(2).transpose(1, 2))


def test_irepas_spatial_normalisation_keeps_how_the_patches_differ():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 9, 4, generator=g) * 3 + torch.randn(2, 1, 4, generator=g) * 10
    normalised = spatial_normalize(features, 1.0)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(1), torch.ones(2, 4), atol=1e-5, rtol=0)
    # What every patch shares is gone: a constant per sample and channel changes nothing.
    torch.testing.assert_close(spatial_normalize(features + 7.0, 1.0), normalised, atol=1e-5, rtol=0)
    centred = features - 0.6 * features.mean(1, keepdim=True)
    torch.testing.assert_close(spatial_normalize(features, 0.6), centred / (centred.std(1, keepdim=True) + 1e-6))
    cfg = build_config("tiny", ablations=["irepa"], shards="m", out="r")
    assert (cfg.repa.weight, cfg.repa.projector, cfg.repa.spatial_norm, cfg.repa.spatial_gamma) == (0.5, "conv", True, 0.6)
    # TREAD routing tokens past the aligned block would leave holes in the grid the convolution reads.
    depth8 = ["model.depth=8", "routing.start=1", "routing.end=4"]
    with pytest.raises(ConfigError, match="convolves block 2's whole token grid, but TREAD routes part of its "
                                          "tokens past blocks 2-4"):
        build_config("tiny", ablations=["irepa", "tread"], overrides=depth8)
    assert build_config("tiny", ablations=["irepa", "tread"], overrides=[*depth8, "repa.block=5"]).repa.block == 5
    with pytest.raises(ConfigError, match="repa.projector must be mlp"):
        build_config("tiny", overrides=["repa.projector=attention"])


def test_the_loader_pairs_each_latent_with_its_image_cropped_as_for_the_vae(pipeline):
    manifest = load_manifest(pipeline["manifest"])
    settings = DataSettings(seed=0, global_batch=4, micro_batch=2, workers=0, shuffle_buffer=8)
    originals = {}
    for tar in sorted(pipeline["images"].glob("*.tar")):
        with tarfile.open(tar) as f:
            for member in f.getmembers():
                if member.name.endswith(".jpg"):
                    originals[member.name[: -len(".jpg")]] = f.extractfile(member).read()
    seen = 0
    with LatentLoader(manifest, pipeline["manifest"], settings, images=pipeline["images"]) as loader:
        for batch, _ in zip(loader, range(4), strict=False):
            for micro in batch.micro:
                assert micro.images.dtype == torch.uint8 and micro.images.shape[1:] == (3, 32, 32)
                for key, image in zip(micro.keys, micro.images, strict=True):
                    assert torch.equal(image, preprocess(originals[key], resolution=32)[0])
                    seen += 1
    assert seen == 16
    with LatentLoader(manifest, pipeline["manifest"], settings) as loader:  # no image stage, no images
        assert next(iter(loader)).micro[0].images is None


def test_bucketed_latents_get_their_buckets_images_and_the_teacher_their_grid(teachers, tmp_path: Path):
    made = make_tiny_runs(tmp_path, images=8, sizes=[(256, 64), (64, 256), (64, 64)], resolution=32,
                          shard_size=4, runs={}, buckets=True)
    manifest = load_manifest(made["manifest"])
    assert len(manifest.latent.buckets) > 1
    settings = DataSettings(seed=0, global_batch=2, micro_batch=1, workers=0, shuffle_buffer=4)
    teacher = DinoEncoder(str(teachers["dinov3"]), device=torch.device("cpu"))
    shapes = set()
    with LatentLoader(manifest, made["manifest"], settings, images=made["images"]) as loader:
        for batch, _ in zip(loader, range(4), strict=False):
            for micro in batch.micro:
                h, w = micro.images.shape[-2:]
                assert micro.latents.shape[-2:] == (h // 8, w // 8)  # Flux: 1/8, the same crop
                shapes.add((h, w))
                assert teacher.features(micro.images, (h // 16, w // 16)).shape == (1, h * w // 256, 32)
    assert len(shapes) > 1, shapes  # wide, tall and square buckets all met
    # iREPA's convolution on those grids, in training.
    assert _train(made["manifest"], tmp_path / "irepa", made, teachers["dinov3"], "--ablation", "irepa", steps=4) == 0
    assert all(r is not None and 0 < r < 2 for _, _, r in _metrics(tmp_path / "irepa"))


def test_a_merged_manifest_pairs_each_latent_with_its_own_datasets_original_and_trains(pipeline, teachers,
                                                                                      tmp_path: Path, capsys):
    other = make_tiny_runs(tmp_path / "other", images=6, sizes=[(64, 64)], resolution=32, shard_size=3, runs={},
                           seed=700, vae=pipeline["images"].parent / "vae")
    merged = tmp_path / "merged.json"
    assert curate_main(["manifest", f"first={pipeline['manifest']}", f"second={other['manifest']}:2",
                        "--name", "both", "--out", str(merged)]) == 0
    manifest = load_manifest(merged)
    stages = image_stages(manifest)
    assert stages == [pipeline["images"].resolve(), other["images"].resolve()]
    originals = {}
    for stage in stages:
        for tar in sorted(stage.glob("*.tar")):
            with tarfile.open(tar) as f:
                originals.update({m.name[: -len(".jpg")]: f.extractfile(m).read() for m in f.getmembers()
                                  if m.name.endswith(".jpg")})
    settings = DataSettings(seed=0, global_batch=2, micro_batch=2, workers=0, shuffle_buffer=8)
    seen = Counter()
    with LatentLoader(manifest, merged, settings, images=stages) as loader:
        for batch, _ in zip(loader, range(manifest.samples // 2), strict=False):
            for key, image in zip(batch.micro[0].keys, batch.micro[0].images, strict=True):
                assert torch.equal(image, preprocess(originals[key], resolution=32)[0])
                seen[key] += 1
    assert sorted(Counter(seen.values()).items()) == [(1, 12), (2, 6)]  # the second dataset twice an epoch
    run = tmp_path / "run"
    capsys.readouterr()
    assert _train(merged, run, pipeline, teachers["dinov3"], "--ablation", "repa", steps=3) == 0
    assert [r is not None for _, _, r in _metrics(run)] == [True] * 3
    log = capsys.readouterr().err
    assert "data: part second: 6 samples x 2, 50.0% of an epoch, captions orig 1" in log
    assert f"of the originals in {stages[0]}, {stages[1]}" in log


def test_an_image_stage_that_does_not_hold_the_latents_is_refused_before_training(pipeline, tmp_path: Path):
    manifest = load_manifest(pipeline["manifest"])
    assert check_data(manifest, pipeline["manifest"], images=pipeline["images"]).samples == manifest.samples
    other = tmp_path / "images"
    shutil.copytree(pipeline["images"], other)
    shards = sorted(other.glob("*.tar"))
    shards[0].unlink()
    with pytest.raises(DataError, match="does not exist"):
        check_data(manifest, pipeline["manifest"], images=other)
    shutil.copy(shards[1], shards[0])
    shutil.copy(shards[1].with_suffix(".parquet"), shards[0].with_suffix(".parquet"))
    with pytest.raises(DataError, match="lacks sample"):
        check_data(manifest, pipeline["manifest"], images=other)
    # Without a recorded image stage REPA needs repa.images.
    data = manifest.model_copy(update={"provenance": {}})
    bare = write_manifest(data, tmp_path / "bare.json")
    code = _train(bare, tmp_path / "run", pipeline, teacher=None, **{"repa.weight": 0.5})
    assert code == 2 and not (tmp_path / "run" / "checkpoints").exists()


def _settings(pipeline, teacher: Path | None, **overrides) -> list[str]:
    text = pipeline["images"].parent / "t5gemma"
    settings = {"text_encoder": str(text), "sample_every": 0, "data.workers": 0, "log.every": 1,
                "log.tensorboard": "false", "global_batch": 4, "micro_batch": 2,
                **({"repa.encoder": str(teacher)} if teacher else {}), **overrides}
    return [f"{k}={v}" for k, v in settings.items()]


def _train(manifest: Path, out: Path, pipeline, teacher: Path | None, *extra: str, **overrides) -> int:
    return train_main(["--shards", str(manifest), "--out", str(out), "--preset", "tiny", *extra,
                       *_settings(pipeline, teacher, **overrides)])


def _metrics(run: Path) -> list[tuple[int, float, float | None]]:
    return [(m["step"], m["loss"], m.get("repa_loss")) for m in read_metrics(run)]


def test_repa_aligns_ends_at_its_stop_step_and_resumes_exactly(pipeline, teachers, tmp_path: Path):
    common = {"steps": 10, "checkpoint_every": 3, "repa.stop_step": 6, "caption_dropout": 0.2, "data.workers": 2}
    clean = tmp_path / "clean"
    # With Muon too: its optimizer gets REPA's projector as a third, AdamW group.
    assert _train(pipeline["manifest"], clean, pipeline, teachers["dinov3"], "--ablation", "repa,muon", **common) == 0
    metrics = _metrics(clean)
    assert [s for s, _, _ in metrics] == list(range(1, 11))
    assert all(r is not None and 0 < r < 2 for _, _, r in metrics[:6])  # steps 1-6: aligned
    assert all(r is None for _, _, r in metrics[6:])  # steps 7-10: REPA is over
    assert load_checkpoint(checkpoint_path(clean, 6))["repa"]["projector"]
    assert load_checkpoint(latest_checkpoint(clean))["repa"] is None
    # Resumed before the stop (step 3: teacher and projector restored), exactly at it (step 6: the
    # projector's optimizer state dropped) and after it (step 9: none built).
    cut = tmp_path / "cut"
    assert _train(pipeline["manifest"], cut, pipeline, teachers["dinov3"], "--ablation", "repa,muon",
                  **{**common, "steps": 3}) == 0
    for steps in (6, 9, 10):
        assert _train(pipeline["manifest"], cut, pipeline, teachers["dinov3"], "--resume", "auto",
                      **{**common, "steps": steps}) == 0
    assert _metrics(cut) == metrics
    a, b = (load_checkpoint(latest_checkpoint(r)) for r in (clean, cut))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("ablation", ["repa", "irepa"])
def test_repa_learns_to_align(pipeline, teachers, tmp_path: Path, ablation: str):
    run = tmp_path / "run"
    assert _train(pipeline["manifest"], run, pipeline, teachers["dinov2"], "--ablation", ablation, steps=60,
                  lr=3e-3, caption_dropout=0.0, **{"log.every": 10}) == 0
    repa = [r for _, _, r in _metrics(run)]
    # The tokens turn towards the teacher's: repa 0.62 -> 0.39 here, irepa 0.95 -> 0.52 (normalised
    # features: far from a random projection's at first)
    assert repa[-1] < 0.85 * repa[0], repa
    projector = load_checkpoint(latest_checkpoint(run))["repa"]["projector"]
    assert (projector["conv.weight"].shape == (32, 64, 3, 3)) if ablation == "irepa" else "0.weight" in projector


def test_repa_and_tread_compiled_train_as_eager(pipeline, teachers, tmp_path: Path, monkeypatch):
    """Dynamo captures the REPA and TREAD wrappers (the hooked block's tokens, the routed blocks)
    whole, with every other block recomputed in the backward pass (REPA's hooked block 0 among
    them), and the compiled run trains as eager. Through AOTAutograd's graphs without inductor's
    code generation: the compiled denoiser's own test in test_train.py runs inductor, which here
    would cost a minute of a cold CI machine (78 s against 13 s) for the same kinds of kernels."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    settings = {"steps": 3, "checkpoint_every": 3, "model.depth": 4, "routing.start": 1}
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        torch._dynamo.reset()
        counters.clear()
        assert _train(pipeline["manifest"], tmp_path / name, pipeline, teachers["dinov3"], "--ablation", "repa,tread",
                      compile=compile_, activation_checkpointing=2 if compile_ == "true" else 0, **settings) == 0
        # One graph: the routed and hooked forward is captured whole, with no graph break.
        assert (counters["stats"]["unique_graphs"], dict(counters["graph_break"])) == (int(compile_ == "true"), {})
    for (s1, l1, r1), (s2, l2, r2) in zip(_metrics(tmp_path / "eager"), _metrics(tmp_path / "compiled"), strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-3) and r1 == pytest.approx(r2, rel=1e-3)


def test_two_ranks_with_repa_equal_one_across_its_stop_step(pipeline, teachers, tmp_path: Path):
    """DDP reduces the projector's gradients with the denoiser's, and is rebuilt without the
    projector when REPA ends; TREAD's routes are drawn per slot, as on one rank. FSDP (fsdp=true)
    shards the projector as a unit of its own, and the run is the same again. Muon, on: the ranks
    split its orthogonalisations (whole matrices with DDP, row blocks gathered with FSDP)."""
    settings = _settings(pipeline, teachers["dinov3"], steps=5, checkpoint_every=5,
                         **{"repa.stop_step": 3, "data.workers": 1, "model.depth": 4, "routing.start": 1})
    base = ["-m", "train", "--shards", str(pipeline["manifest"]), "--preset", "tiny", "--ablation",
            "repa,tread,muon"]
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, *base, "--out", str(one), *settings], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for name, extra in (("ddp", []), ("fsdp", ["fsdp=true"])):
        done = subprocess.run([*torchrun, *base, "--out", str(tmp_path / name), *settings, *extra], cwd=REPO,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("the REPA projector)" in done.stderr) == (name == "fsdp")  # its FSDP note
        assert "each of 2 ranks orthogonalises its share of the " in done.stderr
        for (s1, l1, r1), (s2, l2, r2) in zip(_metrics(one), _metrics(tmp_path / name), strict=True):
            assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)
            assert (r1 is None) == (r2 is None) and (r1 is None or r1 == pytest.approx(r2, rel=1e-4))
        # FSDP: a step on sharded tensors can round a last bit otherwise than one process's, and
        # Muon's bf16 orthogonalisation can turn such a bit into a bf16 step of its own, which later
        # steps carry on: up to 2e-4 in weights of 0.125 after 5 steps, as measured on data made with
        # one thread (none with two). DDP's steps are the one process's, bit for bit.
        atol = 5e-4 if name == "fsdp" else 1e-6
        a, b = (load_checkpoint(latest_checkpoint(r)) for r in (one, tmp_path / name))
        for key in a["model"]:
            torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=atol,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")


def test_repa_inside_the_routed_blocks_aligns_the_kept_tokens(pipeline, teachers, tmp_path: Path):
    """With TREAD routing blocks 1..2, REPA's block 2 sees half the tokens: the teacher's features
    are taken at those tokens."""
    run = tmp_path / "run"
    assert _train(pipeline["manifest"], run, pipeline, teachers["dinov3"], "--ablation", "repa,tread", steps=3,
                  **{"model.depth": 4, "routing.start": 1, "repa.block": 2}) == 0
    assert all(r is not None and 0 < r < 2 for _, _, r in _metrics(run))


def test_the_benchmarks_synthetic_image_stage_pairs_with_its_latents(tmp_path: Path):
    """tests/latent_data.add_image_stage (bench/gpu_train.py's REPA originals) as ingest leaves one."""
    from latent_data import add_image_stage, make_latent_dataset

    data = make_latent_dataset(tmp_path, shards=2, per_shard=4, sizes=[(4, 4), (2, 6)], rejected_every=3)
    images = add_image_stage(data)
    manifest = load_manifest(data["mix"])
    assert manifest.provenance["images"]["path"] == str(images.resolve())
    check_data(manifest, data["mix"], images=images)
    settings = DataSettings(seed=0, global_batch=2, micro_batch=1, workers=0, shuffle_buffer=4)
    with LatentLoader(manifest, data["mix"], settings, images=images) as loader:
        for batch, _ in zip(loader, range(4), strict=False):
            micro = batch.micro[0]
            assert micro.images.shape[-2:] == (micro.latents.shape[-2] * 8, micro.latents.shape[-1] * 8)


def test_in_pixel_space_the_teacher_sees_the_samples_themselves(pipeline, teachers, tmp_path: Path, monkeypatch):
    """A `--vae pixels` manifest needs no image stage: each sample is its image, which the teacher
    reads from the batch (its pixel values, exactly)."""
    from latent_data import make_latent_dataset
    from safetensors.torch import load as load_safetensors

    from curate.shards import committed_shards, iter_tar_samples

    data = make_latent_dataset(tmp_path / "pixels", shards=1, per_shard=4, channels=3, sizes=[(32, 32)],
                               stored="mean", dtype="uint8", vae_dir="pixels")
    stored = [load_safetensors(members["latent.safetensors"])["mean"]
              for shard in committed_shards(data["latents"]) for _, members in iter_tar_samples(shard.tar_path)]
    seen = []
    features = DinoEncoder.features
    monkeypatch.setattr(DinoEncoder, "features", lambda self, images, grid: seen.append(images) or
                        features(self, images, grid))
    assert _train(data["long"], tmp_path / "run", pipeline, teachers["dinov3"], "--ablation", "repa", steps=2,
                  **{"model.patch_size": 16}) == 0
    assert all(r is not None and r > 0 for _, _, r in _metrics(tmp_path / "run"))
    images = [image for batch in seen for image in batch.cpu()]
    assert len(images) == 8  # 2 steps of 4
    for image in images:  # each one of the stored samples, exactly
        assert any(torch.equal(image.round().to(torch.uint8), sample) for sample in stored)
        torch.testing.assert_close(image, image.round(), rtol=0, atol=1e-4)
