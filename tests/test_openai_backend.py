"""The openai backend against a real HTTP server on 127.0.0.1 (tests/fake_openai_server.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import socket
import threading
import time
from email.utils import formatdate
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import (
    LOOP_TEXT,
    REFUSAL_TEXT,
    TRUNCATED_TEXT,
    FakeOpenAIServer,
    Reply,
    decode_data_url,
)
from PIL import Image

from curate.captioners.base import CaptionerError, CaptionRequest, Sampling
from curate.captioners.openai_backend import (
    OpenAICaptioner,
    _retry_after_seconds,
    list_models,
    normalize_endpoint,
)

KEY_ENV = "KILN_TEST_OPENAI_KEY"
SECRET = "sk-kiln-test-9f8e7d6c5b4a3210"


@pytest.fixture
def server():
    with FakeOpenAIServer(models=("fake-vlm", "other-vlm")) as s:
        yield s


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def with_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def captioner(server: FakeOpenAIServer, **kwargs) -> OpenAICaptioner:
    options = {"api_key_env": KEY_ENV, "concurrency": 8, "timeout": 5.0, "max_retries": 3,
               "backoff_base": 0.01, "backoff_max": 0.05}
    return OpenAICaptioner("fake-vlm", server.url, **{**options, **kwargs})


def image(i: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    return Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256))


def req(i: int, prompt: str | None = None, **kwargs) -> CaptionRequest:
    return CaptionRequest(key=f"k{i}/long", variant="long", image=image(i), prompt=prompt or f"prompt {i}", **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the happy path


def test_order_preserved_under_concurrency(server: FakeOpenAIServer, no_key: None) -> None:
    server.jitter = 0.05  # answers come back out of order
    with captioner(server, concurrency=8) as cap:
        encoders: set[str] = set()
        body = cap._body

        def spy(request: CaptionRequest) -> bytes:
            encoders.add(threading.current_thread().name)
            return body(request)

        cap._body = spy
        gens = cap.generate([req(i) for i in range(40)])
    assert encoders and all(name.startswith("openai-captioner-encode") for name in encoders)  # off the loop
    assert [g.text for g in gens] == [f"Caption for: prompt {i}" for i in range(40)]
    assert all(g.finish_reason == "stop" and g.error is None and g.tokens == 4 for g in gens)
    arrival = [r.prompt for r in server.chat_requests()]
    assert sorted(arrival) == sorted(f"prompt {i}" for i in range(40))


def test_concurrency_is_bounded_and_connections_reused(server: FakeOpenAIServer, no_key: None) -> None:
    server.latency = 0.03
    with captioner(server, concurrency=5) as cap:
        assert all(g.error is None for g in cap.generate([req(i) for i in range(40)]))
        assert server.max_in_flight == 5  # reached, never exceeded
        cap.generate([req(i) for i in range(10)])  # a second batch reuses the keep-alive connections
    assert server.max_in_flight == 5
    assert server.connections == 5


def test_request_format(server: FakeOpenAIServer, with_key: str) -> None:
    from curate.captioners.base import request_seed

    sampling = Sampling(temperature=0.3, top_p=0.8, max_new_tokens=77, seed=42, repetition_penalty=1.1)
    requests = [
        CaptionRequest("a/long", "long", image(1, (64, 48)), "Describe it.", sampling, system="Be terse."),
        CaptionRequest("b/long", "long", image(2, (33, 100)).convert("L"), "Describe that."),
    ]
    with captioner(server) as cap:
        cap.generate(requests)
    first, second = sorted(server.chat_requests(), key=lambda r: r.prompt)
    assert first.headers["authorization"] == f"Bearer {with_key}"
    assert first.headers["content-type"] == "application/json"
    body = first.body
    assert body["model"] == "fake-vlm"
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty")} == {
        "max_tokens": 77, "temperature": 0.3, "top_p": 0.8, "seed": request_seed(sampling, "a/long"),
        "repetition_penalty": 1.1}
    assert body["messages"][0] == {"role": "system", "content": "Be terse."}
    user = body["messages"][1]
    assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == "Describe it."
    url = user["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    base64.b64decode(url.split(",", 1)[1], validate=True)
    decoded = decode_data_url(url)
    assert decoded.format == "JPEG" and decoded.size == (64, 48) and decoded.mode == "RGB"
    # No system message when none is given; a grey image is sent as RGB at its own size.
    assert [m["role"] for m in second.body["messages"]] == ["user"]
    decoded = decode_data_url(second.image_urls[0])
    assert decoded.size == (33, 100) and decoded.mode == "RGB"
    assert second.body["max_tokens"] == Sampling().max_new_tokens


def test_each_request_is_seeded_by_its_key(server: FakeOpenAIServer, no_key: None) -> None:
    """As in the transformers and vllm backends: a server draws a seeded request's noise from its
    seed, so one seed for every request would give every image the same noise at every step (and
    near-identical images the same caption); each request's own seed keeps them independent, and a
    rerun sends the same seeds."""
    from curate.captioners.base import request_seed

    sampling = Sampling(temperature=0.7, seed=7)
    requests = [CaptionRequest(f"k{i}/{v}", v, image(i), "Describe it.", sampling)
                for i in range(3) for v in ("long", "short")]
    with captioner(server) as cap:
        cap.generate(requests)
        first = {r.body["seed"] for r in server.chat_requests()}
        cap.generate(requests)
    assert first == {request_seed(sampling, r.key) for r in requests} and len(first) == 6
    assert {r.body["seed"] for r in server.chat_requests()} == first


def test_no_authorization_header_without_key(server: FakeOpenAIServer, no_key: None) -> None:
    with captioner(server) as cap:
        assert "(unset)" in repr(cap)
        cap.generate([req(0)])
    assert "authorization" not in server.chat_requests()[0].headers


def test_scripted_captions_and_finish_reasons(server: FakeOpenAIServer, no_key: None) -> None:
    server.on("good", Reply(text="A fine caption.", tokens=5))
    server.on("refuse", Reply.refusal())
    server.on("loop", Reply.repetition_loop())
    server.on("cut", Reply.truncated())
    with captioner(server) as cap:
        good, refusal, loop, cut = cap.generate([req(i, p) for i, p in enumerate(["good", "refuse", "loop", "cut"])])
    assert (good.text, good.finish_reason, good.tokens) == ("A fine caption.", "stop", 5)
    assert (refusal.text, refusal.finish_reason) == (REFUSAL_TEXT, "stop")
    assert (loop.text, loop.finish_reason) == (LOOP_TEXT, "length")
    assert (cut.text, cut.finish_reason) == (TRUNCATED_TEXT, "length")
    assert all(g.error is None for g in (good, refusal, loop, cut))


def test_a_refusal_the_server_marks_is_a_refusal_whatever_its_words(server: FakeOpenAIServer, no_key: None) -> None:
    from curate.caption_qa import check_caption
    from curate.prompts import load_prompts

    server.on("refuse", Reply(kind="refused", text="That is not something I can describe."))
    with captioner(server) as cap:
        refused, = cap.generate([req(0, "refuse")])
    assert (refused.text, refused.finish_reason, refused.error) == ("That is not something I can describe.",
                                                                     "refused", None)
    qa = check_caption(refused.text, refused.finish_reason, load_prompts()["long"])
    assert qa.failures == ["refusal"] and qa.text == ""


# --------------------------------------------------------------------------- failures and retries


@pytest.mark.parametrize(
    "failure",
    [
        Reply.rate_limited("0"),
        Reply.http_error(500),
        Reply.http_error(503, retry_after="0"),
        Reply.http_error(408),
        Reply.stall(1.5),  # longer than the client's 0.4 s timeout
        Reply.drop(),
    ],
    ids=["429", "500", "503", "408", "stall", "drop"],
)
def test_transient_failure_then_success(server: FakeOpenAIServer, no_key: None, failure: Reply) -> None:
    server.on("flaky", failure)
    with captioner(server, timeout=0.4) as cap:
        gens = cap.generate([req(0, "flaky"), req(1, "steady")])
    assert [g.text for g in gens] == ["Caption for: flaky", "Caption for: steady"]
    assert all(g.error is None for g in gens)
    assert sum(r.prompt == "flaky" for r in server.chat_requests()) == 2


def test_retry_after_is_honoured(server: FakeOpenAIServer, no_key: None) -> None:
    server.on("busy", Reply.rate_limited("1"))
    with captioner(server) as cap:
        start = time.monotonic()
        (gen,) = cap.generate([req(0, "busy")])
        elapsed = time.monotonic() - start
    assert gen.error is None
    assert 1.0 <= elapsed < 2.0  # the server's 1 s, not the 0.01 s backoff


def test_retry_after_parsing() -> None:
    assert _retry_after_seconds({"retry-after": "3"}) == 3.0
    assert _retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert _retry_after_seconds({"retry-after": "-4"}) == 0.0
    assert _retry_after_seconds({"retry-after": "99999"}) == 300.0
    assert 8 <= _retry_after_seconds({"retry-after": formatdate(time.time() + 10, usegmt=True)}) <= 10
    assert _retry_after_seconds({"retry-after": "soon"}) is None
    assert _retry_after_seconds({}) is None


def test_permanent_failure_becomes_error_generation(server: FakeOpenAIServer, no_key: None) -> None:
    server.on("doomed", *[Reply.http_error(500, "engine dead")] * 10)
    with captioner(server, max_retries=2) as cap:
        doomed, fine = cap.generate([req(0, "doomed"), req(1, "fine")])
    assert (doomed.text, doomed.finish_reason) == ("", "error")
    assert "3 attempts" in doomed.error and "HTTP 500" in doomed.error and "engine dead" in doomed.error
    assert fine.error is None and fine.text == "Caption for: fine"
    assert sum(r.prompt == "doomed" for r in server.chat_requests()) == 3  # 1 + max_retries


def test_bad_request_is_not_retried(server: FakeOpenAIServer, no_key: None) -> None:
    server.on("huge", Reply.http_error(400, "This model's maximum context length is 32768 tokens"))
    with captioner(server) as cap:
        huge, fine = cap.generate([req(0, "huge"), req(1, "fine")])
    assert huge.finish_reason == "error" and "HTTP 400" in huge.error and "maximum context length" in huge.error
    assert fine.error is None
    assert sum(r.prompt == "huge" for r in server.chat_requests()) == 1


def test_timeouts_exhausted(server: FakeOpenAIServer, no_key: None) -> None:
    server.on("slow", *[Reply.stall(2.0)] * 3)
    with captioner(server, timeout=0.3, max_retries=1) as cap:
        (gen,) = cap.generate([req(0, "slow")])
    assert gen.finish_reason == "error" and "no answer within 0.3s" in gen.error


def test_unreachable_endpoint_raises(no_key: None) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/v1"
    with OpenAICaptioner("fake-vlm", endpoint, api_key_env=KEY_ENV, max_retries=1, backoff_base=0.01) as cap:
        with pytest.raises(CaptionerError, match="cannot reach") as err:
            cap.generate([req(0), req(1)])
    assert endpoint in str(err.value)
    with pytest.raises(CaptionerError, match="cannot reach"):
        list_models(endpoint, KEY_ENV)


def test_a_server_gone_in_the_middle_of_a_batch_raises(no_key: None) -> None:
    """The server dies while a batch is in flight: the requests it was answering lose their
    connections, the queued ones never connect, and no retry reaches it. That is the server, not the
    images: the batch raises rather than answering error Generations, which recaption would commit
    as rejected captions (with --retries 0, or in a flagged caption's last try) that a rerun keeps."""
    server = FakeOpenAIServer(default=Reply(kind="echo", delay=2.0)).start()
    server.on("warm", Reply.echo())
    try:
        with captioner(server, concurrency=2, max_retries=2) as cap:
            assert cap.generate([req(9, "warm")])[0].error is None  # connections open, loop running
            threading.Timer(0.5, server.stop).start()  # two requests in flight, two waiting for a slot
            with pytest.raises(CaptionerError, match="cannot reach"):
                cap.generate([req(i) for i in range(4)])
        assert len(server.chat_requests()) >= 2  # the warm-up, and what was in flight, reached it
    finally:
        server.stop()


def test_model_not_served_and_wrong_key_are_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with FakeOpenAIServer(api_key="the-right-key") as locked, captioner(locked) as cap:
        with pytest.raises(CaptionerError, match="HTTP 401") as err:
            cap.generate([req(i) for i in range(4)])
        assert SECRET not in str(err.value)
        assert len(locked.chat_requests()) <= 4  # no retries
    with FakeOpenAIServer() as server:
        with OpenAICaptioner("missing-vlm", server.url, api_key_env=KEY_ENV) as cap:
            with pytest.raises(CaptionerError, match="HTTP 404"):
                cap.generate([req(0)])


# --------------------------------------------------------------------------- the API key stays secret


def test_api_key_never_leaks(server: FakeOpenAIServer, with_key: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    # A server (or proxy) that quotes the Authorization header back in its error message.
    server.on("echo-key", Reply.http_error(400, f"invalid header: Bearer {with_key}"))
    server.on("flaky", Reply.http_error(500), Reply.drop())
    with captioner(server) as cap:
        gens = cap.generate([req(0, "echo-key"), req(1, "flaky"), req(2)])
        seen = [repr(cap), repr(vars(cap)), repr(cap._runtime.client.headers), *(repr(g) for g in gens)]
    assert "[redacted]" in gens[0].error
    assert gens[1].error is None and gens[2].error is None
    with FakeOpenAIServer(api_key="another-key") as locked, captioner(locked) as locked_cap:
        with pytest.raises(CaptionerError) as err:
            locked_cap.generate([req(0)])
        seen.append(str(err.value))
    unreachable = f"http://127.0.0.1:{free_port()}"
    with OpenAICaptioner("fake-vlm", unreachable, api_key_env=KEY_ENV, max_retries=0) as down:
        with pytest.raises(CaptionerError) as err:
            down.generate([req(0)])
        seen.append(str(err.value))
    seen.append(caplog.text)
    assert any("HTTP 500" in record.getMessage() for record in caplog.records)  # retries were logged
    for text in seen:
        assert with_key not in text
    # The key's characters are checked without quoting it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, "sk-bad\nkey")
        with pytest.raises(CaptionerError, match=KEY_ENV) as err:
            captioner(server)
        assert "sk-bad" not in str(err.value)


# --------------------------------------------------------------------------- endpoint and models


def test_normalize_endpoint() -> None:
    for given in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/",
                  "http://h:8000/v1/chat/completions", " http://h:8000/v1/models "):
        assert normalize_endpoint(given) == "http://h:8000/v1"
    assert normalize_endpoint("https://gw.example/openai/v1/") == "https://gw.example/openai/v1"
    for bad in ("localhost:8000", "ftp://h/v1", "http://h/v1?x=1"):
        with pytest.raises(CaptionerError):
            normalize_endpoint(bad)
    with pytest.raises(CaptionerError) as err:
        normalize_endpoint("ftp://user:hunter2@h/v1")
    assert "hunter2" not in str(err.value)


def test_list_models(server: FakeOpenAIServer, with_key: str) -> None:
    base = server.url.removesuffix("/v1")
    assert list_models(base, KEY_ENV) == ["fake-vlm", "other-vlm"]
    assert list_models(server.url + "/", KEY_ENV, model="other-vlm") == ["fake-vlm", "other-vlm"]
    assert server.requests[-1].path == "/v1/models"
    assert server.requests[-1].headers["authorization"] == f"Bearer {with_key}"
    with pytest.raises(CaptionerError, match="'qwen2-vl' is not served") as err:
        list_models(server.url, KEY_ENV, model="qwen2-vl")
    assert "'fake-vlm', 'other-vlm'" in str(err.value)
    with captioner(server) as cap:
        assert cap.check() == ["fake-vlm", "other-vlm"]
    with FakeOpenAIServer(api_key="another-key") as locked:
        with pytest.raises(CaptionerError, match="HTTP 401"):
            list_models(locked.url, KEY_ENV)


def test_a_server_that_refuses_caption_requests_fails_at_the_check(no_key: None) -> None:
    """A server that lists the model but refuses every caption request (a text-only model, a field it
    does not take, such as the vLLM extension repetition_penalty on OpenAI's own API) stops the stage
    before any shard, rather than every image being committed as a rejected caption."""
    from curate.captioners import open_captioner

    refused = Reply.http_error(400, "Unrecognized request argument supplied: repetition_penalty")
    with FakeOpenAIServer(models=("fake-vlm",), default=refused) as refusing:
        with pytest.raises(CaptionerError, match="refuses caption requests.*repetition_penalty"):
            open_captioner("openai", "fake-vlm", endpoint=refusing.url, api_key_env=KEY_ENV)
        probe = refusing.chat_requests()[-1].body
    assert probe["model"] == "fake-vlm" and probe["max_tokens"] == 1
    assert decode_data_url(probe["messages"][-1]["content"][0]["image_url"]["url"]).size == (64, 64)
    with FakeOpenAIServer(models=("fake-vlm",)) as serving:  # a server that captions passes the check
        cap = open_captioner("openai", "fake-vlm", endpoint=serving.url, api_key_env=KEY_ENV)
        cap.close()
        assert len(serving.chat_requests()) == 1


def test_close_then_generate_again(server: FakeOpenAIServer, no_key: None) -> None:
    cap = captioner(server)
    assert cap.generate([req(0)])[0].error is None
    thread = cap._runtime.thread
    cap.close()
    cap.close()  # idempotent
    assert not thread.is_alive()
    assert cap.generate([req(1)])[0].text == "Caption for: prompt 1"  # a fresh loop and client
    cap.close()
    assert cap.generate([]) == []

    async def inside_a_running_loop() -> str:  # a notebook cell, say
        return cap.generate([req(2)])[0].text

    assert asyncio.run(inside_a_running_loop()) == "Caption for: prompt 2"
    cap.close()


# --------------------------------------------------------------------------- a real model behind the server


def test_round_trip_with_tiny_model(tmp_path: Path, no_key: None) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from curate.tiny import build_tiny_qwen2_vl

    folder = build_tiny_qwen2_vl(tmp_path / "qwen", tokenizer="small", cache_dir=tmp_path / "cache")
    greedy = Sampling(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(96, 80), (80, 112)]]
    requests = [CaptionRequest(f"k{i}/long", "long", im, "Describe this image.", greedy)
                for i, im in enumerate(images)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads on a busy machine
    try:
        with FakeOpenAIServer(models=("tiny-qwen",), tiny_model=folder) as server:
            with OpenAICaptioner("tiny-qwen", server.url, api_key_env=KEY_ENV, timeout=60) as cap:
                gens = cap.generate(requests)
        # The same model, run here on the pixels the server received (JPEG-decoded), says the same.
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        for gen, im in zip(gens, images, strict=True):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
            received = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
            inputs = processor(text=[prompt], images=[received], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            assert gen.error is None
            assert gen.text == processor.decode(new, skip_special_tokens=True)
            assert gen.tokens == len(new)
            assert gen.finish_reason == ("length" if len(new) == 12 else "stop")
    finally:
        torch.set_num_threads(threads)
