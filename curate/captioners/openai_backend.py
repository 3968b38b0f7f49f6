"""The `openai` backend: any OpenAI-compatible chat-completions server (`vllm serve`, SGLang, TGI, ...).

One HTTP request per caption, images inlined as base64 data URLs, many requests in flight at
once: a served VLM batches concurrent requests itself (continuous batching), so throughput
comes from keeping ``concurrency`` requests in flight, not from batching on our side.

``generate`` is synchronous (the recaption stage is), so the backend runs its own asyncio
event loop on a daemon thread and keeps it, and one ``httpx2.AsyncClient`` with its pool of
keep-alive connections, for the captioner's lifetime: consecutive batches reuse connections.
Running the loop on its own thread (rather than ``asyncio.run`` per call) also makes
``generate`` callable from code that already runs an event loop (a notebook). Images are
encoded (JPEG, base64, JSON) on a thread pool, ahead of the requests in flight, so many
concurrent requests do not queue behind encoding on the loop.

Why ``httpx2`` (the maintained successor of httpx, already required by huggingface_hub) and
not ``httpx`` 0.28: httpcore 1.x's connection pool does O(connections^2) work on every
request event, which at 64 connections made the client burn a core and reach a quarter of
the throughput (bench/recaption_openai.py); httpcore2's pool is linear.

Retries (per request, up to ``max_retries`` after the first attempt):

- retried: HTTP 429, 408 and every 5xx; timeouts; refused connections; connections dropped
  before an answer. The wait is exponential with jitter, ``min(backoff_max, backoff_base *
  2**attempt)`` times a random factor in [0.5, 1]; on 429 and 503 a ``Retry-After`` (seconds
  or an HTTP date) or ``retry-after-ms`` header is honoured instead (at most 5 minutes),
  plus a little jitter so that a crowd of rejected requests does not come back at once.
  A request waiting to retry keeps its concurrency slot, so an overloaded server sees the
  load drop instead of being refilled.
- not retried: any other 4xx (a bad request: the image or prompt is the problem) and a
  malformed 200. The request becomes ``Generation(text="", finish_reason="error", error=...)``,
  as does one that still fails after its last retry.
- fatal (``CaptionerError``, the whole batch stops): 401, 403 and 404 (wrong key, or the
  model or path is not served: every request would fail the same way), and a batch in which
  a request's last attempt could not connect (the server is down, gone in the middle of the
  batch, or the endpoint is wrong: after every retry's wait, a fact about the server, not
  about the image). Failing loudly matters: error Generations would otherwise be recorded as rejected
  captions in committed shards, which a rerun does not redo. For the same reason ``check``
  (run before any shard) sends one caption request and fails on any error: a server that
  refuses every request (a 400 for a text-only model or a field it does not take) is otherwise
  only a run of rejected captions.

The API key is read from the environment variable named by ``api_key_env`` (no variable, no
``Authorization`` header). It is never logged, never put in an exception or a repr, and any
text we pass on from the server or the HTTP library is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx2
from PIL import Image

from curate.captioners.base import (
    Captioner,
    CaptionerError,
    CaptionRequest,
    Generation,
    Sampling,
    request_seed,
)

__all__ = ["OpenAICaptioner", "list_models", "normalize_endpoint"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statuses that mean "this configuration cannot work": retrying or moving on to the next
# request would only fail the same way, so they stop the batch.
FATAL_STATUSES = {401: "unauthorized (check the API key)", 403: "forbidden (check the API key)",
                  404: "not found (is the model served under this name, and the endpoint right?)"}
RETRY_AFTER_STATUSES = (429, 503)
RETRY_AFTER_MAX = 300.0  # seconds: a misconfigured proxy must not park the run for hours
IMAGE_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"), "webp": ("WEBP", "image/webp")}
REDACTED = "[redacted]"


def normalize_endpoint(endpoint: str) -> str:
    """The API base URL that ``/chat/completions`` and ``/models`` are appended to.

    A URL without a path gets ``/v1`` (``http://localhost:8000`` -> ``http://localhost:8000/v1``);
    a URL with a path is used as given, because servers behind proxies or other vendors use
    other prefixes (``https://host/openai/v1``, ``.../v1beta/openai``). Trailing slashes and a
    pasted ``/chat/completions`` or ``/models`` suffix are removed.
    """
    url = endpoint.strip().rstrip("/")
    for suffix in ("/chat/completions", "/models"):
        if url.endswith(suffix):
            url = url[: -len(suffix)].rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CaptionerError(f"endpoint must be an http(s) URL such as http://localhost:8000/v1, "
                             f"got {_display_url(endpoint)!r}")
    if parts.query or parts.fragment:
        raise CaptionerError(f"endpoint must not carry a query or fragment: {_display_url(endpoint)!r}")
    if parts.path in ("", "/"):
        url = urlunsplit((parts.scheme, parts.netloc, "/v1", "", ""))
    return url


def _display_url(url: str) -> str:
    """The URL without user:password, for messages (credentials can sit in a URL too)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class _Secret:
    """The API key, wrapped so that no repr, ``vars()`` dump or debugger view shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return REDACTED


def _read_api_key(api_key_env: str) -> _Secret | None:
    key = os.environ.get(api_key_env, "").strip()
    if not key:
        return None
    # h11 would reject such a header with an error that quotes it: refuse it here, without the value.
    if not key.isascii() or not key.isprintable():
        raise CaptionerError(f"${api_key_env} holds characters that an HTTP header cannot carry")
    return _Secret(key)


def _auth_headers(key: _Secret | None) -> dict[str, str]:
    headers = {"User-Agent": "kiln-recaption", "Accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key.value}"  # httpx2 shows it as [secure] in reprs
    return headers


def _scrub(text: str, key: _Secret | None) -> str:
    return text.replace(key.value, REDACTED) if key is not None else text


def _server_message(resp: httpx2.Response, limit: int = 300) -> str:
    """The error text a server sent: vLLM/SGLang ``{"message": ...}`` or OpenAI ``{"error": {"message": ...}}``."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        msg = err.get("message") if isinstance(err, dict) else data.get("message") or err or data.get("detail")
        if msg:
            return str(msg)[:limit]
    text = resp.text.strip()
    return text[:limit] if text else resp.reason_phrase


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms`` (OpenAI), else ``Retry-After`` in seconds or as an HTTP date; None if absent."""
    seconds: float | None = None
    if ms := headers.get("retry-after-ms"):
        try:
            seconds = float(ms) / 1000.0
        except ValueError:
            seconds = None
    if seconds is None and (value := headers.get("retry-after")):
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
    if seconds is None or seconds != seconds:  # absent or NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def list_models(endpoint: str, api_key_env: str = "OPENAI_API_KEY", *, model: str | None = None,
                timeout: float = 30.0) -> list[str]:
    """The model names the server serves (``GET {endpoint}/models``), to check a server up front.

    With ``model``, raises ``CaptionerError`` naming the served models if it is not among them
    (``vllm serve PATH`` serves the model as PATH unless ``--served-model-name`` is given).
    Raises ``CaptionerError`` when the server cannot be reached or does not answer the list.
    """
    base = normalize_endpoint(endpoint)
    shown = _display_url(base)
    key = _read_api_key(api_key_env)
    try:
        with httpx2.Client(timeout=timeout, headers=_auth_headers(key)) as client:
            resp = client.get(f"{base}/models")
    except httpx2.HTTPError as e:
        raise CaptionerError(_scrub(f"cannot reach the OpenAI-compatible server at {shown}: "
                                    f"{type(e).__name__}: {e}", key)) from None
    if resp.status_code != 200:
        hint = FATAL_STATUSES.get(resp.status_code, "")
        raise CaptionerError(_scrub(f"{shown}/models answered HTTP {resp.status_code} {hint}: "
                                    f"{_server_message(resp)}", key))
    try:
        names = [str(entry["id"]) for entry in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise CaptionerError(f"{shown}/models did not answer an OpenAI model list") from None
    if model is not None and model not in names:
        served = ", ".join(repr(n) for n in names) or "nothing"
        raise CaptionerError(f"model {model!r} is not served by {shown}; it serves {served}. Pass the "
                             "served name as the model (vllm serve names a model by the path it was "
                             "given unless --served-model-name is set)")
    return names


@dataclass
class _Outcome:
    generation: Generation
    unreachable: bool = False  # the last attempt could not connect to the server


class _Runtime:
    """The event loop thread, the HTTP client on it, the encoding threads and the concurrency slots.

    Kept apart from the captioner so that a finalizer can shut it down without keeping the
    captioner alive.
    """

    def __init__(self, concurrency: int, timeout: float, headers: dict[str, str]) -> None:
        self.loop = asyncio.new_event_loop()
        running = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(running,), name="openai-captioner-loop",
                                       daemon=True)
        self.thread.start()
        running.wait()  # so that close() right after start finds the loop running
        # Encoding a JPEG releases the GIL, so threads do encode in parallel.
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, os.cpu_count() or 1)),
                                       thread_name_prefix="openai-captioner-encode")
        self.client = httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(timeout),
            limits=httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                                keepalive_expiry=60.0),
        )
        self.concurrency = concurrency
        self.http_slots: asyncio.Semaphore | None = None
        self.prepare_slots: asyncio.Semaphore | None = None
        self.closed = False
        self._lock = threading.Lock()

    def _serve(self, running: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(running.set)
        self.loop.run_forever()

    def slots(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        """Created on the loop at first use. ``http_slots`` bounds requests in flight;
        ``prepare_slots`` lets as many more be encoded ahead, so encoding overlaps the
        requests in flight while at most 2 x concurrency encoded images sit in memory."""
        if self.http_slots is None or self.prepare_slots is None:
            self.http_slots = asyncio.Semaphore(self.concurrency)
            self.prepare_slots = asyncio.Semaphore(self.concurrency)
        return self.http_slots, self.prepare_slots

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            raise RuntimeError("OpenAICaptioner.generate cannot be called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller also stops the requests in flight
            raise

    async def _shutdown(self) -> None:
        # Requests left over from an interrupted batch are cancelled, not destroyed while pending.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self.client.aclose()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
            except Exception:  # closing connections is best effort
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self.thread:
                self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class OpenAICaptioner(Captioner):
    """Captions through an OpenAI-compatible ``/chat/completions`` endpoint.

    ``endpoint`` is the API base (see ``normalize_endpoint``: ``http://host:8000`` and
    ``http://host:8000/v1/`` both mean ``http://host:8000/v1``). ``model`` is the served
    model name. ``timeout`` bounds each phase of one attempt (connect, send, wait for the
    answer) in seconds. Call ``close()`` (or use it as a context manager) to drop the
    connections and stop the loop thread.
    """

    backend = "openai"

    def __init__(
        self,
        model: str,
        endpoint: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        image_format: str = "jpeg",
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if timeout <= 0 or max_retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("timeout must be positive; max_retries, backoff_base and backoff_max non-negative")
        fmt = image_format.lower().replace("jpg", "jpeg")
        if fmt not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
        self.model_id = model
        self.revision = None  # the server decides which weights it serves
        self.endpoint = normalize_endpoint(endpoint)
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.image_format = fmt
        self._key = _read_api_key(api_key_env)
        self._url = f"{self.endpoint}/chat/completions"
        self._shown = _display_url(self.endpoint)
        self._runtime: _Runtime | None = None
        self._finalizer: weakref.finalize | None = None
        self._rng = random.Random()

    def __repr__(self) -> str:
        key_state = "set" if self._key is not None else "unset"
        return (f"OpenAICaptioner(model={self.model_id!r}, endpoint={self._shown!r}, "
                f"api_key_env={self.api_key_env!r} ({key_state}), concurrency={self.concurrency})")

    def __enter__(self) -> OpenAICaptioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API

    def check(self) -> list[str]:
        """Ask the server which models it serves (``CaptionerError`` if ours is not one of them), then
        send it one caption request of a small grey image (one token): ``CaptionerError`` if it does
        not answer it. A server that lists the model but refuses our requests (a text-only model, a
        field it does not take, such as the vLLM and SGLang extension ``repetition_penalty`` on
        OpenAI's own API) would otherwise see every image recorded as a rejected caption in committed
        shards, which a rerun does not redo."""
        names = list_models(self.endpoint, self.api_key_env, model=self.model_id,
                            timeout=min(self.timeout, 30.0))
        probe = CaptionRequest(key="kiln-check", variant="check", image=Image.new("RGB", (64, 64), (128, 128, 128)),
                               prompt="Describe this image in one word.", sampling=Sampling(max_new_tokens=1))
        error = self.generate([probe])[0].error
        if error is not None:
            raise CaptionerError(f"{self._url_shown()} refuses caption requests for model {self.model_id!r}: "
                                 f"{error}. Is the model a vision-language model, and does the server take "
                                 "the fields vLLM's server takes (repetition_penalty)?")
        return names

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        """One Generation per request, in request order; see the module docstring for failures."""
        if not requests:
            return []
        runtime = self._runtime
        if runtime is None or runtime.closed:
            runtime = self._runtime = _Runtime(self.concurrency, self.timeout, _auth_headers(self._key))
            self._finalizer = weakref.finalize(self, runtime.close)
        return runtime.run(self._generate(runtime, requests))

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs runtime.close once, and never again at exit
        self._runtime = None
        self._finalizer = None

    # ------------------------------------------------------------------ internals

    async def _generate(self, runtime: _Runtime, requests: list[CaptionRequest]) -> list[Generation]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(runtime, r)) for r in requests]
        except BaseExceptionGroup as eg:  # a fatal status: the group cancelled the other requests
            fatal = [e for e in eg.exceptions if isinstance(e, CaptionerError)]
            if fatal:
                raise fatal[0] from None
            raise
        outcomes = [t.result() for t in tasks]
        # Any, not all: a server that dies while a batch is in flight leaves a mix of requests that
        # connected (and lost their connection) and requests that never did.
        lost = [o for o in outcomes if o.unreachable]
        if lost:
            raise CaptionerError(
                f"cannot reach the OpenAI-compatible server at {self._shown}: {len(lost)} of the "
                f"batch's {len(outcomes)} requests could not connect in their last attempt, after "
                f"{self.max_retries} retries each ({lost[0].generation.error}). Is the server (e.g. "
                "`vllm serve MODEL`) running and is the endpoint right?")
        # Logged once the batch is known to go on (a fatal batch would only repeat its error N times).
        for request, outcome in zip(requests, outcomes, strict=True):
            if outcome.generation.error is not None:
                log.warning("openai request %s to %s failed: %s", request.key, self._shown,
                            outcome.generation.error)
        return [o.generation for o in outcomes]

    async def _one(self, runtime: _Runtime, request: CaptionRequest) -> _Outcome:
        http_slots, prepare_slots = runtime.slots()
        async with prepare_slots:
            try:
                body = await asyncio.get_running_loop().run_in_executor(runtime.pool, self._body, request)
            except Exception as e:  # a broken image fails its request, not the batch
                return _Outcome(self._failed(f"could not encode the image: {type(e).__name__}: {e}"))
            await http_slots.acquire()
        try:
            return await self._send(runtime.client, request, body)
        finally:
            http_slots.release()

    def _body(self, request: CaptionRequest) -> bytes:
        """The request JSON, built on an encoding thread (JPEG + base64 + JSON of a large string)."""
        pil_format, mime = IMAGE_FORMATS[self.image_format]
        image = request.image if request.image.mode == "RGB" else request.image.convert("RGB")
        buf = io.BytesIO()
        options = {"quality": 95} if pil_format in ("JPEG", "WEBP") else {}
        image.save(buf, format=pil_format, **options)
        data_url = f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": request.prompt},
        ]})
        s = request.sampling
        body = {
            "model": self.model_id,
            "messages": messages,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            # The request's own seed, as in the other backends: one seed for every request would give
            # every image the same sampling noise, step by step.
            "seed": request_seed(s, request.key),
            # Not an OpenAI parameter; vLLM and SGLang take it at the top level of the body.
            "repetition_penalty": s.repetition_penalty,
            "n": 1,
            "stream": False,
        }
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    async def _send(self, client: httpx2.AsyncClient, request: CaptionRequest, body: bytes) -> _Outcome:
        headers = {"Content-Type": "application/json"}
        error = ""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            unreachable = False
            try:
                resp = await client.post(self._url, content=body, headers=headers)
            except httpx2.ConnectTimeout as e:
                unreachable = True
                error = f"connect timeout after {self.timeout:g}s ({e})"
            except httpx2.TimeoutException as e:
                error = f"no answer within {self.timeout:g}s ({type(e).__name__})"
            except httpx2.ConnectError as e:
                unreachable = True
                error = f"connection failed ({e})"
            except (httpx2.NetworkError, httpx2.RemoteProtocolError) as e:
                error = f"connection dropped ({type(e).__name__}: {e})"
            except httpx2.HTTPError as e:  # a local problem (protocol, proxy): retrying cannot help
                return _Outcome(self._failed(f"{type(e).__name__}: {e}"))
            else:
                status = resp.status_code
                if status == 200:
                    return _Outcome(self._parse(request, resp))
                message = _server_message(resp)
                if status in FATAL_STATUSES:
                    raise CaptionerError(self._scrub(
                        f"{self._url_shown()} answered HTTP {status}, {FATAL_STATUSES[status]}, "
                        f"for model {self.model_id!r}: {message}"))
                error = f"HTTP {status}: {message}"
                if not (status == 429 or status == 408 or status >= 500):
                    return _Outcome(self._failed(error))  # a bad request: retrying gives the same
                if status in RETRY_AFTER_STATUSES:
                    retry_after = _retry_after_seconds(resp.headers)
            if attempt + 1 == attempts:
                break
            delay = self._delay(attempt, retry_after)
            log.debug("openai request %s attempt %d/%d failed: %s; retrying in %.2fs",
                      request.key, attempt + 1, attempts, self._scrub(error), delay)
            await asyncio.sleep(delay)
        return _Outcome(self._failed(f"failed after {attempts} attempts: {error}"), unreachable=unreachable)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after + self._rng.uniform(0.0, self.backoff_base)
        cap = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        return cap * self._rng.uniform(0.5, 1.0)

    def _parse(self, request: CaptionRequest, resp: httpx2.Response) -> Generation:
        try:
            data = resp.json()
            choice = data["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content")
            if isinstance(content, list):  # some servers answer content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            text = "" if content is None else str(content)
            usage = data.get("usage") or {}
            tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            return self._failed(f"malformed answer ({type(e).__name__}: {e}): {resp.text[:200]}")
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal and not text:  # OpenAI's API: a refusal, not an empty caption
            return Generation(text=refusal, finish_reason="refused", tokens=tokens)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Generation(text=text, finish_reason=finish, tokens=tokens)

    def _failed(self, error: str) -> Generation:
        return Generation(text="", finish_reason="error", error=self._scrub(error))

    def _scrub(self, text: str) -> str:
        return _scrub(text, self._key)

    def _url_shown(self) -> str:
        return f"{self._shown}/chat/completions"
