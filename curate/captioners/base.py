"""What every captioning backend implements, and what it is given.

The recaption stage owns everything backends share (prompts, decoding and resizing of
images, quality control, retries, writing); a backend only turns a batch of
(image, prompt, sampling) requests into generations. That keeps the vLLM backend, which
cannot run in CI, thin, and everything else tested.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from curate.runner import CurateError

# "refused": the server said the model refused (OpenAI's message.refusal), whatever its words.
FinishReason = Literal["stop", "length", "error", "refused"]


@dataclass(frozen=True)
class Sampling:
    """Sampling for one attempt. Retries of a flagged caption use another seed and temperature."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 384
    seed: int = 0
    repetition_penalty: float = 1.05

    def for_attempt(self, attempt: int) -> Sampling:
        """Attempt 0 is the configured sampling; each retry gets a new seed and a bit more temperature
        (up to 1.2, and never less than the configured one, however high that is)."""
        if attempt == 0:
            return self
        return Sampling(
            temperature=max(self.temperature, min(1.2, max(self.temperature, 0.5) + 0.2 * attempt)),
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed + 1000 * attempt,
            repetition_penalty=self.repetition_penalty + 0.05 * attempt,
        )

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "repetition_penalty": self.repetition_penalty}


def request_seed(sampling: Sampling, key: str) -> int:
    """The seed of one request's random stream: a 63-bit hash of the sampling seed and the key.

    A hash (not ``seed + index``) so that it does not depend on the request's position in a
    batch; 63 bits because vLLM and torch generators take a signed 64-bit seed. Every backend
    seeds a request with it (the openai one sends it as the request's ``seed``), so that requests
    draw independent noise and a rerun draws the same.
    """
    digest = hashlib.blake2b(f"{sampling.seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class CaptionRequest:
    """One caption to generate: an RGB image already resized to the pixel budget, and the prompt."""

    key: str  # the sample's key (with the variant, unique within a batch)
    variant: str  # long, short, ...
    image: Image.Image  # RGB, at most --max-pixels
    prompt: str  # the user message text; the backend adds the image and the chat template
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None  # optional system message


@dataclass
class Generation:
    text: str  # the raw generated text, special tokens removed
    finish_reason: FinishReason  # "length" means the token limit cut it
    tokens: int = 0  # generated tokens (for tokens/s)
    error: str | None = None  # backend failure after its own retries (finish_reason "error")


class Captioner:
    """A loaded vision-language model behind one backend."""

    backend: str = "base"
    model_id: str = ""  # Hub id, local folder or served model name
    revision: str | None = None

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        """One generation per request, in order. Failures are Generations with an error, not exceptions,
        unless the backend cannot work at all (then raise CaptionerError)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model / connections."""


class CaptionerError(CurateError, RuntimeError):
    """The backend cannot work at all (model not found, server unreachable after retries, ...).

    A CurateError, so that one raised in the middle of a run (the server gone, its key revoked) is
    the CLI's clear error with exit code 2, as one raised while loading is."""
