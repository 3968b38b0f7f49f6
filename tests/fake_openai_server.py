"""A real OpenAI-compatible HTTP server on 127.0.0.1 with scripted answers, for the openai backend.

Why a real server rather than a mocked transport: retries on dropped connections, timeouts,
keep-alive reuse and bounded concurrency are properties of real sockets, and they are what
can go wrong against ``vllm serve``.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies) on an asyncio loop of
its own thread, so a stalled or slow request costs nothing and in-flight counting is exact:

- ``GET /v1/models`` lists ``models``;
- ``POST /v1/chat/completions`` answers, in this order of precedence, the next reply scripted
  for a marker found in the request's text (``on(marker, ...)``), the next reply of the
  global script (``enqueue(...)``), or the default: an echo of the prompt, a fixed caption,
  or, with ``tiny_model=FOLDER``, the real output of that model for the request's image
  and messages (loaded with ``AutoProcessor``/``AutoModelForImageTextToText``).

Every request is recorded (method, path, lower-cased headers, parsed JSON body), and the
server tracks how many chat requests it had in flight at most.

Standalone, for benchmarks: ``python tests/fake_openai_server.py --latency 0.2`` prints
``READY http://127.0.0.1:PORT/v1`` and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFUSAL_TEXT = "I'm sorry, but I can't help with describing this image."
LOOP_TEXT = "A red car parked on the street. " + "the red car " * 60
TRUNCATED_TEXT = "A wide photograph of a harbour at dusk with fishing boats moored along the"
GOOD_TEXT = ("A wide photograph of a harbour at dusk: fishing boats moored along a stone quay, "
             "warm lamplight reflected in calm water, hills in soft blue haze behind.")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 408: "Request Timeout",
           422: "Unprocessable Entity", 429: "Too Many Requests", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Reply:
    """One scripted answer. ``delay`` is waited before answering (on top of the server latency)."""

    kind: str = "text"  # text | refused (OpenAI's message.refusal) | http_error | drop | echo | model
    text: str = GOOD_TEXT
    finish_reason: str = "stop"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    tokens: int | None = None  # usage.completion_tokens (default: the word count)

    @classmethod
    def caption(cls, text: str = GOOD_TEXT) -> Reply:
        return cls(text=text)

    @classmethod
    def refusal(cls) -> Reply:
        return cls(text=REFUSAL_TEXT)

    @classmethod
    def repetition_loop(cls) -> Reply:
        return cls(text=LOOP_TEXT, finish_reason="length")

    @classmethod
    def truncated(cls) -> Reply:
        return cls(text=TRUNCATED_TEXT, finish_reason="length")

    @classmethod
    def http_error(cls, status: int, message: str = "scripted failure", retry_after: str | None = None) -> Reply:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(kind="http_error", status=status, text=message, headers=headers)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "0") -> Reply:
        return cls.http_error(429, "rate limited", retry_after)

    @classmethod
    def stall(cls, seconds: float, then: Reply | None = None) -> Reply:
        """Say nothing for ``seconds`` (longer than the client's timeout), then answer ``then``."""
        after = then or cls()
        return cls(kind=after.kind, text=after.text, finish_reason=after.finish_reason, status=after.status,
                   headers=after.headers, delay=seconds)

    @classmethod
    def drop(cls) -> Reply:
        """Close the connection after reading the request, without a byte of answer."""
        return cls(kind="drop")

    @classmethod
    def echo(cls) -> Reply:
        return cls(kind="echo")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received: float  # time.monotonic()

    @property
    def prompt(self) -> str:
        """The text parts of the last user message."""
        return _prompt_text(self.body) if isinstance(self.body, dict) else ""

    @property
    def image_urls(self) -> list[str]:
        return _image_urls(self.body) if isinstance(self.body, dict) else []


def _prompt_text(body: dict) -> str:
    texts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part.get("text", "") for part in content if part.get("type") == "text"]
    return "\n".join(texts)


def _image_urls(body: dict) -> list[str]:
    urls = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            urls += [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    return urls


def decode_data_url(url: str):
    """A ``data:image/...;base64,...`` URL back to a PIL image (fully loaded)."""
    from PIL import Image

    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"not a base64 image data URL: {header[:40]!r}")
    image = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    image.load()
    return image


class _TinyModel:
    """The tiny VLM behind the server: one generation at a time, on a worker thread."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.lock = threading.Lock()

    def generate(self, body: dict) -> tuple[str, str, int]:
        import torch

        messages, images = [], []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, list):  # OpenAI parts -> the processor's chat-template parts
                parts = []
                for part in content:
                    if part["type"] == "image_url":
                        images.append(decode_data_url(part["image_url"]["url"]).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                content = parts
            messages.append({"role": message["role"], "content": content})
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        max_new = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {"max_new_tokens": max_new,
                                  "repetition_penalty": float(body.get("repetition_penalty", 1.0))}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        else:
            kwargs.update(do_sample=False)
        with self.lock, torch.no_grad(), torch.random.fork_rng():  # leave the test's RNG alone
            torch.manual_seed(int(body.get("seed") or 0))
            out = self.model.generate(**inputs, **kwargs)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        ended = bool(new) and new[-1] in self.eos_ids
        text = self.processor.decode(new, skip_special_tokens=True)
        return text, ("stop" if ended or len(new) < max_new else "length"), len(new)


class FakeOpenAIServer:
    """Scripted OpenAI-compatible server on 127.0.0.1; ``with FakeOpenAIServer() as s: s.url``."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("fake-vlm",),
        latency: float = 0.0,
        jitter: float = 0.0,
        default: Reply | None = None,
        tiny_model: str | Path | None = None,
        api_key: str | None = None,
        seed: int = 0,
        record_bodies: bool = True,
    ) -> None:
        self.models = list(models)
        self.latency = latency
        self.jitter = jitter
        self.default = default or (Reply(kind="model") if tiny_model else Reply.echo())
        self.api_key = api_key  # when set, other keys get a 401
        self.record_bodies = record_bodies
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.connections = 0
        self._tiny = _TinyModel(tiny_model) if tiny_model else None
        self._script: deque[Reply] = deque()
        self._by_marker: dict[str, deque[Reply]] = {}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ------------------------------------------------------------------ control

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        """Replies for the next chat requests, in arrival order (after marker scripts)."""
        with self._lock:
            self._script.extend(replies)

    def on(self, marker: str, *replies: Reply) -> None:
        """Replies, in order, for requests whose text contains ``marker``; then the default."""
        with self._lock:
            self._by_marker.setdefault(marker, deque()).extend(replies)

    def chat_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._script.clear()
            self._by_marker.clear()
            self.max_in_flight = self.in_flight

    def start(self) -> FakeOpenAIServer:
        ready = threading.Event()

        def serve() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            # stopped: cancel the handlers still sleeping (stalls), then close
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        loop, server = self._loop, self._server

        async def shutdown() -> None:
            server.close()
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    break
                if not await self._respond(*request, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
        line = await reader.readline()
        if not line:
            return None
        method, path, _version = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            raw = await reader.readline()
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        return method, path, headers, body

    async def _write(self, writer: asyncio.StreamWriter, status: int, payload: Any,
                     headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()

    async def _respond(self, method: str, path: str, headers: dict[str, str], raw: bytes,
                       writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False closes the connection."""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            self.requests.append(Recorded(method, path, headers,
                                          body if self.record_bodies else None, time.monotonic()))
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            await self._write(writer, 401, {"error": {"message": "Incorrect API key provided"}})
            return True
        if method == "GET" and path.rstrip("/") == "/v1/models":
            await self._write(writer, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]})
            return True
        if method != "POST" or path.rstrip("/") != "/v1/chat/completions":
            await self._write(writer, 404, {"object": "error", "message": f"no route {method} {path}"})
            return True
        if not isinstance(body, dict):
            await self._write(writer, 400, {"object": "error", "message": "body is not JSON"})
            return True
        if body.get("model") not in self.models:
            await self._write(writer, 404, {"object": "error",
                                            "message": f"The model `{body.get('model')}` does not exist."})
            return True

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self._next_reply(body)
            wait = self.latency + reply.delay + (self._rng.uniform(0, self.jitter) if self.jitter else 0.0)
            if wait > 0:
                await asyncio.sleep(wait)
            if reply.kind == "drop":
                writer.transport.abort()  # no answer at all: the client sees the connection vanish
                return False
            if reply.kind == "http_error":
                await self._write(writer, reply.status, {"object": "error", "message": reply.text,
                                                         "code": reply.status}, reply.headers)
                return True
            if reply.kind == "model":
                assert self._tiny is not None, "Reply(kind='model') needs tiny_model="
                text, finish, tokens = await asyncio.get_running_loop().run_in_executor(
                    None, self._tiny.generate, body)
            elif reply.kind == "echo":
                text, finish, tokens = f"Caption for: {_prompt_text(body)}", "stop", None
            else:
                text, finish, tokens = reply.text, reply.finish_reason, reply.tokens
            answer = self._completion(body, text, finish, tokens)
            if reply.kind == "refused":  # as OpenAI's API says one: no content, the words apart
                answer["choices"][0]["message"] |= {"content": None, "refusal": text}
            await self._write(writer, 200, answer)
            return True
        finally:
            self.in_flight -= 1

    def _next_reply(self, body: dict) -> Reply:
        text = _prompt_text(body)
        with self._lock:
            for marker, queue in self._by_marker.items():
                if marker in text and queue:
                    return queue.popleft()
            if self._script:
                return self._script.popleft()
        return self.default

    def _completion(self, body: dict, text: str, finish: str, tokens: int | None) -> dict:
        completion_tokens = tokens if tokens is not None else len(text.split())
        return {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 100, "completion_tokens": completion_tokens,
                      "total_tokens": 100 + completion_tokens},
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra uniform random seconds")
    parser.add_argument("--model", default="fake-vlm")
    parser.add_argument("--tiny-model", default=None, help="answer with this tiny model's real output")
    args = parser.parse_args(argv)
    # A benchmark must not hold every request body it ever got in memory.
    server = FakeOpenAIServer(models=(args.model,), latency=args.latency, jitter=args.jitter,
                              default=None if args.tiny_model else Reply.caption(),
                              tiny_model=args.tiny_model, record_bodies=False).start()
    print(f"READY {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
