"""Captioning backends: transformers (batched generate), vllm (in-process, GPU) and openai
(any OpenAI-compatible server: `vllm serve`, SGLang, ...), chosen by --backend."""

from __future__ import annotations

from curate.captioners.base import Captioner, CaptionerError, CaptionRequest, Generation, Sampling

__all__ = ["Captioner", "CaptionerError", "CaptionRequest", "Generation", "Sampling", "open_captioner",
           "choose_backend"]


def choose_backend(backend: str) -> str:
    """`auto` is vllm when it is importable and a GPU is present, else transformers."""
    if backend != "auto":
        return backend
    from curate.captioners.vllm_backend import vllm_available

    return "vllm" if vllm_available() else "transformers"


def open_captioner(
    backend: str,
    model: str,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    batch_size: int = 8,
    concurrency: int = 16,
    max_pixels: int = 802_816,
    api_key_env: str = "OPENAI_API_KEY",
) -> Captioner:
    """Load ``model`` (a Hub id, a local folder or, for openai, the served model name)."""
    if backend == "transformers":
        from curate.captioners.transformers_backend import TransformersCaptioner

        return TransformersCaptioner(model, revision=revision, batch_size=batch_size)
    if backend == "vllm":
        from curate.captioners.vllm_backend import VLLMCaptioner

        return VLLMCaptioner(model, revision=revision, max_pixels=max_pixels)
    if backend == "openai":
        if not endpoint:
            raise CaptionerError("--backend openai needs --endpoint, e.g. http://localhost:8000/v1")
        from curate.captioners.openai_backend import OpenAICaptioner

        captioner = OpenAICaptioner(model, endpoint, api_key_env=api_key_env, concurrency=concurrency)
        captioner.check()  # a wrong endpoint or model name fails here, before any shard
        return captioner
    raise CaptionerError(f"unknown backend {backend!r} (auto, transformers, vllm, openai)")
