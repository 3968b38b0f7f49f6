"""`evaluate`: FID arithmetic, the TF resize, evaluation sets, FID of a real tiny run (kill,
resume and two workers give the clean run's number), and the comparison table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode, noise_image
from latent_data import make_latent_dataset

import eval.fid as fid_module
from curate.encode_latents import EncodeLatentsStage
from curate.ingest import IngestStage
from curate.manifest import load_manifest
from curate.runner import run_stage
from curate.sources import open_source
from eval.cli import main as evaluate_main
from eval.compare import compare_runs, format_table
from eval.evalset import EvalSetError, choose_samples
from eval.fid import evaluate_fid, result_files
from eval.inception import InceptionError, InceptionFeatures, find_inception, resize_tf_bilinear
from eval.stats import FeatureStats, frechet_distance, load_stats
from train.cli import main as train_main

SAMPLES = 10  # images per evaluation: each costs about 0.1 s of Inception on this CPU


# --------------------------------------------------------------------------- arithmetic


def test_frechet_distance_matches_the_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    # Diagonal covariances: FID = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Full covariances against the textbook formula with scipy's matrix square root.
    from scipy import linalg

    x, y = rng.normal(size=(50, 8)), rng.normal(size=(40, 8)) @ rng.normal(size=(8, 8))
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    textbook = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(textbook, rel=1e-8)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-9)
    # Fewer samples than dimensions: a singular covariance still gives a finite, symmetric value.
    s1, s2 = np.cov(rng.normal(size=(3, 8)), rowvar=False), np.cov(rng.normal(size=(4, 8)), rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu1, c1, mu2[:4], c2[:4, :4])


def test_feature_stats_are_numpys_mean_and_cov_and_save_without_pickle(tmp_path: Path):
    features = np.random.default_rng(1).normal(size=(37, 5))
    stats = FeatureStats(5)
    for part in np.array_split(features, 4):
        stats.add(part)
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=1e-10)
    stats.save(tmp_path / "s.npz", {"what": "test"})
    mean, cov, n, meta = load_stats(tmp_path / "s.npz")
    assert n == 37 and meta == {"what": "test"}
    np.testing.assert_array_equal(cov, stats.cov)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        stats.add(np.zeros((2, 4)))


def test_resize_follows_tensorflows_corner_aligned_bilinear():
    # TF1 resize_bilinear (align_corners=False): output i samples input coordinate i * in / out,
    # and bilinear interpolation of a ramp is exact, so the output is that coordinate.
    ramp = torch.arange(40, dtype=torch.float64).expand(1, 3, 40, 40).contiguous()
    out = resize_tf_bilinear(ramp, size=16)
    expected = torch.clamp(torch.arange(16, dtype=torch.float64) * 40 / 16, max=39)
    torch.testing.assert_close(out[0, 0, 0], expected)
    torch.testing.assert_close(out[0, 1, :, 5], torch.full((16,), float(expected[5]), dtype=torch.float64))
    up = resize_tf_bilinear(torch.arange(4, dtype=torch.float64).expand(1, 1, 4, 4).contiguous(), size=8)
    torch.testing.assert_close(up[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3], dtype=torch.float64))


# --------------------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def inception() -> Path:
    try:
        return find_inception()
    except InceptionError as e:  # make test installs it; a missing file is a broken set-up, not a skip
        pytest.fail(f"{e}")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_gives_2048_features_and_refuses_other_networks(inception, tmp_path: Path, monkeypatch):
    net = InceptionFeatures(inception)
    assert net.sha1 == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    images = torch.from_numpy(np.stack([np.asarray(noise_image(i, (48, 40))) for i in range(3)])).permute(0, 3, 1, 2)
    features = net(images.contiguous())
    assert features.shape == (3, 2048) and features.dtype == torch.float64
    assert torch.all(features >= 0)  # pool features after a ReLU
    torch.testing.assert_close(net(images[:1].contiguous()), features[:1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        net(images.float())

    monkeypatch.setenv("KILN_INCEPTION", str(tmp_path / "nothing.pt"))
    with pytest.raises(InceptionError, match="no FID Inception weights"):
        find_inception()
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(other))
    with pytest.raises(InceptionError, match="not the FID Inception"):
        InceptionFeatures(other)(images)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InceptionError, match="cannot load"):
        InceptionFeatures(tmp_path / "junk.pt")


# --------------------------------------------------------------------------- evaluation sets


def test_evaluation_sets_share_keys_across_caption_selections_and_follow_each(tmp_path: Path):
    manifests = make_latent_dataset(tmp_path, shards=3, per_shard=6, rejected_every=4,
                                    missing={4: ("long",)})
    loaded = {name: load_manifest(manifests[name]) for name in ("long", "short", "mix")}
    sets = {name: choose_samples(m, manifests[name], 8, seed=3) for name, m in loaded.items()}
    keys = [s.key for s in sets["long"]]
    assert len(set(keys)) == 8 and all([s.key for s in v] == keys for v in sets.values())
    assert [s.index for s in sets["long"]] == list(range(8))
    assert {s.variant for s in sets["short"]} == {"short"}
    assert all(s.caption.startswith(s.variant) for s in sets["short"])
    assert {s.variant for s in sets["mix"]} <= {"long", "short"}
    assert [s.key for s in choose_samples(loaded["long"], manifests["long"], 8, seed=4)] != keys
    assert choose_samples(loaded["long"], manifests["long"], 8, seed=3) == sets["long"]
    fixed = choose_samples(loaded["mix"], manifests["mix"], 8, seed=3, variant="short")
    assert {s.variant for s in fixed} == {"short"}
    everything = choose_samples(loaded["long"], manifests["long"], 1000)
    assert len(everything) == 18 and len({s.key for s in everything}) == 18
    # The sample whose long caption is missing falls back to another variant, as in training.
    assert any(s.variant != "long" for s in everything)
    with pytest.raises(EvalSetError, match="at least 1"):
        choose_samples(loaded["long"], manifests["long"], 0)


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """Images -> tiny Flux latents (orig captions) -> a tiny run of 2 steps, and a second run
    that differs in its learning rate."""
    from curate.tiny import build_tiny_flux_vae, build_tiny_t5gemma

    root = tmp_path_factory.mktemp("eval")
    src = root / "src"
    src.mkdir()
    for i in range(12):
        size = [(80, 64), (64, 80), (72, 72)][i % 3]
        (src / f"img_{i}.jpg").write_bytes(encode(noise_image(200 + i, size), "JPEG", quality=90))
        (src / f"img_{i}.txt").write_text(f"{['a red', 'a green', 'a blue'][i % 3]} pattern number {i}")
    images = root / "images"
    run_stage(IngestStage(open_source(str(src)), images, shard_size=5), images, progress=False)
    vae, text = build_tiny_flux_vae(root / "vae"), build_tiny_t5gemma(root / "t5gemma")
    latents, manifests = root / "latents", root / "manifests"
    run_stage(EncodeLatentsStage(images, None, latents, str(vae), resolution=32, batch_size=4, decode_workers=0,
                                 allow_missing_captions=True, manifest_dir=manifests, device="cpu"),
              latents, progress=False)
    manifest = manifests / "orig.json"
    runs = {}
    for name, lr in (("base", "0.001"), ("slow", "0.0001")):
        runs[name] = root / "runs" / name
        assert train_main(["--shards", str(manifest), "--out", str(runs[name]), "--preset", "tiny", "steps=2",
                           "checkpoint_every=2", f"lr={lr}", f"text_encoder={text}", "sample_every=0",
                           "data.workers=0", "log.every=1", "log.tensorboard=false"]) == 0
    return {"images": images, "manifest": manifest, **runs}


def _fid(run: Path, **kwargs) -> dict | None:
    options = {"samples": SAMPLES, "steps": 2, "batch_size": 4, "device": "cpu", "progress": False}
    return evaluate_fid(run, **{**options, **kwargs})


def _fresh_copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("eval"))
    return to


def test_fid_of_a_run_is_recorded_reproducible_and_reused(pipeline, inception, tmp_path: Path):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    first = _fid(run)
    assert first is not None and np.isfinite(first["value"]) and first["value"] > 0
    assert first["step"] == 2 and first["settings"]["samples"] == SAMPLES
    assert first["settings"]["steps"] == 2 and first["settings"]["guidance"] == 4.0  # the run's sample.guidance
    assert first["settings"]["captions"] == {"orig": 1.0} and first["empty_prompts"] == 0
    assert "biased" in first["note"]
    assert [p.name for p in result_files(run)] == [f"fid-step00000002-{first['tag']}.json"]
    features = sorted(Path(first["features"]).glob("*.npy"))
    assert len(features) == 1 and np.load(features[0]).shape == (SAMPLES, 2048)
    _, _, n, meta = load_stats(first["reference"])
    assert n == SAMPLES and meta["resolution"] == 32

    assert _fid(run) == first  # stored: nothing recomputed
    again = _fid(run, force=True)
    assert again["value"] == first["value"] and again["tag"] == first["tag"]
    other = _fid(run, guidance=1.0)
    assert other["tag"] != first["tag"] and other["value"] != first["value"]
    assert other["reference"] == first["reference"]  # same real images: the cached statistics
    assert len(result_files(run)) == 2


def test_a_killed_evaluation_and_two_workers_give_the_clean_runs_number(pipeline, inception, tmp_path: Path,
                                                                       monkeypatch):
    monkeypatch.setattr(fid_module, "CHUNK", 4)  # 3 chunks of SAMPLES = 10
    clean = _fid(_fresh_copy(pipeline["base"], tmp_path / "clean"))

    killed = _fresh_copy(pipeline["base"], tmp_path / "killed")
    original = fid_module._Generator.images
    calls = []

    def dies_in_the_second_chunk(self, part):
        calls.append(len(part))
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from original(self, part)

    monkeypatch.setattr(fid_module._Generator, "images", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _fid(killed)
    monkeypatch.setattr(fid_module._Generator, "images", original)
    assert not result_files(killed)
    assert len(list((killed / "eval").glob("fid-step*/*.npy"))) == 1  # the first chunk survived
    resumed = _fid(killed)
    assert resumed["value"] == clean["value"]

    shared = _fresh_copy(pipeline["base"], tmp_path / "shared")
    assert _fid(shared, rank=0, world_size=2) is None  # chunks 0 and 2; chunk 1 is the other worker's
    both = _fid(shared, rank=1, world_size=2)
    assert both["value"] == clean["value"]


def test_compare_puts_runs_side_by_side_with_their_differences(pipeline, inception, tmp_path: Path):
    runs = [_fresh_copy(pipeline[name], tmp_path / name) for name in ("base", "slow")]
    for run in runs:
        _fid(run)
    header, rows, notes = compare_runs(runs)
    assert header == ["run", "step", "loss", "FID", "FID step", "FID samples", "lr"]
    assert [r[0] for r in rows] == ["base", "slow"] and [r[-1] for r in rows] == [0.001, 0.0001]
    assert all(r[1] == 2 and r[5] == SAMPLES for r in rows)
    assert notes == ["some FIDs come from fewer than 2048 images: compare them only at equal sample counts"]
    table = format_table(header, rows, notes)
    assert table.splitlines()[0] == "| run | step | loss | FID | FID step | FID samples | lr |"
    assert json.loads(format_table(header, rows, notes, "json"))["rows"][1]["lr"] == 0.0001
    assert format_table(header, rows, notes, "csv").splitlines()[0] == "run,step,loss,FID,FID step,FID samples,lr"

    _fid(runs[1], seed=1)  # a later evaluation of another sample set at the same step
    _, _, notes = compare_runs(runs)
    assert "the FIDs were measured with different keys: they are not comparable" in notes


def test_the_evaluate_command(pipeline, inception, tmp_path: Path, capsys):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    assert evaluate_main(["fid", str(run), "--samples", "4", "--steps", "1", "--device", "cpu",
                          "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("FID ") and "from 4 images (1 steps, guidance 4.0)" in out
    assert evaluate_main(["compare", str(run), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run,step,loss,FID")
    assert evaluate_main(["fid", str(tmp_path / "nothing")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    moved = tmp_path / "moved-images"
    shutil.copytree(pipeline["images"], moved)
    assert evaluate_main(["fid", str(run), "--samples", "3", "--steps", "1", "--device", "cpu", "--no-progress",
                          "--images", str(tmp_path / "gone")]) == 2
    assert "does not exist: pass its new place with --images" in capsys.readouterr().err
    assert evaluate_main(["fid", str(run), "--samples", "3", "--steps", "1", "--device", "cpu", "--no-progress",
                          "--images", str(moved)]) == 0
