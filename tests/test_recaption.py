"""The recaption stage: QA and retries with a scripted captioner, then the real paths
(tiny Qwen2-VL through transformers, the openai backend) through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from conftest import kill_at, run_cli, snapshot, write_good_images

from curate.captioners.base import Captioner, CaptionRequest, Generation, Sampling
from curate.ingest import IngestStage
from curate.prompts import load_prompts
from curate.recaption import CaptionSettings, RecaptionStage, summarize_captions
from curate.runner import STAGE_FILE, CurateError, WorkerShare, run_stage
from curate.shards import committed_shards, read_index
from curate.sources import open_source

GOOD_LONG = (
    "A red ceramic mug sits on a weathered oak table beside a folded linen napkin, lit by soft morning light "
    "from a window on the left. Steam rises from the coffee inside, and the mug's glaze shows small crackles "
    "near the rim. Behind it, out of focus, a bookshelf holds rows of paperbacks in muted blues and greens. "
    "The composition is centred, with shallow depth of field and warm colour grading, like a lifestyle "
    "photograph for a cafe menu. A handwritten label on the mug reads \"MONDAY\" in white letters."
)
GOOD_SHORT = "A red ceramic mug of coffee on an oak table."


class ScriptedCaptioner(Captioner):
    """Answers from a script keyed by (image number, variant, attempt); records every request."""

    backend = "scripted"
    model_id = "scripted/model"
    revision = "abc123"

    def __init__(self, script: dict[tuple[int, str, int], tuple[str, str]], numbering: dict[str, int]):
        self.script, self.numbering, self.calls = script, numbering, []

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        out = []
        for r in requests:
            key, variant = r.key.split("/")
            attempt = 0 if r.sampling.seed < 1000 else r.sampling.seed // 1000
            self.calls.append((self.numbering[key], variant, attempt, r.sampling, r.image.size, r.prompt))
            default = (GOOD_LONG if variant == "long" else GOOD_SHORT, "stop")
            text, finish = self.script.get((self.numbering[key], variant, attempt), default)
            out.append(Generation(text=text, finish_reason=finish, tokens=len(text.split())))
        return out


@pytest.fixture
def images(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i, p in enumerate(write_good_images(src, 6, size=(400, 300))):
        p.with_suffix(".txt").write_text(f"alt text {i}")
    out = tmp_path / "images"
    run_stage(IngestStage(open_source(str(src)), out, shard_size=4), out, progress=False)
    return out


def rows_without_timing(stage: Path) -> dict:
    """Every index row of every shard, less the seconds each took (the only field that varies)."""
    return {k: [{c: v for c, v in r.items() if c != "seconds"} for r in rows]
            for k, (_, rows, _, _) in snapshot(stage).items()}


def numbering(images: Path) -> dict[str, int]:
    rows = pl.concat([read_index(s.index_path) for s in committed_shards(images)])
    return {k: int(s.split("_")[1].split(".")[0]) for k, s in zip(rows["key"], rows["source"], strict=True)}


def recaption(images: Path, out: Path, captioner: Captioner, retries: int = 2, **kwargs):
    settings = CaptionSettings(prompts=load_prompts([], ["long", "short"]), sampling=Sampling(seed=7),
                               max_pixels=200 * 150, retries=retries, **kwargs)
    stage = RecaptionStage(images, "scripted/model", lambda: captioner, settings, chunk_images=3,
                           decode_workers=0)
    return run_stage(stage, out, progress=False)


def test_every_qa_flag_and_retry_path(images: Path, tmp_path: Path):
    n = numbering(images)
    script = {
        (0, "long", 0): ("I'm sorry, but I can't help with identifying this image.", "stop"),  # refusal, then fine
        (1, "short", 0): ("The image shows a red mug on a table.", "stop"),  # boilerplate stripped, accepted
        (2, "long", 0): ("a mug " * 80, "stop"),  # repetition
        (2, "long", 1): ("a mug " * 80, "stop"),
        (2, "long", 2): ("a mug " * 80, "stop"),  # still failing after 2 retries: rejected
        (3, "long", 0): (GOOD_LONG[:300], "length"),  # truncated at the token limit
        (3, "short", 0): ("", "stop"),  # empty
        (4, "short", 0): (GOOD_LONG, "stop"),  # too long for short
        (4, "short", 1): ("Mug.", "stop"),  # too short
        (5, "long", 0): ("", "error"),  # backend error, then fine
    }
    captioner = ScriptedCaptioner(script, n)
    out = tmp_path / "captions"
    result = recaption(images, out, captioner)
    totals = result.summary["totals"]
    assert totals["seen"] == 6 and totals["ok"] == 5
    assert totals["reasons"] == {"long_repetition": 1}
    flags = totals["flags"]
    assert flags["long_retried"] == 4 and flags["short_retried"] == 2
    assert flags["short_boilerplate_stripped"] == 1
    assert flags["long_repetition"] == 1

    rows = {n[r["key"]]: r for s in committed_shards(out) for r in read_index(s.index_path).to_dicts()}
    assert rows[1]["short"] == "A red mug on a table."
    assert rows[2]["status"] == "rejected" and rows[2]["long"] is None
    assert rows[2]["long_failed_text"].startswith("a mug a mug") and rows[2]["long_retries"] == 2
    assert rows[2]["short"] == GOOD_SHORT  # the other variant is kept
    assert rows[0]["long"] == GOOD_LONG and rows[0]["long_retries"] == 1
    assert rows[4]["short_retries"] == 2
    assert rows[0]["model"] == "scripted/model" and rows[0]["revision"] == "abc123"
    assert rows[0]["long_prompt_hash"] != rows[0]["short_prompt_hash"]
    assert rows[0]["orig_caption"] == "alt text 0"
    assert json.loads(rows[0]["sampling"])["seed"] == 7

    # Retries used other seeds and a higher temperature; images were resized to the budget.
    attempts = {(i, v, a): s for i, v, a, s, _, _ in captioner.calls}
    assert attempts[(0, "long", 1)].seed != attempts[(0, "long", 0)].seed
    assert attempts[(0, "long", 1)].temperature > attempts[(0, "long", 0)].temperature
    assert all(w * h <= 200 * 150 for *_, (w, h), _ in [(c[0], c[1], c[2], c[3], c[4], c[5])
                                                        for c in captioner.calls])
    summary = result.summary["summary"]
    assert summary["long_captions"]["ok"] == 5 and summary["short_captions"]["ok"] == 6
    assert summary["short_captions"]["words_median"] > 3


@pytest.mark.parametrize("name", ["orig", "model"])
def test_a_variant_named_like_a_column_or_the_original_caption_is_refused(images: Path, tmp_path: Path, name: str):
    """`orig` is the original caption downstream (encode-latents' KEY.orig.txt, a manifest's `orig`
    weight): a caption variant of that name would be overwritten by the alt-text there."""
    prompts = tmp_path / "mine.json"
    prompts.write_text(json.dumps({"variants": {name: {"prompt": "Caption it.", "min_words": 1, "max_words": 40,
                                                       "max_new_tokens": 60}}}))
    settings = CaptionSettings(prompts=load_prompts([prompts], ["long", name]), sampling=Sampling())
    with pytest.raises(CurateError, match=f"caption variant names \\['{name}'\\] are reserved"):
        RecaptionStage(images, "scripted/model", lambda: ScriptedCaptioner({}, {}), settings)


def test_original_caption_is_context_only_when_asked(images: Path, tmp_path: Path):
    plain = ScriptedCaptioner({}, numbering(images))
    recaption(images, tmp_path / "a", plain)
    assert not any("alt text" in prompt for *_, prompt in plain.calls)
    with_orig = ScriptedCaptioner({}, numbering(images))
    recaption(images, tmp_path / "b", with_orig, use_orig_caption=True)
    assert all(f"alt text {i}" in prompt for i, *_, prompt in with_orig.calls)
    assert (tmp_path / "a" / STAGE_FILE).exists()
    # A different setting is a different stage config: nothing reused across them.
    assert json.loads((tmp_path / "a" / STAGE_FILE).read_text())["config_hash"] != \
        json.loads((tmp_path / "b" / STAGE_FILE).read_text())["config_hash"]


def test_rerun_skips_and_two_ranks_split_the_shards(images: Path, tmp_path: Path):
    n = numbering(images)
    one = tmp_path / "one"
    recaption(images, one, ScriptedCaptioner({}, n))
    captioner = ScriptedCaptioner({}, n)
    again = recaption(images, one, captioner)
    assert again.processed == [] and captioner.calls == []
    two = tmp_path / "two"
    settings = CaptionSettings(prompts=load_prompts([], ["long", "short"]), sampling=Sampling(seed=7),
                               max_pixels=200 * 150)
    results = []
    for rank in (0, 1):
        stage = RecaptionStage(images, "scripted/model", lambda: ScriptedCaptioner({}, n), settings,
                               chunk_images=3, decode_workers=0)
        results.append(run_stage(stage, two, share=WorkerShare(rank, 2), progress=False))
    assert results[0].processed == [0] and results[1].processed == [1] and results[1].complete
    assert rows_without_timing(one) == rows_without_timing(two)


def test_an_image_stage_at_a_url_captions_as_its_files(images: Path, tmp_path: Path):
    """`curate recaption http://.../images`: two decoding workers fetch their own samples over
    HTTP (each once); the captioner sees the same images, and the captions are the folder's."""
    from file_server import serve

    n = numbering(images)
    settings = CaptionSettings(prompts=load_prompts([], ["long", "short"]), sampling=Sampling(seed=7),
                               max_pixels=200 * 150)
    local, remote, uploaded = ScriptedCaptioner({}, n), ScriptedCaptioner({}, n), ScriptedCaptioner({}, n)
    run_stage(RecaptionStage(images, "scripted/model", lambda: local, settings, chunk_images=3, decode_workers=0),
              tmp_path / "local", progress=False)
    with serve(images.parent) as server:
        stage = RecaptionStage(f"{server.url}/images", "scripted/model", lambda: remote, settings, chunk_images=3,
                               decode_workers=2)
        run_stage(stage, tmp_path / "remote", progress=False)
        tars = {f"/images/{s.tar_path.name}": s.tar_path.stat().st_size for s in committed_shards(images)}
        assert {path: server.sent[path] for path in tars} == {  # every sample's bytes, once
            path: read_index(images / Path(path).with_suffix(".parquet").name)["tar_length"].sum() for path in tars}
        # Read over HTTP and written there too (each worker's shards uploaded as they are committed).
        written = run_stage(RecaptionStage(f"{server.url}/images", "scripted/model", lambda: uploaded, settings,
                                           chunk_images=3, decode_workers=2),
                            f"{server.url}/captions-uploaded", progress=False)
        timing = "generated_tokens_per_second_per_worker"
        assert written.complete and {**written.summary["summary"], timing: None} == \
            {**summarize_captions(tmp_path / "local"), timing: None}
    assert rows_without_timing(tmp_path / "remote") == rows_without_timing(tmp_path / "local")
    assert rows_without_timing(images.parent / "captions-uploaded") == rows_without_timing(tmp_path / "local")
    assert remote.calls == local.calls
    stage_file = json.loads((tmp_path / "remote" / STAGE_FILE).read_text())
    assert stage_file["provenance"]["images"] == f"{server.url}/images"


def test_incomplete_image_stage_is_refused(images: Path, tmp_path: Path):
    (images / STAGE_FILE).unlink()
    with pytest.raises(CurateError, match="run `curate ingest` to completion"):
        recaption(images, tmp_path / "c", ScriptedCaptioner({}, {}))


TEST_PROMPTS = {"variants": {"long": {"prompt": "Describe this image in detail.", "min_words": 1,
                                      "max_words": 400, "max_new_tokens": 12},
                             "short": {"prompt": "Name the main subject.", "min_words": 1, "max_words": 15,
                                       "max_new_tokens": 6}}}


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    from curate.tiny import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("vlm") / "qwen2-vl", tokenizer="small")


def _cli_args(images: Path, out: Path, model: Path, prompts: Path) -> list[str]:
    return ["recaption", str(images), "--out", str(out), "--model", str(model), "--backend", "transformers",
            "--prompts", str(prompts), "--batch-size", "4", "--decode-workers", "1", "--max-pixels", "40000",
            "--retries", "1", "--no-progress"]


def test_kill_and_rerun_equals_a_clean_run_with_the_tiny_model(tmp_path: Path, tiny_vlm: Path):
    src = tmp_path / "src"
    write_good_images(src, 24, size=(200, 150))
    images = tmp_path / "images"
    run_cli("ingest", str(src), "--out", str(images), "--shard-size", "4", "--workers", "1", "--no-progress")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(TEST_PROMPTS))
    env = {"OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean"
    run_cli(*_cli_args(images, clean, tiny_vlm, prompts), env=env)
    stats = run_cli("stats", str(clean), "--plot", str(tmp_path / "lengths.png"))
    assert "long captions: ok" in stats.stdout and (tmp_path / "lengths.png").stat().st_size > 1000

    killed = tmp_path / "killed"
    kills = kill_at(_cli_args(images, killed, tiny_vlm, prompts), killed, (1,), env=env)
    assert kills >= 1
    run_cli(*_cli_args(images, killed, tiny_vlm, prompts), env=env)

    assert rows_without_timing(killed) == rows_without_timing(clean)
    rows = pl.concat([read_index(s.index_path) for s in committed_shards(clean)])
    assert rows.height == 24 and rows["backend"].unique().to_list() == ["transformers"]


def test_openai_backend_through_the_cli_never_writes_the_api_key(images: Path, tmp_path: Path):
    from fake_openai_server import FakeOpenAIServer, Reply

    secret = "sk-test-DO-NOT-LEAK-0123456789"
    out = tmp_path / "captions"
    with FakeOpenAIServer(models=("served-vlm",)) as server:
        # Retried, then fine (on a caption request: the backend's check answers its own first).
        server.on("dense paragraph", Reply.http_error(429, retry_after="0"), Reply.http_error(500))
        server.on("In one sentence", Reply.refusal())  # the first short caption is refused, then retried
        proc = run_cli("-v", "recaption", str(images), "--out", str(out), "--backend", "openai",
                       "--endpoint", server.url, "--model", "served-vlm", "--api-key-env", "MY_VLM_KEY",
                       "--concurrency", "4", "--decode-workers", "1", "--no-progress",
                       env={"MY_VLM_KEY": secret})
        requests = server.chat_requests()
    assert all(r.headers.get("authorization") == f"Bearer {secret}" for r in requests)
    totals = json.loads((out / STAGE_FILE).read_text())["totals"]
    assert totals["seen"] == 6 and totals["flags"]["short_retried"] >= 1
    rows = pl.concat([read_index(s.index_path) for s in committed_shards(out)])
    assert rows["backend"].unique().to_list() == ["openai"] and rows["model"].unique().to_list() == ["served-vlm"]
    assert secret not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_openai_backend_with_a_wrong_model_name_fails_before_any_shard(images: Path, tmp_path: Path):
    from fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer(models=("served-vlm",)) as server:
        proc = run_cli("recaption", str(images), "--out", str(tmp_path / "c"), "--backend", "openai",
                       "--endpoint", server.url, "--model", "other-name", "--no-progress", check=False)
    assert proc.returncode == 2 and "served-vlm" in proc.stderr
    assert not list((tmp_path / "c").glob("*.parquet"))


def test_a_captioner_that_fails_mid_run_is_a_clear_error(images: Path, tmp_path: Path, capsys):
    """A backend that stops working after its check (a key revoked, the server gone) is the CLI's
    clear error with exit code 2, like one that fails at loading, not a traceback."""
    from fake_openai_server import FakeOpenAIServer, Reply

    from curate.cli import main

    with FakeOpenAIServer(models=("served-vlm",)) as server:
        server.on("dense paragraph", *[Reply.http_error(401, "key revoked")] * 20)
        code = main(["recaption", str(images), "--out", str(tmp_path / "c"), "--backend", "openai",
                     "--endpoint", server.url, "--model", "served-vlm", "--decode-workers", "0", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "curate: error:" in err and "HTTP 401" in err and "key revoked" in err
    assert not list((tmp_path / "c").glob("*.parquet"))


def test_rules_leave_images_out_before_the_model_and_encode_latents_leaves_them_out_too(images: Path,
                                                                                         tmp_path: Path):
    from curate.encode_latents import EncodeLatentsStage
    from curate.subset import SubsetRules
    from curate.tiny import build_tiny_flux_vae

    n = numbering(images)
    by_number = {i: k for k, i in n.items()}
    rows = pl.concat([read_index(s.index_path) for s in committed_shards(images)])
    # A score per source (the images' paths), as a scoring model would have written it.
    pl.DataFrame({"source": rows["source"], "aesthetic": [float(n[k]) for k in rows["key"]]}).write_parquet(
        tmp_path / "aesthetic.parquet")
    (tmp_path / "drop.txt").write_text(by_number[5] + "\n")
    rules = SubsetRules(where=["aesthetic >= 1", "caption <> 'alt text 3'"], scores=[tmp_path / "aesthetic.parquet"],
                        exclude=[tmp_path / "drop.txt"])
    captioner = ScriptedCaptioner({}, n)
    settings = CaptionSettings(prompts=load_prompts([], ["long", "short"]), sampling=Sampling(seed=7),
                               max_pixels=200 * 150)
    out = tmp_path / "captions"
    stage = RecaptionStage(images, "scripted/model", lambda: captioner, settings, chunk_images=3, decode_workers=0,
                           select=rules)
    assert run_stage(stage, out, progress=False).complete
    assert {number for number, *_ in captioner.calls} == {1, 2, 4}  # the model never saw 0, 3 and 5
    captions = pl.concat([read_index(s.index_path) for s in committed_shards(out)])
    left_out = captions.filter(pl.col("reason") == "filtered_out")
    assert dict(zip(left_out["key"], left_out["detail"], strict=True)) == {
        by_number[0]: "--where aesthetic >= 1", by_number[3]: "--where caption <> 'alt text 3'",
        by_number[5]: f"--exclude {tmp_path / 'drop.txt'}"}
    stage_file = json.loads((out / STAGE_FILE).read_text())
    assert stage_file["config"]["select"]["where"] == rules.where
    # Without rules the config has no "select": stages captioned before it existed keep their hash.
    assert "select" not in RecaptionStage(images, "m", lambda: captioner, settings).config()
    # encode-latents leaves them out too, even where it keeps images without a caption.
    vae = build_tiny_flux_vae(tmp_path / "vae")
    latents = tmp_path / "latents"
    run_stage(EncodeLatentsStage(images, out, latents, str(vae), resolution=64, batch_size=4, decode_workers=0,
                                 allow_missing_captions=True, manifest_dir=tmp_path / "manifests", device="cpu"),
              latents, progress=False)
    index = pl.concat([read_index(s.index_path) for s in committed_shards(latents)])
    assert set(index.filter(pl.col("reason") == "filtered_out")["key"]) == set(left_out["key"])
    assert index.filter(pl.col("status") == "ok").height == 3


def test_a_retry_samples_hotter_but_never_cooler_than_asked():
    from curate.captioners.base import Sampling

    assert [Sampling(temperature=0.0).for_attempt(a).temperature for a in range(4)] == [0.0, 0.7, 0.9, 1.1]
    assert Sampling(temperature=1.0).for_attempt(3).temperature == 1.2
    assert Sampling(temperature=1.5).for_attempt(1).temperature == 1.5  # was cooled to 1.2
