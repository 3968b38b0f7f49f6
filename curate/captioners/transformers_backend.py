"""The ``transformers`` backend: batched ``generate`` with left padding, one model per process.

Loading is the path users take with real weights: ``AutoProcessor.from_pretrained`` and
``AutoModelForImageTextToText.from_pretrained`` (a Hub id or a local folder, ``revision``
pinned if given). Under ``torchrun --nproc_per_node N`` each worker takes ``cuda:LOCAL_RANK``.

What is guaranteed about the text (``generate``):

- Same requests, same batch size, same device and dtype: the same text, every run.
- Greedy decoding (``temperature == 0``): prompts are left-padded and masked, so a request
  gives the same text in a batch of any size and composition as alone, in float32 (tests on
  CPU; also seen on an H100). In bf16 on a GPU, batch shapes change the kernels' rounding
  and a near-tie can flip a token, after which the text diverges (on the tiny random model,
  whose logits are nearly flat: 1 to 3 captions in 16 differed from one-at-a-time).
- Sampling (``temperature > 0``) is seeded *per request*: each request draws from its own
  generator, seeded from ``(sampling.seed, request.key)`` (:func:`request_seed`), so its
  text does not depend on the rest of the batch, on ``batch_size``, on an out-of-memory
  split or on a rerun of the stage (16 in 16 captions equal to one-at-a-time on an H100 in
  bf16 and float32, and on CPU). Not across devices: CPU and CUDA generators differ. The
  global torch RNG is neither used nor touched.

How sampling works, and why: ``generate``'s own sampling draws from the global RNG for the
whole batch at once, so a request's text would depend on its neighbours. Instead the model
runs in greedy mode and :class:`SeededSampler`, the last logits processor, does temperature,
top-p and a Gumbel-max draw with the request's own generator, then leaves only the drawn
token finite, which the greedy ``argmax`` picks. Repetition penalty is applied by
``generate`` before it, as usual. The model's ``generation_config.json`` sampling defaults
(Qwen2-VL-Instruct ships ``top_k=1``, ``top_p=0.001``, which would silently turn sampling
into greedy decoding) are therefore never applied: a request's :class:`Sampling` is the
whole truth.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from curate.models import resolved_commit
from curate.runner import default_device, resolve_device

from .base import Captioner, CaptionerError, CaptionRequest, Generation, Sampling, request_seed

log = logging.getLogger(__name__)

__all__ = [
    "SeededSampler",
    "TransformersCaptioner",
    "chat_messages",
    "default_device",
    "request_seed",
]

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


def chat_messages(request: CaptionRequest) -> list[dict[str, Any]]:
    """The chat for one request: optional system message, then the image and the prompt.

    Content as a list of typed parts (not a plain string), the form every VLM chat template
    (and vLLM's chat parser) accepts.
    """
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": request.system}]})
    messages.append(
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": request.prompt}],
        }
    )
    return messages


class SeededSampler(LogitsProcessor):
    """Temperature + top-p sampling where row ``i`` draws from its own seeded generator.

    The draw is the Gumbel-max trick: ``argmax(logits / T - log E)`` with ``E ~ Exp(1)`` per
    token, which samples exactly from ``softmax(logits / T)`` (restricted to the top-p
    nucleus). Why not inverse-CDF sampling (one uniform number against the cumulative
    probabilities)? With a 152k vocabulary each token's slice of the CDF is tiny, so the
    rounding differences between a batched and an unbatched forward pass (around 1e-6)
    moved the draw to a neighbouring token several times per caption; the Gumbel race only
    changes when its two best scores are within that rounding, about one step in a million.

    Returns scores that are ``-inf`` everywhere but the drawn token, so ``generate`` must run
    with ``do_sample=False`` (its ``argmax`` then picks the draw). Rows that already finished
    still draw (their token is replaced by padding), so a row's t-th token always uses its
    generator's t-th draw. Generators live on the scores' device: the same request gives the
    same text on the same kind of device, not across CPU and GPU.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        if temperature <= 0:
            raise ValueError("SeededSampler needs temperature > 0 (use greedy decoding for 0)")
        self.seeds = [int(seed) for seed in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows of scores for {len(self.seeds)} seeds")
        if self.generators is None:  # created here, where the device is known
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds
            ]
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        vocab = logits.shape[-1]
        noise = torch.stack(
            [
                torch.empty(vocab, device=logits.device).exponential_(generator=g)
                for g in self.generators
            ]
        )
        # tiny, not 0: log(0) would make a token outside the nucleus win with -inf + inf = nan.
        token = (logits - noise.clamp_min_(torch.finfo(noise.dtype).tiny).log()).argmax(
            dim=-1, keepdim=True
        )
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def _looks_like_path(model: str) -> bool:
    """A local path rather than a Hub id (which also contains a slash: ``org/name``)."""
    return model.startswith(("/", "./", "../", "~"))


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype | str:
    if dtype is None:
        if device.type == "cuda":
            # bf16 where the GPU has it (Ampere and later), fp16 on older cards (V100, T4).
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "auto":
        return "auto"  # whatever the checkpoint's config says
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}"
        ) from None


def _default_attention(device: torch.device, dtype: torch.dtype | str) -> str:
    """flash_attention_2 on a GPU in half precision when a working flash-attn is installed, else sdpa."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    try:  # also checks the installed version against this transformers
        from transformers.utils import is_flash_attn_2_available

        return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"
    except ImportError:
        return "sdpa"


class TransformersCaptioner(Captioner):
    """A vision-language model loaded through transformers' Auto classes, batched with left padding.

    ``batch_size`` is the largest batch; after a CUDA out-of-memory error the batch is halved
    and retried (down to 1), and later batches keep the smaller size (``self.batch_size``),
    since the same pixel budget would run out of memory again.
    """

    backend = "transformers"

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        attn_implementation: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # from_pretrained does not expand "~"; a Hub id never starts with it.
        self.model_id = os.path.expanduser(model) if str(model).startswith("~") else str(model)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            # Kernels that use the "current" device (flash-attn, some processors) must agree.
            torch.cuda.set_device(self.device)
        torch_dtype = _resolve_dtype(dtype, self.device)
        if _looks_like_path(self.model_id) and not Path(self.model_id).exists():
            raise CaptionerError(f"cannot load model {self.model_id!r}: no such folder")

        at = f" at revision {revision!r}" if revision else ""
        try:
            config = AutoConfig.from_pretrained(self.model_id, revision=revision)
        except Exception as e:
            raise CaptionerError(
                f"cannot load model {self.model_id!r}{at}: {type(e).__name__}: {e}"
            ) from e
        # Load every file from the commit the config came from, even if the branch moves meanwhile.
        self.revision = resolved_commit(self.model_id, revision, config)
        if self.revision is not None and _COMMIT_HASH.fullmatch(self.revision):
            revision = self.revision
        # Checked on the config (small) before any weights are read.
        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise CaptionerError(
                f"model {self.model_id!r}{at} is not a vision-language model: its type "
                f"{config.model_type!r} has no AutoModelForImageTextToText class"
            )
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id, revision=revision)
        except Exception as e:
            raise CaptionerError(
                f"cannot load the processor of model {self.model_id!r}{at}: {type(e).__name__}: {e}"
            ) from e
        tokenizer = getattr(self.processor, "tokenizer", None)
        if getattr(self.processor, "image_processor", None) is None or tokenizer is None:
            raise CaptionerError(
                f"model {self.model_id!r} has no image processor and tokenizer: AutoProcessor "
                f"gave {type(self.processor).__name__}"
            )
        # Left padding: every row's last prompt token sits at the end, where generation starts.
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer

        attn = attn_implementation or _default_attention(self.device, torch_dtype)
        try:
            self.model = self._load_model(revision, torch_dtype, attn)
        except Exception as e:
            if attn_implementation is None and attn != "sdpa":
                # Our own choice of flash-attn failed (an incompatible build): sdpa always works.
                log.warning("loading %s with %s failed (%s); using sdpa", self.model_id, attn, e)
                attn = "sdpa"
                try:
                    self.model = self._load_model(revision, torch_dtype, attn)
                except Exception as e2:
                    raise self._load_error(revision, e2) from e2
            else:
                raise self._load_error(revision, e) from e
        self.attn_implementation = attn
        self.dtype = self.model.dtype

        # Stop at any end-of-sequence id the generation config or the tokenizer knows, so a
        # caption is cut at the first one, and count tokens up to it.
        gen = self.model.generation_config
        eos = gen.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        if not eos_ids:
            raise CaptionerError(f"model {self.model_id!r} has no end-of-sequence token")
        self.eos_token_ids = sorted(eos_ids)
        pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]
        log.info(
            "loaded %s (revision %s) on %s, %s, attention %s, batch %d",
            self.model_id, self.revision, self.device, self.dtype, attn, self.batch_size,
        )

    def _load_model(self, revision: str | None, dtype: torch.dtype | str, attn: str) -> Any:
        # device_map: weights go straight to the GPU instead of through a CPU copy.
        model = AutoModelForImageTextToText.from_pretrained(
            self.model_id,
            revision=revision,
            dtype=dtype,
            attn_implementation=attn,
            device_map=str(self.device),
        )
        return model.eval()

    def _load_error(self, revision: str | None, e: Exception) -> CaptionerError:
        at = f" at revision {revision!r}" if revision else ""
        return CaptionerError(f"cannot load model {self.model_id!r}{at}: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[CaptionRequest]) -> list[Generation]:
        """One generation per request, in request order (see the module docstring for seeding)."""
        results: list[Generation | None] = [None] * len(requests)
        groups: dict[Sampling, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.sampling, []).append(i)
        for sampling, indices in groups.items():
            # Similar sizes side by side, so a batch wastes little compute on padding (the
            # outputs do not depend on the batch a request lands in).
            indices.sort(key=lambda i: -requests[i].image.width * requests[i].image.height)
            self._generate_group([requests[i] for i in indices], indices, sampling, results)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _generate_group(
        self,
        batch_requests: list[CaptionRequest],
        indices: list[int],
        sampling: Sampling,
        results: list[Generation | None],
    ) -> None:
        start = 0
        while start < len(batch_requests):
            size = min(self.batch_size, len(batch_requests) - start)
            batch = batch_requests[start : start + size]
            try:
                outs = self._generate_batch(batch, sampling)
            except torch.cuda.OutOfMemoryError as e:
                self._free_memory()
                if size > 1:
                    self.batch_size = max(1, size // 2)
                    log.warning(
                        "CUDA out of memory on a batch of %d; retrying with batches of %d "
                        "(set --batch-size %d to skip this)",
                        size, self.batch_size, self.batch_size,
                    )
                    continue
                outs = [_error(f"CUDA out of memory on a single image: {e}")]
            except torch.AcceleratorError as e:
                raise _device_failed(e) from e
            except Exception as e:
                # A request the processor or model rejects (an extreme aspect ratio, say)
                # must not fail its neighbours: isolate it by running the batch one by one.
                if size > 1:
                    log.warning("batch of %d failed (%s: %s); retrying one by one",
                                size, type(e).__name__, e)
                    outs = [self._generate_one(request, sampling) for request in batch]
                else:
                    log.warning("request %s failed: %s: %s", batch[0].key, type(e).__name__, e)
                    outs = [_error(f"{type(e).__name__}: {e}")]
            for i, out in zip(indices[start : start + size], outs, strict=True):
                results[i] = out
            start += size

    def _generate_one(self, request: CaptionRequest, sampling: Sampling) -> Generation:
        try:
            return self._generate_batch([request], sampling)[0]
        except torch.cuda.OutOfMemoryError as e:
            self._free_memory()
            return _error(f"CUDA out of memory on a single image: {e}")
        except torch.AcceleratorError as e:
            raise _device_failed(e) from e
        except Exception as e:
            log.warning("request %s failed: %s: %s", request.key, type(e).__name__, e)
            return _error(f"{type(e).__name__}: {e}")

    def _generate_batch(self, batch: list[CaptionRequest], sampling: Sampling) -> list[Generation]:
        texts = [
            self.processor.apply_chat_template(
                chat_messages(r), tokenize=False, add_generation_prompt=True
            )
            for r in batch
        ]
        inputs = self.processor(
            text=texts, images=[r.image for r in batch], padding=True, return_tensors="pt"
        )
        inputs = inputs.to(self.device, dtype=self.dtype)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": False,  # sampling, if any, is SeededSampler's (see module docstring)
            "repetition_penalty": sampling.repetition_penalty,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            # Unset the checkpoint's sampling defaults so generate() neither applies nor warns.
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }
        if sampling.temperature > 0:
            seeds = [request_seed(sampling, r.key) for r in batch]
            kwargs["logits_processor"] = LogitsProcessorList(
                [SeededSampler(seeds, sampling.temperature, sampling.top_p)]
            )
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **kwargs)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :].tolist()
        return [self._to_generation(row) for row in new_tokens]

    def _to_generation(self, row: list[int]) -> Generation:
        eos = self.eos_token_ids
        stop = next((i for i, token in enumerate(row) if token in eos), None)
        if stop is None:  # ran to max_new_tokens without an end-of-sequence token
            return Generation(self._decode(row), "length", tokens=len(row))
        return Generation(self._decode(row[:stop]), "stop", tokens=stop + 1)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Drop the model and free its GPU memory (the captioner is unusable afterwards)."""
        for name in ("model", "processor", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        self._free_memory()


def _error(message: str) -> Generation:
    return Generation("", "error", tokens=0, error=message)


def _device_failed(e: Exception) -> CaptionerError:
    """A CUDA error other than out-of-memory (an illegal memory access, a device-side assert) leaves
    the device unusable for this process: every later request would fail too, and the stage would
    commit each as a rejected caption that a rerun does not redo. It stops the stage instead."""
    return CaptionerError(f"the accelerator failed ({type(e).__name__}: {e}); this process cannot caption "
                          "any more: rerun the stage (the shard in progress is not committed)")
