"""The transformers captioning backend on tiny Qwen2-VL and Qwen2.5-VL checkpoints, loaded by path.

Also the vLLM backend's behaviour where vLLM cannot run (no vLLM, no GPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.captioners.base import CaptionerError, CaptionRequest, Generation, Sampling
from curate.captioners.transformers_backend import (
    TransformersCaptioner,
    chat_messages,
    default_device,
    request_seed,
)
from curate.tiny import build_tiny_qwen2_vl

VARIANTS = ("qwen2-vl", "qwen2.5-vl")
GREEDY = Sampling(temperature=0.0, max_new_tokens=12)
SAMPLED = Sampling(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=7)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spinning threads slow a tiny generate down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vlm")
    return {v: build_tiny_qwen2_vl(root / v, variant=v, tokenizer="small") for v in VARIANTS}


@pytest.fixture(scope="module", params=VARIANTS)
def captioner(request: pytest.FixtureRequest, folders: dict[str, Path]) -> TransformersCaptioner:
    cap = TransformersCaptioner(str(folders[request.param]), batch_size=4)
    yield cap
    cap.close()


def noise(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


SIZES = [(256, 256), (320, 200), (100, 180), (64, 64), (200, 320), (140, 140)]
PROMPTS = [
    "Describe this image in detail.",
    "One sentence.",
    "List the objects you see, comma separated",
    "Style?",
    "Describe the lighting, colours and composition of this picture.",
    "What is in the picture?",
]


def make_requests(sampling: Sampling, n: int = 6) -> list[CaptionRequest]:
    return [
        CaptionRequest(
            key=f"{i:04d}-{'long' if i % 2 else 'short'}",
            variant="long" if i % 2 else "short",
            image=noise(i, SIZES[i % len(SIZES)]),
            prompt=PROMPTS[i % len(PROMPTS)],
            sampling=sampling,
            system="You write alt-text." if i == 2 else None,
        )
        for i in range(n)
    ]


def one_at_a_time(cap: TransformersCaptioner, requests: list[CaptionRequest]) -> list[Generation]:
    return [cap.generate([r])[0] for r in requests]


# ------------------------------------------------------------------------ generation


def test_loads_the_real_classes(captioner: TransformersCaptioner) -> None:
    assert type(captioner.model).__name__ in (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
    )
    assert captioner.backend == "transformers"
    assert captioner.device == torch.device("cpu")  # no CUDA here: cpu and float32
    assert captioner.dtype == torch.float32
    assert captioner.attn_implementation == "sdpa"
    assert captioner.tokenizer.padding_side == "left"
    assert captioner.revision is None  # a local folder, no revision asked for
    im_end = captioner.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in captioner.eos_token_ids


def test_chat_prompt_has_the_image_then_the_text(captioner: TransformersCaptioner) -> None:
    request = make_requests(GREEDY)[2]
    text = captioner.processor.apply_chat_template(
        chat_messages(request), tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou write alt-text.<|im_end|>")
    assert f"<|vision_start|><|image_pad|><|vision_end|>{request.prompt}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_batched_greedy_in_order_and_equal_to_one_at_a_time(
    captioner: TransformersCaptioner,
) -> None:
    """Left padding done right: a request's greedy text does not depend on its batch."""
    requests = make_requests(GREEDY)  # 6 requests in batches of 4: a full and a partial batch
    batched = captioner.generate(requests)
    assert len(batched) == len(requests)
    assert batched == one_at_a_time(captioner, requests)  # so also in request order
    assert len({g.text for g in batched}) == len(batched)  # distinct inputs, distinct outputs
    for g in batched:
        assert isinstance(g.text, str) and g.text and g.error is None
        # A random model rarely emits <|im_end|>: it runs to the limit.
        assert (g.finish_reason, g.tokens) == ("length", GREEDY.max_new_tokens)
    assert captioner.generate([]) == []


def test_sampling_is_seeded_per_request(captioner: TransformersCaptioner) -> None:
    requests = make_requests(SAMPLED)
    state = torch.random.get_rng_state()
    first = captioner.generate(requests)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
    assert captioner.generate(requests) == first  # same requests and seed: same text
    # ... whatever the batch: alone, or in a batch of other requests in another order.
    assert one_at_a_time(captioner, requests) == first
    assert captioner.generate(requests[::-1]) == first[::-1]
    # Another seed, and greedy decoding, give other texts.
    reseeded = [
        CaptionRequest(r.key, r.variant, r.image, r.prompt, SAMPLED.for_attempt(1), r.system)
        for r in requests
    ]
    assert [g.text for g in captioner.generate(reseeded)] != [g.text for g in first]
    assert [g.text for g in captioner.generate(make_requests(GREEDY))] != [g.text for g in first]


def test_mixed_sampling_in_one_call(captioner: TransformersCaptioner) -> None:
    """Retries arrive with other sampling in the same call: each group gets its own."""
    greedy, sampled = make_requests(GREEDY, 3), make_requests(SAMPLED, 3)
    mixed = [greedy[0], sampled[1], greedy[2], sampled[0], greedy[1], sampled[2]]
    out = captioner.generate(mixed)
    expect = captioner.generate(greedy) + captioner.generate(sampled)
    by_key = {(r.key, r.sampling): g for r, g in zip(greedy + sampled, expect, strict=True)}
    assert out == [by_key[(r.key, r.sampling)] for r in mixed]


def test_checkpoint_sampling_defaults_are_not_applied(captioner: TransformersCaptioner) -> None:
    """Qwen2-VL-Instruct's generation_config.json has top_k=1 and top_p=0.001: applied, they would
    turn every sampled caption into the greedy one."""
    requests = make_requests(SAMPLED, 3)
    expected = captioner.generate(requests)
    config = captioner.model.generation_config
    saved = (config.do_sample, config.top_k, config.top_p, config.temperature)
    config.do_sample, config.top_k, config.top_p, config.temperature = True, 1, 0.001, 0.01
    try:
        assert captioner.generate(requests) == expected
    finally:
        config.do_sample, config.top_k, config.top_p, config.temperature = saved


def test_token_limit_gives_length(captioner: TransformersCaptioner) -> None:
    short = Sampling(temperature=0.0, max_new_tokens=2)
    for g in captioner.generate(make_requests(short, 3)):
        assert (g.finish_reason, g.tokens) == ("length", 2)
        assert g.text


def test_end_of_sequence_gives_stop(folders: dict[str, Path]) -> None:
    """Make <|im_end|> win where request 0's third greedy token did: rows of one batch then end
    at different steps, and tokens count up to and including the end token, never padding."""
    cap = TransformersCaptioner(str(folders["qwen2-vl"]), batch_size=8)
    requests = make_requests(GREEDY)
    # Request 0's first greedy tokens, through the plain transformers API.
    text = cap.processor.apply_chat_template(
        chat_messages(requests[0]), tokenize=False, add_generation_prompt=True
    )
    inputs = cap.processor(text=[text], images=[requests[0].image], return_tensors="pt")
    with torch.inference_mode():
        ids = cap.model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, -3:].tolist()
    head = cap.model.get_output_embeddings().weight
    with torch.no_grad():  # only the end token's logit changes: earlier tokens stay the same
        head[cap.tokenizer.convert_tokens_to_ids("<|im_end|>")] = 1.5 * head[ids[2]]
    batched = cap.generate(requests)
    assert batched == one_at_a_time(cap, requests)
    g = batched[0]
    assert g.finish_reason == "stop" and 1 <= g.tokens <= 3
    assert g.text == cap.tokenizer.decode(ids[: g.tokens - 1])  # the end token is not in the text
    for g in batched:
        assert g.tokens <= GREEDY.max_new_tokens
        assert g.finish_reason == "stop" or g.tokens == GREEDY.max_new_tokens
    cap.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defaults_and_seeded_sampling(folders: dict[str, Path]) -> None:
    cap = TransformersCaptioner(str(folders["qwen2-vl"]), batch_size=4)
    assert cap.device == torch.device(default_device()) and cap.device.type == "cuda"
    assert cap.dtype in (torch.bfloat16, torch.float16)
    assert cap.attn_implementation in ("sdpa", "flash_attention_2")
    requests = make_requests(SAMPLED)
    first = cap.generate(requests)
    assert all(g.error is None and g.text for g in first)
    assert cap.generate(requests) == first
    cap.close()


# ------------------------------------------------------------------------ failures


def test_out_of_memory_halves_the_batch(
    captioner: TransformersCaptioner, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    requests = make_requests(GREEDY, 8)
    expected = one_at_a_time(captioner, requests)
    real_generate = captioner.model.generate
    sizes: list[int] = []

    def generate_fitting_two(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if sizes[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real_generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", generate_fitting_two)
    monkeypatch.setattr(captioner, "batch_size", 8)
    with caplog.at_level(logging.WARNING):
        assert captioner.generate(requests) == expected
    assert sizes == [8, 4, 2, 2, 2, 2]
    assert captioner.batch_size == 2  # later batches start at the size that fits
    assert "out of memory" in caplog.text

    # Out of memory on a single image (the largest, alone of its size): it fails, no other does.
    monkeypatch.setattr(captioner, "batch_size", 1)
    requests[3] = dataclasses.replace(requests[3], image=noise(3, (300, 270)))
    expected[3] = None
    patches = [_patches(captioner, r) for r in requests]
    assert patches.count(max(patches)) == 1 and patches.index(max(patches)) == 3

    def generate_small_only(**kwargs):
        if kwargs["pixel_values"].shape[0] == max(patches):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", generate_small_only)
    out = captioner.generate(requests)
    assert out[3].finish_reason == "error" and "out of memory" in out[3].error
    assert out[:3] + out[4:] == expected[:3] + expected[4:]


def _patches(cap: TransformersCaptioner, request: CaptionRequest) -> int:
    """How many vision patches the processor makes of the request's image."""
    pixels = cap.processor.image_processor(images=[request.image], return_tensors="pt")
    return int(pixels["pixel_values"].shape[0])


def test_a_bad_request_does_not_fail_its_batch(captioner: TransformersCaptioner) -> None:
    requests = make_requests(GREEDY, 4)
    # An aspect ratio over 200 is refused by the Qwen2-VL image processor.
    requests[1] = CaptionRequest("bad", "long", noise(99, (2000, 4)), "Describe.", GREEDY)
    out = captioner.generate(requests)
    assert out[1].finish_reason == "error" and "aspect ratio" in out[1].error
    assert out[1].text == "" and out[1].tokens == 0
    good = [requests[i] for i in (0, 2, 3)]
    assert [out[i] for i in (0, 2, 3)] == one_at_a_time(captioner, good)


def test_a_failed_gpu_stops_the_captioner(captioner: TransformersCaptioner, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA error (an illegal memory access, a device-side assert) leaves the device unusable: every
    later request would fail too, and as error Generations the stage would commit every image left as
    a rejected caption. It raises instead, as a backend that cannot work at all."""
    calls: list[int] = []

    def generate_on_a_dead_gpu(**kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(captioner.model, "generate", generate_on_a_dead_gpu)
    with pytest.raises(CaptionerError, match="illegal memory access"):
        captioner.generate(make_requests(GREEDY, 4))
    assert calls == [4]  # not retried one by one


@pytest.mark.parametrize("lost", [torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                                  type("EngineDeadError", (RuntimeError,), {})("EngineCore encountered an issue")])
def test_a_lost_vllm_engine_stops_the_captioner_and_a_bad_request_does_not(lost: Exception) -> None:
    from curate.captioners.vllm_backend import VLLMCaptioner

    calls: list[int] = []

    def run(requests):
        calls.append(len(requests))
        raise lost

    captioner = object.__new__(VLLMCaptioner)  # no engine here: its generate's handling of errors alone
    captioner._run = run
    with pytest.raises(CaptionerError, match="cannot go on"):
        captioner.generate(make_requests(GREEDY, 4))
    assert calls == [4]  # not retried one by one

    def refuse(requests):  # one image the processor refuses: the others are captioned
        if any(r.key.startswith("0001") for r in requests):
            raise ValueError("image too small")
        return [Generation("A caption.", "stop") for _ in requests]

    captioner._run = refuse
    assert [g.finish_reason for g in captioner.generate(make_requests(GREEDY, 3))] == ["stop", "error", "stop"]


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CaptionerError, match="no-such-model"):
        TransformersCaptioner(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError, match="empty"):
        TransformersCaptioner(str(tmp_path / "empty"))


def test_text_only_model_is_refused(tmp_path: Path, folders: dict[str, Path]) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "text-only"
    config = Qwen2Config(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["qwen2-vl"] / name, folder / name)
    with pytest.raises(CaptionerError, match="text-only.*not a vision-language model"):
        TransformersCaptioner(str(folder))


def test_bad_dtype_and_batch_size(folders: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="dtype"):
        TransformersCaptioner(str(folders["qwen2-vl"]), dtype="int3")
    with pytest.raises(ValueError, match="batch_size"):
        TransformersCaptioner(str(folders["qwen2-vl"]), batch_size=0)


# ------------------------------------------------------------------------ revisions


def test_revision_of_a_local_folder_is_kept_as_given(folders: dict[str, Path]) -> None:
    cap = TransformersCaptioner(str(folders["qwen2.5-vl"]), revision="v1.0", dtype="float32")
    assert cap.revision == "v1.0" and cap.model_id == str(folders["qwen2.5-vl"])
    cap.close()


def test_hub_revision_resolves_to_the_commit(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub id loaded from the Hub cache (offline): the revision is passed through to loading
    (an unknown branch fails) and the captioner reports the commit it resolved to."""
    import huggingface_hub.constants as hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kiln--tiny-qwen2-vl"
    shutil.copytree(folders["qwen2-vl"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    for revision in (None, "main", commit):
        cap = TransformersCaptioner("kiln/tiny-qwen2-vl", revision=revision)
        assert (cap.model_id, cap.revision) == ("kiln/tiny-qwen2-vl", commit)
        cap.close()
    with pytest.raises(CaptionerError, match="kiln/tiny-qwen2-vl.*no-such-branch"):
        TransformersCaptioner("kiln/tiny-qwen2-vl", revision="no-such-branch")


def test_request_seed_depends_on_seed_and_key_only() -> None:
    a = Sampling(seed=1)
    assert request_seed(a, "k") == request_seed(Sampling(seed=1, temperature=0.2), "k")
    assert len({request_seed(a, "k"), request_seed(a, "j"), request_seed(Sampling(seed=2), "k")}) == 3
    assert 0 <= request_seed(a, "k") < 2**63


# ------------------------------------------------------------------------ vLLM (cannot run here)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm() -> None:
    from curate.captioners.vllm_backend import VLLMCaptioner, vllm_available

    assert vllm_available() is False
    with pytest.raises(CaptionerError, match=r"vllm is not installed: pip install 'kiln\[vllm\]'"):
        VLLMCaptioner("Qwen/Qwen2-VL-7B-Instruct")


def test_vllm_unavailable_without_gpu() -> None:
    from curate.captioners.vllm_backend import vllm_available

    if not torch.cuda.is_available():
        assert vllm_available() is False
