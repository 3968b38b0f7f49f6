"""Manifests: validation that names the bad field, shard checks, pipe: refusal."""

from __future__ import annotations

import copy
import json
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
