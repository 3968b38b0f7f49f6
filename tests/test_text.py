"""The text encoder: a tiny T5Gemma of the real class, loaded by path, encoding as PRXPipeline does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from curate.text import TextEncoder, TextEncoderError, clean_caption
from curate.tiny import MARKER_NAME, build_tiny_t5gemma, read_marker
from curate.tiny import main as tiny_main

LONG = " ".join(["a red cube on a wooden table next to a window"] * 60)  # ~600 tokens
MESSY = "Visit https://example.com/x.jpg for A RED Cube &amp; more!!! @someone <person> ***SALE***"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def t5gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5gemma(tmp_path_factory.mktemp("text") / "t5gemma")


@pytest.fixture(scope="session")
def text(t5gemma_dir: Path) -> TextEncoder:
    return TextEncoder.load(str(t5gemma_dir))


def test_tiny_t5gemma_is_the_class_prx_loads_and_is_idempotent(t5gemma_dir: Path, tmp_path: Path):
    from diffusers.pipelines.prx import T5GemmaEncoder as PRXLoader
    from transformers import AutoTokenizer

    marker = read_marker(t5gemma_dir)
    assert marker["spec"]["builder"] == "t5gemma"
    assert marker["info"]["class"] == "T5GemmaEncoder"
    assert 32 <= marker["info"]["hidden_size"] <= 64
    stamp = (t5gemma_dir / MARKER_NAME).stat().st_mtime_ns
    assert build_tiny_t5gemma(t5gemma_dir) == t5gemma_dir  # complete: returned as is
    assert (t5gemma_dir / MARKER_NAME).stat().st_mtime_ns == stamp

    # diffusers' PRX loader (["prx", "T5GemmaEncoder"]) reads the composite config's encoder.
    model = PRXLoader.from_pretrained(t5gemma_dir)
    assert model.config.hidden_size == marker["info"]["hidden_size"]
    assert model.config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(t5gemma_dir)
    assert tok.model_max_length == 256
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    ids = tok("a red cube on a wooden table")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) <= 8  # real subwords, not bytes
    assert tok.decode(ids, skip_special_tokens=True) == "a red cube on a wooden table"

    # The CLI entry builds the same weights (same seed).
    assert tiny_main(["t5gemma", str(tmp_path / "cli")]) == 0
    a = (t5gemma_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == a


def test_encode_shapes_mask_padding_and_frozen(text: TextEncoder):
    assert text.dim == 32 and text.max_tokens == 256 and text.dtype == torch.float32
    assert not text.model.training
    assert not any(p.requires_grad for p in text.model.parameters())

    emb, mask = text.encode(["a red cube", LONG, ""])
    assert emb.shape == (3, 256, 32) and emb.dtype == torch.float32 and not emb.requires_grad
    assert mask.shape == (3, 256) and mask.dtype == torch.bool
    ids, _ = text.tokenize(["a red cube"])
    assert mask[0].sum() == 4  # <bos> a ▁red ▁cube, padded to 256 (on the left, as Gemma pads)
    assert mask[1].all()  # truncated to 256
    assert mask[2].sum() == 1  # the empty prompt is <bos> alone: attention stays well defined
    assert ids[0, mask[0]].tolist()[0] == text.tokenizer.bos_token_id
    assert torch.isfinite(emb).all()

    # One caption's embedding does not depend on its batch.
    alone, _ = text.encode(["a red cube"])
    torch.testing.assert_close(alone[0], emb[0], rtol=1e-5, atol=1e-5)
    empty, empty_mask = text.encode([])
    assert empty.shape == (0, 256, 32) and empty_mask.shape == (0, 256)
    with pytest.raises(TypeError):
        text.encode("a red cube")


def test_encoding_equals_prx_pipeline(text: TextEncoder):
    """Same cleaning, tokens, mask and embeddings as PRXPipeline.encode_prompt; "" is its negative."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline, PRXTransformer2DModel
    from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor

    assert clean_caption(MESSY) == TextPreprocessor().clean_text(MESSY)
    assert clean_caption(MESSY) != MESSY  # lowercased, URL and handle gone
    assert text.clean([MESSY, "A Cat"]) == [clean_caption(MESSY), "a cat"]

    transformer = PRXTransformer2DModel(in_channels=16, context_in_dim=text.dim, hidden_size=64,
                                        num_heads=4, depth=1, axes_dim=[8, 8], mlp_ratio=2)
    pipe = PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                       text_encoder=text.model, tokenizer=text.tokenizer, vae=None)
    prompts = [MESSY, "a red cube", LONG]
    theirs, their_mask, negative, negative_mask = pipe.encode_prompt(
        prompts, device=torch.device("cpu"), do_classifier_free_guidance=True,
        tokenizer_max_length=text.max_tokens)
    ours, our_mask = text.encode(prompts)
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)
    assert torch.equal(our_mask, their_mask)
    empty, empty_mask = text.encode([""] * len(prompts))
    torch.testing.assert_close(empty, negative.float(), rtol=0, atol=1e-6)
    assert torch.equal(empty_mask, negative_mask)
    # Pre-cleaned captions (cleaned in data-loader workers) encode the same.
    pre, _ = text.encode([clean_caption(p) for p in prompts], clean=False)
    torch.testing.assert_close(pre, ours, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["encoder-decoder", "encoder-model"])
def test_full_t5gemma_checkpoints_load_only_the_encoder(text: TextEncoder, tmp_path: Path, layout: str):
    """google/t5gemma-2b-2b-ul2 is an encoder-decoder (model.encoder.*, model.decoder.*)."""
    from transformers import T5GemmaConfig, T5GemmaEncoderModel, T5GemmaForConditionalGeneration

    module = text.model.config.to_dict()
    if layout == "encoder-decoder":
        config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"])
        full = T5GemmaForConditionalGeneration(config)
        full.model.encoder.load_state_dict(text.model.state_dict())
    else:
        config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"],
                               is_encoder_decoder=False)
        full = T5GemmaEncoderModel(config)
        full.encoder.load_state_dict(text.model.state_dict())
    full.save_pretrained(tmp_path)
    text.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder.load(str(tmp_path))
    assert type(loaded.model).__name__ == "T5GemmaEncoder"
    assert not any("decoder" in name for name, _ in loaded.model.named_parameters())
    captions = ["a red cube", ""]
    torch.testing.assert_close(loaded.encode(captions)[0], text.encode(captions)[0], rtol=0, atol=0)


def test_pipeline_layout_from_the_hub_records_the_commit(text: TextEncoder, t5gemma_dir: Path,
                                                        tmp_path: Path, monkeypatch):
    """A Hub id is fetched with snapshot_download (text-encoder files only, at the revision); a
    PRX pipeline repository's text_encoder/ and tokenizer/ are used."""
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "0123abcd"
    (snapshot / "model_index.json").parent.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    text.model.save_pretrained(snapshot / "text_encoder")  # a t5_gemma_module config this time
    text.tokenizer.save_pretrained(snapshot / "tokenizer")
    calls = []

    def fake_download(repo, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    loaded = TextEncoder.load("someone/prx-like", revision="main")
    assert loaded.id == "someone/prx-like" and loaded.revision == "0123abcd"
    repo, revision, patterns = calls[0]
    assert (repo, revision) == ("someone/prx-like", "main")
    assert "text_encoder/*" in patterns and not any("transformer" in p for p in patterns)
    torch.testing.assert_close(loaded.encode(["a cat"])[0], text.encode(["a cat"])[0], rtol=0, atol=0)

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(TextEncoderError, match="cannot fetch someone/other from the Hub"):
        TextEncoder.load("someone/other")


def test_bad_names_and_checkpoints_are_clear_errors(t5gemma_dir: Path, tmp_path: Path, monkeypatch):
    with pytest.raises(TextEncoderError, match="not a known text alias.*t5gemma"):
        TextEncoder.load("no such model")
    with pytest.raises(TextEncoderError, match="revision applies to Hub ids"):
        TextEncoder.load(str(t5gemma_dir), revision="main")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TextEncoderError, match="'bert' model"):
        TextEncoder.load(str(tmp_path))
    (tmp_path / "config.json").write_text((t5gemma_dir / "config.json").read_text())
    with pytest.raises(TextEncoderError, match="no safetensors weights"):
        TextEncoder.load(str(tmp_path))

    from diffusers.pipelines.prx import pipeline_prx

    from curate import text as text_module

    monkeypatch.setattr(pipeline_prx, "ftfy", None, raising=False)
    text_module._preprocessor.cache_clear()  # built once per process; rebuild without ftfy
    try:
        with pytest.raises(TextEncoderError, match="pip install ftfy"):
            TextEncoder.load(str(t5gemma_dir))
    finally:
        text_module._preprocessor.cache_clear()
