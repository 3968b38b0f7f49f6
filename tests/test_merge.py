"""Merged manifests (`curate manifest A.json B.json:2`): one run over several datasets, each with
its own caption selection, image stage and repeat; what may not be merged is refused by name."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from latent_data import (
    add_image_stage,
    add_text_shards,
    caption_text,
    make_latent_dataset,
    sample_key,
    step_keys,
)

from curate.cli import main as curate_main
from curate.manifest import (
    ManifestError,
    image_stages,
    load_manifest,
    merge_manifests,
    parse_merge_source,
    write_manifest,
)
from eval.evalset import choose_samples, images_dir_of, real_images
from train.data import DataError, DataSettings, LatentLoader, check_data, fingerprint

# Dataset a: 3 shards of 4 samples with long and short captions; dataset b: 2 shards of 3 with long only.
A_SAMPLES, B_SAMPLES = 12, 6


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("merge")
    a = make_latent_dataset(root / "a", shards=3, per_shard=4, variants=("long", "short"), seed=0)
    b = make_latent_dataset(root / "b", shards=2, per_shard=3, variants=("long",), seed=1)
    a["images"], b["images"] = add_image_stage(a, seed=0), add_image_stage(b, seed=1)
    return {"a": a, "b": b, "root": root}


@pytest.fixture(scope="module")
def merging(datasets) -> tuple[Path, str]:
    """a's short captions once and b's long captions twice an epoch, written in a third folder;
    what the command printed."""
    out = datasets["root"] / "mixes" / "mixed.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert curate_main(["manifest", f"a={datasets['a']['short']}", f"b={datasets['b']['long']}:2",
                            "--name", "mixed", "--out", str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture
def merged(merging) -> Path:
    return merging[0]


def one_epoch(path: Path, **kw) -> list:
    """Every sample of an epoch as (key, variant, caption, latent), through one stream."""
    manifest = load_manifest(path)
    st = DataSettings(seed=5, global_batch=2, micro_batch=2, workers=0, shuffle_buffer=4)
    out = []
    with LatentLoader(manifest, path, st, **kw) as loader:
        for batch, _ in zip(loader, range(manifest.samples // 2), strict=False):
            for m in batch.micro:
                out += [(k, v, c, m.latents[i]) for i, (k, v, c) in enumerate(zip(m.keys, m.variants, m.captions,
                                                                                   strict=True))]
    return out


def test_merging_lists_each_dataset_as_a_part_with_its_selection_and_repeat(datasets, merging):
    merged, printed = merging
    manifest = load_manifest(merged, check_files=True)
    assert [(p.name, p.shards, p.samples, p.repeat, p.captions) for p in manifest.parts] == [
        ("a", 3, A_SAMPLES, 1, {"short": 1.0}), ("b", 4, 2 * B_SAMPLES, 2, {"long": 1.0})]
    assert manifest.samples == A_SAMPLES + 2 * B_SAMPLES
    assert manifest.captions == {"short": 0.5, "long": 0.5}  # the epoch's mean selection
    assert manifest.parts[0].provenance["images"]["path"] == str(datasets["a"]["images"].resolve())
    assert manifest.parts[1].provenance["manifest"]["path"] == str(datasets["b"]["long"].resolve())
    assert image_stages(manifest) == [datasets["a"]["images"].resolve(), datasets["b"]["images"].resolve()]
    assert ("part a: 12 samples, 50.0% of an epoch\n    short: weight 1, 12 of 12 samples have it\n"
            "  part b: 6 samples x 2, 50.0% of an epoch\n    long: weight 1, 12 of 12 samples have it") in printed
    # check_data reads both datasets and reports the union of their captions.
    summary = check_data(manifest, merged, verify="checksums", images=image_stages(manifest))
    assert summary.samples == 24 and summary.captions == {"long": 2 * B_SAMPLES + A_SAMPLES, "short": A_SAMPLES}


def test_an_epoch_reads_each_part_by_its_repeat_with_its_own_captions(merged):
    epoch = one_epoch(merged)
    counts = Counter(key for key, *_ in epoch)
    a_keys = {sample_key(0, i) for i in range(A_SAMPLES)}
    b_keys = {sample_key(1, i) for i in range(B_SAMPLES)}
    assert counts == Counter({**{k: 1 for k in a_keys}, **{k: 2 for k in b_keys}})
    for key, variant, caption, _ in epoch:
        if key in a_keys:
            assert variant == "short" and caption == caption_text("short", [sample_key(0, i) for i in
                                                                            range(A_SAMPLES)].index(key))
        else:
            assert variant == "long"
    # The two readings of a repeated sample draw their own latent from its stored distribution.
    latents: dict[str, list[torch.Tensor]] = {}
    for key, _, _, latent in epoch:
        latents.setdefault(key, []).append(latent)
    for key in b_keys:
        first, second = latents[key]
        assert not torch.equal(first, second)
        assert (first - second).abs().max() < 1.0  # the same mean, two draws of std ~0.075


def test_a_merged_run_resumes_onto_the_same_batches(merged):
    st = DataSettings(seed=1, global_batch=4, micro_batch=2, workers=0, shuffle_buffer=3)
    full = step_keys(merged, st, 0, 14)
    assert step_keys(merged, st, 5, 9) == full[5:] and step_keys(merged, st, 11, 3) == full[11:]


def test_the_fingerprint_holds_the_parts_selections_only_for_merged_manifests(datasets, merged):
    st = DataSettings(seed=0, global_batch=2, micro_batch=2)
    plain = fingerprint(st, load_manifest(datasets["a"]["long"]))
    assert "part_captions" not in plain  # checkpoints of unmerged manifests keep resuming
    assert fingerprint(st, load_manifest(merged))["part_captions"] == [{"short": 1.0}, {"long": 1.0}]


def test_a_part_selecting_a_caption_its_samples_lack_is_named(merged, tmp_path: Path):
    data = json.loads(merged.read_text())
    data["parts"][1]["captions"] = {"short": 1.0}
    edited = merged.parent / "edited.json"
    edited.write_text(json.dumps(data))
    try:
        with pytest.raises(DataError, match=r"'parts.1.captions' selects 'short', but no sample of part 'b'"):
            check_data(load_manifest(edited), edited)
    finally:
        edited.unlink()


def test_the_loader_reads_each_parts_originals_from_its_own_image_stage(datasets, merged):
    manifest = load_manifest(merged)
    settings = DataSettings(seed=0, global_batch=2, micro_batch=2, workers=0, shuffle_buffer=4)
    with LatentLoader(manifest, merged, settings, images=image_stages(manifest)) as loader:
        batch = next(iter(loader))
    assert batch.micro[0].images.shape == (2, 3, 32, 32)
    swapped = [datasets["b"]["images"], datasets["a"]["images"]]
    with pytest.raises(DataError, match="lacks sample"):
        check_data(manifest, merged, images=swapped)
    with pytest.raises(ManifestError, match="merges 2 datasets, each with its own image stage: name the parts"):
        image_stages(manifest, datasets["a"]["images"], option="repa.images=DIR")
    # A part's stage that moved is named by the part.
    moved = merged.parent / "b-images-moved"
    shutil.copytree(datasets["b"]["images"], moved)
    assert image_stages(manifest, f"b={moved}") == [datasets["a"]["images"].resolve(), moved]
    with pytest.raises(ManifestError, match=r"\(parts: a, b\)"):
        image_stages(manifest, f"c={moved}")


def test_each_parts_originals_are_cropped_to_their_own_buckets(tmp_path: Path):
    """A dataset encoded without buckets (its 3:2 originals centre-cropped to squares) merged with a
    bucketed one: the merged manifest lists both parts' buckets, but REPA's loader crops each original
    as its own encode-latents did, to the bucket its index records, not to the closest of the union."""
    square = make_latent_dataset(tmp_path / "square", shards=1, per_shard=4, sizes=[(4, 4)], seed=0)
    wide = make_latent_dataset(tmp_path / "wide", shards=1, per_shard=4, sizes=[(4, 4), (4, 6)], seed=1)
    add_image_stage(square, seed=0, original=lambda h, w: (h, w * 3 // 2))
    add_image_stage(wide, seed=1)
    out = tmp_path / "mixed.json"
    assert curate_main(["manifest", f"square={square['long']}", f"wide={wide['long']}", "--name", "m",
                        "--out", str(out)]) == 0
    assert load_manifest(out).latent.buckets == [(32, 32), (32, 48)]

    def images(path: Path, steps: int) -> dict[str, torch.Tensor]:
        manifest = load_manifest(path)
        settings = DataSettings(seed=0, global_batch=4, micro_batch=4, workers=0, shuffle_buffer=8)
        with LatentLoader(manifest, path, settings, images=image_stages(manifest)) as loader:
            return {k: m.images[i] for batch, _ in zip(loader, range(steps), strict=False) for m in batch.micro
                    for i, k in enumerate(m.keys)}

    alone, mixed = images(square["long"], 1), images(out, 4)
    assert len(alone) == 4 and set(alone) <= set(mixed)
    assert all(torch.equal(mixed[k], alone[k]) and alone[k].shape == (3, 32, 32) for k in alone)


def test_evaluation_takes_each_sample_once_with_its_parts_caption_and_original(merged):
    manifest = load_manifest(merged)
    evalset = choose_samples(manifest, merged, 100, seed=0)
    assert len(evalset) == A_SAMPLES + B_SAMPLES  # the repeated part's samples once
    assert {s.part for s in evalset} == {0, 1}
    assert all(s.variant == ("short" if s.part == 0 else "long") for s in evalset)
    images = torch.cat(list(real_images(evalset, images_dir_of(manifest), 32, batch_size=5)))
    assert images.shape == (A_SAMPLES + B_SAMPLES, 3, 32, 32)


def test_stats_and_another_selection_of_a_merged_manifest(merged, capsys):
    assert curate_main(["stats", str(merged)]) == 0
    printed = capsys.readouterr().out
    assert "part      b: 6 samples in 2 shards x 2, 50.0% of an epoch; captions long 1" in printed
    assert "merged_from" in printed
    assert curate_main(["manifest", str(merged), "--captions", "long=1", "--name", "all-long"]) == 0
    relabelled = load_manifest(merged.parent / "all-long.json", check_files=True)
    assert [p.captions for p in relabelled.parts] == [{"long": 1.0}, {"long": 1.0}]
    assert relabelled.shards == load_manifest(merged).shards


def test_a_merged_manifest_merges_again_its_parts_kept_and_repeats_multiplied(datasets, merged, tmp_path: Path):
    again = merge_manifests([(None, merged, 3), ("extra", datasets["a"]["long"], 1)], name="again",
                            out=tmp_path / "again.json")
    assert [(p.name, p.repeat, p.samples) for p in again.parts] == [
        ("a", 3, 3 * A_SAMPLES), ("b", 6, 6 * B_SAMPLES), ("extra", 1, A_SAMPLES)]
    # The original dataset's manifest stays the provenance of a part merged twice.
    assert again.parts[1].provenance["manifest"]["path"] == str(datasets["b"]["long"].resolve())
    write_manifest(again, tmp_path / "again.json")
    assert load_manifest(tmp_path / "again.json", check_files=True).samples == 4 * A_SAMPLES + 6 * B_SAMPLES


def test_merged_text_shards_stay_parallel_to_the_latent_shards(tmp_path: Path):
    root = tmp_path / "text"
    a = make_latent_dataset(root / "a", shards=2, per_shard=3, variants=("long", "short"), seed=0)
    b = make_latent_dataset(root / "b", shards=1, per_shard=4, variants=("long",), seed=1)
    a_text = add_text_shards(a, root / "encoder", dim=8, max_tokens=16)
    b_text = add_text_shards(b, root / "encoder", dim=8, max_tokens=16)
    out = root / "m" / "mixed.json"
    assert curate_main(["manifest", f"a={a_text['short']}", f"b={b_text['long']}:2", "--name", "m",
                        "--out", str(out)]) == 0
    manifest = load_manifest(out, check_files=True)
    assert len(manifest.text.shards) == len(manifest.shards) == 4
    assert manifest.text.variants == ["long", "short", "orig"]
    check_data(manifest, out)
    epoch = one_epoch(out)
    assert len(epoch) == 6 + 8
    # Text and latents of different kinds do not merge.
    with pytest.raises(ManifestError, match="lists text shards .* but .* does not"):
        merge_manifests([("a", a_text["long"], 1), ("b", b["long"], 1)], name="x", out=out)


def test_what_cannot_be_merged_is_refused_by_name(datasets, tmp_path: Path, capsys, monkeypatch):
    wide = make_latent_dataset(tmp_path / "wide", shards=1, per_shard=2, channels=32, seed=2)
    with pytest.raises(ManifestError, match=r"latents differ .* in channels \(32 against 16\)"):
        merge_manifests([(None, datasets["a"]["long"], 1), (None, wide["long"], 1)], name="x", out=tmp_path / "x.json")
    # Two manifests of the same name need part names.
    code = curate_main(["manifest", str(datasets["a"]["long"]), str(datasets["b"]["long"]), "--name", "x",
                        "--out", str(tmp_path / "x.json")])
    assert code != 0 and "NAME=PATH" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    # A selection some part's text shards never encoded, a repeat that is no count, nothing to do.
    for text in ("a.json:0", "a.json:two"):
        with pytest.raises(ManifestError, match="REPEAT a whole number"):
            parse_merge_source(text)
    assert parse_merge_source("cc12m=data/m.json:4") == ("cc12m", "data/m.json", 4)
    assert parse_merge_source("data/x=y/m.json") == (None, "data/x=y/m.json", 1)
    partition = tmp_path / "date=2024" / "long.json"  # a data lake's partition folder, named relative to here
    partition.parent.mkdir()
    partition.write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert parse_merge_source("date=2024/long.json:2") == (None, "date=2024/long.json", 2)
    assert parse_merge_source("date=2024/long.json") == (None, "date=2024/long.json", 1)
    assert parse_merge_source("web=long.json") == ("web", "long.json", 1)
    assert curate_main(["manifest", str(datasets["a"]["long"]), "--name", "same"]) != 0
    assert "give --captions" in capsys.readouterr().err
    # A selection that a part's samples never have, as training would refuse it.
    code = curate_main(["manifest", f"a={datasets['a']['long']}", f"b={datasets['b']['long']}", "--captions",
                        "short=1", "--name", "x", "--out", str(tmp_path / "x.json")])
    assert code != 0 and "no sample of part 'b'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_encode_text_sends_a_merged_manifest_back_to_its_datasets(datasets, merged, tmp_path: Path, capsys):
    code = curate_main(["encode-text", str(datasets["a"]["latents"]), "--out", str(tmp_path / "text"),
                        "--text-encoder", "unused", "--manifests", str(merged), "--device", "cpu"])
    assert code == 2 and "merges 2 datasets: run encode-text on each dataset's latents" in capsys.readouterr().err


def test_a_part_whose_images_moved_is_named(merged, tmp_path: Path):
    data = json.loads(merged.read_text())
    data["parts"][1]["provenance"]["images"]["path"] = str(tmp_path / "gone")
    edited = merged.parent / "moved.json"
    edited.write_text(json.dumps(data))
    try:
        with pytest.raises(ManifestError, match="gone does not exist"):
            image_stages(load_manifest(edited))
    finally:
        edited.unlink()
