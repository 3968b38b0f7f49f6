"""`curate encode-latents`: tiny Flux and FLUX.2 VAEs loaded by path, manifests, decoding, kills."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import download, encode, kill_at, noise_image, run_cli, snapshot
from safetensors.torch import load as load_safetensors
from test_recaption import ScriptedCaptioner, numbering

from curate.buckets import preprocess, to_model_range
from curate.captioners.base import Sampling
from curate.encode_latents import EncodeLatentsStage
from curate.ingest import IngestStage
from curate.manifest import ManifestError, load_manifest, shard_urls
from curate.prompts import load_prompts
from curate.recaption import CaptionSettings, RecaptionStage
from curate.runner import CurateError, run_stage, stage_record
from curate.shards import ShardError, committed_shards, iter_tar_samples, read_index
from curate.sources import open_source
from curate.vae import (
    decode_to_images,
    from_model_output,
    load_vae,
    load_vae_for_spec,
    to_model_input,
)
from train.data import check_data


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, Path]:
    from curate.tiny import build_tiny_flux2_vae, build_tiny_flux_vae

    root = tmp_path_factory.mktemp("vaes")
    return {"flux": build_tiny_flux_vae(root / "flux"), "flux2": build_tiny_flux2_vae(root / "flux2")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Ingested images of several aspect ratios, captioned by a scripted captioner (one refused)."""
    root = tmp_path_factory.mktemp("data")
    src = root / "src"
    src.mkdir()
    sizes = [(96, 96), (160, 96), (96, 160), (200, 80), (120, 90), (90, 120), (128, 128), (150, 100), (100, 150)]
    for i, size in enumerate(sizes):
        (src / f"img_{i}.jpg").write_bytes(encode(noise_image(100 + i, size), "JPEG", quality=90))
        (src / f"img_{i}.txt").write_text(f"original caption {i}")
    images = root / "images"
    run_stage(IngestStage(open_source(str(src)), images, shard_size=4), images, progress=False)
    n = numbering_by_name(images)
    script = {(n["img_2.jpg"], v, a): ("I'm sorry, I cannot describe this.", "stop")
              for v in ("long", "short") for a in range(3)}
    captions = root / "captions"
    settings = CaptionSettings(prompts=load_prompts([], ["long", "short"]), sampling=Sampling(seed=3))
    captioner = ScriptedCaptioner(script, {k: i for k, i in numbering(images).items()})
    run_stage(RecaptionStage(images, "scripted/model", lambda: captioner, settings, decode_workers=0), captions,
              progress=False)
    return {"images": images, "captions": captions, "src": src}


def numbering_by_name(images: Path) -> dict[str, int]:
    rows = pl.concat([read_index(s.index_path) for s in committed_shards(images)])
    by_key = numbering(images)
    return {src: by_key[k] for k, src in zip(rows["key"], rows["source"], strict=True)}


def encode_stage(data, vae: Path, out: Path, manifests: Path, **kwargs) -> EncodeLatentsStage:
    options = {"resolution": 64, "batch_size": 3, "decode_workers": 0, "manifest_dir": manifests, "device": "cpu"}
    return EncodeLatentsStage(data["images"], data["captions"], out, str(vae), **{**options, **kwargs})


@pytest.mark.parametrize("kind", ["flux", "flux2"])
def test_stored_latents_decode_through_the_manifest_like_the_vae_directly(data, vaes, tmp_path: Path, kind: str):
    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    result = run_stage(encode_stage(data, vaes[kind], out, manifests, store="dist", dtype="bfloat16"), out,
                       progress=False)
    totals = result.summary["totals"]
    assert totals["seen"] == 9 and totals["ok"] == 8 and totals["reasons"] == {"no_caption": 1}

    manifest_path = manifests / "long.json"
    manifest = load_manifest(manifest_path, check_checksums=True)
    assert manifest.samples == 8 and manifest.latent.channels == (16 if kind == "flux" else 32)
    assert manifest.latent.stored == "dist" and manifest.latent.dtype == "bfloat16"
    assert (manifest.latent.normalization is not None) == (kind == "flux2")

    # One stored sample: its mean, decoded through the manifest's spec, equals decode(encode(x)) done by hand.
    tar = shard_urls(manifest, manifest_path)[0]
    key, members = next(iter_tar_samples(tar))
    latent = load_safetensors(members["latent.safetensors"])
    assert set(latent) == {"mean", "std"} and latent["mean"].dtype == torch.bfloat16
    meta = json.loads(members["json"])
    assert meta["captions"] == ["long", "short"] and members["long.txt"]
    assert members["orig.txt"].decode().startswith("original caption")

    original = _original_bytes(data, key)
    pixels, record = preprocess(original, resolution=64, buckets=None)
    assert record["crop_box"] == meta["crop_box"]
    vae = load_vae(str(vaes[kind]), device="cpu")
    with torch.no_grad():
        direct = vae.model.decode(vae.model.encode(to_model_range(pixels[None])).latent_dist.mean).sample
    direct = ((direct + 1) / 2).clamp(0, 1)
    model_space = to_model_input(latent["mean"][None].float(), manifest.latent)
    assert torch.allclose(from_model_output(model_space, manifest.latent), latent["mean"][None].float(), atol=1e-5)
    via_manifest = decode_to_images(model_space, manifest.latent, load_vae_for_spec(manifest.latent, "cpu"))
    # The stored mean is bf16: the same decode, within what bf16 rounding of the latent moves.
    assert (via_manifest - direct).abs().mean() < 2e-2
    exact = decode_to_images(to_model_input(latent["mean"][None].float(), manifest.latent), manifest.latent, vae)
    with torch.no_grad():
        by_hand = ((vae.model.decode(latent["mean"][None].float()).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(exact, by_hand, atol=1e-5)


def test_pixel_space_stores_each_crop_exactly_and_decodes_back_to_it(data, vaes, tmp_path: Path):
    out, manifests = tmp_path / "pixels", tmp_path / "manifests"
    run_stage(encode_stage(data, "pixels", out, manifests), out, progress=False)
    manifest_path = manifests / "long.json"
    spec = load_manifest(manifest_path, check_checksums=True).latent
    assert (spec.vae, spec.channels, spec.downsample, spec.stored, spec.dtype) == ("pixels", 3, 1, "mean", "uint8")
    pixel_space = load_vae_for_spec(spec, "cpu")
    seen = 0
    for tar in shard_urls(load_manifest(manifest_path), manifest_path):
        for key, members in iter_tar_samples(tar):
            stored = load_safetensors(members["latent.safetensors"])
            crop, _ = preprocess(_original_bytes(data, key), resolution=64, buckets=None)
            assert set(stored) == {"mean"} and torch.equal(stored["mean"], crop)
            images = decode_to_images(to_model_input(stored["mean"][None], spec), spec, pixel_space)
            torch.testing.assert_close(images[0] * 255, crop.float(), rtol=0, atol=1e-4)
            seen += 1
    assert seen == 8
    with pytest.raises(CurateError, match="no distribution"):
        encode_stage(data, "pixels", out, manifests, store="dist")
    with pytest.raises(CurateError, match="uint8 holds pixel values"):
        encode_stage(data, vaes["flux"], out, manifests, dtype="uint8")


def test_dc_ae_stores_one_latent_per_image_that_decodes_and_trains_through_the_manifest(data, tmp_path: Path):
    """PRX's DC-AE space: a deterministic encoder (its latent alone is stored), 32 channels at 1/32,
    so the denoiser takes a token per latent cell; sizes that are not whole cells are refused before
    any image is encoded."""
    from curate.tiny import build_tiny_dc_ae, build_tiny_t5gemma
    from train.cli import main as train_main

    vae_dir = build_tiny_dc_ae(tmp_path / "dc-ae")
    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    run_stage(encode_stage(data, vae_dir, out, manifests), out, progress=False)
    manifest_path = manifests / "long.json"
    spec = load_manifest(manifest_path, check_checksums=True).latent
    assert (spec.vae_class, spec.channels, spec.downsample, spec.stored, spec.dtype) == \
        ("AutoencoderDC", 32, 32, "mean", "bfloat16")
    assert (spec.scaling_factor, spec.shift_factor, spec.normalization) == (0.41407, 0.0, None)

    vae = load_vae_for_spec(spec, "cpu")
    seen = 0
    for tar in shard_urls(load_manifest(manifest_path), manifest_path):
        for key, members in iter_tar_samples(tar):
            stored = load_safetensors(members["latent.safetensors"])
            assert set(stored) == {"mean"} and stored["mean"].shape == (32, 2, 2)
            crop, _ = preprocess(_original_bytes(data, key), resolution=64, buckets=None)
            with torch.no_grad():
                direct = vae.model.encode(to_model_range(crop[None])).latent
                by_hand = ((vae.model.decode(stored["mean"][None].float()).sample + 1) / 2).clamp(0, 1)
            torch.testing.assert_close(stored["mean"][None].float(), direct, rtol=1e-2, atol=2e-2)  # bf16
            model_space = to_model_input(stored["mean"][None], spec)
            torch.testing.assert_close(model_space, stored["mean"][None].float() * 0.41407)
            torch.testing.assert_close(decode_to_images(model_space, spec, vae), by_hand, rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == 8

    with pytest.raises(CurateError, match="one latent, which has no distribution"):
        encode_stage(data, vae_dir, out, manifests, store="dist")
    bucketed = tmp_path / "bucketed"
    with pytest.raises(CurateError, match="not divisible by 32.*--bucket-multiple divisible by 32"):
        run_stage(encode_stage(data, vae_dir, bucketed, tmp_path / "m2", buckets=True), bucketed, progress=False)
    assert not committed_shards(bucketed)

    run = tmp_path / "run"
    assert train_main(["--shards", str(manifest_path), "--out", str(run), "--preset", "tiny", "steps=2",
                       "global_batch=4", "micro_batch=4", f"text_encoder={build_tiny_t5gemma(tmp_path / 't5')}",
                       "sample_every=0", "data.workers=0", "log.tensorboard=false"]) == 0
    config = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)["denoiser"]
    assert (config["in_channels"], config["patch_size"]) == (32, 1)

    # A scale of the manifest's own (curate manifest --latent-scaling): the same shards train, and
    # the sample grid decodes with the VAE checked against its own config.
    from curate.cli import main as curate_main

    assert curate_main(["manifest", str(manifest_path), "--latent-scaling", "0.2", "--name", "rescaled"]) == 0
    rescaled = load_manifest(manifests / "rescaled.json").latent
    assert (rescaled.scaling_factor, rescaled.vae_scaling) == (0.2, (0.41407, 0.0))
    assert train_main(["--shards", str(manifests / "rescaled.json"), "--out", str(tmp_path / "run2"), "--preset",
                       "tiny", "steps=2", "global_batch=4", "micro_batch=4", "sample_every=2",
                       f"text_encoder={tmp_path / 't5'}", "data.workers=0", "log.tensorboard=false"]) == 0
    assert list((tmp_path / "run2" / "samples").glob("*.png"))


def _original_bytes(data, key: str) -> bytes:
    for shard in committed_shards(data["images"]):
        for k, members in iter_tar_samples(shard.tar_path):
            if k == key:
                return members["jpg"]
    raise KeyError(key)


def test_three_manifests_differ_only_in_caption_selection(data, vaes, tmp_path: Path):
    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    run_stage(encode_stage(data, vaes["flux"], out, manifests, name="tiny"), out, progress=False)
    loaded = {n: json.loads((manifests / f"tiny-{n}.json").read_text()) for n in ("long", "short", "mix")}
    assert loaded["long"]["captions"] == {"long": 1.0}
    assert loaded["short"]["captions"] == {"short": 1.0}
    assert loaded["mix"]["captions"] == {"long": 0.5, "short": 0.5}
    for n in ("short", "mix"):
        for field in ("shards", "samples", "latent", "provenance", "version"):
            assert loaded[n][field] == loaded["long"][field], field
        load_manifest(manifests / f"tiny-{n}.json", check_checksums=True)
    prov = loaded["long"]["provenance"]
    assert prov["images"]["stage"] == "ingest" and prov["captions"]["config"]["model"] == "scripted/model"


def _stored_means(out: Path) -> dict[str, torch.Tensor]:
    return {key: load_safetensors(members["latent.safetensors"])["mean"].float()
            for shard in committed_shards(out) for key, members in iter_tar_samples(shard.tar_path)}


def test_bf16_vae_weights_are_recorded_and_stay_within_bf16_rounding(data, vaes, tmp_path: Path):
    with pytest.raises(CurateError, match="--vae-dtype must be one of"):
        encode_stage(data, vaes["flux2"], tmp_path / "x", tmp_path / "m", vae_dtype="float16")
    means = {}
    for vae_dtype in ("float32", "bfloat16"):
        out, manifests = tmp_path / vae_dtype, tmp_path / f"manifests-{vae_dtype}"
        result = run_stage(encode_stage(data, vaes["flux2"], out, manifests, vae_dtype=vae_dtype), out,
                           progress=False)
        assert result.summary["config"]["vae_dtype"] == vae_dtype  # in the config hash: a change re-encodes
        assert result.summary["provenance"]["vae_dtype"] == vae_dtype
        assert load_manifest(manifests / "long.json").provenance["latents"]["vae_dtype"] == vae_dtype
        means[vae_dtype] = _stored_means(out)
    assert means["float32"].keys() == means["bfloat16"].keys() and len(means["float32"]) == 8
    for key, want in means["float32"].items():
        assert float((means["bfloat16"][key] - want).norm() / want.norm()) < 0.03, key


def test_missing_or_changed_shard_is_a_clear_error(data, vaes, tmp_path: Path):
    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    run_stage(encode_stage(data, vaes["flux"], out, manifests), out, progress=False)
    first = sorted(out.glob("*.tar"))[0]
    blob = bytearray(first.read_bytes())
    blob[700] ^= 0xFF  # one flipped byte inside the first member's data
    first.write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="does not match its sha256"):
        load_manifest(manifests / "long.json", check_checksums=True)
    first.unlink()
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(manifests / "long.json", check_files=True)


def test_an_image_shard_cut_off_is_refused_before_any_work(data, vaes, tmp_path: Path):
    """A tar shorter than its index recorded (a copy cut off) is named before anything is read or
    written, whoever would read it first: here, or in DataLoader workers."""
    images = tmp_path / "images"
    shutil.copytree(data["images"], images)
    os.truncate(images / "000001.tar", 3000)
    out = tmp_path / "latents"
    for workers in (0, 2):
        with pytest.raises(ShardError, match=r"000001.tar: 3000 bytes, but its index recorded \d+ \(cut off"):
            run_stage(encode_stage({**data, "images": images}, vaes["flux"], out, tmp_path / "m",
                                   decode_workers=workers), out, progress=False)
    assert not committed_shards(out)


def test_a_folder_of_another_stage_given_as_the_images_or_captions_is_named(data, vaes, tmp_path: Path):
    for swapped, message in (({"captions": data["images"]}, "holds shards of `curate ingest`, not captions"),
                             ({"images": data["captions"]}, "holds shards of `curate recaption`, not images")):
        with pytest.raises(CurateError, match=message):
            run_stage(encode_stage({**data, **swapped}, vaes["flux"], tmp_path / "out", tmp_path / "m"),
                      tmp_path / "out", progress=False)


def test_buckets_keep_aspect_ratio_and_batches_share_a_shape(data, vaes, tmp_path: Path):
    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    run_stage(encode_stage(data, vaes["flux"], out, manifests, buckets=True, store="mean"), out, progress=False)
    manifest = load_manifest(manifests / "long.json")
    assert len(manifest.latent.buckets) > 3 and manifest.latent.stored == "mean"
    rows = pl.concat([read_index(s.index_path) for s in committed_shards(out)]).filter(pl.col("status") == "ok")
    shapes = set(zip(rows["bucket_h"], rows["bucket_w"], strict=True))
    assert len(shapes) >= 3  # landscape, portrait and square images landed in different buckets
    for shard in committed_shards(out):
        for _, members in iter_tar_samples(shard.tar_path):
            meta = json.loads(members["json"])
            latent = load_safetensors(members["latent.safetensors"])
            assert set(latent) == {"mean"}
            h, w = meta["target_size"]
            assert latent["mean"].shape == (16, h // 8, w // 8)
            ow, oh = meta["orig_size"]
            assert (w >= h) == (ow >= oh) or abs(ow - oh) < 0.1 * max(ow, oh)


def test_compiled_encoder_with_buckets_compiles_twice_and_equals_eager(data, vaes, tmp_path: Path, monkeypatch):
    """--compile --buckets: padded batches keep one batch size and the second bucket shape makes
    the sides symbolic, so every bucket runs compiled (static shapes would stop compiling at
    dynamo's limit of 8 shapes, 17 buckets at 256 px); the stored latents equal eager's.

    Dynamo's graphs are what this checks, so they run through AOTAutograd without inductor's code
    generation: inductor's two compiles of the encoder cost a cold CI machine 70-76 s (it caches
    nothing between runs), and its CPU kernels say nothing of the GPU's (bench/gpu.sh runs
    `--compile` there)."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    stored = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        out = tmp_path / f"latents-{compiled}"
        run_stage(encode_stage(data, vaes["flux"], out, tmp_path / "m", buckets=True, store="mean", compile=compiled),
                  out, progress=False)
        stored[compiled] = {key: load_safetensors(members["latent.safetensors"])["mean"]
                            for shard in committed_shards(out) for key, members in iter_tar_samples(shard.tar_path)}
        graphs = counters["stats"]["unique_graphs"]
        assert graphs == (2 if compiled else 0), graphs
    assert stored[True].keys() == stored[False].keys() and len(stored[True]) >= 8
    for key, eager in stored[False].items():
        torch.testing.assert_close(stored[True][key].float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_without_captions_only_with_allow_missing(data, vaes, tmp_path: Path):
    with pytest.raises(CurateError, match="--captions is required"):
        EncodeLatentsStage(data["images"], None, tmp_path / "x", str(vaes["flux"]))
    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    stage = EncodeLatentsStage(data["images"], None, out, str(vaes["flux"]), resolution=64, decode_workers=0,
                               allow_missing_captions=True, manifest_dir=manifests, device="cpu")
    assert run_stage(stage, out, progress=False).summary["totals"]["ok"] == 9
    assert json.loads((manifests / "orig.json").read_text())["captions"] == {"orig": 1.0}


def test_rules_leave_images_out_before_they_are_decoded(data, vaes, tmp_path: Path, capsys):
    """A second stage at a higher resolution encodes only the images that have it: --where over
    the image stage's columns, the others rejected as filtered_out with the rule they fail."""
    from curate.cli import main as curate_main

    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    args = [*_cli(data, vaes["flux"], out, manifests), "--where", "width >= 120", "--where", "height >= 100"]
    assert curate_main(args) == 0
    images = pl.concat([read_index(s.index_path) for s in committed_shards(data["images"])])
    name = dict(zip(images["key"], images["source"], strict=True))
    index = pl.concat([read_index(s.index_path) for s in committed_shards(out)])
    assert sorted(name[k] for k in index.filter(pl.col("status") == "ok")["key"]) == ["img_6.jpg", "img_7.jpg"]
    left_out = index.filter(pl.col("reason") == "filtered_out")
    # img_2's captions were refused, but the rule is what leaves it out.
    assert {name[k]: d for k, d in zip(left_out["key"], left_out["detail"], strict=True)} == {
        **{f"img_{i}.jpg": "--where width >= 120" for i in (0, 2, 5, 8)},
        **{f"img_{i}.jpg": "--where height >= 100" for i in (1, 3, 4)}}
    manifest = json.loads((manifests / "long.json").read_text())
    assert manifest["samples"] == 2
    assert manifest["provenance"]["latents"]["select"]["where"] == ["width >= 120", "height >= 100"]
    assert json.loads((out / "_stage.json").read_text())["config"]["select"]["where"] == manifest[
        "provenance"]["latents"]["select"]["where"]
    before = snapshot(out)
    assert curate_main(args) == 0 and snapshot(out) == before  # the same rules: nothing redone
    capsys.readouterr()
    # A column the image stage does not have is named before anything is encoded.
    assert curate_main([*_cli(data, vaes["flux"], tmp_path / "x", manifests), "--where", "aesthetic >= 5"]) == 2
    assert "aesthetic" in capsys.readouterr().err and not list((tmp_path / "x").glob("*.tar"))


def test_shards_load_with_datasets(data, vaes, tmp_path: Path):
    import datasets

    out, manifests = tmp_path / "latents", tmp_path / "manifests"
    run_stage(encode_stage(data, vaes["flux2"], out, manifests), out, progress=False)
    tars = sorted(str(p) for p in out.glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert len(ds) == 8
    row = ds[0]
    assert isinstance(row["long.txt"], str) and row["json"]["captions"]
    latent = load_safetensors(row["latent.safetensors"])
    assert latent["mean"].shape[0] == 32


def _cli(data, vae: Path, out: Path, manifests: Path) -> list[str]:
    return ["encode-latents", str(data["images"]), "--captions", str(data["captions"]), "--out", str(out),
            "--vae", str(vae), "--resolution", "64", "--buckets", "--batch-size", "2", "--decode-workers", "1",
            "--manifest-dir", str(manifests), "--device", "cpu", "--no-progress"]


def test_an_image_stage_at_a_url_encodes_as_its_files_fetching_each_sample_once(data, vaes, tmp_path: Path):
    """`curate encode-latents http://.../images --captions http://.../captions`: listed over HTTP,
    each sample fetched by the one
    decoding worker that owns it, at the offset its index records, and only the samples that the
    --where rules keep; the latents, indexes and manifests are the local folder's."""
    from file_server import serve

    from curate.cli import main as curate_main

    where = ["--where", "width >= 100"]
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert curate_main([*_cli(data, vaes["flux"], local, tmp_path / "m1"), *where]) == 0
    with serve(data["images"].parent) as server:
        args = _cli(data, vaes["flux"], remote, tmp_path / "m2")
        args[1], args[args.index("--decode-workers") + 1] = f"{server.url}/images", "2"
        args[args.index("--captions") + 1] = f"{server.url}/captions"
        assert curate_main([*args, *where]) == 0
        sent = dict(server.sent)
    assert snapshot(remote) == snapshot(local)
    first, second = (json.loads((m / "long.json").read_text()) for m in (tmp_path / "m1", tmp_path / "m2"))
    assert first["provenance"]["images"]["path"] == str(data["images"].resolve())
    assert second["provenance"]["images"]["path"] == f"{server.url}/images"
    assert second["provenance"]["captions"]["path"] == f"{server.url}/captions"
    for manifest in (first, second):  # the shards' own paths: local/ and remote/
        manifest["shards"] = [{**e, "path": Path(e["path"]).name} for e in manifest["shards"]]
    assert {k: v for k, v in first.items() if k != "provenance"} == {k: v for k, v in second.items()
                                                                      if k != "provenance"}
    for shard in committed_shards(data["images"]):
        rows = read_index(shard.index_path)
        kept = rows.filter((pl.col("status") == "ok") & (pl.col("width") >= 100))
        assert sent.get(f"/images/{shard.tar_path.name}", 0) == kept["tar_length"].sum()


def test_kill_and_rerun_equals_a_clean_run(data, vaes, tmp_path: Path):
    # Same thread count in every run: float sums in the convolutions depend on it.
    env = {"OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    run_cli(*_cli(data, vaes["flux2"], clean, tmp_path / "m1"), env=env)
    killed = tmp_path / "killed"
    kills = kill_at(_cli(data, vaes["flux2"], killed, tmp_path / "m2"), killed, (1,), env=env)
    assert kills >= 1
    run_cli(*_cli(data, vaes["flux2"], killed, tmp_path / "m2"), env=env)
    assert snapshot(killed) == snapshot(clean)
    a = json.loads((tmp_path / "m1" / "long.json").read_text())
    b = json.loads((tmp_path / "m2" / "long.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_stats_show_the_manifests(data, vaes, tmp_path: Path):
    out = tmp_path / "latents"
    run_cli(*_cli(data, vaes["flux"], out, tmp_path / "m"))
    stats = run_cli("stats", str(out)).stdout
    assert "no_caption" in stats and "long.json" in stats


@pytest.mark.parametrize("store", ["http", "s3"])
def test_latents_written_to_a_url_by_two_workers_are_a_local_runs(data, vaes, tmp_path: Path, monkeypatch,
                                                                   request, store: str):
    """`curate encode-latents ... --out s3://bucket/latents` with two workers that share no folder:
    each uploads its own shards (tar, then index), the second to end finishes the stage there, and
    what is stored is the local run's; the manifests name the shards by their URLs, and check. Both
    an HTTP server that takes PUT and a real S3 API (moto's server, through s3fs) on 127.0.0.1."""
    import contextlib

    from file_server import serve

    from curate.runner import WorkerShare

    monkeypatch.setenv("KILN_STAGING", str(tmp_path / "staging"))
    local = tmp_path / "local"
    run_stage(encode_stage(data, vaes["flux2"], local, tmp_path / "m1"), local, progress=False)
    www = tmp_path / "www"
    with serve(www) if store == "http" else contextlib.nullcontext() as server:
        out = f"{server.url}/latents" if store == "http" else f"{request.getfixturevalue('s3_bucket')}/latents"
        first = run_stage(encode_stage(data, vaes["flux2"], out, tmp_path / "m2"), out,
                          share=WorkerShare(0, 2), progress=False)
        assert first.processed == [0, 2] and not first.complete and stage_record(out) is None
        second = run_stage(encode_stage(data, vaes["flux2"], out, tmp_path / "m2"), out,
                           share=WorkerShare(1, 2), progress=False)
        assert second.processed == [1] and second.complete
        if server:
            assert server.puts == 3 * 2 + 1 + 2  # a tar and an index per shard, _stage.json, each worker's probe
        manifest = load_manifest(tmp_path / "m2" / "long.json", check_checksums=True)
        assert [e.path for e in manifest.shards] == [f"{out}/{n:06d}.tar" for n in range(3)]
        # Rerun with the manifests to the store as well (any worker may be the one that writes them):
        # they name the shards relative to themselves, as in a folder, and train from there.
        at = out.rsplit("/", 1)[0] + "/manifests"
        again = run_stage(encode_stage(data, vaes["flux2"], out, at), out, progress=False)
        assert again.processed == [] and again.complete
        there = load_manifest(f"{at}/long.json", check_checksums=True)
        assert [e.path for e in there.shards] == [f"../latents/{n:06d}.tar" for n in range(3)]
        assert check_data(there, f"{at}/long.json").samples == manifest.samples
        with pytest.raises(CurateError, match="give --out a URL too"):
            encode_stage(data, vaes["flux2"], tmp_path / "here", at)
        if store == "s3":
            download(out, www / "latents")
    assert snapshot(www / "latents") == snapshot(local)
    assert json.loads((www / "latents" / "_stage.json").read_text())["totals"] == \
        json.loads((local / "_stage.json").read_text())["totals"]
    a, b = (json.loads((tmp_path / m / "long.json").read_text()) for m in ("m1", "m2"))
    assert b["provenance"]["latents"]["path"] == out
    for manifest in (a, b):
        manifest["shards"] = [{**e, "path": Path(e["path"]).name} for e in manifest["shards"]]
        del manifest["provenance"]["latents"]["path"]
    assert a == b
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]  # staged copies are gone


def test_killed_and_rerun_into_a_url_equals_a_clean_run(data, vaes, tmp_path: Path):
    from file_server import serve

    env = {"OMP_NUM_THREADS": "1", "KILN_STAGING": str(tmp_path / "staging")}
    clean = tmp_path / "clean"
    run_cli(*_cli(data, vaes["flux"], clean, tmp_path / "m1"), env=env)
    www = tmp_path / "www"
    with serve(www) as server:
        args = _cli(data, vaes["flux"], tmp_path / "x", tmp_path / "m2")
        args[args.index("--out") + 1] = f"{server.url}/killed"
        kills = kill_at(args, www / "killed", (1, 2), env=env)
        assert kills >= 1
        run_cli(*args, env=env)
    assert snapshot(www / "killed") == snapshot(clean)
    assert not list((www / "killed").glob(".*"))  # no upload was left half done

