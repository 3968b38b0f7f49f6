"""`curate encode-text`: stored embeddings equal the text encoder's, manifests that list them, a
trainer that reads them instead of running the encoder, and every way that can go wrong."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import kill_at, run_cli, snapshot
from latent_data import caption_text, make_latent_dataset
from PIL import Image
from safetensors.torch import load

from curate.encode_text import EncodeTextStage
from curate.manifest import ManifestError, load_manifest, parse_manifest
from curate.runner import CurateError, run_stage
from curate.shards import iter_tar_samples
from curate.text import EncodedPrompts, TextEncoder, TextEncoderError
from train.cli import main as train_main
from train.config import ConfigError, build_config
from train.data import DataError, check_data
from train.metrics import read_metrics
from train.trainer import train


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    """The tiny T5Gemma (its Gemma tokenizer pads on the left) and a copy that pads on the right."""
    from curate.tiny import build_tiny_t5gemma

    root = tmp_path_factory.mktemp("text")
    left = build_tiny_t5gemma(root / "left")
    right = root / "right"
    shutil.copytree(left, right)
    config = json.loads((right / "tokenizer_config.json").read_text())
    (right / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    return {"left": left, "right": right}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """Three shards of 6 samples; sample 4 has no long caption, sample 7 no caption at all."""
    from curate.tiny import build_tiny_flux_vae

    root = tmp_path_factory.mktemp("latents")
    vae = build_tiny_flux_vae(root / "vae")
    return make_latent_dataset(root / "data", shards=3, per_shard=6, vae_dir=vae, rejected_every=4,
                               missing={4: ("long",), 7: ("long", "short", "orig")})


def encode_text(dataset, encoder: Path, out: Path | str, **kwargs) -> EncodeTextStage:
    kwargs = {"manifest_dir": Path(out).parent / "manifests", "device": "cpu", "workers": 0, "max_tokens": 64,
              "dtype": "float32", "batch_size": 4, **kwargs}
    stage = EncodeTextStage(dataset["latents"], out, str(encoder), **kwargs)
    result = run_stage(stage, out, progress=False)
    assert result.complete
    return stage


def stored(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for key, members in iter_tar_samples(tar):
            assert list(members) == ["text.safetensors"]
            found[key] = load(members["text.safetensors"])
    return found


@pytest.mark.parametrize("side", ["left", "right"])
def test_stored_embeddings_are_the_encoders_at_the_valid_tokens(dataset, encoders, tmp_path: Path, side: str):
    out = tmp_path / "text"
    encode_text(dataset, encoders[side], out)
    encoder = TextEncoder.load(str(encoders[side]), max_tokens=64)
    assert encoder.tokenizer.padding_side == side
    found = stored(out)
    assert len(found) == 18
    for i, tensors in enumerate(found.values()):
        expected = {"long", "short", "orig"} - {4: {"long"}, 7: {"long", "short", "orig"}}.get(i, set())
        assert set(tensors) == expected, i
        for variant, rows in tensors.items():
            # What the trainer gets from the encoder for this sample's caption: the same rows.
            context, mask = encoder.encode([caption_text(variant, i)])
            assert rows.dtype == torch.float32 and rows.shape == (int(mask.sum()), encoder.dim)
            torch.testing.assert_close(rows, context[0][mask[0]], atol=2e-5, rtol=1e-4)
    index = pl.read_parquet(out / "000001.parquet")
    assert index["status"].to_list() == ["ok"] * 6
    assert index.filter(pl.col("key") == list(found)[7])["flags"].to_list() == [["no_caption"]]


def test_manifests_extend_the_latent_ones_with_text_shards(dataset, encoders, tmp_path: Path):
    out = tmp_path / "text" / "t5"
    stage = encode_text(dataset, encoders["left"], out, dtype="bfloat16")
    manifests = tmp_path / "text" / "manifests"
    assert sorted(p.name for p in manifests.iterdir()) == ["long-t5.json", "mix-t5.json", "short-t5.json"]
    for name in ("long", "short", "mix"):
        latent = load_manifest(dataset[name])
        extended = load_manifest(manifests / f"{name}-t5.json", check_checksums=True)
        assert extended.name == f"{name}-t5" and extended.captions == latent.captions
        assert extended.latent == latent.latent and extended.samples == latent.samples
        # Same latent shards, paths rebased onto the new folder; text shard i beside latent shard i.
        assert [(manifests / s.path).resolve() for s in extended.shards] == \
               [(dataset[name].parent / s.path).resolve() for s in latent.shards]
        text = extended.text
        assert (text.encoder_id, text.dim, text.max_tokens, text.dtype) == \
               (str(encoders["left"].resolve()), 32, 64, "bfloat16")
        assert text.variants == ["long", "short", "orig"]
        assert [(manifests / s.path).resolve() for s in text.shards] == sorted(out.glob("*.tar"))
        assert extended.provenance["text"]["path"] == str(out.resolve())
    # A rerun with everything committed rewrites the same manifests (the final pass is idempotent).
    before = (manifests / "long-t5.json").read_text()
    run_stage(EncodeTextStage(dataset["latents"], out, str(encoders["left"]), manifest_dir=manifests, device="cpu",
                              workers=0, max_tokens=64), out, progress=False)
    assert (manifests / "long-t5.json").read_text() == before
    assert stage.config()["dtype"] == "bfloat16"


def test_training_on_stored_embeddings_equals_encoding_on_the_fly(dataset, encoders, tmp_path: Path):
    encode_text(dataset, encoders["left"], tmp_path / "t5", workers=1)
    runs = {}
    for name, manifest in {"fly": dataset["mix"], "stored": tmp_path / "manifests" / "mix-t5.json"}.items():
        cfg = build_config("tiny", overrides=[f"text_encoder={encoders['left']}", "steps=12", "log.every=1",
                                              "sample_every=12", "caption_dropout=0.3", "data.workers=2",
                                              "log.tensorboard=false"],
                           shards=str(manifest), out=str(tmp_path / name))
        train(cfg)
        runs[name] = [m["loss"] for m in read_metrics(tmp_path / name)]
    # Dropped captions (30%) and sample 7, which has none, take the empty prompt's embedding.
    assert len(runs["fly"]) == 12
    torch.testing.assert_close(torch.tensor(runs["stored"]), torch.tensor(runs["fly"]), rtol=1e-5, atol=0)
    # The stored run released its encoder after encoding the grid's prompts: the same grid.
    grids = [np.asarray(Image.open(tmp_path / name / "samples" / "step_00000012.png"), dtype=np.int16)
             for name in runs]
    assert np.abs(grids[0] - grids[1]).max() <= 2


def test_encoded_prompts_serve_their_prompts_as_the_encoder_does(encoders):
    encoder = TextEncoder.load(str(encoders["left"]), max_tokens=64)
    prompts = EncodedPrompts(encoder, ["a red fox", "a blue house"])
    for batch in (["a blue house", "", "a red fox"], [""]):
        got, expected = prompts.encode(batch), encoder.encode(batch)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
    assert (prompts.dim, prompts.id, prompts.max_tokens) == (encoder.dim, encoder.id, 64)
    with pytest.raises(TextEncoderError, match="'a green tree' was not encoded before the text encoder"):
        prompts.encode(["a red fox", "a green tree"])


def test_kill_and_rerun_equals_a_clean_run(dataset, encoders, tmp_path: Path):
    clean = tmp_path / "clean" / "t5"
    encode_text(dataset, encoders["left"], clean, dtype="bfloat16", workers=1)
    killed = tmp_path / "killed" / "t5"
    args = ["encode-text", str(dataset["latents"]), "--out", str(killed), "--text-encoder", str(encoders["left"]),
            "--max-tokens", "64", "--batch-size", "4", "--workers", "1", "--device", "cpu",
            "--manifest-dir", str(killed.parent / "manifests"), "--no-progress"]
    kill_at(args, killed, committed=(1,))
    # The rest without caption workers: how captions are read does not change the output.
    rest = list(args)
    rest[rest.index("--workers") + 1] = "0"
    run_cli(*rest)
    assert snapshot(killed) == snapshot(clean)
    assert load_manifest(killed.parent / "manifests" / "long-t5.json").text.shards == \
           load_manifest(clean.parent / "manifests" / "long-t5.json").text.shards


def _with_text(dataset, encoders, tmp_path: Path) -> Path:
    encode_text(dataset, encoders["left"], tmp_path / "t5")
    return tmp_path / "manifests" / "long-t5.json"


def test_missing_changed_or_foreign_text_shards_are_clear_errors(dataset, encoders, tmp_path: Path):
    manifest_path = _with_text(dataset, encoders, tmp_path)
    manifest = load_manifest(manifest_path)
    data = json.loads(manifest_path.read_text())

    # Text shards that do not pair with the latent shards: refused when the manifest is read.
    short = {**data, "text": {**data["text"], "shards": data["text"]["shards"][:2]}}
    with pytest.raises(ManifestError, match="text.shards lists 2 shards but shards lists 3"):
        parse_manifest(short)
    swapped = copy.deepcopy(data)
    swapped["text"]["shards"][0]["samples"] = 5
    with pytest.raises(ManifestError, match="text.shards.0 holds 5 samples but shards.0 holds 6"):
        parse_manifest(swapped)

    # Made from other latents (keys in another order): check_data names the text shard.
    other = manifest_path.with_name("other.json")
    reordered = [data["text"]["shards"][1], data["text"]["shards"][0], data["text"]["shards"][2]]
    other.write_text(json.dumps({**data, "text": {**data["text"], "shards": reordered}}))
    with pytest.raises(DataError, match=r"text shard 0 .*not those of shard 0"):
        check_data(load_manifest(other), other)

    # A selected variant that was not encoded.
    narrowed = manifest_path.with_name("narrowed.json")
    narrowed.write_text(json.dumps({**data, "text": {**data["text"], "variants": ["short", "orig"]}}))
    with pytest.raises(DataError, match="selects 'long', but the text shards hold embeddings of short, orig only"):
        check_data(load_manifest(narrowed), narrowed)

    # A text shard changed after the manifest was written, then one removed.
    tar = tmp_path / "t5" / "000001.tar"
    data_bytes = bytearray(tar.read_bytes())
    data_bytes[2048] ^= 0xFF  # inside the first sample's embeddings: same size, other bytes
    tar.write_bytes(bytes(data_bytes))
    with pytest.raises(ManifestError, match=r"text shard 1 \(.*000001.tar\) does not match its sha256"):
        load_manifest(manifest_path, check_checksums=True)
    with pytest.raises(DataError, match="text shard 1"):
        check_data(manifest, manifest_path, verify="checksums")
    tar.unlink()
    with pytest.raises(ManifestError, match="text shard 1 .* does not exist"):
        load_manifest(manifest_path, check_files=True)
    with pytest.raises(DataError, match=r"text shard 1 .*the tar .* does not exist"):
        check_data(manifest, manifest_path)


def test_the_trainer_refuses_another_text_encoder_or_max_tokens(dataset, encoders, tmp_path: Path, capsys):
    manifest_path = _with_text(dataset, encoders, tmp_path)
    base = ["--shards", str(manifest_path), "--out", str(tmp_path / "run"), "--preset", "tiny", "steps=1",
            "sample_every=0", "data.workers=0", "log.tensorboard=false"]
    assert train_main([*base, f"text_encoder={encoders['right']}"]) == 2
    assert f"set text_encoder={encoders['left']}" in capsys.readouterr().err
    assert train_main([*base, f"text_encoder={encoders['left']}", "max_tokens=32"]) == 2
    assert "set max_tokens=64, or rerun curate encode-text with --max-tokens 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError):
        cfg = build_config("tiny", overrides=[f"text_encoder={encoders['right']}", "steps=1"],
                           shards=str(manifest_path), out=str(tmp_path / "run"))
        train(cfg)


def test_bad_arguments_and_inputs(dataset, encoders, tmp_path: Path):
    with pytest.raises(CurateError, match="--dtype must be one of"):
        EncodeTextStage(dataset["latents"], tmp_path / "t", str(encoders["left"]), dtype="int8")
    with pytest.raises(CurateError, match="not a complete encode-latents stage"):
        EncodeTextStage(tmp_path, tmp_path / "t", str(encoders["left"]))
    (tmp_path / "bad.json").write_text("{bad")
    with pytest.raises(ManifestError, match="bad.json: not valid JSON"):  # before anything is encoded
        EncodeTextStage(dataset["latents"], tmp_path / "t", str(encoders["left"]), manifests=[tmp_path / "bad.json"])
    moved = tmp_path / "moved"
    shutil.copytree(dataset["latents"], moved)
    stage_file = json.loads((moved / "_stage.json").read_text())
    stage_file["summary"]["manifests"] = ["nowhere/long.json"]
    (moved / "_stage.json").write_text(json.dumps(stage_file))
    with pytest.raises(CurateError, match="cannot find the manifests encode-latents wrote.*--manifests"):
        EncodeTextStage(moved, tmp_path / "t", str(encoders["left"]))
    # Manifests of other latents than the ones encoded: the final pass says so.
    other = make_latent_dataset(tmp_path / "other", shards=1, per_shard=2)
    stage = EncodeTextStage(dataset["latents"], tmp_path / "t", str(encoders["left"]), manifests=[other["long"]],
                            device="cpu", workers=0, max_tokens=64)
    with pytest.raises(CurateError, match="is not a current shard of"):
        run_stage(stage, tmp_path / "t", progress=False)


def test_a_subset_manifest_gets_text_shards_of_every_sample_and_keeps_its_subset(dataset, encoders, tmp_path: Path):
    from curate.cli import main as curate_main

    subset = tmp_path / "manifests" / "odd.json"
    assert curate_main(["manifest", str(dataset["long"]), "--fraction", "0.5",
                        "--name", "odd", "--out", str(subset)]) == 0
    source = load_manifest(subset)
    encode_text(dataset, encoders["left"], tmp_path / "t5", manifests=[subset], name="t5")
    written = tmp_path / "manifests" / "odd-t5.json"
    manifest = load_manifest(written, check_files=True)
    assert [e.subset for e in manifest.shards] == [e.subset for e in source.shards]
    assert manifest.samples == source.samples
    # A text shard holds every accepted sample of its latent shard, the ones the subset leaves out too.
    assert [e.samples for e in manifest.text.shards] == [e.accepted for e in source.shards]
    assert check_data(manifest, written).samples == source.samples


def test_latents_and_manifests_at_urls_encode_as_their_files_reading_each_tar_once(dataset, encoders,
                                                                                   tmp_path: Path):
    """`curate encode-text http://.../latents --manifests http://.../long.json --manifest-dir M`: the
    text shards are the local folder's, each latent tar is fetched once, and the manifest written
    locally names the latent shards by their URLs and trains as the local one does."""
    from file_server import serve

    local = tmp_path / "local" / "t5"
    encode_text(dataset, encoders["left"], local, manifests=[dataset["long"]], workers=1)
    root = dataset["root"]
    with serve(root) as server:
        def url(path: Path) -> str:
            return f"{server.url}/{path.relative_to(root).as_posix()}"

        with pytest.raises(CurateError, match="where it can name shards at URLs only"):
            EncodeTextStage(url(dataset["latents"]), tmp_path / "x", str(encoders["left"]),
                            manifests=[url(dataset["long"])])
        remote = tmp_path / "remote" / "t5"
        encode_text({"latents": url(dataset["latents"])}, encoders["left"], remote,
                    manifests=[url(dataset["long"])], workers=1)
        sent = dict(server.sent)
        written = remote.parent / "manifests" / "long-t5.json"
        manifest = load_manifest(written, check_checksums=True)
        assert [s.path for s in manifest.shards] == [url(t) for t in sorted(dataset["latents"].glob("*.tar"))]
        local_manifest = local.parent / "manifests" / "long-t5.json"
        remote_summary, local_summary = check_data(manifest, written), check_data(load_manifest(local_manifest),
                                                                                    local_manifest)
        assert (remote_summary.samples, remote_summary.buckets) == (local_summary.samples, local_summary.buckets)
    assert snapshot(remote) == snapshot(local)
    assert manifest.text.model_dump() | {"shards": None} == load_manifest(local_manifest).text.model_dump() | \
        {"shards": None}
    assert json.loads((remote / "_stage.json").read_text())["provenance"]["latents"] == url(dataset["latents"])
    # Written to a URL as well: the same shards, uploaded; the manifest names them by their URLs.
    with serve(root) as server:
        encode_text({"latents": url(dataset["latents"])}, encoders["left"], f"{server.url}/text/t5",
                    manifests=[url(dataset["long"])], workers=1, manifest_dir=tmp_path / "m3")
        manifest = load_manifest(tmp_path / "m3" / "long-t5.json", check_checksums=True)
        assert [s.path for s in manifest.text.shards] == [f"{server.url}/text/t5/{n:06d}.tar"
                                                          for n in range(len(manifest.shards))]
        # Without --manifest-dir the manifest goes beside the one it extends, at its URL, naming the
        # shards relative to it as a folder's manifest does; it trains from there.
        encode_text({"latents": url(dataset["latents"])}, encoders["left"], f"{server.url}/text/t5",
                    manifests=[url(dataset["long"])], workers=1, manifest_dir=None)
        beside = f"{url(dataset['long']).rsplit('/', 1)[0]}/long-t5.json"
        there = load_manifest(beside, check_checksums=True)
        assert there.text.shards[0].path == os.path.relpath(root / "text/t5/000000.tar", dataset["long"].parent)
        assert there.shards[0].path == json.loads(dataset["long"].read_text())["shards"][0]["path"]
        assert check_data(there, beside).samples == check_data(manifest, tmp_path / "m3" / "long-t5.json").samples
    assert snapshot(root / "text" / "t5") == snapshot(local)
    for tar in dataset["latents"].glob("*.tar"):
        assert sent[f"/{tar.relative_to(root).as_posix()}"] == tar.stat().st_size
