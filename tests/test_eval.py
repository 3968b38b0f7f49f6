"""`evaluate`: FID and MMD arithmetic, the TF resize, the networks, evaluation sets, the three
metrics of a real tiny run (kill, resume and two workers give the clean run's numbers), and the
comparison table."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import noise_image
from latent_data import make_latent_dataset
from PIL import Image
from tiny_run import make_tiny_runs

import eval.evaluation as evaluation
from curate.buckets import preprocess
from curate.manifest import load_manifest
from curate.runner import CurateError
from eval.cli import main as evaluate_main
from eval.compare import compare_runs, format_table
from eval.embedders import EmbedderError, ImageEmbedder
from eval.evalset import EvalSetError, choose_samples
from eval.evaluation import evaluate_run, result_files
from eval.inception import InceptionError, InceptionFeatures, find_inception, resize_tf_bilinear
from eval.stats import FeatureStats, fid_from_features, frechet_distance, kid, mmd
from train.checkpoint import CheckpointError

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


def test_fid_from_few_features_equals_the_full_covariance_way():
    rng = np.random.default_rng(3)

    def full(x: np.ndarray, y: np.ndarray) -> float:
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))

    def nuclear(x: np.ndarray, y: np.ndarray) -> float:
        """Another exact form: tr((A^T A B^T B)^(1/2)) is the sum of the singular values of A B^T."""
        a, b = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (x, y))
        diff = x.mean(0) - y.mean(0)
        return diff @ diff + (a * a).sum() + (b * b).sum() - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum()

    # Fewer samples than dimensions (the smaller set's features are used), in either order; then
    # Inception's 2048 dimensions with an evaluation's few images, where it matters. The D x D way
    # is off by about 1e-8 there: the square roots of its rounding-level zero eigenvalues add up.
    for n1, n2, d in ((5, 9, 16), (9, 5, 16), (7, 7, 16), (10, 12, 2048)):
        x, y = rng.normal(size=(n1, d)), rng.normal(0.3, 1.5, size=(n2, d))
        assert fid_from_features(x, y) == pytest.approx(nuclear(x, y), rel=1e-11)
        assert fid_from_features(x, y) == pytest.approx(full(x, y), rel=1e-7)
        assert fid_from_features(x, x) == pytest.approx(0, abs=1e-9)
    x, y = rng.normal(size=(40, 6)), rng.normal(0.3, 1.5, size=(30, 6))  # full rank: frechet_distance itself
    assert fid_from_features(x, y) == full(y, x)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid_from_features(x[:1], y)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fid_from_features(x, y[:, :4])


def test_kid_is_the_unbiased_polynomial_mmd_over_subsets():
    rng = np.random.default_rng(4)

    def by_pairs(x: np.ndarray, y: np.ndarray) -> float:
        """The unbiased estimator written out: distinct pairs within each set, every pair across."""
        k = lambda a, b: (a @ b / x.shape[1] + 1) ** 3  # noqa: E731
        m = len(x)
        within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        return within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2

    x, y = rng.normal(size=(12, 8)), rng.normal(0.5, 1, size=(12, 8))
    assert kid(x, y) == (pytest.approx(by_pairs(x, y), rel=1e-12), 0.0)  # one subset: the whole sets
    # Subsets: seeded; near 0 between two draws of one distribution (unbiased), above it otherwise.
    same = rng.normal(size=(400, 8)), rng.normal(size=(300, 8))
    mean, std = kid(*same, subset_size=50)
    assert kid(*same, subset_size=50) == (mean, std) and kid(*same, subset_size=50, seed=1) != (mean, std)
    assert abs(mean) < std and std > 0
    assert kid(same[0], same[1] + 0.5, subset_size=50)[0] > 10 * std
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid(x[:1], y)


def test_feature_stats_are_numpys_mean_and_cov():
    features = np.random.default_rng(1).normal(size=(37, 5))
    stats = FeatureStats(5)
    for part in np.array_split(features, 4):
        stats.add(part)
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        stats.add(np.zeros((2, 4)))


def test_mmd_is_cmmds_estimator_in_blocks():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 6)), rng.normal(0.5, 1, size=(20, 6))

    def kernel_mean(a, b):  # the definition, pair by pair
        return np.mean([[np.exp(-((u - v) ** 2).sum() / (2 * 10.0**2)) for v in b] for u in a])

    expected = 1000 * (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y))
    assert mmd(x, y) == pytest.approx(expected, rel=1e-9)
    assert mmd(x, y, block=7) == pytest.approx(expected, rel=1e-9)
    assert mmd(x, x) == pytest.approx(0, abs=1e-9) and mmd(x, y) > 0
    assert mmd(x, y, sigma=1.0, scale=1.0) != pytest.approx(expected / 1000)
    with pytest.raises(ValueError, match="non-empty"):
        mmd(x, y[:, :4])


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


@pytest.fixture(scope="module")
def embedders(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_clip_vision, build_tiny_dinov2

    root = tmp_path_factory.mktemp("embedders")
    return {"clip": build_tiny_clip_vision(root / "clip"), "dino": build_tiny_dinov2(root / "dino")}


def test_clip_and_dinov2_embed_unit_vectors_with_their_processors_settings(embedders, tmp_path: Path):
    images = torch.from_numpy(np.stack([np.asarray(noise_image(i, (40, 40))) for i in range(3)]))
    images = images.permute(0, 3, 1, 2).contiguous()
    clip = ImageEmbedder("clip", str(embedders["clip"]))
    dino = ImageEmbedder("dino", str(embedders["dino"]))
    for net, dim in ((clip, 16), (dino, 32)):  # CLIP's projection; DINOv2's hidden size
        out = net(images)
        assert out.shape == (3, dim) and out.dtype == torch.float64
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, dtype=torch.float64))
        assert net.size == 28 and net.identity["fingerprint"] and net.key.startswith(net.kind)
    assert clip.identity["class"] == "CLIPVisionModelWithProjection" and dino.identity["class"] == "Dinov2Model"
    # CLIP's own normalisation, from its processor: (x - mean) / std of OpenAI's CLIP.
    torch.testing.assert_close(clip.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    with pytest.raises(EmbedderError, match="revision applies to Hub ids"):
        ImageEmbedder("clip", str(embedders["clip"]), revision="main")
    with pytest.raises(EmbedderError, match="not a known image alias"):
        ImageEmbedder("dino", "no-such-alias")
    with pytest.raises(EmbedderError, match="cannot load"):
        ImageEmbedder("clip", str(tmp_path))
    with pytest.raises(EmbedderError, match="is a dinov2 model, not a clip model"):
        ImageEmbedder("clip", str(embedders["dino"]))


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
    with pytest.raises(EvalSetError, match="--captions bogus: no sample drawn has a bogus caption"):
        choose_samples(loaded["mix"], manifests["mix"], 8, seed=3, variant="bogus")
    everything = choose_samples(loaded["long"], manifests["long"], 1000)
    assert len(everything) == 18 and len({s.key for s in everything}) == 18
    # The sample whose long caption is missing falls back to another variant, as in training.
    assert any(s.variant != "long" for s in everything)
    with pytest.raises(EvalSetError, match="at least 1"):
        choose_samples(loaded["long"], manifests["long"], 0)


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """Images -> tiny Flux latents (orig captions) -> a tiny run of 2 steps (checkpoints at 1
    and 2), a second run that differs in its learning rate, and a third that keeps an EMA."""
    runs = {name: {"steps": "2", "checkpoint_every": "1", "lr": lr}
            for name, lr in (("base", "0.001"), ("slow", "0.0001"))}
    runs["ema"] = {"steps": "2", "checkpoint_every": "2", "lr": "0.01", "ema.decay": "0.9"}
    return make_tiny_runs(tmp_path_factory.mktemp("eval"), images=12, sizes=[(80, 64), (64, 80), (72, 72)],
                          resolution=32, shard_size=5, runs=runs)


def _evaluate(run: Path, embedders, **kwargs) -> dict | None:
    options = {"samples": SAMPLES, "steps": 2, "batch_size": 4, "device": "cpu", "progress": False,
               "clip": str(embedders["clip"]), "dino": str(embedders["dino"])}
    return evaluate_run(run, **{**options, **kwargs})


def _values(result: dict) -> dict[str, float]:
    return {m: v["value"] for m, v in result["metrics"].items()}


def _fresh_copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("eval"))
    return to


def test_a_manifest_and_image_stage_at_urls_evaluate_as_their_files(pipeline, embedders, tmp_path: Path):
    """A run that trained from an object store evaluates from it: the evaluation set and the real
    images read over HTTP (tests/file_server.py) give the files' metric exactly."""
    from file_server import serve

    local = _evaluate(_fresh_copy(pipeline["base"], tmp_path / "local"), embedders, metrics=["cmmd"])
    root = pipeline["images"].parent
    with serve(root) as server:
        url = f"{server.url}/{pipeline['manifest'].relative_to(root).as_posix()}"
        remote = _evaluate(_fresh_copy(pipeline["base"], tmp_path / "remote"), embedders, metrics=["cmmd"],
                           manifest=url, images=f"{server.url}/images")
    assert _values(remote) == _values(local) and remote["manifest"]["path"] == url
    assert remote["manifest"]["sha256"] == local["manifest"]["sha256"]


def test_a_runs_metrics_are_recorded_reproducible_and_reused(pipeline, inception, embedders, tmp_path: Path):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    first = _evaluate(run, embedders)
    assert set(first["metrics"]) == {"fid", "cmmd", "dino-mmd"}
    assert all(np.isfinite(v) and v > 0 for v in _values(first).values())
    assert first["step"] == 2 and first["settings"]["samples"] == SAMPLES
    assert first["settings"]["steps"] == 2 and first["settings"]["guidance"] == 4.0  # the run's sample.guidance
    assert first["settings"]["captions"] == {"orig": 1.0} and first["empty_prompts"] == 0
    assert first["metrics"]["fid"]["network"]["sha1"] == "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
    assert first["metrics"]["cmmd"]["network"]["class"] == "CLIPVisionModelWithProjection"
    assert "biased" in first["note"]
    assert [p.name for p in result_files(run)] == [f"step00000002-{first['tag']}.json"]
    features = sorted(Path(first["features"]).glob("*.npy"))
    assert len(features) == 3 and [np.load(f).shape for f in features] == [(SAMPLES, 16), (SAMPLES, 32),
                                                                              (SAMPLES, 2048)]
    assert np.load(first["metrics"]["fid"]["reference"]).shape == (SAMPLES, 2048)
    with Image.open(first["preview"]) as preview:  # 8 generated images above their 8 real ones
        assert preview.size == (8 * 32, 2 * 32)
        real = np.asarray(preview)[32:, :32]
    sample = choose_samples(load_manifest(pipeline["manifest"]), pipeline["manifest"], SAMPLES)[0]
    with tarfile.open(pipeline["images"] / f"{sample.shard:06d}.tar") as tar:
        original = tar.extractfile(f"{sample.key}.jpg").read()
    np.testing.assert_array_equal(real, preprocess(original, resolution=32)[0].permute(1, 2, 0).numpy())

    assert _evaluate(run, embedders) == first  # stored: nothing recomputed
    again = _evaluate(run, embedders, force=True)
    assert _values(again) == _values(first) and again["tag"] == first["tag"]
    other = _evaluate(run, embedders, guidance=1.0, metrics=["cmmd"])
    assert other["tag"] != first["tag"] and set(other["metrics"]) == {"cmmd"}
    assert other["metrics"]["cmmd"]["value"] != first["metrics"]["cmmd"]["value"]
    assert other["metrics"]["cmmd"]["reference"] == first["metrics"]["cmmd"]["reference"]  # same real images
    assert len(result_files(run)) == 2
    # Asking for a metric the stored evaluation lacks computes that one and keeps the other.
    more = _evaluate(run, embedders, guidance=1.0, metrics=["cmmd", "fid"])
    assert more["metrics"]["cmmd"] == other["metrics"]["cmmd"] and set(more["metrics"]) == {"cmmd", "fid"}
    # KID from the stored Inception features of both sides, nothing generated again.
    with_kid = _evaluate(run, embedders, metrics=["fid", "kid"])
    assert with_kid["metrics"]["fid"] == first["metrics"]["fid"]
    generated = np.load(next(f for f in features if np.load(f).shape[1] == 2048))
    assert (with_kid["metrics"]["kid"]["value"], with_kid["metrics"]["kid"]["std"]) == kid(
        generated, np.load(first["metrics"]["fid"]["reference"]))
    assert with_kid["metrics"]["kid"]["network"] == first["metrics"]["fid"]["network"]


def test_fd_dinov2_is_the_frechet_distance_of_dinov2s_class_tokens_as_they_are(pipeline, embedders, tmp_path: Path):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    result = _evaluate(run, embedders, metrics=["fd-dinov2", "dino-mmd"])
    fd, mmd_entry = result["metrics"]["fd-dinov2"], result["metrics"]["dino-mmd"]
    assert fd["network"] == {**mmd_entry["network"], "normalized": False}  # the MMD's features keep their identity
    dino = [np.load(f) for f in sorted(Path(result["features"]).glob("*.dino-*.npy"))]  # both networks' features
    generated = next(a for a in dino if not np.allclose(np.linalg.norm(a, axis=1), 1.0))
    real = np.load(fd["reference"])
    assert not np.allclose(np.linalg.norm(real, axis=1), 1.0)  # DINOv2's pooled output, not normalised
    assert fd["value"] == pytest.approx(fid_from_features(generated, real), rel=1e-12) and fd["value"] > 0
    normalized = np.load(mmd_entry["reference"])
    np.testing.assert_allclose(real / np.linalg.norm(real, axis=1, keepdims=True), normalized, rtol=1e-5)
    assert "FD-DINOv2" in format_table(*compare_runs([run]), fmt="markdown")


def test_the_clip_score_pairs_each_image_with_its_own_prompt(pipeline, embedders, tmp_path: Path):
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPModel

    from curate.tiny import build_tiny_clip
    from eval.evalset import images_dir_of, real_batches

    clip = build_tiny_clip(tmp_path / "clip-score")
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    result = _evaluate(run, embedders, metrics=["clip-score", "cmmd"], clip_score=str(clip))
    entry = result["metrics"]["clip-score"]
    assert entry["network"]["class"] == "CLIPModel" and entry["network"]["max_tokens"] == 77
    assert 0 <= entry["value"] <= 100 and np.load(entry["reference"]).shape == (SAMPLES, 1)
    # The real images' score, recomputed with CLIPModel's own logits (their cosines times the logit
    # scale): each image with its own prompt, wherever it lies in the image shards.
    manifest = load_manifest(pipeline["manifest"])
    evalset = choose_samples(manifest, pipeline["manifest"], SAMPLES)
    model, tokenizer = CLIPModel.from_pretrained(clip).eval(), AutoTokenizer.from_pretrained(clip)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert len({s.caption for s in evalset}) == SAMPLES  # distinct prompts: a wrong pairing would show
    cosines = []
    for chosen, images in real_batches(evalset, images_dir_of(manifest), 32, batch_size=3):
        pixels = (F.interpolate(images.float() / 255, size=(28, 28), mode="bicubic", align_corners=False) - mean) / std
        text = tokenizer([s.caption for s in chosen], padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            logits = model(pixel_values=pixels, **text).logits_per_image / model.logit_scale.exp()
        cosines.extend(logits.diagonal().tolist())
    assert entry["real"] == pytest.approx(100 * np.clip(cosines, 0, None).mean(), abs=1e-4)
    # Stored like the other metrics, and laid out by compare.
    assert _evaluate(run, embedders, metrics=["clip-score"], clip_score=str(clip)) == result
    assert "CLIP score" in format_table(*compare_runs([run]), fmt="markdown")


def test_vqa_score_asks_a_vlm_about_each_image_and_its_whole_prompt(pipeline, embedders, tmp_path: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from curate.runner import CurateError
    from curate.tiny import build_tiny_qwen2_vl
    from curate.vqa import QUESTION, VqaScorer

    vlm = build_tiny_qwen2_vl(tmp_path / "vlm")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    long = " ".join(["a small red cube on a wooden table under soft light"] * 40)  # about 400 tokens
    prompts = ["a red cube", f"{long}, and a cat", f"{long}, and a dog"]
    scorer = VqaScorer(str(vlm), batch_size=3)
    batched = scorer(images, prompts)
    scorer.batch_size = 1
    one_by_one = scorer(images, prompts)
    assert batched.shape == (3, 1) and ((batched > 0) & (batched < 1)).all()
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=0)  # left padding changes nothing
    # The probability of "Yes" as the model's own forward gives it for one image and question.
    processor, model = AutoProcessor.from_pretrained(vlm), AutoModelForImageTextToText.from_pretrained(vlm).eval()
    question = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f'Does this figure show "{prompts[0]}"? Please answer yes or no.'}]}]
    inputs = processor(text=[processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)],
                       images=[Image.fromarray(images[0].permute(1, 2, 0).numpy())], return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0, -1].softmax(-1)
    assert float(batched[0, 0]) == pytest.approx(float(probs[processor.tokenizer.convert_tokens_to_ids("Yes")]),
                                                 rel=1e-4)
    # The whole prompt is read: two prompts that differ only after 400 tokens score apart (CLIP reads 77).
    assert batched[1, 0] != batched[2, 0] and batched[1, 0] != scorer(images[1:2], [long])[0, 0]
    with pytest.raises(CurateError, match="not a known vlm alias"):
        VqaScorer("not a model")

    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    result = _evaluate(run, embedders, metrics=["vqa-score"], vqa=str(vlm))
    entry = result["metrics"]["vqa-score"]
    assert entry["network"]["question"] == QUESTION and entry["network"]["answer"] == "Yes"
    assert 0 < entry["value"] < 1 and 0 < entry["real"] < 1 and np.load(entry["reference"]).shape == (SAMPLES, 1)
    assert _evaluate(run, embedders, metrics=["vqa-score"], vqa=str(vlm)) == result  # stored: nothing computed again
    assert "VQAScore" in format_table(*compare_runs([run]), fmt="markdown")


def test_a_benchmarks_prompt_file_is_scored_without_real_images(pipeline, embedders, tmp_path: Path, capsys):
    from curate.tiny import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip-score")
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    prompts = tmp_path / "bench.txt"
    prompts.write_text("a red cube on a table\n\na blue ball\nthree cats on a sofa\na lighthouse at night\n")
    result = _evaluate(run, embedders, metrics=["clip-score"], clip_score=str(clip), prompts=prompts, samples=3)
    entry = result["metrics"]["clip-score"]
    assert 0 <= entry["value"] <= 100 and "real" not in entry and "reference" not in entry
    assert result["settings"]["samples"] == 3 and result["settings"]["prompt_set"] == "bench.txt"
    assert "keys" not in result["settings"] and "manifest" not in result and result["note"] is None
    assert result["prompt_set"]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    with Image.open(result["preview"]) as preview:  # the generated row alone
        assert preview.size == (3 * 32, 32)
    # The same three prompts as a JSON list are the same evaluation set: the same images and score.
    as_json = tmp_path / "bench.json"
    as_json.write_text(json.dumps(["a red cube on a table", "a blue ball", "three cats on a sofa"]))
    again = _evaluate(run, embedders, metrics=["clip-score"], clip_score=str(clip), prompts=as_json, samples=3)
    assert again["metrics"]["clip-score"]["value"] == entry["value"] and again["tag"] != result["tag"]
    # What needs real images is refused, and so is a manifest beside the prompts.
    with pytest.raises(CurateError, match="fid compare with real images, which a prompt file does not have"):
        _evaluate(run, embedders, metrics=["fid", "clip-score"], prompts=prompts)
    with pytest.raises(CurateError, match="--prompts replaces the manifest's samples"):
        _evaluate(run, embedders, metrics=["clip-score"], prompts=prompts, manifest=pipeline["manifest"])
    assert evaluate_main(["run", str(run), "--prompts", str(tmp_path / "missing.txt"), "--metrics", "clip-score",
                          "--device", "cpu", "--no-progress"]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_a_run_with_an_ema_is_evaluated_with_it_unless_raw_is_asked_for(pipeline, embedders, tmp_path: Path):
    run = _fresh_copy(pipeline["ema"], tmp_path / "run")
    averaged = _evaluate(run, embedders, metrics=["cmmd"])
    raw = _evaluate(run, embedders, metrics=["cmmd"], weights="raw")
    assert averaged["settings"]["weights"] == "ema" and "weights" not in raw["settings"]
    assert averaged["tag"] != raw["tag"] and len(result_files(run)) == 2
    assert averaged["metrics"]["cmmd"]["value"] != raw["metrics"]["cmmd"]["value"]
    assert _evaluate(run, embedders, metrics=["cmmd"], weights="ema") == averaged  # the default, stored
    with pytest.raises(CheckpointError, match="no EMA weights"):
        _evaluate(_fresh_copy(pipeline["base"], tmp_path / "base"), embedders, metrics=["cmmd"], weights="ema")


def test_a_killed_evaluation_and_two_workers_give_the_clean_runs_numbers(pipeline, inception, embedders,
                                                                        tmp_path: Path, monkeypatch):
    monkeypatch.setattr(evaluation, "CHUNK", 4)  # 3 chunks of SAMPLES = 10
    clean = _evaluate(_fresh_copy(pipeline["base"], tmp_path / "clean"), embedders)

    killed = _fresh_copy(pipeline["base"], tmp_path / "killed")
    original = evaluation._Generator.images
    calls = []

    def dies_in_the_second_chunk(self, part):
        calls.append(len(part))
        if len(calls) == 2:
            raise KeyboardInterrupt
        yield from original(self, part)

    monkeypatch.setattr(evaluation._Generator, "images", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(killed, embedders)
    monkeypatch.setattr(evaluation._Generator, "images", original)
    assert not result_files(killed)
    assert len(list((killed / "eval").glob("step*/00000.*.npy"))) == 3  # the first chunk survived
    assert not list((killed / "eval").glob("step*/00001.*.npy"))
    assert _values(_evaluate(killed, embedders)) == _values(clean)

    shared = _fresh_copy(pipeline["base"], tmp_path / "shared")
    assert _evaluate(shared, embedders, rank=0, world_size=2) is None  # chunks 0 and 2; 1 is the other's
    assert _values(_evaluate(shared, embedders, rank=1, world_size=2)) == _values(clean)


def test_an_evaluation_killed_once_its_first_chunk_is_saved_still_writes_its_preview(pipeline, embedders,
                                                                                    tmp_path: Path, monkeypatch):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    save = evaluation._save_npy

    def killed_after_the_first_chunk(path: Path, array: np.ndarray) -> None:
        save(path, array)
        if path.name.startswith("00000."):
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "_save_npy", killed_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        _evaluate(run, embedders, samples=4, metrics=["cmmd"])
    monkeypatch.setattr(evaluation, "_save_npy", save)
    result = _evaluate(run, embedders, samples=4, metrics=["cmmd"])  # the chunk is done: not generated again
    with Image.open(result["preview"]) as preview:
        assert preview.size == (4 * 32, 2 * 32)


class _OnAccelerator(torch.Tensor):
    """Stands for a tensor on a GPU (this machine need not have one): torch refuses to stack it with
    CPU tensors, as it refuses a CUDA tensor; ``.cpu()`` gives a plain CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        if func in (torch.stack, torch.cat) and len({isinstance(t, cls) for t in args[0]}) > 1:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_preview_shows_images_generated_on_a_gpu_above_the_real_ones(pipeline, tmp_path: Path):
    """The generator yields its images where the VAE decoded them (the GPU); the real images are
    decoded on the CPU: the preview puts both in one grid."""
    data = load_manifest(pipeline["manifest"])
    evalset = choose_samples(data, pipeline["manifest"], 3)
    generated = [torch.full((3, 32, 32), 255, dtype=torch.uint8).as_subclass(_OnAccelerator) for _ in evalset]
    evaluation._preview(tmp_path / "preview.png", generated, evalset, data, None, 32)
    with Image.open(tmp_path / "preview.png") as preview:
        assert preview.size == (3 * 32, 2 * 32)
        assert (np.asarray(preview)[:32] == 255).all()


def test_compare_puts_runs_side_by_side_with_their_differences(pipeline, inception, embedders, tmp_path: Path):
    runs = [_fresh_copy(pipeline[name], tmp_path / name) for name in ("base", "slow")]
    for run in runs:
        _evaluate(run, embedders, metrics=["fid", "cmmd"])
    header, rows, notes = compare_runs(runs)
    assert header == ["run", "step", "loss", "FID", "CMMD", "eval step", "eval samples", "lr"]
    assert [r[0] for r in rows] == ["base", "slow"] and [r[-1] for r in rows] == [0.001, 0.0001]
    assert all(r[1] == 2 and r[6] == SAMPLES and r[3] > 0 and r[4] > 0 for r in rows)
    assert notes == ["FID from fewer than 2048 images is biased: compare it only at equal sample counts"]
    table = format_table(header, rows, notes)
    assert table.splitlines()[0] == "| run | step | loss | FID | CMMD | eval step | eval samples | lr |"
    assert json.loads(format_table(header, rows, notes, "json"))["rows"][1]["lr"] == 0.0001
    assert format_table(header, rows, notes, "csv").splitlines()[0] == "run,step,loss,FID,CMMD,eval step,eval samples,lr"

    _evaluate(runs[1], embedders, seed=1, metrics=["fid"])  # a later evaluation of other samples
    header, rows, notes = compare_runs(runs)
    assert rows[1][header.index("CMMD")] is None
    assert "the evaluations differ in keys: their metrics are not comparable" in notes
    from curate.tiny import build_tiny_clip_vision

    _evaluate(runs[0], embedders, seed=1, metrics=["fid", "cmmd"])
    _evaluate(runs[1], embedders, seed=1, metrics=["cmmd"], clip=str(build_tiny_clip_vision(tmp_path / "clip", seed=1)))
    assert compare_runs(runs)[2] == [
        "CMMD was measured with different networks: not comparable",
        "FID from fewer than 2048 images is biased: compare it only at equal sample counts"]
    # A line of metrics.jsonl that a kill cut off is passed over; an unreadable result is named.
    with open(runs[0] / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert compare_runs(runs)[1][0][1] == 2
    (runs[0] / "eval" / "step00000002-broken.json").write_text("{bad")
    with pytest.raises(CurateError, match="step00000002-broken.json: not readable JSON"):
        compare_runs(runs)


def test_compare_notes_evaluations_on_other_prompts(tmp_path: Path):
    """Two pipelines' CLIP scores on two benchmarks' prompt files (same count, no keys, no caption
    choice) are not comparable, and the table says so."""
    def evaluated(name: str, **settings) -> Path:
        folder = tmp_path / name
        (folder / "eval").mkdir(parents=True)
        result = {"metrics": {"clip-score": {"value": 30.0, "network": {"id": "clip"}}}, "step": 0, "tag": name,
                  "pipeline": {"path": name}, "finished": 1.0,
                  "settings": {"step": 0, "samples": 4, "seed": 0, "steps": 28, "guidance": 4.0, "shift": 1.0,
                               "resolution": 256, "prompts": "p1", "prompt_set": "genai-bench.txt", **settings}}
        (folder / "eval" / f"step00000000-{name}.json").write_text(json.dumps(result))
        return folder

    same = [evaluated("a"), evaluated("b")]
    assert compare_runs(same)[2] == []
    _, _, notes = compare_runs([*same, evaluated("c", prompts="p2", prompt_set="dpg-bench.txt")])
    assert notes == ["the evaluations differ in prompts: their metrics are not comparable"]


def test_a_run_at_a_url_is_evaluated_and_compared_as_its_folder(pipeline, embedders, tmp_path: Path, monkeypatch):
    """`evaluate run URL` (a run of `train --out s3://...`): its checkpoint fetched, the result
    stored in the run's eval/ at the URL, where another machine finds it (nothing measured again,
    nothing uploaded); `evaluate compare` reads it there; two workers on two machines pool their
    chunks at the URL and give one worker's numbers."""
    from file_server import serve

    local = _evaluate(_fresh_copy(pipeline["base"], tmp_path / "local"), embedders, metrics=["cmmd"])
    store = tmp_path / "store"
    _fresh_copy(pipeline["base"], store / "runs" / "base")
    with serve(store) as server:
        url = f"{server.url}/runs/base"
        monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-1"))
        remote = _evaluate(url, embedders, metrics=["cmmd"])
        assert _values(remote) == _values(local) and remote["tag"] == local["tag"]
        assert remote["run"] == url and remote["checkpoint"] == f"{url}/checkpoints/step_00000002.pt"
        assert json.loads((store / "runs/base/eval" / f"step00000002-{remote['tag']}.json").read_text()) == remote
        monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-2"))
        uploads = server.puts
        assert _evaluate(url, embedders, metrics=["cmmd"]) == remote and server.puts == uploads
        header, rows, _ = compare_runs([url, tmp_path / "local"])
        assert [r[0] for r in rows] == ["base", "local"]
        assert rows[0][header.index("CMMD")] == rows[1][header.index("CMMD")] is not None

        monkeypatch.setattr(evaluation, "CHUNK", 4)  # 3 chunks of SAMPLES = 10
        _fresh_copy(pipeline["base"], store / "runs" / "shared")
        shared = f"{server.url}/runs/shared"
        monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-3"))
        assert _evaluate(shared, embedders, metrics=["cmmd"], rank=0, world_size=2) is None  # chunks 0 and 2
        monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-4"))
        pooled = _evaluate(shared, embedders, metrics=["cmmd"], rank=1, world_size=2)  # chunk 1, then all three
        assert _values(pooled) == _values(local)
        assert len(list((store / "runs/shared/eval").glob("step*/0000[012].*.npy"))) == 3
        assert list((tmp_path / "machine-4").rglob("00000.*.npy"))  # the first machine's chunk, fetched

        # The run deleted and trained again under its name: machine 1's copy of the old run's
        # evaluation is neither returned nor uploaded into the new run's eval/.
        shutil.rmtree(store / "runs/base")
        _fresh_copy(pipeline["slow"], store / "runs/base")
        later = time.time() + 10  # another upload: another modification time, as the server reports it
        os.utime(store / "runs/base/checkpoints/step_00000002.pt", (later, later))
        monkeypatch.setattr(evaluation, "CHUNK", 16)
        monkeypatch.setenv("KILN_STAGING", str(tmp_path / "machine-1"))
        again = _evaluate(url, embedders, metrics=["cmmd"])
        assert _values(again) == _values(_evaluate(_fresh_copy(pipeline["slow"], tmp_path / "slow"), embedders,
                                                   metrics=["cmmd"])) != _values(remote)


def test_a_negative_seed_is_refused_with_a_message(tmp_path: Path, capsys):
    """numpy's generators, which choose the samples, take no negative seed: a usage error, not a traceback."""
    for command in (["run", str(tmp_path)], ["pipeline", str(tmp_path), "--out", str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as exit:
            evaluate_main([*command, "--seed", "-1"])
        assert exit.value.code == 2 and "--seed must be at least 0" in capsys.readouterr().err


def test_the_evaluate_command(pipeline, inception, embedders, tmp_path: Path, capsys):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    nets = ["--clip", str(embedders["clip"]), "--dino", str(embedders["dino"])]
    assert evaluate_main(["run", str(run), "--samples", "4", "--steps", "1", "--device", "cpu",
                          "--no-progress", *nets]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fid ") and ", cmmd " in out and ", dino-mmd " in out
    assert "from 4 images (1 steps, guidance 4.0)" in out
    assert evaluate_main(["compare", str(run), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run,step,loss,FID,CMMD,DINO-MMD")
    assert evaluate_main(["run", str(tmp_path / "nothing")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert evaluate_main(["run", str(run), "--metrics", "fid,is"]) == 2
    assert "unknown metric(s) is" in capsys.readouterr().err
    assert evaluate_main(["run", str(run), "--metrics", "fid", "--samples", "1", "--device", "cpu"]) == 2
    assert "FID needs at least 2 images" in capsys.readouterr().err
    moved = tmp_path / "moved-images"
    shutil.copytree(pipeline["images"], moved)
    fid_only = ["--samples", "3", "--steps", "1", "--device", "cpu", "--no-progress", "--metrics", "fid"]
    assert evaluate_main(["run", str(run), *fid_only, "--images", str(tmp_path / "gone")]) == 2
    assert "does not exist: pass its new place with --images" in capsys.readouterr().err
    assert evaluate_main(["run", str(run), *fid_only, "--images", str(moved)]) == 0


def test_a_run_started_elsewhere_names_its_relative_manifest(pipeline, inception, tmp_path: Path, monkeypatch,
                                                             capsys):
    from train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    state = load_checkpoint(latest_checkpoint(run))
    state["config"]["shards"] = "manifests/orig.json"  # as `train --shards manifests/orig.json` records it
    save_checkpoint(run, state["step"], state, keep=1)
    fid_only = ["--samples", "3", "--steps", "1", "--device", "cpu", "--no-progress", "--metrics", "fid"]
    monkeypatch.chdir(tmp_path)
    assert evaluate_main(["run", str(run), *fid_only]) == 2
    assert "relative to where it was started: run from there, or pass the manifest" in capsys.readouterr().err
    monkeypatch.chdir(pipeline["manifest"].parent.parent)
    assert evaluate_main(["run", str(run), *fid_only]) == 0


def test_a_held_out_manifest_gives_its_own_samples_and_images(pipeline, inception, embedders, tmp_path: Path):
    heldout = make_tiny_runs(tmp_path / "heldout", images=6, sizes=[(64, 64)], resolution=32, runs={}, seed=1000)
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    result = _evaluate(run, embedders, metrics=["fid"], manifest=heldout["manifest"])
    assert result["manifest"]["path"] == str(heldout["manifest"].absolute()) and result["settings"]["samples"] == 6
    keys = {s.key for s in choose_samples(load_manifest(heldout["manifest"]), heldout["manifest"], 6)}
    assert result["settings"]["keys"] == _evaluate(run, embedders, metrics=["fid"], samples=6,
                                                   manifest=heldout["manifest"])["settings"]["keys"]
    assert not keys & {s.key for s in choose_samples(load_manifest(pipeline["manifest"]), pipeline["manifest"], 99)}
    trained_on = _evaluate(run, embedders, metrics=["fid"])
    assert trained_on["tag"] != result["tag"] and trained_on["metrics"]["fid"]["value"] != result["metrics"]["fid"]["value"]


def test_every_checkpoint_evaluated_and_compared_step_by_step(pipeline, inception, embedders, tmp_path: Path,
                                                               capsys):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    options = ["--samples", "4", "--steps", "1", "--device", "cpu", "--no-progress", "--metrics", "fid,cmmd",
               "--clip", str(embedders["clip"])]
    assert evaluate_main(["run", str(run), "--step", "all", *options]) == 0
    assert [line.split(" at step ")[1].split()[0] for line in capsys.readouterr().out.splitlines()
            if " at step " in line] == ["1", "2"]
    header, rows, _ = compare_runs([run], by_step=True)
    assert [r[header.index("eval step")] for r in rows] == [1, 2] and rows[0][3] != rows[1][3]
    assert [r[header.index("eval step")] for r in compare_runs([run])[1]] == [2]
    # A run that logged a validation loss (val.shards) shows the one at each evaluated step.
    with (run / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps({"step": step, "val_loss": value}) + "\n" for step, value in ((1, 1.5), (2, 1.25)))
    header, rows, _ = compare_runs([run], by_step=True)
    assert [r[header.index("val loss")] for r in rows] == [1.5, 1.25]
    assert evaluate_main(["run", str(run), "--step", "1,2", *options]) == 0  # both stored
    assert len(result_files(run)) == 2
    assert evaluate_main(["run", str(run), "--step", "two", *options]) == 2
    assert "--step takes a step" in capsys.readouterr().err
    assert evaluate_main(["compare", str(run), "--by-step", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_a_guidance_sweep_is_stored_per_scale_and_laid_out_by_compare_every(pipeline, inception, embedders,
                                                                            tmp_path: Path, capsys):
    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    options = ["--samples", "4", "--steps", "1", "--device", "cpu", "--no-progress", "--metrics", "fid"]
    assert evaluate_main(["run", str(run), "--guidance", "1,4", *options]) == 0
    out = capsys.readouterr().out
    assert "(1 steps, guidance 1.0)" in out and "(1 steps, guidance 4.0)" in out
    assert len(result_files(run)) == 2
    header, rows, notes = compare_runs([run], every=True)
    assert header[header.index("eval samples") + 1] == "guidance"
    assert [r[header.index("guidance")] for r in rows] == [1.0, 4.0]
    assert rows[0][header.index("FID")] != rows[1][header.index("FID")]
    assert not any("guidance" in n for n in notes)  # a sweep, not an accident
    assert len(compare_runs([run])[1]) == 1  # the default: the latest evaluation only
    assert evaluate_main(["compare", str(run), "--every", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit):  # argparse: a usage error
        evaluate_main(["run", str(run), "--guidance", "high", *options])
    assert "a guidance scale or several" in capsys.readouterr().err
    for wrong, message in ((["compare", str(run), "--every", "--by-step"], "not allowed with argument"),
                           (["run", str(run), *options, "--steps", "0"], "--steps must be at least 1"),
                           (["pipeline", str(run), "--out", str(run), "--shift", "-1"], "--shift must be positive")):
        with pytest.raises(SystemExit):
            evaluate_main(wrong)
        assert message in capsys.readouterr().err
    # A guidance interval is a setting of its own (recorded only when it is not every step), laid out
    # beside the sweep. Guided only for t <= 0.5, the one sampler step (at t = 1) runs the conditional
    # model alone: the images, and so the FID, of guidance 1.
    assert evaluate_main(["run", str(run), "--guidance", "4", "--guidance-interval", "0,0.5", *options]) == 0
    header, rows, _ = compare_runs([run], every=True)
    assert [(r[header.index("guidance")], r[header.index("guidance interval")]) for r in rows] == [
        (1.0, [0.0, 1.0]), (4.0, [0.0, 0.5]), (4.0, [0.0, 1.0])]
    fid = [r[header.index("FID")] for r in rows]
    assert fid[1] == fid[0] != fid[2]
    assert evaluate_main(["run", str(run), "--guidance-interval", "0.5,0.2", *options]) == 2
    assert "--guidance-interval must be two times" in capsys.readouterr().err


def test_a_pipeline_measures_as_the_run_it_was_exported_from(pipeline, embedders, tmp_path: Path, capsys):
    """`evaluate pipeline`: the export of a run, and the same folder as a plain PRXPipeline (no
    kiln record: the latent spec from its VAE, the shift from its scheduler, the text length from its
    tokenizer), sampled through evaluate's sampler, give the run's metrics exactly; `evaluate
    compare` lists them beside the run."""
    from curate.stats import rounded
    from eval.evaluation import evaluate_pipeline
    from train.export import EXPORT_INFO, export_run

    run = _fresh_copy(pipeline["base"], tmp_path / "run")
    exported = export_run(run, tmp_path / "exported")
    plain = tmp_path / "plain"
    shutil.copytree(exported, plain)
    (plain / EXPORT_INFO).unlink()
    options = {"samples": SAMPLES, "steps": 2, "guidance": 3.0, "batch_size": 4, "device": "cpu", "progress": False,
               "clip": str(embedders["clip"]), "dino": str(embedders["dino"])}
    trained = evaluate_run(run, **options)
    measured = {name: evaluate_pipeline(str(folder), tmp_path / "evals" / name, manifest=pipeline["manifest"],
                                        **options)
                for name, folder in (("exported", exported), ("plain", plain))}
    for name, result in measured.items():
        assert _values(result) == _values(trained), name
        assert result["settings"]["keys"] == trained["settings"]["keys"]
        assert result["pipeline"]["path"] == str(exported if name == "exported" else plain)
    assert measured["exported"]["step"] == trained["step"] and measured["plain"]["step"] == 0
    header, rows, _ = compare_runs([run, tmp_path / "evals" / "exported", tmp_path / "evals" / "plain"])
    assert header[-1] == "pipeline" and [r[-1] for r in rows] == [None, str(exported), str(plain)]
    assert len({r[header.index("FID")] for r in rows}) == 1
    # The command, and what it refuses.
    capsys.readouterr()
    args = ["pipeline", str(exported), "--out", str(tmp_path / "evals" / "cli"), "--samples", str(SAMPLES), "--steps",
            "2", "--guidance", "3", "--batch-size", "4", "--device", "cpu", "--no-progress",
            "--clip", str(embedders["clip"]), "--dino", str(embedders["dino"])]
    assert evaluate_main([*args, "--manifest", str(pipeline["manifest"])]) == 0
    assert capsys.readouterr().out.startswith(f"fid {rounded(_values(trained)['fid'])}, cmmd ")
    assert evaluate_main(args) == 2
    assert "give --manifest" in capsys.readouterr().err
    assert evaluate_main(["pipeline", str(tmp_path), "--out", str(tmp_path / "x"), "--manifest",
                          str(pipeline["manifest"])]) == 2
    assert "not a PRXPipeline folder" in capsys.readouterr().err
    assert evaluate_main([*args, "--manifest", str(pipeline["manifest"]), "--resolution", "20"]) == 2
    assert "images of 20 px are not whole tokens of 16 px" in capsys.readouterr().err
    other = [a.replace(str(exported), str(plain)) for a in args]  # another pipeline into the same --out
    assert evaluate_main([*other, "--manifest", str(pipeline["manifest"])]) == 2
    assert f"holds evaluations of {exported}: give {plain} an --out of its own" in capsys.readouterr().err
    # An --out inside the pipeline's folder leaves its tag alone: the second call reads the result.
    inside = [a.replace(str(tmp_path / "evals" / "cli"), str(plain / "evals")) for a in other]
    for _ in range(2):
        assert evaluate_main([*inside, "--manifest", str(pipeline["manifest"])]) == 0
    assert len(list((plain / "evals" / "eval").glob("step*.json"))) == 1
    # A Hub release by its alias: a stand-in for Photoroom/prx-256-t2i in a Hub cache laid out as
    # huggingface_hub writes it, read offline (in a subprocess: huggingface_hub reads
    # HF_HUB_OFFLINE and the cache folder at import).
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Photoroom--prx-256-t2i"
    shutil.copytree(plain, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    hub = [a.replace(str(exported), "prx-256").replace("evals/cli", "evals/hub") for a in args]
    proc = subprocess.run([sys.executable, "-m", "eval", *hub, "--manifest", str(pipeline["manifest"])],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(next((tmp_path / "evals" / "hub" / "eval").glob("step*.json")).read_text())
    assert stored["pipeline"] == {"id": "Photoroom/prx-256-t2i", "revision": None, "commit": sha}
    assert _values(stored) == _values(trained)
    proc = subprocess.run([sys.executable, "-m", "eval", *hub[:1], "prx-512", *hub[2:], "--manifest",
                           str(pipeline["manifest"])], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot fetch pipeline Photoroom/prx-512-t2i" in proc.stderr, proc.stderr


def test_printed_metrics_keep_four_significant_digits_below_a_tenth():
    """A good model's KID (about 0.001) would print as 0.0012 for both 0.00124 and 0.00116."""
    from curate.stats import rounded

    assert (rounded(0.00124), rounded(0.00116), rounded(0.0123456)) == (0.00124, 0.00116, 0.01235)
    assert (rounded(12.345678), rounded(0.4007123), rounded(2.2314e-06)) == (12.3457, 0.4007, 2.231e-06)
