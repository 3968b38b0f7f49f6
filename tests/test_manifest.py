"""Manifests: validation that names the bad field, shard checks, pipe: refusal."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from curate.manifest import (
    ManifestError,
    file_sha256,
    load_manifest,
    parse_manifest,
    shard_urls,
    write_manifest,
)


def valid_manifest(tmp_path: Path) -> dict:
    shards = tmp_path / "latents"
    shards.mkdir(exist_ok=True)
    (shards / "000000.tar").write_bytes(b"a" * 1024)
    (shards / "000001.tar").write_bytes(b"b" * 1024)
    return {
        "version": 1,
        "name": "demo-long",
        "shards": [
            {"path": "latents/000000.tar", "samples": 3, "sha256": file_sha256(shards / "000000.tar")},
            {"path": "latents/000001.tar", "samples": 2, "sha256": file_sha256(shards / "000001.tar")},
        ],
        "samples": 5,
        "latent": {
            "vae": "flux2", "vae_id": "black-forest-labs/FLUX.2-dev", "vae_class": "AutoencoderKLFlux2",
            "revision": None, "channels": 32, "downsample": 8, "stored": "dist", "dtype": "bfloat16",
            "normalization": {"kind": "batchnorm", "patch_size": 2, "mean": [0.0] * 128, "var": [1.0] * 128},
            "resolution": 256, "buckets": [[256, 256], [192, 320]],
        },
        "captions": {"long": 1.0},
        "provenance": {"images": "DATA/images"},
    }


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data))
    return path


def test_valid_manifest_loads_and_resolves_relative_paths(tmp_path: Path):
    path = write(tmp_path, valid_manifest(tmp_path))
    m = load_manifest(path, check_files=True, check_checksums=True)
    assert m.latent.channels == 32 and m.latent.buckets == [(256, 256), (192, 320)]
    assert shard_urls(m, path) == [str(tmp_path / "latents" / "000000.tar"), str(tmp_path / "latents" / "000001.tar")]
    # Round trip through write_manifest.
    again = load_manifest(write_manifest(m, tmp_path / "copy.json"))
    assert again == m


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        (lambda d: d["latent"].pop("channels"), "latent.channels", "Field required"),
        (lambda d: d["latent"].update(channels=0), "latent.channels", "greater than 0"),
        (lambda d: d["latent"].update(stored="sample"), "latent.stored", "'dist' or 'mean'"),
        (lambda d: d["latent"].update(dtype="int8"), "latent.dtype", "bfloat16"),
        (lambda d: d["latent"]["normalization"].update(var=[1.0]), "latent.normalization", "var has 1"),
        (lambda d: d["latent"].update(buckets=[[0, 256]]), "latent.buckets", "positive sides"),
        (lambda d: d.update(captions={"long": 0.5}), "captions", "sum to 1"),
        (lambda d: d.update(captions={"long": 1.5, "short": -0.5}), "captions", "positive"),
        (lambda d: d.update(captions={}), "captions", "at least one"),
        (lambda d: d.update(samples=7), "(top level)", "samples is 7 but the shards hold 5"),
        (lambda d: d["shards"][1].update(samples=-1), "shards.1.samples", "greater than or equal to 0"),
        (lambda d: d["shards"][0].update(sha256="xyz"), "shards.0.sha256", "pattern"),
        (lambda d: d.update(shards=[]), "shards", "at least 1"),
        (lambda d: d.update(typo_field=1), "typo_field", "Extra inputs"),
        (lambda d: d.pop("latent"), "latent", "Field required"),
    ],
)
def test_validation_errors_name_the_field(tmp_path: Path, edit, field: str, words: str):
    data = copy.deepcopy(valid_manifest(tmp_path))
    edit(data)
    with pytest.raises(ManifestError) as err:
        load_manifest(write(tmp_path, data))
    message = str(err.value)
    assert f"field '{field}'" in message, message
    assert words in message, message
    assert "long.json" in message


def test_unknown_version_is_named(tmp_path: Path):
    data = valid_manifest(tmp_path)
    data["version"] = 9
    with pytest.raises(ManifestError, match="field 'version'.*got 9"):
        parse_manifest(data, "m.json")


def test_missing_shard_and_checksum_mismatch(tmp_path: Path):
    path = write(tmp_path, valid_manifest(tmp_path))
    (tmp_path / "latents" / "000001.tar").write_bytes(b"changed")
    load_manifest(path, check_files=True)  # exists: fine without checksums
    with pytest.raises(ManifestError, match=r"shard 1 \(latents/000001.tar\) does not match its sha256"):
        load_manifest(path, check_checksums=True)
    (tmp_path / "latents" / "000000.tar").unlink()
    with pytest.raises(ManifestError, match=r"shard 0 \(latents/000000.tar\) does not exist"):
        load_manifest(path, check_files=True)


def test_pipe_urls_are_refused_unless_allowed(tmp_path: Path):
    data = valid_manifest(tmp_path)
    data["shards"][0]["path"] = "pipe:curl -s https://example.invalid/x.tar"
    path = write(tmp_path, data)
    with pytest.raises(ManifestError, match="field 'shards.0.path'.*runs a shell command"):
        load_manifest(path)
    assert load_manifest(path, allow_pipe=True).shards[0].path.startswith("pipe:")


def test_not_json_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "absent.json")


# ---- curate manifest: another caption selection of the same shards ----------------------------------


@pytest.fixture
def latents(tmp_path: Path) -> dict[str, Path]:
    """3 shards of 8; sample 2 has no short caption; the image stage holds an original caption
    for every other sample (12 of 24)."""
    import polars as pl
    from latent_data import add_image_stage, make_latent_dataset

    data = make_latent_dataset(tmp_path / "d", shards=3, per_shard=8, missing={2: ("short",)})
    images = add_image_stage(data)
    for index in sorted(images.glob("*.parquet")):
        df = pl.read_parquet(index)
        captions = [f"alt text {i}" if i % 2 == 0 else "" for i in range(df.height)]
        df.with_columns(pl.Series("caption", captions)).write_parquet(index)
    return data


def test_curate_manifest_writes_the_same_shards_with_other_caption_weights(tmp_path, latents, capsys):
    from curate.cli import main as curate_main

    out = tmp_path / "elsewhere" / "dalle3.json"
    assert curate_main(["manifest", str(latents["long"]), "--captions", "long=19,orig=1", "--name", "dalle3",
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "long: weight 0.95, 24 of 24 samples have it" in printed
    assert "orig: weight 0.05, 12 of 24 samples have it; the others fall back" in printed
    source, made = load_manifest(latents["long"]), load_manifest(out)
    assert made.name == "dalle3" and made.captions == pytest.approx({"long": 0.95, "orig": 0.05})
    assert [Path(u).resolve() for u in shard_urls(made, out)] == [Path(u).resolve() for u in
                                                                  shard_urls(source, latents["long"])]
    assert made.shards[0].path.startswith("../") and made.latent == source.latent
    assert made.provenance["captions_from"]["captions"] == {"long": 1.0}
    # What the trainer checks before a step accepts it.
    from train.data import check_data

    assert check_data(made, out, verify="checksums").samples == 24

    # Beside the source by default; a short caption that sample 2 lacks is counted.
    assert curate_main(["manifest", str(latents["long"]), "--captions", "short=1", "--name", "s"]) == 0
    assert "short: weight 1, 23 of 24 samples have it" in capsys.readouterr().out
    assert load_manifest(latents["long"].parent / "s.json").shards == source.shards


@pytest.mark.parametrize(("captions", "message"), [
    ("tags=1", "no sample of .* has a tags caption"), ("long=0", "VARIANT=WEIGHT pairs"),
    ("long", "VARIANT=WEIGHT pairs"), ("long=1,long=2", "each variant once")])
def test_curate_manifest_refuses_what_training_could_not_use(tmp_path, latents, capsys, captions, message):
    import re

    from curate.cli import main as curate_main

    assert curate_main(["manifest", str(latents["long"]), "--captions", captions, "--name", "x"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (latents["long"].parent / "x.json").exists()


def test_curate_manifest_refuses_a_manifest_whose_shards_are_not_there(tmp_path, latents, capsys):
    """A manifest copied away from its shards (its relative paths no longer resolve) is refused, not
    turned into another manifest of missing shards, alone or merged."""
    from curate.cli import main as curate_main

    moved = tmp_path / "deep" / "moved.json"
    moved.parent.mkdir()
    shutil.copy(latents["long"], moved)
    for argv in (["--captions", "long=1"], ["--hold-out", "1"], [str(latents["long"])]):
        assert curate_main(["manifest", str(moved), *argv, "--name", "x", "--out", str(tmp_path / "x.json")]) == 2
        assert "does not exist at" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_curate_manifest_keeps_text_shards_and_their_variants(tmp_path, latents, capsys):
    from curate.cli import main as curate_main
    from curate.manifest import TextSpec

    source = load_manifest(latents["long"])
    text = TextSpec(encoder="t5gemma", encoder_id="google/t5gemma-2b-2b-ul2", dim=8, max_tokens=16,
                    dtype="bfloat16", variants=["long", "short"], shards=source.shards)
    with_text = write_manifest(source.model_copy(update={"text": text}), latents["long"].parent / "long-text.json")
    assert curate_main(["manifest", str(with_text), "--captions", "long=1,short=1", "--name", "mix-text"]) == 0
    assert load_manifest(latents["long"].parent / "mix-text.json").text.variants == ["long", "short"]
    assert curate_main(["manifest", str(with_text), "--captions", "long=1,orig=1", "--name", "x"]) == 2
    assert "hold embeddings of long, short, not of orig" in capsys.readouterr().err
    assert curate_main(["manifest", str(with_text), "--captions", "long=1", "--name", "long-text"]) == 2
    assert "is a source manifest" in capsys.readouterr().err


def test_curate_stats_of_a_manifest(latents, capsys):
    from curate.cli import main as curate_main

    assert curate_main(["stats", str(latents["mix"])]) == 0
    out = capsys.readouterr().out
    assert "manifest: mix  24 samples in 3 shards" in out
    assert "buckets   32x32 (24)" in out
    assert "caption   long: weight 0.5, 24 of 24 samples have it" in out
    assert "caption   short: weight 0.5, 23 of 24 samples have it" in out
    assert "also      orig (12)" in out
    assert "from      images: " in out
    assert curate_main(["stats", str(latents["mix"]), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["caption_coverage"] == {"long": 24, "short": 23, "orig": 12} and stats["text"] is None


def test_curate_stats_measures_the_latents_as_the_denoiser_is_fed_them(latents, capsys):
    """--latents N: N samples spread over the manifest, drawn as training draws them (seeded), in
    model space; a spec that does not bring them near mean 0, std 1 is named, with the shift and
    scaling that would."""
    import torch
    from safetensors.torch import load

    from curate.cli import main as curate_main
    from curate.manifest import shard_urls
    from curate.shards import iter_tar_samples
    from curate.stats import latent_stats
    from curate.vae import sample_latent

    manifest = load_manifest(latents["long"])
    generator = torch.Generator().manual_seed(0)
    drawn = []
    for url in shard_urls(manifest, latents["long"]):
        for _, members in iter_tar_samples(url):
            stored = load(members["latent.safetensors"])
            drawn.append(sample_latent(stored["mean"][None], stored["std"][None], generator))
    every = torch.cat(drawn).double()
    stats = latent_stats(latents["long"], 1000)
    assert (stats["samples"], stats["of"], stats["drawn"]) == (24, 24, "mean + std * eps")
    assert abs(stats["model"]["mean"] - float(every.mean())) < 1e-4
    assert abs(stats["model"]["std"] - float(every.std(unbiased=False))) < 1e-4
    per_channel = every.std(dim=(0, 2, 3), unbiased=False)
    assert abs(stats["model"]["channel_std"][0] - float(per_channel.min())) < 1e-4
    assert abs(stats["model"]["channel_std"][1] - float(per_channel.max())) < 1e-4
    unit = stats["unit_scale"]
    rescaled = (every - unit["shift_factor"]) * unit["scaling_factor"]
    assert abs(float(rescaled.mean())) < 1e-3 and abs(float(rescaled.std(unbiased=False)) - 1) < 1e-3
    assert latent_stats(latents["long"], 5)["samples"] == 5  # spread over the shards: 0, 4, 9, 14, 19

    # The same shards under a spec that scales them by 3 and shifts them by 0.5 first.
    data = json.loads(latents["long"].read_text())
    data["latent"] |= {"scaling_factor": 3.0, "shift_factor": 0.5}
    scaled = latents["long"].with_name("scaled.json")
    scaled.write_text(json.dumps(data))
    assert curate_main(["stats", str(scaled), "--latents", "24"]) == 0
    out = capsys.readouterr().out
    assert "model in  24 of 24 samples (mean + std * eps, seed 0): mean -1." in out
    assert "note      the denoiser's inputs are not near mean 0, std 1 (the spec's shift_factor 0.5, " \
           "scaling_factor 3)" in out
    command = (f"curate manifest {scaled} --latent-shift {unit['shift_factor']} --latent-scaling "
               f"{unit['scaling_factor']} --name NAME")
    assert command in out
    assert curate_main(["stats", str(latents["long"]), "--latents", "24"]) == 0
    assert "note" not in capsys.readouterr().out

    # The command the note gives: the same shards, fed at unit scale, the VAE's own scale recorded.
    assert curate_main([*command.split()[1:-1], "unit"]) == 0
    assert "latents: (latent - " in capsys.readouterr().out
    unit_spec = load_manifest(scaled.with_name("unit.json")).latent
    assert (unit_spec.scaling_factor, unit_spec.shift_factor) == (unit["scaling_factor"], unit["shift_factor"])
    assert unit_spec.vae_scaling == (3.0, 0.5)
    measured = latent_stats(scaled.with_name("unit.json"), 1000)["model"]
    assert abs(measured["mean"]) < 1e-3 and abs(measured["std"] - 1) < 1e-3
    # Back to the VAE's own scale: nothing of its own recorded, the manifest as encode-latents wrote it.
    assert curate_main(["manifest", str(scaled.with_name("unit.json")), "--latent-scaling", "3",
                        "--latent-shift", "0.5", "--name", "back"]) == 0
    back = json.loads(scaled.with_name("back.json").read_text())["latent"]
    assert back == data["latent"] and "vae_scaling_factor" not in back
    assert curate_main(["stats", str(latents["latents"]), "--latents", "4"]) == 2
    assert "--latents measures a manifest's latents" in capsys.readouterr().err

    # FLUX.2's batch-norm statistics are its VAE's: no shift and scaling of a manifest's own is offered.
    normalised = json.loads(latents["long"].read_text())
    channels = normalised["latent"]["channels"] * 4
    normalised["latent"]["normalization"] = {"mean": [0.0] * channels, "var": [0.01] * channels}
    scaled.write_text(json.dumps(normalised))
    assert curate_main(["stats", str(scaled), "--latents", "24"]) == 0
    out = capsys.readouterr().out
    assert "batchnorm normalisation)" in out and "--latent-scaling" not in out
    assert "the batchnorm normalisation's statistics are the VAE's own" in out


def test_a_manifest_names_its_shards_relative_to_itself_within_a_bucket():
    from curate.manifest import rebase_shard_path, shard_path_for

    assert shard_path_for("s3://b/latents/000000.tar", "s3://b/manifests") == "../latents/000000.tar"
    assert shard_path_for("s3://b/latents/000000.tar", "s3://b/") == "latents/000000.tar"
    assert shard_path_for("s3://b/latents/000000.tar", "s3://other/manifests") == "s3://b/latents/000000.tar"
    assert shard_path_for("s3://b/latents/000000.tar", "manifests") == "s3://b/latents/000000.tar"
    assert shard_path_for("/data/latents/000000.tar", "/data/manifests") == "../latents/000000.tar"
    with pytest.raises(ValueError, match="a local file, which a manifest at s3://b/m cannot name"):
        shard_path_for("/data/latents/000000.tar", "s3://b/m")
    assert rebase_shard_path("../latents/000000.tar", "s3://b/manifests", "s3://b/m/sub") == \
        "../../latents/000000.tar"
    assert rebase_shard_path("../latents/000000.tar", "s3://b/manifests", "/here") == "s3://b/latents/000000.tar"
