"""`curate score`: CLIP image-text similarity per caption variant and a LAION-style aesthetic score
per image, from a tiny random CLIPModel loaded by path, and the subsets they filter to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import kill_at, run_cli, write_good_images

from curate.cli import main as curate_main
from curate.runner import CurateError
from curate.score import AestheticHead, ClipScorer
from curate.shards import ShardWriter, committed_shards, stable_hash


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from curate.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("models") / "clip")


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> dict[str, Path]:
    """An image stage of 10 images in 3 shards, and a caption stage over it (written directly)."""
    root = tmp_path_factory.mktemp("score")
    write_good_images(root / "photos", 10)
    assert curate_main(["ingest", str(root / "photos"), "--out", str(root / "images"), "--shard-size", "4",
                        "--workers", "1", "--no-progress"]) == 0
    return {"root": root, "images": root / "images"}


def aesthetic_file(path: Path, dim: int, seed: int = 0) -> Path:
    """A state dict shaped like sac+logos+ava1-l14-linearMSE.pth (at ``dim`` inputs), random."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {0: (32, dim), 2: (16, 32), 4: (8, 16), 6: (4, 8), 7: (1, 4)}
    state = {}
    for i, (out, inp) in shapes.items():
        state[f"layers.{i}.weight"] = torch.randn(out, inp, generator=gen)
        state[f"layers.{i}.bias"] = torch.randn(out, generator=gen)
    torch.save(state, path)
    return path


def test_a_caption_scores_its_own_image_and_the_aesthetic_head_is_the_predictors(clip, tmp_path: Path):
    from PIL import Image

    scorer = ClipScorer(str(clip), device="cpu")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    embedded = scorer.images(torch.stack([scorer.prepare(i) for i in images]))
    texts, cut = scorer.texts(["a red square", " ".join(["word"] * 100)])
    assert embedded.shape == (2, scorer.dim) and torch.allclose(embedded.norm(dim=-1), torch.ones(2))
    assert cut == [False, True]  # 100 words do not fit 77 tokens
    # The score is the cosine of the two towers' projections, as CLIPModel computes its logits.
    with torch.no_grad():
        out = scorer.model(**scorer.tokenizer(["a red square"], padding="max_length", max_length=77,
                                              return_tensors="pt"),
                           pixel_values=torch.stack([scorer.prepare(images[0])]))
    expected = out.logits_per_image[0, 0] / scorer.model.logit_scale.exp()
    assert torch.allclose((embedded[0] * texts[0]).sum(), expected, atol=1e-5)
    head = AestheticHead.load(aesthetic_file(tmp_path / "a.pth", scorer.dim))
    state = torch.load(tmp_path / "a.pth", weights_only=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(scorer.dim, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 16),
                              torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.1),
                              torch.nn.Linear(8, 4), torch.nn.Linear(4, 1)).eval()
    mlp.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    assert torch.allclose(head(embedded), mlp(embedded)[:, 0], atol=1e-5)


def caption_stage(images: Path, captions: Path) -> Path:
    """A caption stage over ``images``, with the columns score reads. Each shard's first image's
    short caption failed: recaption rejects the row but keeps its long caption, which training reads."""
    schema = {"long": pl.Utf8, "long_prompt_hash": pl.Utf8, "short": pl.Utf8, "short_prompt_hash": pl.Utf8}
    for shard in committed_shards(images):
        keys = pl.read_parquet(shard.index_path).filter(pl.col("status") == "ok")["key"].to_list()
        writer = ShardWriter(captions, shard.shard_id, schema, with_tar=False)
        for i, key in enumerate(keys):
            row = {"long": f"a long caption of image {i}", "long_prompt_hash": "h",
                   "short": None if i == 0 else "a short one", "short_prompt_hash": "h"}
            if i == 0:
                writer.reject(key, "short_too_short", row=row, detail="2 words")
            else:
                writer.add(key, {}, row=row)
        writer.commit(stage="recaption", fingerprint=stable_hash([shard.shard_id]), config_hash="test")
    return captions


def test_score_writes_a_row_per_image_and_a_rerun_redoes_nothing(clip, stage, tmp_path: Path):
    captions = caption_stage(stage["images"], tmp_path / "captions")
    out = tmp_path / "scores"
    aesthetic = aesthetic_file(tmp_path / "aesthetic.pth", 16)
    args = ["score", str(stage["images"]), "--out", str(out), "--model", str(clip), "--captions", str(captions),
            "--aesthetic", str(aesthetic), "--batch-size", "3", "--decode-workers", "1", "--device", "cpu",
            "--no-progress"]
    assert curate_main(args) == 0
    rows = pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(out)])
    assert rows.height == 10 and set(rows["status"]) == {"ok"}
    assert rows["clip_long"].null_count() == 0 and rows["clip_short"].null_count() == 3  # one per shard
    assert rows["clip_orig"].null_count() == 10  # a folder's images have no original captions
    assert rows["aesthetic"].null_count() == 0 and rows["clip_long"].abs().max() <= 1.0
    stage_file = json.loads((out / "_stage.json").read_text())
    assert stage_file["config"]["variants"] == ["orig", "long", "short"]
    # The spread of each score, to choose a threshold from (curate stats prints it).
    spread = stage_file["summary"]["clip_short"]
    assert spread["samples"] == 7 and spread["p5"] <= spread["p50"] <= spread["p95"]
    assert "clip_orig" not in stage_file["summary"] and stage_file["summary"]["aesthetic"]["samples"] == 10
    # A rerun redoes nothing.
    before = {s.index_path.name: s.index_path.read_bytes() for s in committed_shards(out)}
    assert curate_main(args) == 0
    assert {s.index_path.name: s.index_path.read_bytes() for s in committed_shards(out)} == before
    # The image and caption stages at URLs score the same, into a folder or to a URL (uploaded).
    from file_server import serve

    with serve("/") as server:
        for remote in (tmp_path / "remote", f"{server.url}{tmp_path}/uploaded"):
            at = [*args]
            at[1], at[at.index("--captions") + 1] = f"{server.url}{stage['images']}", f"{server.url}{captions}"
            at[at.index("--out") + 1] = str(remote)
            assert curate_main(at) == 0
    for remote in (tmp_path / "remote", tmp_path / "uploaded"):
        scored = pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(remote)])
        assert scored.equals(rows)
    assert json.loads((tmp_path / "uploaded" / "_stage.json").read_text())["summary"] == stage_file["summary"]


def test_a_killed_score_run_resumes_to_the_same_result(clip, stage, tmp_path: Path):
    base = ["score", str(stage["images"]), "--model", str(clip), "--batch-size", "2", "--decode-workers", "0",
            "--device", "cpu", "--no-progress"]
    clean = tmp_path / "clean"
    assert curate_main([*base, "--out", str(clean)]) == 0
    killed = tmp_path / "killed"
    assert kill_at([*base, "--out", str(killed)], killed, committed=(1,)) == 1
    run_cli(*base, "--out", str(killed))
    read = {p.name: pl.read_parquet(p).drop("seconds", strict=False) for p in sorted(clean.glob("*.parquet"))}
    again = {p.name: pl.read_parquet(p).drop("seconds", strict=False) for p in sorted(killed.glob("*.parquet"))}
    assert read.keys() == again.keys() and all(read[k].equals(again[k]) for k in read)


def test_what_cannot_be_scored_is_named(clip, stage, tmp_path: Path, capsys):
    out = ["--out", str(tmp_path / "x"), "--device", "cpu", "--no-progress", "--decode-workers", "0"]
    assert curate_main(["score", str(stage["images"]), "--model", str(clip), "--aesthetic",
                        str(aesthetic_file(tmp_path / "wide.pth", 768)), *out]) == 2
    assert "takes 768-d image embeddings, but" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert curate_main(["score", str(stage["images"]), "--model", str(clip), "--aesthetic",
                        str(tmp_path / "junk.pth"), *out]) == 2
    assert "cannot read a state dict" in capsys.readouterr().err
    # A training checkpoint, the state dict inside it: named, not an AttributeError.
    torch.save({"state_dict": torch.load(aesthetic_file(tmp_path / "a.pth", 16), weights_only=True), "epoch": 3},
               tmp_path / "checkpoint.pth")
    with pytest.raises(CurateError, match="epoch, state_dict hold no tensor"):
        AestheticHead.load(tmp_path / "checkpoint.pth")
    vision_only = tmp_path / "vision-only"
    from curate.tiny import build_tiny_clip_vision

    build_tiny_clip_vision(vision_only)
    assert curate_main(["score", str(stage["images"]), "--model", str(vision_only), *out]) == 2
    assert "with both towers and its tokenizer" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    """Tiny random ViT classifiers with the labels of the NSFW and of the watermark detector."""
    from curate.tiny import build_tiny_image_classifier

    root = tmp_path_factory.mktemp("classifiers")
    return {"nsfw": build_tiny_image_classifier(root / "nsfw"),
            "watermark": build_tiny_image_classifier(root / "watermark", labels=("No Watermark", "Watermark"), seed=1)}


def test_a_classifier_scores_its_labels_probability_as_the_pipeline_does(classifiers):
    from PIL import Image
    from transformers import pipeline

    from curate.models import resolve_model
    from curate.runner import CurateError
    from curate.score import ImageClassifier

    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "white")]
    for name, label in (("nsfw", "nsfw"), ("watermark", "Watermark")):
        classifier = ImageClassifier(f"{classifiers[name]}:{label.upper()}", device="cpu")  # case does not matter
        assert (classifier.label, classifier.column) == (label, label.lower())
        got = classifier.probabilities(torch.stack([classifier.prepare(i) for i in images]))
        reference = pipeline("image-classification", model=str(classifiers[name]), device="cpu")
        expected = [next(r["score"] for r in reference(image) if r["label"] == label) for image in images]
        assert got == pytest.approx(expected, abs=1e-5)
    # A one-logit head (a binary detector trained with a sigmoid) and a regression head, read as the
    # pipeline reads them: a softmax over one logit scored 1.0 for every image.
    from curate.tiny import build_tiny_image_classifier

    one = build_tiny_image_classifier(classifiers["nsfw"].parent / "one-logit", labels=("watermark",), seed=2)
    regression = classifiers["nsfw"].parent / "regression"
    shutil.copytree(one, regression, dirs_exist_ok=True)
    config = json.loads((regression / "config.json").read_text())
    (regression / "config.json").write_text(json.dumps({**config, "problem_type": "regression"}))
    for folder, activation in ((one, "sigmoid"), (regression, "none")):
        classifier = ImageClassifier(f"{folder}:watermark", device="cpu")
        got = classifier.probabilities(torch.stack([classifier.prepare(i) for i in images]))
        reference = pipeline("image-classification", model=str(folder), device="cpu")
        assert got == pytest.approx([reference(image)[0]["score"] for image in images], abs=1e-5)
        assert len(set(got)) == 3 and classifier.record()["activation"] == activation  # scored again
    assert "activation" not in ImageClassifier(f"{classifiers['nsfw']}:nsfw").record()  # the same hash as before
    # "No Watermark" is another label, not a match of "watermark".
    assert ImageClassifier(f"{classifiers['watermark']}:no watermark").column == "no_watermark"
    with pytest.raises(CurateError, match="has no label 'porn'; its labels are 'normal', 'nsfw'"):
        ImageClassifier(f"{classifiers['nsfw']}:porn")
    with pytest.raises(CurateError, match="name the label to score as MODEL:LABEL"):
        ImageClassifier(str(classifiers["nsfw"]))
    assert resolve_model("nsfw", "classifier").id == "Falconsai/nsfw_image_detection"


def test_hub_models_at_a_pinned_revision(clip, classifiers, tmp_path: Path, monkeypatch):
    """MODEL@REVISION, from a Hub cache laid out as huggingface_hub writes it (offline): the
    revision reaches loading (an unknown one is named), the commit read is recorded (CLIP's as
    provenance), and a folder takes none."""
    import huggingface_hub.constants as hub
    from PIL import Image

    from curate.runner import CurateError
    from curate.score import ClipScorer, ImageClassifier

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    for name, folder in (("tiny-nsfw", classifiers["nsfw"]), ("tiny-clip", clip)):
        repo = tmp_path / "hub" / f"models--kiln--{name}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    local = ImageClassifier(f"{classifiers['nsfw']}:nsfw", device="cpu")
    pixels = torch.stack([local.prepare(Image.new("RGB", (40, 30), c)) for c in ("red", "blue")])
    for spec in ("kiln/tiny-nsfw:nsfw", "kiln/tiny-nsfw@main:nsfw", f"kiln/tiny-nsfw@{commit}:nsfw"):
        classifier = ImageClassifier(spec, device="cpu")
        assert (classifier.id, classifier.commit, classifier.record()["model"]) == (
            "kiln/tiny-nsfw", commit, "kiln/tiny-nsfw")
        assert classifier.probabilities(pixels) == local.probabilities(pixels)  # the same weights
    with pytest.raises(CurateError, match="kiln/tiny-nsfw at no-such-branch"):
        ImageClassifier("kiln/tiny-nsfw@no-such-branch:nsfw")
    with pytest.raises(CurateError, match="a revision applies to Hub ids, not to a local folder"):
        ImageClassifier(f"{classifiers['nsfw']}@main:nsfw")
    assert ClipScorer("kiln/tiny-clip", device="cpu").commit == commit
    assert ClipScorer("kiln/tiny-clip", revision="main", device="cpu").commit == commit
    assert ClipScorer(str(clip), device="cpu").commit is None


def test_classifiers_run_beside_clip_or_alone(clip, classifiers, stage, tmp_path: Path, capsys):
    images = str(stage["images"])
    common = ["--batch-size", "3", "--decode-workers", "1", "--device", "cpu", "--no-progress"]
    aesthetic = str(aesthetic_file(tmp_path / "aesthetic.pth", 16))
    nsfw, watermark = f"{classifiers['nsfw']}:nsfw", f"{classifiers['watermark']}:watermark"

    def scores(out: Path) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(out)])

    assert curate_main(["score", images, "--out", str(tmp_path / "clip"), "--model", str(clip), "--aesthetic",
                        aesthetic, *common]) == 0
    assert curate_main(["score", images, "--out", str(tmp_path / "both"), "--model", str(clip), "--aesthetic",
                        aesthetic, "--classifier", nsfw, "--classifier", watermark, *common]) == 0
    assert curate_main(["score", images, "--out", str(tmp_path / "alone"), "--model", "none",
                        "--classifier", watermark, *common]) == 0
    both, alone = scores(tmp_path / "both"), scores(tmp_path / "alone")
    # Each model gets its own image processor's input: CLIP's numbers do not change beside classifiers.
    assert both["aesthetic"].to_list() == scores(tmp_path / "clip")["aesthetic"].to_list()
    assert both["watermark"].to_list() == alone["watermark"].to_list()
    assert both.height == 10 and both["nsfw"].null_count() == 0 and both["nsfw"].is_between(0, 1).all()
    assert [c for c in alone.columns if c in ("clip_orig", "aesthetic", "nsfw", "watermark")] == ["watermark"]
    stage_file = json.loads((tmp_path / "alone" / "_stage.json").read_text())
    recorded = stage_file["config"]["classifiers"]
    assert recorded == [{"model": str(classifiers["watermark"]), "label": "Watermark", "column": "watermark",
                         "commit": None, "local_model_files": recorded[0]["local_model_files"]}]
    assert recorded[0]["local_model_files"]
    assert stage_file["summary"]["watermark"]["samples"] == 10
    # Without classifiers the config has no "classifiers": stages scored before them keep their hash.
    assert "classifiers" not in json.loads((tmp_path / "clip" / "_stage.json").read_text())["config"]

    out = ["--out", str(tmp_path / "x"), *common]
    assert curate_main(["score", images, "--model", "none", *out]) == 2
    assert "--model none leaves nothing to score" in capsys.readouterr().err
    assert curate_main(["score", images, "--model", "none", "--aesthetic", aesthetic, "--classifier", nsfw, *out]) == 2
    assert "--aesthetic and --embeddings need CLIP" in capsys.readouterr().err
    assert curate_main(["score", images, "--model", "none", "--classifier", nsfw, "--classifier", nsfw, *out]) == 2
    assert "its column 'nsfw' is taken" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("*.parquet"))


def test_vqa_scores_every_caption_against_its_image(stage, tmp_path: Path, capsys):
    import io
    import tarfile

    from PIL import Image

    from curate.tiny import build_tiny_qwen2_vl
    from curate.vqa import VqaScorer

    vlm = build_tiny_qwen2_vl(tmp_path / "vlm", variant="qwen2.5-vl")
    captions = caption_stage(stage["images"], tmp_path / "captions")
    out = tmp_path / "vqa"
    args = ["score", str(stage["images"]), "--out", str(out), "--model", "none", "--vqa", str(vlm), "--captions",
            str(captions), "--batch-size", "3", "--decode-workers", "1", "--device", "cpu", "--no-progress"]
    assert curate_main(args) == 0
    rows = pl.concat([pl.read_parquet(s.index_path) for s in committed_shards(out)])
    assert [c for c in rows.columns if c.startswith(("vqa_", "clip_"))] == ["vqa_orig", "vqa_long", "vqa_short"]
    assert (rows["vqa_orig"].null_count(), rows["vqa_long"].null_count(), rows["vqa_short"].null_count()) == (10, 0, 3)
    assert rows["vqa_long"].is_between(0, 1, closed="none").all()
    # A row's score is the scorer's own for that image (as the decoding worker prepared it) and caption.
    shard = committed_shards(stage["images"])[0]
    key = rows.filter(pl.col("vqa_short").is_not_null())["key"][0]
    with tarfile.open(shard.tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(f"{key}.") and not m.name.endswith(".json"))
        image = Image.open(io.BytesIO(tar.extractfile(member).read()))
        image.load()
    scorer = VqaScorer(str(vlm), device="cpu")
    expected = scorer([VqaScorer.prepare(image)], ["a short one"])
    assert rows.filter(pl.col("key") == key)["vqa_short"][0] == pytest.approx(float(expected[0, 0]), rel=1e-4)
    # A banner longer than 200 times its height (ingest takes it) is one Qwen2-VL's processor
    # refuses (a ValueError, which stopped the stage): it is padded to 200:1 and scored.
    banner = VqaScorer.prepare(Image.new("RGB", (13000, 64), "red"))
    assert max(banner.shape[1:]) <= 200 * min(banner.shape[1:]) and banner.shape[1] * banner.shape[2] <= 448 * 448
    assert 0 < float(scorer([banner], ["a red banner"])[0, 0]) < 1
    stage_file = json.loads((out / "_stage.json").read_text())
    assert stage_file["config"]["vqa"]["question"] == 'Does this figure show "{}"? Please answer yes or no.'
    assert stage_file["config"]["vqa"]["fingerprint"] and stage_file["summary"]["vqa_long"]["samples"] == 10
    assert stage_file["summary"]["vqa_long"]["p50"] > 0  # an untrained judge's millionths, not rounded to 0
    missing = str(tmp_path / "no-such-model")
    assert curate_main([*args[:6], "--vqa", missing, "--model", "none", "--out", str(tmp_path / "x")]) == 2
    assert f"{missing!r} is not a known vlm alias" in capsys.readouterr().err


def test_the_tiny_clips_tokenizer_is_the_same_on_every_build():
    """tokenizers' BpeTrainer broke ties in hash order: each build had another vocabulary, and the
    demo's CLIP scores changed from run to run."""
    from curate.tiny import _clip_vocab_and_merges

    vocab, merges = _clip_vocab_and_merges()
    assert all(_clip_vocab_and_merges() == (vocab, merges) for _ in range(3))
    assert len(vocab) == 300 and vocab["<|startoftext|>"] == 0 and vocab["<|endoftext|>"] == 1
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
